"""The reference runtime depends on the checkpoint format only.

``vllm_kbvq/reference.py`` is the oracle the plugin and the native kernels are tested against, so it may
import, of this project, only ``archs``, ``format``, ``packing`` and the plain-torch math of
``kernels.torch_moe``: never the plugin, the native CPU kernels or the dispatch between implementations
(the transformers model on the CPU kernels is ``vllm_kbvq.plugin.cpu_model``). Checked on the source,
every import statement at any depth (module level, inside functions and classes) and
``importlib.import_module`` / ``__import__`` calls with a literal name, and on a fresh interpreter:
importing the reference loads none of the others.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import vllm_kbvq
import vllm_kbvq.reference

PACKAGE = "vllm_kbvq"
ALLOWED = {"vllm_kbvq.archs", "vllm_kbvq.format", "vllm_kbvq.packing", "vllm_kbvq.kernels.torch_moe"}


def project_imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, module) of every import of a ``vllm_kbvq`` module in the source of ``module`` at ``path``. For
    ``from P import a, b`` that is P where P is a module, ``P.a`` and ``P.b`` where P is a package (each name
    may be a submodule: ``from .kernels import dispatch``)."""
    package = module.split(".")[:-1]
    root = Path(vllm_kbvq.__file__).parent.parent
    found = []

    def add(line, base, names=()):
        if base == PACKAGE or base.startswith(PACKAGE + "."):
            is_package = (root / base.replace(".", "/")).is_dir()
            found.extend([(line, f"{base}.{n}") for n in names] if is_package and names else [(line, base)])

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            parts = package[:len(package) - node.level + 1] if node.level else []
            base = ".".join(parts + ([node.module] if node.module else []))
            add(node.lineno, base, [alias.name for alias in node.names])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                target = node.args[0].value
                if target.startswith("."):  # relative to the package argument; this file's own package here
                    target = ".".join(package) + target
                add(node.lineno, target)
    return sorted(found)


def test_reference_imports_only_the_format_modules():
    path = Path(vllm_kbvq.reference.__file__)
    imports = project_imports(path, "vllm_kbvq.reference")
    assert {m for _, m in imports} >= {"vllm_kbvq.format", "vllm_kbvq.kernels.torch_moe"}  # the walk sees them
    wrong = [f"{path.name}:{line} imports {m}" for line, m in imports if m not in ALLOWED]
    assert not wrong, "the reference runtime may import only " + ", ".join(sorted(ALLOWED)) + ":\n" + "\n".join(wrong)


def test_checker_sees_imports_at_every_depth(tmp_path):
    """The walk itself: relative and absolute imports, at module level and inside a function and a class."""
    src = tmp_path / "reference.py"
    src.write_text("from .format import X\nfrom . import packing\nfrom .kernels import torch_moe, dispatch\n"
                   "def f():\n    from .plugin.layout import load_tensor\n    import vllm_kbvq.kernels.cpu_moe\n"
                   "class C:\n    def g(self):\n        import importlib\n"
                   "        return importlib.import_module('.plugin.cpu_model', 'vllm_kbvq')\n")
    assert [m for _, m in project_imports(src, "vllm_kbvq.reference")] == [
        "vllm_kbvq.format", "vllm_kbvq.packing", "vllm_kbvq.kernels.dispatch", "vllm_kbvq.kernels.torch_moe",
        "vllm_kbvq.plugin.layout", "vllm_kbvq.kernels.cpu_moe", "vllm_kbvq.plugin.cpu_model"]


def test_importing_the_reference_loads_no_plugin_or_native_kernels():
    code = ("import sys, vllm_kbvq.reference; print(' '.join(sorted(m for m in sys.modules "
            "if m.startswith('vllm_kbvq.'))))")
    root = str(Path(vllm_kbvq.__file__).parent.parent)  # this checkout's package, not another one installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         cwd=root, env=env).stdout
    loaded = set(out.split())
    assert "vllm_kbvq.reference" in loaded
    assert loaded <= ALLOWED | {"vllm_kbvq.reference", "vllm_kbvq.kernels"}, sorted(loaded - ALLOWED)
