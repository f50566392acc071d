"""The package's shape: no import cycles, the training loop on one screen."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "mnr"


def imports(path: Path) -> set[str]:
    """The mnr modules ``path`` imports, wherever the import is (a lazy import inside a function is still an edge);
    ``from mnr import X`` is mnr.X when X is a module, else the package itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mnr")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mnr":
            if node.module == "mnr":
                found |= {f"mnr.{a.name}" if (PACKAGE / f"{a.name}.py").exists() else "mnr" for a in node.names}
            else:
                found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {("mnr" if p.stem == "__init__" else f"mnr.{p.stem}"): imports(p) for p in PACKAGE.glob("*.py")}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first search meets (each as the path that closes it)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle_in_the_package():
    edges = graph()
    assert len(edges) > 20 and "mnr.train" in edges["mnr.cli"] | {"mnr.train"}
    assert cycles(edges) == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles(edges))


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert imports(PACKAGE / "data.py") >= {"mnr.retrieval", "mnr.fileio"}


def test_the_training_loop_fits_on_one_screen():
    from mnr.train import fit

    lines = inspect.getsource(fit).splitlines()
    assert len(lines) <= 60, f"mnr.train.fit is {len(lines)} lines"


BENCH = PACKAGE.parent.parent / "bench"


def test_bench_is_a_package_that_patches_nothing():
    """bench/ imports its shared pieces as a package and ablates through the package's own settings: no
    mock.patch or monkeypatch, no sys.path edits; every script imports."""
    import importlib

    scripts = sorted(p for p in BENCH.glob("*.py") if p.name != "__init__.py")
    assert {p.stem for p in scripts} >= {"common", "st", "compare", "gpu", "retrieval", "speed"}
    for path in scripts:
        text = path.read_text()
        for word in ("mock.patch", "monkeypatch", "sys.path", "from unittest import mock"):
            assert word not in text, f"{path.name}: {word}"
        importlib.import_module(f"bench.{path.stem}")
    # a script's work waits for `python -m bench.NAME`: importing it (as above) measures nothing
    libraries = {"common", "st"}
    assert [p.name for p in scripts if p.stem not in libraries and 'if __name__ == "__main__":' not in
            p.read_text()] == []
    sentence_transformers_trainers = [p.name for p in scripts if "SentenceTransformerTrainer(" in p.read_text()]
    assert sentence_transformers_trainers == ["st.py"]  # one harness, used by every comparison
