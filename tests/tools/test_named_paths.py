"""Every repository path and module the docs, the Makefile and the code's comments name exists.

Modules move (the quantizer's method went into ``quantize_tools/method/``); a stale name in a doc
sends a reader to nothing. Paths are checked on disk; dotted module names by resolving the longest
module prefix and finding the rest defined in that module's source.
"""
from __future__ import annotations

import ast
import functools
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATH = re.compile(r"(?<![\w./-])(?:quantize_tools|vllm_kbvq|tests|benchmarks|deploy|docs)/[\w./-]*\w")
MODULE = re.compile(r"(?<![\w./-])(?:quantize_tools|vllm_kbvq)(?:\.\w+)+")
PACKAGES = ("quantize_tools", "vllm_kbvq", "benchmarks", "tests")


def documents() -> list[Path]:
    """The docs, deployment files and Makefile, and every Python source (its comments and docstrings)."""
    docs = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml", *sorted((ROOT / "docs").glob("*.md"))]
    docs += sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())
    docs += sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    return [p for p in docs if p.is_file() and p.resolve() != Path(__file__).resolve()]


def named_paths(text: str) -> set[str]:
    """Paths named in ``text``, less outputs to be written (``--out PATH``) and placeholders (``benchmarks/SCRIPT.py``)."""
    outputs = set(re.findall(r"--out(?:put)?[ =]([\w./-]+)", text))
    return {m.rstrip(".") for m in PATH.findall(text)
            if m.rstrip(".") not in outputs and not any(re.fullmatch(r"[A-Z_]+", Path(c).stem) for c in m.split("/"))}


def named_modules(text: str) -> set[str]:
    return set(MODULE.findall(text))


@functools.cache
def _top_level_names(source: Path) -> frozenset[str]:
    tree = ast.parse(source.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return frozenset(names)


def module_problem(name: str, root: Path = ROOT) -> str | None:
    """Why dotted ``name`` names nothing (None: it resolves), e.g. ``pkg.mod.func``."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:k])
        source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if source.is_file():
            rest = parts[k:]
            if not rest or rest[0] in _top_level_names(source):
                return None
            return f"{'.'.join(parts[:k])} has no {rest[0]!r}"
    return "no such module"


def prose(path: Path) -> str:
    """What a reader reads in a file: all of a doc; a Python source's comments and docstrings (its string
    literals may name paths on purpose: outputs to be written, a test's missing file)."""
    text = path.read_text(errors="replace")
    if path.suffix != ".py":
        return text
    out = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(ast.get_docstring(node) or "")
    return "\n".join(out)


def problems(files: list[Path], root: Path = ROOT) -> list[str]:
    out = []
    for f in files:
        text = prose(f)
        where = f.relative_to(root) if f.is_relative_to(root) else f
        out += [f"{where}: {p} does not exist" for p in sorted(named_paths(text)) if not (root / p).exists()]
        for m in sorted(named_modules(text)):
            why = module_problem(m, root)
            if why:
                out.append(f"{where}: {m}: {why}")
    return out


def test_every_named_path_and_module_exists():
    bad = problems(documents())
    assert not bad, "names of things that do not exist:\n" + "\n".join(bad)


@pytest.mark.parametrize("text, found", [
    ("see `tests/test_deploy.py` for the checks", "tests/test_deploy.py does not exist"),
    ("the baselines (quantize_tools.scalar)", "quantize_tools.scalar: quantize_tools has no 'scalar'"),
    ("`quantize_tools/moe_layer.py`", "quantize_tools/moe_layer.py does not exist"),
    ("quantize_tools.options.no_such_default",
     "quantize_tools.options.no_such_default: quantize_tools.options has no 'no_such_default'"),
    ("make -C deploy/nowhere", "deploy/nowhere does not exist"),
    ("python benchmarks/gone.py --out benchmarks/results/new.json (then benchmarks/SCRIPT.py)",
     "benchmarks/gone.py does not exist"),
])
def test_catches_stale_names(tmp_path, text, found):
    """The stale names this test was written for (moved tests, a module that never existed) are caught;
    what does exist passes."""
    doc = tmp_path / "doc.md"
    doc.write_text(f"{text}\nand these exist: tests/tools/test_deploy.py, quantize_tools.method.mixed.allocate, "
                   "vllm_kbvq.archs.MoEGeometry, docs/results.md.\n")
    assert problems([doc]) == [f"{doc}: {found}"]


def test_python_sources_are_read_for_their_comments_and_docstrings(tmp_path):
    """In code, comments and docstrings are checked, string literals (an output to write, a test's bad
    name) are not."""
    src = tmp_path / "mod.py"
    src.write_text('"""Runs like tests/test_gone.py."""\nOUT = "benchmarks/results/new.json"\n\n\n'
                   'def f():\n    """See quantize_tools.moe_layer."""\n    return 1  # tests/test_layout.py\n')
    assert problems([src]) == [f"{src}: tests/test_gone.py does not exist", f"{src}: tests/test_layout.py does not exist",
                               f"{src}: quantize_tools.moe_layer: quantize_tools has no 'moe_layer'"]
