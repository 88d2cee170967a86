"""Side-by-side comparison of the algorithms: same task, same sample budget, several seeds.

    python bench/compare.py --mode quick      # toy task, 3 seeds, under 10 minutes on 2 CPU cores
    python bench/compare.py --mode full       # toy task, 3 seeds, each script's default budget
    python bench/compare.py --mode long --algorithms ppo ppo_max apa   # 4x the default budget: stability over time
    python bench/compare.py --mode smoke      # CI: 1 seed, 2 iterations each
    python bench/compare.py --extra="--model EleutherAI/pythia-1b --reward-model ... --dataset ..." --nproc 8

Calls each script as a user would, then reads the runs' metrics.jsonl and writes under --output-dir (default
bench/results/<mode>): records.json (per algorithm and seed, every evaluation and the run's samples/s and wall
time: what bench/report.py renders the documents' tables from), results.md (mean +- std over seeds of the final
evaluation, throughput and wall time) and PNG plots (reward and gold reward against episodes with a min-max band
over seeds, the gold-reward / KL frontier, KL and response length against episodes). The budget is counted in
samples trained on: episodes for the online scripts, steps x batch size for the offline A-LoL runs.
"""

import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

REPO = Path(__file__).resolve().parent.parent
# name -> (script, extra flags)
ALGORITHMS = {
    "ppo": ("ppo.py", []),
    "ppo_max": ("ppo_max.py", []),
    "apa": ("apa.py", []),
    "awr": ("awr.py", []),
    "grpo": ("grpo.py", []),
    "rloo": ("rloo.py", []),
    "a-lol": ("alol.py", ["--variant", "a-lol"]),
    "nll": ("alol.py", ["--variant", "nll"]),
    "a-lol-ref-free": ("alol.py", ["--variant", "a-lol-ref-free"]),  # run on request (--algorithms): A-LoL's variants
    "a-lol-seq": ("alol.py", ["--variant", "a-lol-seq"]),
    "a-lol-kl": ("alol.py", ["--variant", "a-lol-kl"]),
    "r-lol": ("alol.py", ["--variant", "r-lol"]),
    "wbc": ("alol.py", ["--variant", "wbc"]),
    "dpo": ("dpo.py", ["--variant", "dpo"]),  # run on request: the A-LoL paper's preference baselines
    "dpo-ref-free": ("dpo.py", ["--variant", "dpo-ref-free"]),
    "pro": ("dpo.py", ["--variant", "pro"]),
    "grpo-batch-std": ("grpo.py", ["--scale-rewards", "batch"]),  # run on request: GRPO's advantage scalings
    "grpo-no-std": ("grpo.py", ["--scale-rewards", "none"]),  # (Dr. GRPO's: no std, no difficulty bias)
}
DEFAULT = ("ppo", "ppo_max", "apa", "awr", "grpo", "rloo", "a-lol", "nll")
# mode -> samples per run, evaluations per run, flags of the online scripts, flags of alol.py
MODES = {
    "full": (4096, 8, [], []),
    "long": (16384, 16, [], []),
    "quick": (640, 4, ["--eval-size", "64"], ["--eval-size", "64", "--value-samples", "4"]),
    "smoke": (
        32, 2,
        ["--rollout-batch-size", "16", "--mini-batch-size", "8", "--max-new-tokens", "16", "--eval-size", "8"],
        ["--max-new-tokens", "16", "--eval-size", "8", "--value-samples", "1", "--value-epochs", "1"],
    ),
}  # fmt: skip
ONLINE_BATCH = {"smoke": 16}  # --rollout-batch-size where it is not the default 64
OFFLINE_BATCH = 16  # alol.py's default --batch-size
TABLE = [  # (column, metric key in the final row)
    ("RM reward", "eval/reward"),
    ("gold reward", "eval/gold_reward"),
    ("KL to ref", "eval/kl"),
    ("length", "eval/response_length"),
    ("distinct-2", "eval/distinct_2"),
    ("samples/s", "time/samples_per_s"),
    ("wall time (s)", "wall_time"),
]


@dataclass
class Args:
    mode: Literal["full", "long", "quick", "smoke"] = "quick"
    """budget: full = each script's default, long = 4x that, quick = 640 samples, smoke = a few for CI"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds per algorithm"""
    algorithms: tuple[str, ...] = DEFAULT
    """which to run: ppo, ppo_max, apa, awr, grpo, rloo, a-lol, nll (the default), or A-LoL's other variants
    a-lol-ref-free, a-lol-seq, a-lol-kl, r-lol, wbc, the preference baselines dpo, dpo-ref-free, pro, or GRPO's
    other advantage scalings grpo-batch-std, grpo-no-std"""
    output_dir: str = ""
    """where records.json, results.md, the plots and the runs (runs/, not committed) go; default bench/results/<mode>"""
    extra: str = ""
    """flags passed to every script, e.g. --extra="--model X --reward-model Y --dataset Z" (with the =) for real runs"""
    nproc: int = 1
    """processes per run (torchrun --nproc_per_node)"""
    reuse: bool = False
    """skip runs whose output directory already holds a final policy (re-plot without re-running)"""
    extra_for: tuple[str, ...] = ()
    """flags for one algorithm's runs, ALGORITHM=FLAGS, e.g. --extra-for "ppo_max=--critic-model toy/reward_model";
    PPO-max's critic starts from a reward model: with a scoring function as --reward-model it needs one"""
    add: bool = False
    """keep the records of records.json whose algorithms this comparison does not run (add to a stored comparison)"""


def script_flags(name: str, mode: str) -> list[str]:
    """Flags giving every algorithm the same sample budget and evaluation points."""
    samples, evaluations, online, offline = MODES[mode]
    script, flags = ALGORITHMS[name]
    if script in ("alol.py", "dpo.py"):  # offline: steps of 16 (pairs, for dpo.py)
        steps = samples // OFFLINE_BATCH
        every = str(max(1, steps // evaluations))
        if script == "dpo.py":  # (no V_ref: without its --value-* flags)
            pairs = zip(offline[::2], offline[1::2])
            offline = [x for flag, value in pairs if not flag.startswith("--value") for x in (flag, value)]
        return [*flags, "--total-steps", str(steps), "--eval-every", every, "--log-every", every, *offline]
    iterations = samples // ONLINE_BATCH.get(mode, 64)
    return [*flags, "--total-episodes", str(samples), "--eval-every", str(max(1, iterations // evaluations)), *online]


def run(name: str, seed: int, args: Args, run_dir: Path) -> None:
    script, _ = ALGORITHMS[name]
    if args.reuse and (run_dir / "policy").exists():
        return
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--standalone"]
    launcher = [sys.executable] if args.nproc == 1 else torchrun
    extra = [*shlex.split(args.extra), *shlex.split(extra_for(args).get(name, ""))]
    cmd = [*launcher, str(REPO / script), "--seed", str(seed), "--output-dir", str(run_dir),
           *script_flags(name, args.mode), *extra]  # fmt: skip
    run_command(cmd, run_dir, f"{name} seed {seed}")


def extra_for(args: Args) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in args.extra_for]
    bad = [item for item, pair in zip(args.extra_for, pairs) if len(pair) != 2 or pair[0] not in ALGORITHMS]
    if bad:
        raise SystemExit(f"error: --extra-for {bad}: expected ALGORITHM=FLAGS with ALGORITHM one of {list(ALGORITHMS)}")
    return dict(pairs)


def run_command(cmd: list[str], run_dir: Path, label: str) -> None:
    """Run one script into a fresh `run_dir` (a leftover partial run is removed); record its wall time."""
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    print(f"{label}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {label} failed:\n{result.stderr[-3000:]}")
    (run_dir / "wall_time.json").write_text(json.dumps({"wall_time": time.perf_counter() - start}))


def record(run_dir: Path, seed: int) -> dict:
    """What a run's tables and plots need: the initial (SFT) evaluation, every later evaluation (the rows where it is
    fresh: episodes and the eval/* metrics), the mean training throughput and the wall time."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evaluations = [{k: v for k, v in r.items() if k == "episodes" or k.startswith("eval/")} for r in rows
                   if r.get("eval/iteration") == r["iteration"]]  # fmt: skip
    throughput = [r["time/samples_per_s"] for r in rows if "time/samples_per_s" in r]
    wall = (
        json.loads((run_dir / "wall_time.json").read_text())["wall_time"]
        if (run_dir / "wall_time.json").exists()
        else None
    )
    mean_throughput = statistics.mean(throughput) if throughput else None
    return {"seed": seed, "evaluations": evaluations, "samples_per_s": mean_throughput, "wall_time": wall}


def final(run: dict) -> dict:
    """The run's last evaluation with its throughput and wall time: the row the summary table reads."""
    return {**run["evaluations"][-1], "time/samples_per_s": run["samples_per_s"], "wall_time": run["wall_time"]}


def eval_curve(run: dict, key: str) -> list[tuple[int, float]]:
    """(episodes, value) at each evaluation of a run's record."""
    return [(e["episodes"], e[key]) for e in run["evaluations"] if key in e]


def cell(values: list[float], digits: int) -> str:
    """mean ± sample std (0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def summarize(runs: dict[str, list[dict]], columns: list[tuple[str, str]] = TABLE, seeds_column: bool = True) -> str:
    """Markdown table: per algorithm, mean +- std over seeds of each of `columns` (TABLE) in the final evaluation."""
    first = "| algorithm | seeds | " if seeds_column else "| algorithm | "
    lines = [first + " | ".join(c for c, _ in columns) + " |", "|---" * (len(columns) + 1 + seeds_column) + "|"]
    for name, seeds in runs.items():
        cells = [str(len(seeds))] if seeds_column else []
        for _, key in columns:
            values = [final(run)[key] for run in seeds if final(run).get(key) is not None]
            if not values:
                cells.append("n/a")
                continue
            digits = 0 if key == "wall_time" else 1 if key in ("time/samples_per_s", "eval/response_length") else 2
            cells.append(cell(values, digits))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stability(runs: dict[str, list[dict]]) -> str:
    """Markdown table over each run's evaluations: the best gold reward and when, the final one, the largest fall
    from an earlier evaluation's gold (a run that degrades mid-run has a large one, even if it recovers later), and
    the largest KL it reached."""
    lines = ["| algorithm | seeds | best gold | at episodes | final gold | largest fall | largest KL |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, seeds in runs.items():
        columns = {"best": [], "at": [], "final": [], "fall": [], "kl": []}
        for run in seeds:
            gold, kl = eval_curve(run, "eval/gold_reward"), eval_curve(run, "eval/kl")
            if not gold:
                continue
            at, best = max(gold, key=lambda point: point[1])
            fall = max(max(v for _, v in gold[: i + 1]) - value for i, (_, value) in enumerate(gold))
            for key, value in zip(columns, (best, at, gold[-1][1], fall, max(v for _, v in kl))):
                columns[key].append(value)
        if not columns["best"]:
            continue
        cells = [cell(values, 0 if key == "at" else 2) for key, values in columns.items()]
        lines.append(f"| {name} | {len(columns['best'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves = {"reward": "RM reward", "gold_reward": "gold reward", "kl": "KL to reference", "response_length": "length"}
    for key, title in ((f"eval/{k}", v) for k, v in curves.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, seeds in runs.items():
            curves = [eval_curve(run, key) for run in seeds]
            points = sorted({e for c in curves for e, _ in c})
            by_x = [[v for c in curves for e, v in c if e == x] for x in points]
            ax.plot(points, [statistics.mean(v) for v in by_x], label=name)
            ax.fill_between(points, [min(v) for v in by_x], [max(v) for v in by_x], alpha=0.2)
        ax.set(xlabel="episodes (samples trained on)", ylabel=title, title=f"held-out {title} (min-max over seeds)")
        ax.legend()
        written.append(out / f"{key.split('/')[1]}.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, seeds in runs.items():
        points = [(kl, gold) for run in seeds for (_, kl), (_, gold) in
                  zip(eval_curve(run, "eval/kl"), eval_curve(run, "eval/gold_reward"))]  # fmt: skip
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=name, s=14)
    ax.set(xlabel="KL to reference (nats per response)", ylabel="gold reward", title="gold reward / KL frontier")
    ax.legend()
    written.append(out / "gold_vs_kl.png")
    fig.savefig(written[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return written


def tables(records: dict) -> str:
    """results.md: the summary of the final evaluations and the stability over each run's evaluations."""
    runs = records["algorithms"]
    header = f"# Comparison: mode {records['mode']}, {records['samples']} samples per run, seeds {records['seeds']}\n\n"
    if records.get("extra"):
        header += f"Flags of every run: `{records['extra']}`\n\n"
    for name, flags in records.get("extra_for", {}).items():
        header += f"Flags of {name}'s runs: `{flags}`\n\n"
    text = (
        summarize(runs) + "\nOver each run's evaluations (stability: a run that degrades mid-run has a large fall):\n\n"
    )
    return header + text + stability(runs)


def main():
    args = tyro.cli(Args)
    out = Path(args.output_dir or f"bench/results/{args.mode}")
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(args.algorithms) - set(ALGORITHMS)
    if unknown:
        raise SystemExit(f"error: unknown --algorithms {sorted(unknown)}; choose from {list(ALGORITHMS)}")
    runs = {}
    for name in args.algorithms:
        for seed in args.seeds:
            run(name, seed, args, out / "runs" / f"{name}__{seed}")
        runs[name] = [record(out / "runs" / f"{name}__{seed}", seed) for seed in args.seeds]
    extras = extra_for(args)
    if args.add and (out / "records.json").exists():  # the stored records of the other algorithms, in ALGORITHMS order
        stored = json.loads((out / "records.json").read_text())
        runs = {**{k: v for k, v in stored["algorithms"].items() if k not in runs}, **runs}
        extras = {**stored.get("extra_for", {}), **extras}
        runs = {name: runs[name] for name in ALGORITHMS if name in runs}
    records = {"mode": args.mode, "samples": MODES[args.mode][0], "seeds": list(args.seeds), "extra": args.extra,
               "extra_for": extras, "nproc": args.nproc, "algorithms": runs}  # fmt: skip
    (out / "records.json").write_text(json.dumps(records, indent=0) + "\n")
    text = tables(records)
    (out / "results.md").write_text(text)
    for path in plot(runs, out):
        print(f"wrote {path}")
    print(text)


if __name__ == "__main__":
    main()
