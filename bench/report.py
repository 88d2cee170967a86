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
BLOCK = re.compile(r"(<!-- report: ([\w-]+) -->\n)(.*?)(<!-- /report -->)", re.S)


def load(path: str):
    return json.loads((REPO / path).read_text())


# ---------------------------------------------------------------- renderers: NAME -> text
def recipe_memory() -> str:
    import recipe_memory

    return recipe_memory.table(load("bench/results/recipe_memory.json"))


def conformance() -> str:
    import conformance

    return conformance.table(load("tests/fixtures/conformance.json")["rows"])


RENDERERS = {
    "recipe-memory": recipe_memory,
    "conformance": conformance,
}


# ---------------------------------------------------------------- documents
def documents() -> list[Path]:
    return sorted({p for pattern in DOCUMENTS for p in REPO.glob(pattern)})


def render(text: str, where: str = "") -> str:
    def block(match):
        name = match.group(2)
        if name not in RENDERERS:
            raise SystemExit(f"error: {where}: no renderer for report block '{name}'; one of {sorted(RENDERERS)}")
        return f"{match.group(1)}{RENDERERS[name]()}{match.group(4)}"

    return BLOCK.sub(block, text)


def stale() -> list[str]:
    """The documents whose report blocks differ from their rendering (names and the first differing block)."""
    out = []
    for path in documents():
        text = path.read_text()
        rendered = render(text, str(path.relative_to(REPO)))
        if rendered != text:
            pairs = zip(BLOCK.finditer(text), BLOCK.finditer(rendered))
            names = [m.group(2) for m, r in pairs if m.group(3) != r.group(3)]
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
