"""The shape of the package (README, Layout): imports point down only, and each concept has one home.

The import graph is built from the source with `ast`, every import counted: module level, inside functions, and
under `if TYPE_CHECKING`. Importing `llmq.a.b` also runs `llmq/a/__init__.py`, so that edge is counted too
(except from inside `llmq.a`, which is already running); the package root is the one exception, because it is the public facade that imports the rest (a submodule that
imports the root by name is still an edge, and a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llmq
from llmq import environment
from llmq.describe import scheme_words
from llmq.evaluation.store import default_store
from llmq.methods import METHODS
from llmq.recipe import METHOD_NAMES, MethodConfig

PACKAGE = Path(llmq.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every llmq module `module` imports (the deepest known module of each imported name)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names += [f"{base}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        if not name.startswith("llmq"):
            continue
        while name not in known and "." in name:
            name = name.rpartition(".")[0]
        parts = name.split(".")
        # the subpackages it runs on the way, but not its own (already running when any of its modules is imported)
        out |= {p for p in (".".join(parts[:i]) for i in range(2, len(parts))) if not module.startswith(p + ".")}
        out.add(name)
    return out - {module}


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imported(m, p, known) for m, p in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "llmq.quantization.blockwise" in graph["llmq.quantization.qat"]
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    """The check itself can fail: a graph with a loop through a function-level import is reported."""
    graph = import_graph()
    graph["llmq.numerics"] = graph["llmq.numerics"] | {"llmq.pipeline.stages"}
    assert any("llmq.numerics" in c and "llmq.pipeline.stages" in c for c in _cycles(graph))


def test_only_the_facade_imports_the_package_root():
    importers = sorted(m for m, deps in import_graph().items() if "llmq" in deps and m != "llmq")
    assert importers == [], f"{importers} import the package root (which loads everything); import llmq.version etc."


def test_every_method_name_has_one_implementation():
    assert tuple(METHODS) == METHOD_NAMES
    assert MethodConfig.model_fields["name"].annotation.__args__ == METHOD_NAMES


@pytest.mark.parametrize(("args", "long", "short"), [
    ((4, 64, False), "4-bit, group 64, asymmetric", "W4g64 asym"),
    ((8, None, True), "8-bit, per-channel, symmetric", "W8 per-channel sym"),
    ((3, -1, True), "3-bit, per-channel, symmetric", "W3 per-channel sym"),  # GPTQ's configs say -1
    ((4, 64, True, "nf4"), "bitsandbytes NF4, absmax per block of 64", "nf4"),
    ((8, None, True, "int8"), "bitsandbytes LLM.int8, per row", "int8"),
])
def test_scheme_words_are_the_ones_cards_and_leaderboards_always_printed(args, long, short):
    assert scheme_words(*args) == long and scheme_words(*args, short=True) == short


def test_the_cache_root_is_one_setting(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMQ_RESULTS", raising=False)
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    assert environment.cache_dir() == tmp_path and default_store() == tmp_path / "results.jsonl"
    monkeypatch.setenv("LLMQ_RESULTS", str(tmp_path / "elsewhere.jsonl"))
    assert default_store() == tmp_path / "elsewhere.jsonl"
