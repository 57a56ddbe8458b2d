"""Runs ``triton_kernel_cases.py`` in a fresh process: Triton's interpreter on a CPU, compiled on a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


def test_triton_kernels_against_torch_reference():
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cases = Path(__file__).parents[1] / "helpers" / "triton_kernel_cases.py"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", str(cases)],
                       env=env, capture_output=True, text=True, timeout=1500, cwd=cases.parents[2])
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout and " skipped" not in r.stdout, r.stdout[-3000:]
