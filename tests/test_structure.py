"""The shape the README promises a reader: layers that import downwards only, plumbing files of a readable size,
script diffs as small as the algorithms' differences, and --help texts that read as sentences."""

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["ppo", "ppo_max", "apa", "awr", "alol", "grpo", "rloo", "dpo"]


def project_modules() -> dict[str, Path]:
    modules = {name: REPO / f"{name}.py" for name in [*SCRIPTS, "common"]}
    modules.update({f"plumbing.{p.stem}": p for p in (REPO / "plumbing").glob("*.py") if p.stem != "__init__"})
    return modules


def imports(path: Path, modules: dict) -> set[str]:
    """The project modules `path` imports, anywhere in the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found & set(modules)


def test_layers_import_downwards_only():
    """tensors (imports nothing of the project) < plumbing (never common) < common < the scripts, no circle."""
    modules = project_modules()
    graph = {name: imports(path, modules) for name, path in modules.items()}
    assert graph["plumbing.tensors"] == set()
    for name, imported in graph.items():
        if name.startswith("plumbing."):
            assert imported <= {m for m in modules if m.startswith("plumbing.")}, (name, imported)
    assert graph["common"] <= {m for m in modules if m.startswith("plumbing.")}
    done, path = set(), []

    def visit(name):  # depth-first: a module met again on the current path closes a circle
        assert name not in path, f"import circle: {' -> '.join([*path[path.index(name) :], name])}"
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_plumbing_files_stay_readable():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "plumbing").glob("*.py")}
    assert max(sizes.values()) <= 450, sizes


@pytest.mark.skipif(shutil.which("diff") is None, reason="needs diff")
@pytest.mark.parametrize(
    "a, b, most",
    [("ppo", "apa", 30), ("apa", "awr", 25), ("ppo", "ppo_max", 120), ("ppo", "grpo", 190), ("grpo", "rloo", 60)],
)
def test_script_diffs_stay_small(a, b, most):
    """`diff a.py b.py` adds at most `most` lines (what README's table promises a reader comparing them)."""
    out = subprocess.run(["diff", f"{a}.py", f"{b}.py"], cwd=REPO, capture_output=True, text=True).stdout
    assert sum(line.startswith("> ") or line == ">" for line in out.splitlines()) <= most


def test_flag_help_texts_are_paragraphs():
    """tyro keeps a field docstring's line break where the next line starts with something other than a letter:
    such a break prints --help as a broken line. Every flag of every script and bench/ tool reads as one paragraph."""
    files = [REPO / f"{name}.py" for name in SCRIPTS] + sorted((REPO / "bench").glob("*.py"))
    broken = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            for field, doc in zip(node.body, node.body[1:]):
                is_doc = isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                if isinstance(field, ast.AnnAssign) and is_doc:
                    lines = [line.strip() for line in str(doc.value.value).split("\n")[1:] if line.strip()]
                    broken += [(path.name, ast.unparse(field.target), line) for line in lines if not line[0].isalpha()]
    assert broken == []
