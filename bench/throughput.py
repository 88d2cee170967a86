"""Throughput of the online scripts: one iteration split into generate / score / update, against its floor.

    python bench/throughput.py               # the toy models, on this machine's device (CPU or GPU)
    python bench/throughput.py --size 1b     # random Pythia-1b-shaped models (bf16 autocast on a GPU), no download
    python bench/throughput.py --size 14m --iterations 2 --rollout-batch-size 8 --algorithms ppo   # CI smoke

For each of ppo, ppo_max, apa, awr: runs the script as a user would for --iterations iterations (the first is a
warm-up and is not reported) and reads time/generate, time/score, time/update, the decode steps and the peak memory
from its metrics.jsonl. Then, in this process and at the same shapes (the same prompt batches, the same number of
decode steps), it times each model pass alone: `generate` with the KV cache, the no-grad policy, reference and
value forwards, the reward through the scripts' scorer (re-tokenize + forward), and the update's forward + backward
+ AdamW steps of the policy and the value net. Their sum is the floor; overhead = iteration time / floor (1.0: no
time outside the model passes).
A `--size` other than toy builds randomly initialised GPT-NeoX (Pythia) configs with the toy tokenizer's
vocabulary (so text decodes and the reward model can re-tokenize it); random policies rarely emit EOS, so
their responses run to --max-new-tokens.
"""

import importlib
import json
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import common  # noqa: E402  (the repository is on the path now)
from plumbing import data, models, run, scorers  # noqa: E402

ONLINE = {"ppo": [], "ppo_max": ["--critic-warmup-steps", "0"], "apa": [], "awr": []}  # extra flags per script
# Pythia shapes (hidden size, layers, attention heads); intermediate size 4 x hidden, rotary on 25% of dims
SIZES = {
    "14m": (128, 6, 4),
    "70m": (512, 6, 8),
    "160m": (768, 12, 12),
    "410m": (1024, 24, 16),
    "1b": (2048, 16, 8),
    "1.4b": (2048, 24, 16),
    "2.8b": (2560, 32, 32),
    "6.9b": (4096, 32, 32),
}
PASSES = ["generate", "policy", "reference", "value", "reward", "update"]  # the floor's model passes


@dataclass
class Args:
    size: Literal["toy", "14m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b"] = "toy"
    """toy = the committed toy models; otherwise random Pythia-shaped policy and reward model"""
    algorithms: tuple[str, ...] = tuple(ONLINE)
    """which of ppo, ppo_max, apa, awr to measure"""
    iterations: int = 5
    """iterations per script; the first is a warm-up, the rest are averaged"""
    rollout_batch_size: int = 64
    """prompts per iteration"""
    mini_batch_size: int = 16
    """responses per gradient step"""
    forward_batch_size: int = 64
    """chunk size of the no-grad generation and forward passes (--rollout-forward-batch-size)"""
    max_new_tokens: int = 48
    """longest response"""
    max_prompt_length: int = 128
    """prompts are left-truncated to this many tokens"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """compute dtype: auto = bfloat16 on CUDA, float32 on CPU"""
    repeats: int = 3
    """timings of each floor pass (after a warm-up); the median is used"""
    output_dir: str = "bench/results"
    """where throughput_<size>_<device>.md/.json go; the runs and random models go under <output_dir>/runs/"""
    seed: int = 1
    """seed of the runs (and of the prompt batches the floor is timed on)"""


def pythia_config(size: str, vocab_config):
    """A Pythia-shaped GPT-NeoX config with the vocabulary and special tokens of `vocab_config`."""
    hidden, layers, heads = SIZES[size]
    config = vocab_config.__class__.from_dict(vocab_config.to_dict())
    config.update({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                   "intermediate_size": 4 * hidden, "max_position_embeddings": 2048})  # fmt: skip
    return config


def make_models(size: str, out: Path, device: torch.device) -> tuple[str, str]:
    """(policy dir, reward-model dir): the toy models, or random Pythia-shaped ones saved in bf16 under `out`."""
    if size == "toy":
        return run.repo_path("toy/policy"), run.repo_path("toy/reward_model")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    policy_dir, rm_dir = out / f"models_{size}" / "policy", out / f"models_{size}" / "reward_model"
    tokenizer = models.load_tokenizer(run.repo_path("toy/policy"))
    config = pythia_config(size, AutoConfig.from_pretrained(run.repo_path("toy/policy")))
    for path, auto, extra in (
        (policy_dir, AutoModelForCausalLM, {}),
        (rm_dir, AutoModelForSequenceClassification, {"num_labels": 1}),
    ):
        if path.exists():  # built by an earlier run (written to a temporary name, then renamed)
            continue
        torch.manual_seed(0)
        config.update(extra)
        with torch.device(device):
            model = auto.from_config(config, dtype=torch.bfloat16)
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(path)
        del model
    return str(policy_dir), str(rm_dir)


def run_script(name: str, args: Args, policy: str, reward_model: str, run_dir: Path) -> list[dict]:
    """Runs `name`.py for args.iterations iterations; returns its training rows (iteration >= 1)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(REPO / f"{name}.py"), "--model", policy, "--reward-model", reward_model,
           "--eval-reward", "", "--seed", str(args.seed), "--dtype", args.dtype, "--output-dir", str(run_dir),
           "--total-episodes", str(args.iterations * args.rollout_batch_size),
           "--rollout-batch-size", str(args.rollout_batch_size), "--mini-batch-size", str(args.mini_batch_size),
           "--rollout-forward-batch-size", str(args.forward_batch_size), "--max-new-tokens", str(args.max_new_tokens),
           "--max-prompt-length", str(args.max_prompt_length), "--eval-size", "8", "--eval-every", "1000000",
           "--save-every", "0", *ONLINE[name]]  # fmt: skip
    print(f"{name}: {shlex.join(cmd[1:])}", flush=True)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {name}.py failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    shutil.rmtree(run_dir / "policy")  # a final policy per script adds up at 1b and above
    return [r for r in rows if r["iteration"] >= 1]


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = run.clock(device)
        fn()
        times.append(run.clock(device) - start)
    return statistics.median(times)


class Floor:
    """The scripts' models, loaded the scripts' way (trained weights and the reference float32 under autocast, the
    reward model through the scripts' scorer in the compute dtype), timing each model pass alone at a given shape."""

    def __init__(self, args: Args, policy_path: str, reward_path: str, device: torch.device):
        from transformers import GenerationConfig

        self.args, self.device, self.dtype = args, device, run.resolve_dtype(args.dtype, device)
        self.tokenizer = models.load_tokenizer(policy_path)
        self.policy = models.load_causal_lm(policy_path, torch.float32).to(device)
        self.reference = models.load_causal_lm(policy_path, torch.float32).requires_grad_(False).to(device)
        self.value = models.load_value_model(policy_path, torch.float32, "--model").to(device)
        # the reward is timed through the scripts' own scorer: decoded text re-tokenized, then the RM's forward
        self.score = scorers.load_scorer(
            reward_path,
            "--reward-model",
            device,
            self.dtype,
            scorers.ScoringOptions(batch_size=args.forward_batch_size),
        )
        self.optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-7) for m in (self.policy, self.value)]
        prompts = data.load_rows("toy/data", "train")[0]
        self.prompts = data.tokenize_prompts(self.tokenizer, prompts, args.max_prompt_length)
        self.generation_config = GenerationConfig(  # EOS is suppressed until min_new_tokens = max_new_tokens
            do_sample=True, top_k=0, top_p=1.0, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )  # fmt: skip

    def batch(self, iteration: int, decode_steps: int):
        """The prompts the script drew at `iteration` (left-padded) followed by `decode_steps` response tokens."""
        indices = data.prompt_indices(
            len(self.prompts), self.args.rollout_batch_size, iteration - 1, self.args.seed, 0, 1
        )
        queries, query_mask = common.left_pad(
            [self.prompts[i] for i in indices], self.tokenizer.pad_token_id, self.device
        )
        responses = torch.randint(2, len(self.tokenizer), (len(queries), decode_steps), device=self.device)
        input_ids = torch.cat([queries, responses], 1)
        return queries, query_mask, input_ids, torch.cat([query_mask, torch.ones_like(responses)], 1), responses

    def chunks(self, n: int):
        return [slice(i, i + self.args.forward_batch_size) for i in range(0, n, self.args.forward_batch_size)]

    def measure(self, iteration: int, decode_steps: int, update_epochs: int) -> dict[str, float]:
        """Seconds of each of PASSES at the shapes of the script's `iteration`."""
        args, device, dtype = self.args, self.device, self.dtype
        queries, query_mask, input_ids, attention_mask, responses = self.batch(iteration, decode_steps)
        context = queries.shape[1]
        prompt_texts = self.tokenizer.batch_decode(queries, skip_special_tokens=True)
        response_texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        self.generation_config.update(max_new_tokens=decode_steps, min_new_tokens=decode_steps)

        @torch.no_grad()
        def generate():
            for c in self.chunks(len(queries)):
                with common.autocast(device, dtype):
                    self.policy.generate(
                        queries[c], attention_mask=query_mask[c], generation_config=self.generation_config
                    )

        def update():
            for _ in range(update_epochs):
                for start in range(0, len(queries), args.mini_batch_size):
                    mb = slice(start, start + args.mini_batch_size)
                    with common.autocast(device, dtype):
                        values = self.value(input_ids[mb], attention_mask[mb])[:, context - 1 : -1]
                        logits = common.response_logits(self.policy, input_ids[mb], attention_mask[mb], context, 1.0)
                    losses = [-common.gather_logprobs(logits, responses[mb]).mean(), values.pow(2).mean()]
                    for loss, model, optimizer in zip(losses, (self.policy, self.value), self.optimizers):
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                        optimizer.step()

        batch = (input_ids, attention_mask, responses)
        passes = {
            "generate": generate,
            # the scripts' own no-grad passes (common.chunked_logprobs / chunked_values)
            "policy": lambda: common.chunked_logprobs(self.policy, *batch, 1.0, args.forward_batch_size, dtype),
            "reference": lambda: common.chunked_logprobs(self.reference, *batch, 1.0, args.forward_batch_size, dtype),
            "value": lambda: common.chunked_values(
                self.value, input_ids, attention_mask, decode_steps, args.forward_batch_size, dtype
            ),
            "reward": lambda: self.score(prompt_texts, response_texts),
            "update": update,
        }
        return {name: timed(fn, device, args.repeats) for name, fn in passes.items()}


def measured(rows: list[dict]) -> list[dict]:
    """The reported iterations: all but the first (the warm-up), unless there is only one."""
    return rows[1:] or rows


def summarize(rows: list[dict], floors: list[dict[str, float]], batch_size: int) -> dict[str, float]:
    """Mean over the measured iterations (all but the first) of the script's split and of the floor."""
    rows, peak = measured(rows), max(r["time/peak_memory_gb"] for r in rows)
    mean = {k: statistics.mean(r[f"time/{k}"] for r in rows) for k in ("generate", "score", "update", "iteration")}
    floor = {k: statistics.mean(f[k] for f in floors) for k in PASSES}
    tokens = statistics.mean(r["train/response_length"] for r in rows) * batch_size
    return {
        **mean,
        **{f"floor/{k}": v for k, v in floor.items()},
        "floor": sum(floor.values()),
        "overhead": mean["iteration"] / sum(floor.values()),
        "overhead/generate": mean["generate"] / floor["generate"],
        "overhead/score": mean["score"] / (floor["policy"] + floor["reference"] + floor["value"] + floor["reward"]),
        "overhead/update": mean["update"] / floor["update"],
        "samples_per_s": batch_size / mean["iteration"],
        "tokens_per_s": tokens / mean["iteration"],
        "decode_steps": statistics.mean(r["time/decode_steps"] for r in rows),
        "peak_memory_gb": peak,  # over the whole run, warm-up included
    }


def tables(results: dict[str, dict[str, float]]) -> str:
    """Two markdown tables: the scripts' split (with each phase's ratio to its floor) and the floor's passes."""
    lines = [
        "| script | generate s | score s | update s | iteration s | samples/s | tokens/s | peak memory GiB "
        "| floor s | overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['generate']:.3f} ({r['overhead/generate']:.2f}x) | {r['score']:.3f} "
            f"({r['overhead/score']:.2f}x) | {r['update']:.3f} ({r['overhead/update']:.2f}x) | {r['iteration']:.3f} "
            f"| {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_memory_gb']:.2f} | {r['floor']:.3f} "
            f"| {r['overhead']:.2f}x |"
        )
    lines += ["", "| script (passes alone) | decode steps | " + " | ".join(f"{p} s" for p in PASSES) + " |",
              "|---|---|" + "---|" * len(PASSES)]  # fmt: skip
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['decode_steps']:.0f} | " + " | ".join(f"{r[f'floor/{p}']:.3f}" for p in PASSES) + " |"
        )
    return "\n".join(lines) + "\n"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def main():
    args = tyro.cli(Args)
    run.quiet_libraries()
    unknown = set(args.algorithms) - set(ONLINE)
    if unknown:
        raise SystemExit(f"error: unknown --algorithms {sorted(unknown)}; choose from {list(ONLINE)}")
    if args.iterations < 1:
        raise SystemExit("error: --iterations must be at least 1 (2 or more: the first is a warm-up)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output_dir)
    policy_path, reward_path = make_models(args.size, out / "runs", device)
    start = time.perf_counter()
    runs = {name: run_script(name, args, policy_path, reward_path, out / "runs" / f"throughput_{name}")
            for name in args.algorithms}  # fmt: skip
    floor = Floor(args, policy_path, reward_path, device)  # after the runs: never two processes on the device
    results = {}
    for name, rows in runs.items():
        update_epochs = importlib.import_module(name).Args.update_epochs
        floors = [floor.measure(r["iteration"], r["time/decode_steps"], update_epochs) for r in measured(rows)]
        results[name] = summarize(rows, floors, args.rollout_batch_size)
    parameters = sum(p.numel() for p in floor.policy.parameters())
    dtype = run.resolve_dtype(args.dtype, device)
    header = (
        f"# Throughput: {args.size} policy ({parameters / 1e6:.1f}M parameters), {device_name(device)}, "
        f"{str(dtype).removeprefix('torch.')}, torch {torch.__version__}\n\n"
        f"{args.rollout_batch_size} prompts per iteration, minibatch {args.mini_batch_size}, up to "
        f"{args.max_new_tokens} new tokens; mean of iterations 2-{args.iterations} "
        f"({time.perf_counter() - start:.0f} s in all). In brackets: each phase's time / its passes timed alone.\n\n"
    )
    tag = f"{args.size}_{'cuda' if device.type == 'cuda' else 'cpu'}"
    (out / f"throughput_{tag}.md").write_text(header + tables(results))
    (out / f"throughput_{tag}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(header + tables(results))


if __name__ == "__main__":
    main()
