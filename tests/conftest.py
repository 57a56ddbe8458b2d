import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent / "helpers"))

import pytest  # noqa: E402

from tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: a tiny random checkpoint of an architecture, built once per session."""
    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny_{arch}"))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def kbvq_tiny(tiny_model, tmp_path_factory):
    """Factory: a tiny checkpoint of an architecture quantized at 2 bits (rank 4 bases), once per session."""
    import torch

    from quantize_tools.pipeline import QuantizeOptions, quantize

    cache = {}

    def get(arch: str, **options):
        """``options``: further QuantizeOptions (e.g. row_scale, finetune_steps); each set is its own checkpoint."""
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"kbvq_{arch}") / "q2"
            tokens = torch.randint(1, 320, (8, 64), generator=torch.Generator().manual_seed(0))
            quantize(tiny_model(arch), out, tokens,
                     QuantizeOptions(bits=2, kmeans_iters=10, rank_ratio=1 / 16, compare_plain_vq=False, **options),
                     progress=False)
            cache[key] = out
        return cache[key]

    return get

