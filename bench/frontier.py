"""Matched-KL frontier: at the same KL to the reference, which algorithm reaches more true (gold) reward?

Each algorithm's KL knob is swept over several values x seeds at one sample budget. The final held-out evaluation
of a run gives one point (KL, gold reward) and one point (KL, RM reward); per algorithm and knob value the points
are averaged over seeds (error bars: std over seeds), and the frontier is the upper envelope over all algorithms.
RM reward against KL on the same axes shows reward over-optimisation (Gao et al. 2023): the RM keeps rising while
gold flattens or falls.

    python bench/frontier.py                      # toy regime: each script's lr, 640 samples, 4 values x 3 seeds
    python bench/frontier.py --regime paper       # learning rates / 20 and 4x the samples (slower, see docs/results.md)
    python bench/frontier.py --mode smoke         # CI: two knob values, one seed, a few samples
    python bench/frontier.py --reuse              # keep finished runs: resume an interrupted sweep, or re-plot
    python bench/frontier.py --algorithms grpo rloo --add   # sweep these, keep the stored rows of the others
    python bench/frontier.py --extra="--reward-model toy.gold:score" --tag gold   # the gold scorer as the reward
    python bench/frontier.py --regime verifiable --tag arith --extra="--model toy/arith/policy ..."  # docs/results.md

The budget is counted in samples trained on (episodes for the online scripts, steps x batch size for alol.py, whose
knob is its training length: an offline method has no other way to trade KL for reward).
"""

import dataclasses
import importlib
import json
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from compare import run_command  # noqa: E402  (bench/ is on the path when this file runs)

# name -> (script, fixed flags, knob flag, knob values from the least to the most KL)
SWEEPS = {
    "ppo": ("ppo.py", [], "--kl-coef", [0.2, 0.1, 0.05, 0.02]),
    "ppo (APA authors' controller)": ("ppo.py", ["--kl-control", "apa-authors"], "--kl-coef", [0.2, 0.1, 0.05, 0.02]),
    "ppo_max": ("ppo_max.py", [], "--kl-coef", [0.1, 0.05, 0.02, 0.01]),
    "apa": ("apa.py", [], "--lam", [1.0, 0.5, 0.2, 0.1]),
    "awr": ("awr.py", [], "--beta", [4.0, 2.0, 1.0, 0.5]),
    "grpo": ("grpo.py", [], "--kl-coef", [0.4, 0.2, 0.04, 0.0]),
    "rloo": ("rloo.py", [], "--kl-coef", [0.8, 0.4, 0.2, 0.05]),
    "a-lol": ("alol.py", ["--variant", "a-lol"], "--total-steps", [5, 10, 20, 40]),
    "nll": ("alol.py", ["--variant", "nll"], "--total-steps", [5, 10, 20, 40]),
}
# regime -> (samples per online run, learning-rate divisor, algorithms)
REGIMES = {
    "toy": (640, 1, list(SWEEPS)),
    "paper": (2560, 20, ["ppo", "ppo (APA authors' controller)", "apa", "awr"]),
    # the verifiable task (toy/arith, with --extra giving its model, data, checker and lr): the default budget
    "verifiable": (4096, 1, ["ppo", "apa", "awr", "grpo", "rloo"]),
}
SMOKE = ["--rollout-batch-size", "16", "--mini-batch-size", "8", "--max-new-tokens", "16", "--eval-size", "8"]
SMOKE_OFFLINE = ["--max-new-tokens", "16", "--eval-size", "8", "--value-samples", "1", "--value-epochs", "1"]


@dataclass
class Args:
    regime: Literal["toy", "paper", "verifiable"] = "toy"
    """toy: each script's learning rate; paper: learning rates / 20 with 4x the samples; verifiable: 4,096 samples,
    for toy/arith, whose model, data, checker and learning rate --extra gives"""
    mode: Literal["sweep", "smoke"] = "sweep"
    """sweep: every knob value x seed; smoke: two knob values, one seed, tiny runs (CI)"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds per knob value"""
    algorithms: tuple[str, ...] = ()
    """subset of the regime's algorithms (default: all of them)"""
    output_dir: str = "bench/results/frontier"
    """runs/, frontier_<regime>.md/.json and frontier_<regime>.png go here"""
    reuse: bool = False
    """keep runs that already finished (their output holds a final policy): resume or re-plot"""
    add: bool = False
    """keep the rows of frontier_<regime>.json whose algorithms this sweep does not run (add to a stored frontier)"""
    extra: str = ""
    """flags passed to every run, e.g. --extra="--reward-model toy.gold:score" (a verifiable reward)"""
    tag: str = ""
    """suffix of the output names (frontier_<regime>_<tag>.*) and run directories, for a sweep with --extra"""


def default_lrs(script: str) -> dict[str, float]:
    """The script's own --lr (and --value-lr), read from its Args so the paper regime divides what the script uses."""
    fields = {f.name: f.default for f in dataclasses.fields(importlib.import_module(script[:-3]).Args)}
    return {k: v for k, v in fields.items() if k in ("lr", "value_lr")}


def run_flags(name: str, value, args: Args) -> list[str]:
    script, fixed, knob, _ = SWEEPS[name]
    samples, divisor, _ = REGIMES[args.regime]
    flags = [*fixed, knob, str(value)]
    if divisor != 1:
        flags += [f for k, v in default_lrs(script).items() for f in (f"--{k.replace('_', '-')}", str(v / divisor))]
    if script == "alol.py":  # the knob is the training length; evaluate at the end
        steps = int(value) if args.mode == "sweep" else int(value) // 5
        sizes = SMOKE_OFFLINE if args.mode == "smoke" else ["--eval-size", "64", "--value-samples", "4"]
        return [*flags[:-2], "--total-steps", str(steps), "--eval-every", str(steps), "--log-every", str(steps), *sizes]
    if args.mode == "smoke":
        return [*flags, "--total-episodes", "32", "--eval-every", "2", *SMOKE]
    iterations = samples // 64
    return [*flags, "--total-episodes", str(samples), "--eval-every", str(iterations), "--eval-size", "64",
            "--save-every", str(iterations)]  # fmt: skip


def run(name: str, value, seed: int, args: Args, run_dir: Path) -> None:
    if args.reuse and (run_dir / "policy").exists():
        return
    cmd = [sys.executable, str(REPO / SWEEPS[name][0]), "--seed", str(seed), "--output-dir", str(run_dir),
           *run_flags(name, value, args), *shlex.split(args.extra)]  # fmt: skip
    run_command(cmd, run_dir, f"{name} {SWEEPS[name][2]} {value} seed {seed}")


def final_eval(run_dir: Path) -> dict:
    """The evaluation after the last update (every script evaluates at its end; it is in the last row)."""
    final = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][-1]
    return {k: final[k] for k in ("eval/kl", "eval/gold_reward", "eval/reward")}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(points: dict[str, dict]) -> list[dict]:
    """One row per (algorithm, knob value): mean and std over seeds of the final KL, gold and RM reward, and each
    seed's own values (`runs`)."""
    rows = []
    for name, by_value in points.items():
        for value, evals in by_value.items():
            row = {"algorithm": name, "knob": SWEEPS[name][2], "value": value, "seeds": len(evals)}
            for key in ("eval/kl", "eval/gold_reward", "eval/reward"):
                row[key], row[key + "_std"] = mean_std([e[key] for e in evals])
            rows.append({**row, "runs": evals})
    return rows


def frontier(rows: list[dict]) -> list[dict]:
    """The upper envelope: rows no other row beats with less (or equal) KL and more gold reward."""
    ordered = sorted(rows, key=lambda r: (r["eval/kl"], -r["eval/gold_reward"]))
    best, envelope = float("-inf"), []
    for row in ordered:
        if row["eval/gold_reward"] > best:
            best = row["eval/gold_reward"]
            envelope.append(row)
    return envelope


def table(rows: list[dict]) -> str:
    on_frontier = {id(r) for r in frontier(rows)}
    lines = ["| algorithm | knob | seeds | KL to ref | gold reward | RM reward | on frontier |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(
            f"| {r['algorithm']} | {r['knob']} {r['value']} | {r['seeds']}"
            f" | {r['eval/kl']:.2f} ± {r['eval/kl_std']:.2f}"
            f" | {r['eval/gold_reward']:.2f} ± {r['eval/gold_reward_std']:.2f}"
            f" | {r['eval/reward']:.2f} ± {r['eval/reward_std']:.2f} | {'yes' if id(r) in on_frontier else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # an unstable setting (KL std above its mean) would squash the rest: keep the axis to the stable points, say so
    stable = [r["eval/kl"] for r in rows if r["eval/kl_std"] <= abs(r["eval/kl"])] or [r["eval/kl"] for r in rows]
    right = 1.15 * max(stable) + 0.5
    off = [f"{r['algorithm']} {r['knob']} {r['value']} (KL {r['eval/kl']:.0f})" for r in rows if r["eval/kl"] > right]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for ax, key, label in ((axes[0], "eval/gold_reward", "gold reward"), (axes[1], "eval/reward", "RM reward")):
        for name in dict.fromkeys(r["algorithm"] for r in rows):
            mine = sorted((r for r in rows if r["algorithm"] == name), key=lambda r: r["eval/kl"])
            ax.errorbar([r["eval/kl"] for r in mine], [r[key] for r in mine], xerr=[r["eval/kl_std"] for r in mine],
                        yerr=[r[key + "_std"] for r in mine], marker="o", capsize=3, label=name)  # fmt: skip
        if key == "eval/gold_reward":
            envelope = frontier(rows)
            ax.plot([r["eval/kl"] for r in envelope], [r[key] for r in envelope], "k--", lw=1, label="frontier")
        ax.set(xlabel="KL to reference (nats per response)", ylabel=f"held-out {label}", title=f"{label}: {title}")
        ax.set_xlim(-0.5, right)
        if off:
            ax.annotate("off the axis: " + "; ".join(off), (0.01, 0.01), xycoords="axes fraction", fontsize=7)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main():
    args = tyro.cli(Args)
    names = list(args.algorithms) or REGIMES[args.regime][2]
    unknown = set(names) - set(SWEEPS)
    if unknown:
        raise SystemExit(f"error: unknown --algorithms {sorted(unknown)}; choose from {list(SWEEPS)}")
    seeds = args.seeds[:1] if args.mode == "smoke" else args.seeds
    out = Path(args.output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    points = {}
    for name in names:
        values = SWEEPS[name][3][1:3] if args.mode == "smoke" else SWEEPS[name][3]
        points[name] = {}
        for value in values:
            for seed in seeds:
                prefix = f"{args.regime}_{args.tag}" if args.tag else args.regime
                run_dir = out / "runs" / f"{prefix}__{name.split()[0]}{'-authors' if '(' in name else ''}"
                run_dir = run_dir.with_name(f"{run_dir.name}__{value}__{seed}")
                run(name, value, seed, args, run_dir)
                points[name].setdefault(value, []).append({"seed": seed, **final_eval(run_dir)})
    rows = summarize(points)
    stem = f"frontier_{args.regime}_{args.tag}" if args.tag else f"frontier_{args.regime}"
    if args.add and (out / f"{stem}.json").exists():  # the stored rows of the other algorithms, in SWEEPS order
        kept = [r for r in json.loads((out / f"{stem}.json").read_text()) if r["algorithm"] not in points]
        rows = sorted(kept + rows, key=lambda r: list(SWEEPS).index(r["algorithm"]))
    samples, divisor, _ = REGIMES[args.regime]
    budget = "smoke budget" if args.mode == "smoke" else f"{samples} samples"
    title = f"{args.regime} regime ({budget}, lr / {divisor}), {len(seeds)} seeds"
    if args.tag or args.extra:  # (the tag names a sweep whose flags are long; the table's header has them)
        title += f", {args.tag or args.extra}"
    header = f"# Matched-KL frontier: {title}\n\n" + (
        f"Runs with --extra={shlex.quote(args.extra)}\n\n" if args.extra else ""
    )
    (out / f"{stem}.md").write_text(header + table(rows))
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out / f"{stem}.png", title)
    print(header + table(rows))


if __name__ == "__main__":
    main()
