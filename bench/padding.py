"""Padding: the toy task with HH's spread of prompt lengths against the plain toy task.

    python bench/padding.py              # ppo.py, default flags, 4 iterations on each; about 5 minutes on 2 cores

HH prompts run from ~20 to ~450 tokens (median 78). Left-padded to the longest prompt of the batch and with every
column kept, most of what the passes compute would be padding. toy/long (`python toy/build.py long`) is the toy's
data with earlier exchanges before each prompt (14 to 496 tokens, median 68); this runs ppo.py on it
(--max-prompt-length 512) and on the plain toy (prompts of 16 tokens), and reports the iteration time (the mean after
a warm-up iteration) and the padding fractions the scripts log (padding / computed tokens) in
<output_dir>/padding_<device>.md and .json.
"""

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parent.parent
KEYS = ["time/iteration", "time/padding_fraction_generate", "time/padding_fraction_passes",
        "time/padding_fraction_update", "train/response_length"]  # fmt: skip


@dataclass
class Args:
    iterations: int = 4  # iterations per run; the first is a warm-up
    output_dir: str = "bench/results"  # padding_<device>.md/.json go here; runs under <output_dir>/runs/
    repo: str = str(REPO)  # the tree whose ppo.py runs (to measure another version)


def measure(args: Args, name: str, flags: list[str]) -> dict:
    out = Path(args.output_dir) / "runs" / f"padding_{name}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, str(Path(args.repo) / "ppo.py"), "--total-episodes", str(64 * args.iterations),
           "--eval-every", "1000", "--eval-size", "16", "--save-every", "0", "--output-dir", str(out),
           *flags]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=args.repo)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")][2:]  # iteration 0 and the warm-up left out
    return {k: statistics.mean(r[k] for r in rows) for k in KEYS if all(k in r for r in rows)}


def main():
    args = tyro.cli(Args)
    long_data = REPO / "toy" / "long"
    if not long_data.exists():
        subprocess.run([sys.executable, str(REPO / "toy" / "build.py"), "long"], check=True)
    results = {"plain toy (16-token prompts)": measure(args, "plain", []),
               "toy/long (14-496 tokens)": measure(args, "long", ["--dataset", str(long_data),
                                                                  "--max-prompt-length", "512"])}  # fmt: skip
    plain, long = results.values()
    ratio = long["time/iteration"] / plain["time/iteration"]
    lines = [f"# Padding (ppo.py defaults; toy/long iterations take {ratio:.1f}x the plain toy's)", "",
             "| data | s / iteration | padding: generate | passes | update | response length |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        cells = [f"{r.get(k, float('nan')):.2f}" for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    device = "cuda" if "cuda" in subprocess.run([sys.executable, "-c", "import torch; print('cuda' if "
                                                 "torch.cuda.is_available() else 'cpu')"], capture_output=True,
                                                text=True).stdout else "cpu"  # fmt: skip
    Path(args.output_dir, f"padding_{device}.md").write_text("\n".join(lines) + "\n")
    Path(args.output_dir, f"padding_{device}.json").write_text(json.dumps({"ratio": ratio, **results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
