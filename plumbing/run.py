"""Plumbing (a reader of the algorithms can skip it): running a script. Distributed setup, flag checks, the compute
dtype, timing and memory, the output directory, the Logger (metrics.jsonl, samples.jsonl, TensorBoard, wandb) and
the held-out evaluation's metrics."""

import dataclasses
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from plumbing import tensors

REPO = Path(__file__).resolve().parent.parent


def quiet_libraries():
    """Hide the libraries' load reports and progress bars; our own errors and logs stay. (Also: no tokenizer thread
    pools, which warn and can deadlock once torchrun or a data loader forks.)"""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def fail(message: str):
    """Stop with a one-line error naming the problem and the fix (exit status 1)."""
    raise SystemExit(f"error: {message}")


def repo_path(path: str) -> str:
    """Defaults like `toy/policy` are relative to the repository, wherever the script runs from."""
    return str(REPO / path) if not os.path.exists(path) and (REPO / path).exists() else path


def process_group_backend(device: torch.device) -> str:
    """gloo on CPU; on CUDA torch's per-device backend: NCCL for CUDA tensors, gloo for host tensors and the object
    collectives (a plain "nccl" group serves CUDA tensors only: a host tensor in a collective would stop the run)."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def setup_distributed(timeout_minutes: float = 60) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Launched by torchrun (which sets WORLD_SIZE, also for --nproc_per_node 1) the
    process joins the process group, so one GPU runs every collective an 8-GPU run does; `python X.py` runs alone,
    with none. A rank waits up to `timeout_minutes` in a collective (NCCL's default 10 would stop a run while rank 0
    writes a 6.9B save)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    quiet_libraries()
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # (before any collective: NCCL and the object collectives use it)
    if "WORLD_SIZE" in os.environ:
        backend = process_group_backend(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world_size, device


def close_distributed():
    """Every rank has finished (rank 0's final save included); leave the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_list(items: list) -> list:
    if not dist.is_initialized():
        return items
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def broadcast_object(obj):
    """Rank 0's value of `obj` on every rank (e.g. a time-stamped output directory name)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def check_batch_sizes(args, world_size: int, positive: str = "", non_negative: str = ""):
    """An online script's flags: each in its range (`check_flags`), and batch sizes that divide as the loops need
    them to (before anything loads or is written)."""
    check_flags(args, world_size, args.mini_batch_size // world_size, positive, non_negative)
    for flag, size in (("--rollout-batch-size", args.rollout_batch_size), ("--mini-batch-size", args.mini_batch_size)):
        if size % world_size:  # (positive: check_flags)
            fail(f"{flag} {size} is not divisible by the {world_size} ranks; make it a multiple of the world size")
    rollout, mini = args.rollout_batch_size, args.mini_batch_size
    if rollout % mini:
        fail(f"--rollout-batch-size {rollout} is not divisible by --mini-batch-size {mini}")
    if args.total_episodes < args.rollout_batch_size:
        fail(
            f"--total-episodes {args.total_episodes} is less than one --rollout-batch-size ({args.rollout_batch_size})"
        )


# The ranges of the flags the scripts share (those a script has); a script names its own algorithm's flags.
POSITIVE_COUNTS = """total_episodes rollout_batch_size mini_batch_size update_epochs rollout_forward_batch_size
max_new_tokens max_prompt_length eval_every eval_size lora_r""".split()
NON_NEGATIVE = "save_every micro_batch_size missing_eos_penalty weight_decay lora_alpha".split()
POSITIVE = "temperature lr value_lr max_grad_norm dist_timeout".split()
UNIT_INTERVAL = ["gamma", "gae_lambda"]


def check_flags(args, world_size: int, local_mini_batch: int, positive: str = "", non_negative: str = ""):
    """Every shared flag in its range, and the script's own `positive` and `non_negative` ones (names separated by
    spaces); --micro-batch-size divides a rank's minibatch (`local_mini_batch` rows); --fsdp
    has ranks to shard over; --num-layers-unfrozen >= -1; --push-to-hub has a token to upload with."""
    for names, ok, wanted in (
        (POSITIVE_COUNTS, lambda v: v >= 1, "a positive integer"),
        (NON_NEGATIVE + non_negative.split(), lambda v: v >= 0, "0 or more"),
        (POSITIVE + positive.split(), lambda v: v > 0, "greater than 0"),
        (UNIT_INTERVAL, lambda v: 0 <= v <= 1, "in [0, 1]"),
    ):
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not (ok(value) and value == value):  # value == value: not NaN
                fail(f"--{name.replace('_', '-')} {value} is out of range; it must be {wanted}")
    if not 0 <= getattr(args, "lora_dropout", 0.0) < 1:
        fail(f"--lora-dropout {args.lora_dropout} is out of range; it must be in [0, 1)")
    if not all(0 <= beta < 1 for beta in getattr(args, "adam_betas", ())):
        fail(f"--adam-betas {args.adam_betas} is out of range; both must be in [0, 1)")
    if args.micro_batch_size and local_mini_batch % args.micro_batch_size:
        fail(
            f"--micro-batch-size {args.micro_batch_size} does not divide the {local_mini_batch} rows each rank gets "
            "per gradient step; pass a divisor of it (0 = no micro-batching)"
        )
    if args.fsdp and not dist.is_initialized():
        fail("--fsdp shards the models over ranks; launch with torchrun --nproc_per_node N or drop --fsdp")
    for name in ("num_layers_unfrozen", "value_num_layers_unfrozen"):
        value = getattr(args, name, None)
        if value is not None and value < -1:
            fail(f"--{name.replace('_', '-')} {value} is out of range; pass -1 (train all) or N >= 0")
    if args.push_to_hub:
        import huggingface_hub

        if "/" not in args.push_to_hub:
            fail(f"--push-to-hub {args.push_to_hub}: pass a hub repository as <user or organisation>/<name>")
        if huggingface_hub.get_token() is None:  # found out now, not after the run
            fail("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    # a real --model on the toy's data, reward model or learning rate is almost always an omission: say so once
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    toy = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in ("dataset", "reward_model", "eval_reward")]
    toy = [flag for flag in toy if flag.split(" ")[1].startswith(("toy/", "toy."))]
    toy += [f"--lr {args.lr}"] * (args.lr == defaults["lr"])
    if not args.model.startswith("toy/") and toy and int(os.environ.get("RANK", 0)) == 0:
        print(
            f"notice: --model {args.model} is not the toy policy, but {', '.join(toy)} are still the toy task's "
            "defaults; the papers' recipes for real models are in recipes/ (README: Real models)",
            flush=True,
        )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def clock(device: torch.device) -> float:
    """Wall-clock time after the device has finished queued work (for the time split)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams over all responses (word level)."""
    ngrams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(ngrams)) / max(len(ngrams), 1)


def is_checker(scorer, device) -> bool:
    """Whether `scorer` checks answers on every rank: a scoring function whose every score so far was 0 or 1 (ranks
    decide alike: what follows may gather sharded weights). A reward model never is (no collective)."""
    if not hasattr(scorer, "is_checker"):
        return False
    everywhere = torch.tensor([float(scorer.is_checker)], device=device)
    if dist.is_initialized():
        dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
    return bool(everywhere.item())


def evaluation_metrics(score_fn, eval_score_fn, prompt_texts, response_texts, ended, kl, response_mask, ns=(1, 2),
                       columns=None, greedy=None):  # fmt: skip
    """The evaluation of held-out samples, every rank's together: eval/reward (--reward-model), eval/gold_reward
    (--eval-reward, when given), eval/kl (k1 summed over the response), eval/response_length, eval/eos_rate, and
    eval/distinct_n for n in `ns` over all ranks' responses; under "samples" the samples themselves, in prompt order
    (rank r holds the held-out prompts r, r + world size, ...), which the Logger writes to samples.jsonl. `columns`:
    each row's dataset columns the scoring functions read. When a reward is a checker (a scoring function whose
    every score so far, on every rank, was 0 or 1; --eval-reward's first): eval/accuracy, pass@1 of the samples,
    and eval/accuracy_greedy, of `greedy()`'s responses (a function returning the greedy responses' texts)."""
    per_sequence = {
        "eval/reward": score_fn(prompt_texts, response_texts, ended, columns),
        "eval/kl": kl.sum(1),
        "eval/response_length": response_mask.sum(1),
        "eval/eos_rate": ended,
    }
    if eval_score_fn:
        per_sequence["eval/gold_reward"] = eval_score_fn(prompt_texts, response_texts, ended, columns)
    checker = next((f for f in (eval_score_fn, score_fn) if is_checker(f, kl.device)), None)
    if checker is not None:
        per_sequence["eval/accuracy"] = per_sequence["eval/gold_reward" if checker is eval_score_fn else "eval/reward"]
        if greedy is not None:
            per_sequence["eval/accuracy_greedy"] = checker(prompt_texts, greedy(), None, columns)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    values = {key.removeprefix("eval/"): v.tolist() for key, v in per_sequence.items()}
    fields = {
        "reward": "reward",
        "gold_reward": "gold_reward",
        "kl": "kl",
        "length": "response_length",
        "ended": "eos_rate",
    }
    samples = [
        {"index": rank + i * world_size, "prompt": prompt, "response": response}
        | {name: values[key][i] if key in values else None for name, key in fields.items()}
        for i, (prompt, response) in enumerate(zip(prompt_texts, response_texts))
    ]
    samples = sorted(all_gather_list(samples), key=lambda sample: sample["index"])
    texts = [sample["response"] for sample in samples]
    return {
        **tensors.global_means(per_sequence),
        **{f"eval/distinct_{n}": distinct_n(texts, n) for n in ns},
        "samples": samples,
    }


def check_output_dir(output_dir: str, resume: bool):
    checkpoints = [
        os.path.join(output_dir, f) for f in ("checkpoint.pt", "checkpoint/state.pt", "checkpoint.old/state.pt")
    ]
    if resume and not any(os.path.exists(path) for path in checkpoints):
        fail(f"--resume: no checkpoint in {output_dir}; pass the --output-dir of the run to continue")
    if not resume and os.path.isdir(output_dir) and os.listdir(output_dir):
        fail(f"--output-dir {output_dir} already holds a run; pass --resume to continue it or choose a new directory")


def hours(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


class Logger:
    """metrics.jsonl + TensorBoard (+ wandb with --track) + one printed progress line per row, all on rank 0. A row's
    "samples" (an evaluation's, when it was made at this row's iteration) go to samples.jsonl, one row per held-out
    prompt, and to TensorBoard (text) and wandb (a table)."""

    def __init__(self, output_dir: str, args, rank: int, total: int, start: int):
        self.rank, self.total, self.start, self.started = rank, total, start, time.time()
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.samples_path = (os.path.join(output_dir, name) for name in ("metrics.jsonl", "samples.jsonl"))
        for path in (self.path, self.samples_path):  # on resume, drop rows logged after the checkpoint: they are redone
            if os.path.exists(path):
                rows = [line for line in open(path) if json.loads(line)["iteration"] <= start]
                with open(path + ".tmp", "w") as f:
                    f.writelines(rows)
                os.replace(path + ".tmp", path)
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self.wandb = None
        if args.track:
            try:
                import wandb
            except ImportError:
                fail("--track needs wandb: pip install wandb")
            self.wandb = wandb.init(project=args.wandb_project, config=vars(args), name=os.path.basename(output_dir))

    def log(self, row: dict):
        if self.rank != 0:
            return
        samples = row.get("samples") if row.get("eval/iteration") == row["iteration"] else None
        row = {key: value for key, value in row.items() if key != "samples"}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if "/" in key and (not key.startswith("eval/") or row.get("eval/iteration") == row["iteration"]):
                self.writer.add_scalar(key, value, row["episodes"])
        if self.wandb:
            self.wandb.log(row, step=row["episodes"])
        if samples:
            self.log_samples(row, samples)
        keys = ("train/reward", "train/kl", "eval/gold_reward", "time/samples_per_s")
        progress = [f"{key} {row[key]:.3f}" for key in keys if key in row]
        elapsed, done = time.time() - self.started, row["iteration"] - self.start
        clock = f"elapsed {hours(elapsed)}"  # remaining: at the pace of this session's iterations so far
        clock += f", remaining {hours(elapsed / done * (self.total - row['iteration']))}" if done > 0 else ""
        print(f"iteration {row['iteration']}/{self.total}", *progress, clock, sep="  ", flush=True)

    def log_samples(self, row: dict, samples: list[dict]):
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps({"iteration": row["iteration"], **sample}) + "\n" for sample in samples)
        columns = [key for key in samples[0] if key != "index"]
        cell = lambda value: str(value).replace("|", "\\|").replace("\n", " ")  # noqa: E731 (a Markdown table cell)
        table = [" | ".join(columns), " | ".join("---" for _ in columns)]
        table += [" | ".join(cell(sample[key]) for key in columns) for sample in samples[:8]]
        self.writer.add_text("eval/samples", "\n".join(table), row["episodes"])
        if self.wandb:
            import wandb

            data = [[sample[key] for key in columns] for sample in samples]
            self.wandb.log({"eval/samples": wandb.Table(columns=columns, data=data)}, step=row["episodes"])

    def close(self):
        if self.rank == 0:
            self.writer.close()
            if self.wandb:
                self.wandb.finish()
