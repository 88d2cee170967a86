"""The documents' measured numbers are the measurements': every report block of README.md, docs/ and toy/README.md
is its rendering by bench/report.py from the committed files, the result documents hold no measured table outside
a block, and a number quoted in docs/results.md's prose is one the committed results hold."""

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402

NUMBER = re.compile(r"(?<![\w.-])-?\d+\.\d+(?![\w.])")


def test_every_report_block_is_its_rendering():
    """A table edited by hand, or a result file changed without `python bench/report.py`, fails here."""
    assert report.stale() == []


def test_every_renderer_is_used_and_every_block_has_one():
    assert report.used() == set(report.RENDERERS)


def test_a_changed_result_file_makes_its_block_stale(tmp_path, monkeypatch):
    """The check itself: a table whose file changed under it is reported, naming the block."""
    text = "x\n<!-- report: table bench/results/padding_cpu.md 0 -->\n| stale |\n<!-- /report -->\n"
    (tmp_path / "doc.md").write_text(text)
    monkeypatch.setattr(report, "REPO", tmp_path)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "padding_cpu.md").write_text((REPO / "bench/results/padding_cpu.md").read_text())
    monkeypatch.setattr(report, "DOCUMENTS", ["doc.md"])
    assert report.stale() == ["doc.md: table bench/results/padding_cpu.md 0"]


def outside_blocks(text: str) -> str:
    return report.BLOCK.sub("", text)


def test_result_documents_hold_no_measured_table_outside_a_block():
    """docs/results.md, docs/throughput.md: every table is rendered (but the claims table, whose cells are prose)."""
    for name in ("docs/results.md", "docs/throughput.md"):
        tables = report.markdown_tables(outside_blocks((REPO / name).read_text()))
        assert [t.split("\n")[0] for t in tables if not t.startswith("| claim |")] == [], name


def known_numbers() -> set[str]:
    """Every number as the committed results print it: the rendered blocks, the benchmarks' markdown, and the
    values of their JSON records at 0-2 decimals."""
    texts = [m.group(4) for path in report.documents() for m in report.BLOCK.finditer(path.read_text())]
    texts += [p.read_text() for p in (REPO / "bench" / "results").rglob("*.md")]
    numbers = {n for t in texts for n in NUMBER.findall(t)}

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, float):
            numbers.update(f"{x:.{d}f}" for d in (1, 2))

    for path in [*(REPO / "bench" / "results").rglob("*.json"), REPO / "toy" / "build_report.json"]:
        walk(json.loads(path.read_text()))
    return numbers


def test_numbers_in_the_results_prose_are_measured_ones():
    """A decimal number in docs/results.md's prose (outside code, blocks and the paper citations) appears in the
    committed results; a number left from an earlier measurement fails."""
    text = outside_blocks((REPO / "docs" / "results.md").read_text())
    text = re.sub(r"`[^`]*`", "", text)  # flags and commands
    text = re.sub(r"arXiv \d+\.\d+|\d+\.\d+\.\d+|\d+(\.\d+)?x\b|\d+(\.\d+)?e-\d+", "", text)  # ids, versions, ratios
    unknown = sorted(set(NUMBER.findall(text)) - known_numbers(), key=float)
    assert unknown == []
