"""The project's modules import each other without a cycle, and the vLLM plugin never imports the quantizer.

Read from the sources with ``ast`` (nothing is imported): every import statement counts, at module level, in a
function, under ``if TYPE_CHECKING:`` or in a ``try``; relative ones are resolved against the importing module.
``from pkg import name`` is an edge to ``pkg.name`` where that is a module, else to ``pkg`` (its ``__init__``).
Importing ``a.b.c`` also runs ``a`` and ``a.b``'s ``__init__``; those implicit edges are not counted (every
submodule of a package whose ``__init__`` imports a submodule would otherwise close a loop). The scripts in
``benchmarks/`` are read as sources only: their directory is on ``sys.path`` when they run, so ``import shapes``
there is ``benchmarks.shapes``.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vllm_kbvq", "quantize_tools")
SCRIPTS = ("benchmarks",)


def project_modules(root: Path, packages=PACKAGES, scripts=SCRIPTS) -> dict[str, Path]:
    """Dotted module name -> source file; a package's name maps to its ``__init__.py``."""
    mods = {}
    for top in (*packages, *scripts):
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The project module an imported dotted name runs: itself, else its longest prefix that is one."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in mods:
            return ".".join(parts[:n])
    return None


def imports_of(module: str, path: Path, mods: dict[str, Path], scripts=SCRIPTS) -> set[str]:
    """The project modules ``module`` (source ``path``) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    here = module.split(".")
    script_dir = here[0] if here[0] in scripts else None
    out = set()

    def add(name):
        target = _resolve(name, mods)
        if target is None and script_dir:  # a script's sibling, found through the script's directory
            target = _resolve(f"{script_dir}.{name}", mods)
        if target is not None and target != module:
            out.add(target)

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = here if is_package else here[:-1]
                if node.level - 1 > len(package) - 1:
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top package")
                base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base)
    return out


def import_graph(root: Path = ROOT, **kw) -> dict[str, set[str]]:
    mods = project_modules(root, **kw)
    scripts = kw.get("scripts", SCRIPTS)
    return {m: imports_of(m, p, mods, scripts) for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as its chain of modules (first == last), or None. Depth first, in sorted order (deterministic)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_reader_resolves_every_kind_of_import(tmp_path):
    """On a small tree made for it: relative imports of every depth, ``from pkg import module`` against
    ``from pkg import name``, imports in functions and under TYPE_CHECKING, a script's sibling; and the cycle."""
    files = {
        "pkg/__init__.py": "from .a import thing\n",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.b import B\nthing = 1\n",
        "pkg/sub/__init__.py": "from .. import a\nfrom . import b, not_a_module\n",
        "pkg/sub/b.py": "import os\ndef f():\n    from ..c import x\n    import pkg.sub.c.deeper\n",
        "pkg/sub/c.py": "",
        "pkg/c.py": "from pkg import thing\ntry:\n    import numpy\nexcept ImportError:\n    pass\n",
        "scripts/run.py": "from helper import y\nimport pkg.sub.b\n",
        "scripts/helper.py": "y = 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, packages=("pkg",), scripts=("scripts",))
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": {"pkg.a", "pkg.sub.b"},  # not_a_module: the package itself, no edge
        "pkg.sub.b": {"pkg.c", "pkg.sub.c"},
        "pkg.sub.c": set(),
        "pkg.c": {"pkg"},
        "scripts.run": {"scripts.helper", "pkg.sub.b"},
        "scripts.helper": set(),
    }
    assert find_cycle(graph) == ["pkg", "pkg.a", "pkg.sub.b", "pkg.c", "pkg"]
    graph["pkg.a"] = set()
    assert find_cycle(graph) is None


def test_no_import_cycle():
    graph = import_graph()
    assert {"vllm_kbvq.plugin.config", "quantize_tools.cli", "benchmarks.shapes"} <= set(graph)
    assert sum(map(len, graph.values())) > 50  # the reader finds the project's imports at all
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_plugin_never_imports_the_quantizer():
    """vllm_kbvq is what a vLLM server installs; quantize_tools (and its dependencies) need not be there."""
    mods = project_modules(ROOT)
    bad = []
    for module, path in mods.items():
        if module.split(".")[0] != "vllm_kbvq":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                    if n.split(".")[0] == "quantize_tools"]
    assert not bad, "vllm_kbvq imports quantize_tools:\n" + "\n".join(bad)
    graph = import_graph()
    assert not [(m, n) for m in graph if m.startswith("vllm_kbvq") for n in graph[m] if n.startswith("quantize_tools")]
