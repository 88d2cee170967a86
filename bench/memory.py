"""Peak memory per rank of ppo.py under DDP, DDP + LoRA and FSDP2, with and without activation checkpointing,
micro-batches and --num-layers-unfrozen, for random Pythia-shaped models (no download); next to each measurement
the per-rank memory model's prediction, and the model's table for the papers' sizes on 8 x 80 GB.

    python bench/memory.py                          # 70m and 160m shapes, 2 ranks, about 10 minutes on 2 CPU cores
    python bench/memory.py --sizes 70m 160m 410m    # 410m: FSDP and LoRA only (DDP needs ~30 GB for 2 ranks)

Measured: what ppo.py logs as time/peak_memory_gb on rank 0 (peak resident memory on CPU, which includes the
Python/torch runtime, with glibc returning freed blocks of 64 KiB and more at once; torch.cuda.max_memory_allocated
on CUDA). Predicted: `memory_model` below, whose bytes per
parameter follow from what each mode keeps (weights, gradients, AdamW, DDP buckets, gathered FSDP weights) and
whose two free constants (runtime memory, activation bytes per token, layer and hidden unit) are fitted to the
measurements by least squares. Results go to <output_dir>/memory_<device>.md and .json.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import REPO, SIZES, make_models  # noqa: E402

# flags of each measured mode (added to the common flags of `measure`)
MODES = {
    "ddp": [],
    "ddp + AC": ["--activation-checkpointing"],
    "ddp, micro 1": ["--micro-batch-size", "1"],
    "ddp, unfrozen 2": ["--num-layers-unfrozen", "2"],
    "ddp + LoRA": ["--use-lora"],
    "fsdp": ["--fsdp"],
    "fsdp + AC": ["--fsdp", "--activation-checkpointing"],
    "fsdp, micro 1": ["--fsdp", "--micro-batch-size", "1"],
    "fsdp, unfrozen 2": ["--fsdp", "--num-layers-unfrozen", "2"],
}
TOY_VOCAB = 635  # the toy tokenizer: the benchmark's models use it, so logits are small here (not at 50k)


@dataclass
class Args:
    sizes: tuple[str, ...] = ("70m", "160m")
    """random Pythia shapes to measure (14m 70m 160m 410m ...); 410m and above skip the DDP modes"""
    modes: tuple[str, ...] = tuple(MODES)
    """which modes to measure"""
    nproc: int = 2
    """ranks (torchrun --nproc_per_node)"""
    rollout_batch_size: int = 8
    """prompts per iteration (all ranks); also the minibatch, so each rank trains on rollout/nproc rows at once"""
    max_new_tokens: int = 128
    """response length (random models rarely emit EOS, so nearly every response has this length)"""
    output_dir: str = "bench/results"
    """where memory_<device>.md/.json go; runs and random models under <output_dir>/runs/"""
    reuse: bool = False
    """reuse measurements already in memory_<device>.json (re-fit and re-print only)"""
    predict: list[str] = field(default_factory=lambda: ["1b", "6.9b"])
    """Pythia sizes of the predicted 8 x 80 GB table"""


def parameters(hidden: int, layers: int, vocab: int) -> int:
    """GPT-NeoX parameters: input embedding + untied head (V h each), 12 h^2 + 13 h per layer, final norm."""
    return 2 * vocab * hidden + layers * (12 * hidden**2 + 13 * hidden) + 2 * hidden


def linear_parameters(hidden: int, layers: int, vocab: int) -> int:
    """GPT-NeoX parameters in Linear layers (12 h^2 + 9 h per layer: QKV, output, the MLP's two) and the untied head
    (V h): what a frozen net stores in the compute dtype (models.frozen_linears_to) and autocast casts when trained."""
    return layers * (12 * hidden**2 + 9 * hidden) + vocab * hidden


def memory_model(
    shape: tuple[int, int, int], rm_params: int, mode: str, world: int, nbytes: int, rows: int, seq: int,
    gen_rows: int, response: int, k_act: float, runtime: float, unfrozen: int = -1,
) -> dict[str, float]:  # fmt: skip
    """Bytes per rank, by term. shape = (hidden, layers, vocab) of policy and value net; rm_params of the reward
    model; nbytes the compute dtype's bytes; rows per forward/backward (micro-batch), seq = prompt + response
    tokens; gen_rows generated at once. The peak is the static memory plus the largest transient phase."""
    hidden, layers, vocab = shape
    p, linear = parameters(hidden, layers, vocab), linear_parameters(hidden, layers, vocab)
    fsdp, lora, ac = mode.startswith("fsdp"), "LoRA" in mode, "AC" in mode
    trained = 0.0 if lora else (1.0 if unfrozen < 0 else (unfrozen * 12 * hidden**2 + vocab * hidden) / p)
    shard = world if fsdp else 1
    per_net = (nbytes * p if lora else 4 * p + 12 * trained * p) / shard  # weights (+ grads + AdamW m, v) of a net
    ddp_buckets = 0 if fsdp or world == 1 else 4 * trained * p  # DDP's gradient buckets, one more gradient copy
    # the reference: under FSDP gathered in the compute dtype; else its Linear weights stored in the compute dtype,
    # the rest (embeddings, norms) in float32, so that it computes exactly what the policy computes
    reference = nbytes * p / world if fsdp else nbytes * linear + 4 * (p - linear)
    static = {
        "policy + value": 2 * (per_net + ddp_buckets),
        "reference": 0 if lora else reference,
        "reward model": nbytes * rm_params / shard,
    }
    # under 16-bit autocast (not FSDP, which gathers in that dtype): the 16-bit copies of the trained float32 Linear
    # weights that autocast keeps until its block ends (the policy's in generation and in its no-grad pass, both
    # nets' in the update, whose forwards share one block); frozen Linear weights are stored in that dtype already
    trained_linear = 0 if lora else (linear if unfrozen < 0 else unfrozen * 12 * hidden**2 + vocab * hidden)
    cast = nbytes < 4 and not fsdp
    policy_copies = nbytes * trained_linear if cast else 0
    value_copies = nbytes * (trained_linear - vocab * hidden) if cast else 0  # (a value net has no LM head)
    gathered = nbytes * max(p, rm_params) if fsdp else 0  # one full model during a no-grad pass / generation
    kv_cache = 2 * layers * hidden * nbytes * gen_rows * seq
    logits = 4 * rows * response * vocab * 3  # float32 logits / T, their log-softmax and its gradient
    kept = layers * (1 + k_act / layers) if ac else layers * k_act  # AC: each layer's input + one layer recomputed
    activations = 2 * rows * seq * hidden * nbytes * kept  # policy and value net both wait for backward
    layer_gather = 2 * nbytes * 12 * hidden**2 if fsdp else 0  # a layer in use and the next one prefetched
    transient = {
        "generation": gathered + kv_cache + policy_copies,
        "no-grad passes": gathered + 4 * gen_rows * response * vocab * 2 + policy_copies,
        "update": activations + logits + layer_gather + policy_copies + value_copies,
    }
    phase = max(transient, key=transient.get)
    return {**static, "runtime": runtime, "peak phase": phase, phase: transient[phase],
            "total": sum(static.values()) + runtime + transient[phase], "autocast copies": policy_copies + value_copies,
            **{f"phase/{name}": value for name, value in transient.items()}}  # fmt: skip


def measure(size: str, mode: str, args: Args, models: tuple[str, str], run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--standalone",
           str(REPO / "ppo.py"), "--model", models[0], "--reward-model", models[1], "--eval-reward", "",
           "--output-dir", str(run_dir), "--total-episodes", str(args.rollout_batch_size),
           "--rollout-batch-size", str(args.rollout_batch_size), "--mini-batch-size", str(args.rollout_batch_size),
           "--max-new-tokens", str(args.max_new_tokens), "--eval-size", str(args.nproc), "--save-every", "0",
           "--update-epochs", "1", *MODES[mode]]  # fmt: skip
    print(f"{size} {mode}: {' '.join(cmd[7:])}", flush=True)
    # one thread per rank (never more threads than cores); on CPU, glibc serves every block of 64 KiB or more with its
    # own mmap and returns it when freed, so the peak resident size follows the live tensors (not heap fragments)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"error: {size} {mode} failed:\n{result.stderr[-3000:]}")
    row = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][-1]
    shutil.rmtree(run_dir)
    return {"size": size, "mode": mode, "peak_gb": row["time/peak_memory_gb"], "decode_steps": row["time/decode_steps"]}


def predict_cpu(m: dict, args: Args, k_act: float, runtime: float) -> dict:
    hidden, layers, _ = SIZES[m["size"]]
    shape = (hidden, layers, TOY_VOCAB)
    rows = 1 if "micro 1" in m["mode"] else args.rollout_batch_size // args.nproc
    unfrozen = 2 if "unfrozen 2" in m["mode"] else -1
    seq = 17 + m["decode_steps"]  # toy prompts are 14-20 tokens
    return memory_model(shape, parameters(*shape), m["mode"], args.nproc, 4, rows, seq,
                        args.rollout_batch_size // args.nproc, m["decode_steps"], k_act, runtime, unfrozen)  # fmt: skip


def update_memory(size: str, policy_path: str, rows: int, seq: int, checkpointed: bool) -> dict:
    """Tensor memory of one update step alone (the policy's and the value net's forward and backward on `rows` rows
    of `seq` tokens, the second half of them the response), tracked tensor by tensor by torch's MemTracker: the
    peak of everything allocated during the step, minus the weights and gradients, is the activation memory."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from common import gather_logprobs, response_logits
    from plumbing.models import checkpoint_layers, load_causal_lm, load_value_model

    policy = load_causal_lm(policy_path, torch.float32)
    value_model = load_value_model(policy_path, torch.float32, "--model")
    if checkpointed:
        checkpoint_layers(policy), checkpoint_layers(value_model)
    ids = torch.randint(2, TOY_VOCAB - 1, (rows, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    tracker = MemTracker()
    tracker.track_external(policy, value_model)
    with tracker:
        logits = response_logits(policy, ids, mask, seq // 2, 1.0)
        values = value_model(ids, mask)[:, seq // 2 - 1 : -1]
        (-gather_logprobs(logits, ids[:, seq // 2 :]).mean() + values.pow(2).mean()).backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    activations = sum(v for k, v in peak.items() if getattr(k, "value", k) in ("Activation", "Temp"))
    return {"size": size, "rows": rows, "seq": seq, "checkpointed": checkpointed, "activation_bytes": activations}


def activation_term(m: dict) -> float:
    """The bytes per unit of k_act of an update_memory() measurement, and the k_act-free part (AC's kept inputs)."""
    hidden, layers, _ = SIZES[m["size"]]
    per_layer = 2 * m["rows"] * m["seq"] * hidden * 4  # two nets, float32
    return per_layer * (1 if m["checkpointed"] else layers), per_layer * layers if m["checkpointed"] else 0.0


def fit(measurements: list[dict], updates: list[dict], args: Args) -> tuple[float, float]:
    """k_act: least squares through the update-step activation measurements (activation bytes = k_act x term +
    AC's kept inputs); runtime: the mean residual of the whole-run peaks given k_act."""
    terms = [activation_term(u) for u in updates]
    k_act = sum(t * (u["activation_bytes"] - fixed) for u, (t, fixed) in zip(updates, terms)) / sum(
        t * t for t, _ in terms
    )
    residuals = [m["peak_gb"] * 2**30 - predict_cpu(m, args, k_act, 0.0)["total"] for m in measurements]
    return k_act, sum(residuals) / len(residuals)


def main():
    args = tyro.cli(Args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.output_dir)
    path = out / f"memory_{device}.json"
    measurements = json.loads(path.read_text())["measurements"] if args.reuse and path.exists() else []
    done = {(m["size"], m["mode"]) for m in measurements}
    for size in args.sizes:
        models = make_models(size, out / "runs", torch.device("cpu"))
        for mode in args.modes:
            big = SIZES[size][0] >= 1024
            if (size, mode) in done or (big and mode.startswith("ddp") and "LoRA" not in mode):
                continue
            measurements.append(measure(size, mode, args, models, out / "runs" / "memory_run"))
            path.write_text(json.dumps({"args": vars(args), "measurements": measurements}, indent=1))
    updates = []
    for size in args.sizes:
        if SIZES[size][0] < 1024:  # in-process, one rank: 410m and above would take long for the same slope
            policy_path = make_models(size, out / "runs", torch.device("cpu"))[0]
            for rows, checkpointed in [(2, False), (4, False), (4, True)]:  # (1 row: MemTracker misses most)
                updates.append(update_memory(size, policy_path, rows, 256, checkpointed))
                print(updates[-1], flush=True)
    k_act, runtime = fit(measurements, updates, args)
    gb = 2**30
    lines = [
        f"# Peak memory per rank: ppo.py, {args.nproc} ranks, {device}, float32 (measured) vs the memory model\n",
        f"Rollout {args.rollout_batch_size} prompts (= the minibatch), up to {args.max_new_tokens} new tokens, one "
        f"iteration. Fitted: runtime {runtime / gb:.2f} GiB, activations {k_act:.1f} x hidden x dtype bytes per "
        "token and layer and network (from the update steps below).\n",
        "| size | params | mode | measured GiB | predicted GiB | predicted peak phase |",
        "|---|---|---|---|---|---|",
    ]
    for m in measurements:
        p = predict_cpu(m, args, k_act, runtime)
        n = parameters(SIZES[m["size"]][0], SIZES[m["size"]][1], TOY_VOCAB)
        lines.append(f"| {m['size']} | {n / 1e6:.0f}M | {m['mode']} | {m['peak_gb']:.2f} | {p['total'] / gb:.2f} "
                     f"| {p['peak phase']} |")  # fmt: skip
    lines += ["", "## One update step alone: activation memory (MemTracker: peak tensors less weights and gradients)",
              "", "| size | rows x tokens | activation checkpointing | measured MiB | predicted MiB |",
              "|---|---|---|---|---|"]  # fmt: skip
    for u in updates:
        term, fixed = activation_term(u)
        lines.append(f"| {u['size']} | {u['rows']} x {u['seq']} | {'yes' if u['checkpointed'] else 'no'} "
                     f"| {u['activation_bytes'] / 2**20:.0f} | {(k_act * term + fixed) / 2**20:.0f} |")  # fmt: skip
    lines += ["", "## Predicted: 8 ranks x 80 GB, bfloat16, Pythia vocabulary (50304), 6B reward model (GPT-J shape)",
              "", "Per rank: micro-batches of 1000-token rows (872 prompt + 128 response), 16 rollouts generated at "
              "once; CUDA runtime (context, allocator slack) not included.", "",
              "| policy | mode | rows per micro-batch | policy + value | reference | reward model | peak phase "
              "| total GiB | fits (< 76 GiB) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    rm_params = 28 * (12 * 4096**2 + 13 * 4096) + 2 * 50400 * 4096
    for size in args.predict:
        hidden, layers, _ = SIZES[size]
        for mode, unfrozen, rows in [("ddp", -1, 1), ("ddp + LoRA", -1, 1), ("ddp", 2, 1), ("fsdp", -1, 1),
                                     ("fsdp", -1, 8), ("fsdp + AC", -1, 8), ("fsdp", 2, 1)]:  # fmt: skip
            p = memory_model((hidden, layers, 50304), rm_params, mode, 8, 2, rows, 1000, 16, 128, k_act, 0.0, unfrozen)
            name = mode + (f", unfrozen {unfrozen}" if unfrozen >= 0 else "")
            lines.append(
                f"| {size} | {name} | {rows} | {p['policy + value'] / gb:.1f} | {p['reference'] / gb:.1f} | "
                f"{p['reward model'] / gb:.1f} | {p['peak phase']} {p[p['peak phase']] / gb:.1f} | "
                f"{p['total'] / gb:.1f} | {'yes' if p['total'] < 76 * gb else 'no'} |"
            )
    text = "\n".join(lines) + "\n"
    (out / f"memory_{device}.md").write_text(text)
    path.write_text(json.dumps({"args": vars(args), "measurements": measurements, "updates": updates, "k_act": k_act,
                                "runtime_bytes": runtime}, indent=1))  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
