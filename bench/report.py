"""Every table of measured (or predicted) numbers in README.md and docs/, rendered from committed files (under
bench/results/, toy/build_report.json): a document holds each one between `<!-- report: NAME -->` and
`<!-- /report -->`, and RENDERERS below make the text from the files, so a number in a table cannot drift from the
measurement it reports.

    python bench/report.py            # rewrite every block from the files
    python bench/report.py --check    # list the blocks whose text is not their rendering (exit 1); tests run it

The benchmarks write those files (bench/compare.py records.json, bench/frontier.py frontier_*.json, ...); each
renderer names the command that made its file.
"""

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "bench"))
DOCUMENTS = ["README.md", "docs/*.md", "toy/README.md"]
BLOCK = re.compile(r"(<!-- report: ([\w-]+)((?: [^ >]+)*) -->\n)(.*?)(<!-- /report -->)", re.S)


def load(path: str):
    return json.loads((REPO / path).read_text())


# ---------------------------------------------------------------- renderers: NAME ARGS... -> text
def recipe_memory() -> str:
    """bench/recipe_memory.py: each recipe's predicted peak per GPU."""
    import recipe_memory

    return recipe_memory.table(load("bench/results/recipe_memory.json"))


def conformance() -> str:
    """bench/conformance.py: this project's functions against TRL's own code on the same inputs."""
    import conformance

    return conformance.table(load("tests/fixtures/conformance.json")["rows"])


def markdown_tables(text: str) -> list[str]:
    tables, current = [], []
    for line in text.split("\n"):
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables, current = [*tables, "\n".join(current) + "\n"], []
    return tables + (["\n".join(current) + "\n"] if current else [])


def table(path: str, index: str = "0") -> str:
    """The index-th table of a benchmark's own markdown output (bench/throughput.py, memory.py, padding.py, ...)."""
    return markdown_tables((REPO / path).read_text())[int(index)]


def comparison(directory: str, part: str) -> str:
    """bench/compare.py's records.json: `summary` (final evaluation, mean +- std over seeds), `stability` (over each
    run's evaluations), `short` (README's columns), `sft` (the SFT policy: every run's evaluation at episode 0),
    `accuracy` (a checker's task: pass@1 sampled and greedy, the SFT policy's evaluation first)."""
    import compare

    records = load(f"{directory}/records.json")
    runs = records["algorithms"]
    if part == "summary":
        return compare.summarize(runs)
    if part == "stability":
        return compare.stability(runs)
    if part == "short":
        keep = ("RM reward", "gold reward", "KL to ref", "length", "samples/s")
        return compare.summarize(runs, [c for c in compare.TABLE if c[0] in keep], seeds_column=False)
    if part == "sft":
        return sft(runs)
    if part == "accuracy":  # a checker's comparison: pass@1 sampled and greedy, the SFT policy's first
        columns = [
            ("pass@1 sampled", "eval/accuracy"),
            ("pass@1 greedy", "eval/accuracy_greedy"),
            ("KL to ref", "eval/kl"),
            ("length", "eval/response_length"),
            ("samples/s", "time/samples_per_s"),
        ]
        start = {"SFT policy (episode 0)": [{**run, "evaluations": run["evaluations"][:1], "samples_per_s": None}
                                            for run in next(iter(runs.values()))]}  # fmt: skip
        return compare.summarize({**start, **runs}, columns)
    raise SystemExit(f"error: comparison part '{part}': one of summary, stability, short, sft, accuracy")


def sft(runs: dict) -> str:
    """The SFT policy's evaluation (episode 0) per seed: the same for every algorithm of a seed's online runs."""
    import statistics

    first = {}
    for seeds in runs.values():
        for run in seeds:
            evaluation = run["evaluations"][0]
            if evaluation["episodes"] == 0:
                first.setdefault(run["seed"], evaluation["eval/gold_reward"])
    seeds = sorted(first)
    values = ", ".join(f"{first[s]:.2f}" for s in seeds)
    return (
        f"The SFT policy (every run's evaluation before training): gold {statistics.mean(first.values()):.2f}\n"
        f"(seeds {', '.join(map(str, seeds))}: {values}).\n"
    )


def frontier(name: str) -> str:
    """bench/frontier.py's frontier_<name>.json: mean +- std over seeds per knob value, and the frontier."""
    import frontier as sweep

    return sweep.table(load(f"bench/results/frontier/{name}.json"))


def toy_build() -> str:
    """toy/build.py's build_report.json."""
    r = load("toy/build_report.json")
    rows = [
        ("reward model: held-out pair accuracy (500 test pairs)", f"{r['reward_model_test_pair_accuracy']:.1%}"),
        ("reward model: pair accuracy on 1,000 train-split pairs", f"{r['reward_model_train_pair_accuracy']:.1%}"),
        ("SFT policy: mean gold reward of its samples on the 500 test prompts (T = 1, 48 new tokens)",
         f"{r['sft_gold_reward_test_prompts']:.2f}"),
        ("gold reward of the test split's `chosen` / `rejected` responses",
         f"{r['gold_reward_chosen_test']:.2f} / {r['gold_reward_rejected_test']:.2f}"),
        ("policy / reward model parameters", f"{r['policy_parameters']:,} / {r['reward_model_parameters']:,}"),
    ]  # fmt: skip
    return "| measurement | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def arith_build() -> str:
    """toy/arith/build.py's build_report.json."""
    r = load("toy/arith/build_report.json")
    rows = [
        ("SFT policy: pass@1 of its samples (T = 1)", f"{r['sft_accuracy_sampled_test']:.1%}"),
        ("SFT policy: pass@1 greedy", f"{r['sft_accuracy_greedy_test']:.1%}"),
        ("the SFT mix's own responses (the test split's `chosen`)", f"{r['sft_mix_accuracy_test']:.1%}"),
        ("policy parameters / vocabulary", f"{r['policy_parameters']:,} / {r['vocab_size']}"),
    ]
    return "| measurement (500 test problems) | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


RENDERERS = {
    "arith-build": arith_build,
    "recipe-memory": recipe_memory,
    "conformance": conformance,
    "table": table,
    "comparison": comparison,
    "frontier": frontier,
    "toy-build": toy_build,
}


# ---------------------------------------------------------------- documents
def documents() -> list[Path]:
    return sorted({p for pattern in DOCUMENTS for p in REPO.glob(pattern)})


def render(text: str, where: str = "") -> str:
    def block(match):
        name, arguments = match.group(2), match.group(3).split()
        if name not in RENDERERS:
            raise SystemExit(f"error: {where}: no renderer for report block '{name}'; one of {sorted(RENDERERS)}")
        return f"{match.group(1)}{RENDERERS[name](*arguments)}{match.group(5)}"

    return BLOCK.sub(block, text)


def stale() -> list[str]:
    """The documents whose report blocks differ from their rendering (names and the first differing block)."""
    out = []
    for path in documents():
        text = path.read_text()
        rendered = render(text, str(path.relative_to(REPO)))
        if rendered != text:
            pairs = zip(BLOCK.finditer(text), BLOCK.finditer(rendered))
            names = [(m.group(2) + m.group(3)) for m, r in pairs if m.group(4) != r.group(4)]
            out.append(f"{path.relative_to(REPO)}: {', '.join(names)}")
    return out


def used() -> set[str]:
    return {m.group(2) for path in documents() for m in BLOCK.finditer(path.read_text())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="list stale blocks and exit 1 if any (change nothing)")
    args = parser.parse_args()
    if args.check:
        problems = stale()
        for line in problems:
            print(f"stale: {line} (run python bench/report.py)")
        sys.exit(1 if problems else 0)
    for path in documents():
        text = path.read_text()
        rendered = render(text, str(path.relative_to(REPO)))
        if rendered != text:
            path.write_text(rendered)
            print(f"rendered {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
