"""benchmarks/random_moe.py, the full-size model writer, run as its users run it, at a tiny size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _write(out: Path, *extra: str) -> Path:
    args = [sys.executable, str(REPO / "benchmarks" / "random_moe.py"), "--shape", "tiny", "--out", str(out),
            "--layers", "3", "--layers-per-shard", "2", "--vocab", "1000", "--tokenizer-vocab", "300", *extra]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("random_moe")
    return _write(root / "a", "--shared-rank", "8"), _write(root / "b", "--shared-rank", "0"), root


def test_transformers_loads_every_tensor_and_runs(written):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.random_moe import TINY
    from vllm_kbvq.archs import MoEGeometry

    path = written[0]
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    assert MoEGeometry.from_config(model.config) == TINY.geom
    assert model.config.num_hidden_layers == 3 and model.config.vocab_size == 1000
    assert model.config.architectures == [type(model).__name__]  # serving engines pick the model class by it
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 300  # the embedding is padded past the tokenizer, as released models' are
    logits = model(tok("The quick brown fox", return_tensors="pt").input_ids).logits
    assert logits.shape[-1] == 1000 and torch.isfinite(logits).all()


def test_shards_hold_at_most_the_asked_layers(written):
    index = json.loads((written[0] / "model.safetensors.index.json").read_text())
    layers_in = {}
    for name, file in index["weight_map"].items():
        if name.startswith("model.layers."):
            layers_in.setdefault(file, set()).add(int(name.split(".")[2]))
    assert sorted(map(sorted, layers_in.values())) == [[0, 1], [2]]
    on_disk = sum(f.stat().st_size for f in written[0].glob("*.safetensors"))
    assert 0.99 * on_disk < index["metadata"]["total_size"] <= on_disk


def _subspace_energy(path: Path, rank: int) -> float:
    """The share of the stacked routed experts' gate energy in its top-``rank`` input directions."""
    from safetensors.torch import load_file

    tensors = {}
    for f in path.glob("*.safetensors"):
        tensors.update(load_file(f))
    w = torch.cat([tensors[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"].double() for e in range(8)])
    s = torch.linalg.svdvals(w) ** 2
    return float(s[:rank].sum() / s.sum())


def test_experts_share_a_low_rank_row_space(written):
    """Half the energy of each expert is in one rank-8 row space shared by the layer's experts: the top 8
    of 128 input directions of the stacked experts hold about 1/2 + 1/2 * 8/128 of it; on pure noise
    (--shared-rank 0) they hold little more than 8/128."""
    shared, noise = _subspace_energy(written[0], 8), _subspace_energy(written[1], 8)
    assert 0.48 < shared < 0.62, shared
    assert noise < 0.2, noise


def test_same_arguments_same_files(written):
    again = _write(written[2] / "c", "--shared-rank", "8")
    for f in sorted(written[0].glob("*.safetensors")):
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name


def test_existing_output_is_refused(written):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "random_moe.py"), "--out", str(written[0])],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "exists" in r.stderr
