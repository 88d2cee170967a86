"""Host memory under --fsdp around loading, checkpointing and resuming: a 410m-shaped policy on 2 CPU ranks (gloo).

    python bench/checkpoint_memory.py     # about 5 minutes on 2 CPU cores

Each phase runs under torchrun as the scripts run it (models.load_causal_lm, prepare_model, save_checkpoint,
load_checkpoint) on a random 410m-shaped GPT-NeoX (toy vocabulary) with AdamW, and records each rank's peak resident
memory (ru_maxrss) after it:
1. loading: only rank 0 reads the checkpoint (models.rank_0_loads), or every rank (as before);
2. one training step (forward, backward, AdamW), then a sharded save (checkpoints.save_checkpoint: each rank its own
   shards), then the old full save (every tensor gathered on rank 0, torch.save);
3. a new process: loading, then resuming from the sharded checkpoint.
The peak never falls, so a phase that needs no more memory than the ones before it leaves the peak unchanged.
Writes <output_dir>/checkpoint_memory.md and .json.
"""

import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    size: str = "410m"  # Pythia shape (toy vocabulary)
    output_dir: str = "bench/results"  # checkpoint_memory.md/.json go here; the checkpoint under <output_dir>/runs/


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def phase(name: str, size: str, run_dir: str):
    """Run under torchrun: one of the measured sequences; each rank writes rank<r>_<name>.json."""
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from throughput import make_models

    from plumbing import checkpoints, models, run

    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), {}
    policy_dir = make_models(size, Path(run_dir), torch.device("cpu"))[0] if rank == 0 else None
    policy_dir = run.broadcast_object(policy_dir)
    out["start"] = peak_gib()
    rank_0_loads = name != "load_every_rank"
    model = models.load_causal_lm(policy_dir, torch.float32, rank_0_loads=rank_0_loads)
    model = models.shard_model(model, torch.float32, rank_0_loads)
    out["loaded"] = peak_gib()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    trained = {"policy": (model, optimizer)}
    if name == "resume":
        checkpoints.load_checkpoint(run_dir, trained)
        out["resumed"] = peak_gib()
    elif name == "train_and_save":
        ids = torch.randint(3, 600, (4, 128), generator=torch.Generator().manual_seed(rank))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        out["trained"] = peak_gib()
        checkpoints.save_checkpoint(run_dir, trained, {"iteration": 1})
        out["sharded save"] = peak_gib()
        state = checkpoints.training_state(trained)  # the old way: every tensor gathered on rank 0
        if rank == 0:
            torch.save(state, os.path.join(run_dir, "full_checkpoint.pt"))
        del state
        dist.barrier()
        out["full save"] = peak_gib()
    (Path(run_dir) / f"rank{rank}_{name}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main():
    args = tyro.cli(Args)
    run_dir = Path(args.output_dir) / "runs" / f"checkpoint_memory_{args.size}"
    subprocess.run(["rm", "-rf", str(run_dir / "checkpoint"), str(run_dir / "full_checkpoint.pt")], check=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for name in ("load_every_rank", "train_and_save", "resume"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               __file__, "--phase", name, "--size", args.size, "--run-dir", str(run_dir)]  # fmt: skip
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        results[name] = [json.loads((run_dir / f"rank{r}_{name}.json").read_text()) for r in range(2)]
    lines = [f"# Host memory under --fsdp, {args.size}-shaped policy, 2 CPU ranks: peak RSS (GiB) after each phase",
             "", "| run | phase | rank 0 | rank 1 |", "|---|---|---|---|"]  # fmt: skip
    for name, ranks in results.items():
        for key in ranks[0]:
            lines.append(f"| {name} | {key} | {ranks[0][key]:.2f} | {ranks[1][key]:.2f} |")
    (Path(args.output_dir) / "checkpoint_memory.md").write_text("\n".join(lines) + "\n")
    (Path(args.output_dir) / "checkpoint_memory.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    if "--phase" in sys.argv:
        flags = dict(zip(sys.argv[1::2], sys.argv[2::2]))
        phase(flags["--phase"], flags["--size"], flags["--run-dir"])
    else:
        main()
