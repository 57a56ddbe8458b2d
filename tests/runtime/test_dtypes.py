"""Every architecture loads and runs in every dtype, through both loaders (issue 23).

A KBVQ checkpoint loaded in float32, bfloat16 or float16 must end with every floating
parameter outside the KBVQ modules in that dtype (the KBVQ tensors keep their format
dtypes), and its logits must be finite and agree with the float32 load as closely as the
unquantized model's logits in that dtype agree with its own float32 run.
"""
import shutil

import pytest
import torch

from tiny_models import ARCH_NAMES
from vllm_kbvq.format import CODE_DTYPE, FLOAT_DTYPE
from vllm_kbvq.plugin.cpu_model import load_kbvq_model
from vllm_kbvq.reference import KBVQLinear, register_with_transformers

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IDS = torch.randint(1, 320, (2, 16), generator=torch.Generator().manual_seed(1))
# The KBVQ model's dtype deviation (vs its float32 load) may be at most this multiple of the
# unquantized model's (same dtype vs float32): measured ratios are 0.8-1.0 (mean) and 0.2-1.1 (max).
MEAN_FACTOR, MAX_FACTOR = 3.0, 5.0


def _from_pretrained(path, dtype):
    from transformers import AutoModelForCausalLM

    register_with_transformers()  # KBVQ checkpoints load through transformers' own from_pretrained
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


LOADERS = {"load_kbvq_model": lambda path, dtype: load_kbvq_model(path, dtype=dtype),
           "from_pretrained": _from_pretrained}


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(IDS).logits


@pytest.fixture(scope="module")
def oracle(tiny_model, kbvq_tiny):
    """Per arch (once): the KBVQ float32 logits and the unquantized model's dtype noise."""
    cache = {}

    def get(arch):
        if arch not in cache:
            orig32 = _logits(_from_pretrained(tiny_model(arch), torch.float32))
            noise = {}
            for dt in DTYPES[1:]:
                d = (_logits(_from_pretrained(tiny_model(arch), dt)).float() - orig32).abs()
                noise[dt] = (d.mean().item(), d.max().item())
            cache[arch] = (_logits(load_kbvq_model(kbvq_tiny(arch), dtype=torch.float32, cpu_kernels=False)), noise)
        return cache[arch]

    return get


def _check_dtypes(model, dtype):
    wrong, kbvq = [], 0
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}"
            if isinstance(module, KBVQLinear):
                kbvq += 1
                want = CODE_DTYPE if p_name == "vq_codes" else FLOAT_DTYPE
            else:
                want = dtype if p.is_floating_point() else p.dtype
            if p.dtype != want:
                wrong.append((name, p.dtype, want))
    assert kbvq, "no KBVQ module in the loaded model"
    assert not wrong, f"{len(wrong)} parameters in the wrong dtype, e.g. {wrong[:4]}"


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_loads_and_runs_in_dtype(arch, dtype, loader, kbvq_tiny, oracle):
    ref32, noise = oracle(arch)
    model = LOADERS[loader](kbvq_tiny(arch), dtype)
    _check_dtypes(model, dtype)
    logits = _logits(model)
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()
    dev = (logits.float() - ref32).abs()
    if dtype == torch.float32:  # the same weights and code path: the two loaders agree exactly
        assert dev.max().item() <= 1e-6
        return
    mean_noise, max_noise = noise[dtype]
    assert dev.mean().item() <= MEAN_FACTOR * mean_noise, (dev.mean().item(), mean_noise)
    assert dev.max().item() <= MAX_FACTOR * max_noise, (dev.max().item(), max_noise)


@pytest.fixture(scope="module")
def kbvq_bf16_rest(kbvq_tiny, tmp_path_factory):
    """Per arch: the KBVQ checkpoint with every non-KBVQ tensor stored in bf16, as real Mixtral ships."""
    from safetensors.torch import load_file, save_file

    cache = {}

    def get(arch):
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"kbvq_bf16_{arch}") / "q2"
            shutil.copytree(kbvq_tiny(arch), out)
            for f in out.glob("*.safetensors"):
                sd = load_file(f)
                save_file({k: v.to(torch.bfloat16) if v.dtype == torch.float32 else v for k, v in sd.items()},
                          f, metadata={"format": "pt"})
            cache[arch] = out
        return cache[arch]

    return get


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_bf16_checkpoint_loads_in_float32(arch, loader, kbvq_bf16_rest, oracle):
    """Issue 23: Mixtral's router kept the checkpoint's bf16 in a float32 load, and the forward failed."""
    ref32, noise = oracle(arch)
    model = LOADERS[loader](kbvq_bf16_rest(arch), torch.float32)
    _check_dtypes(model, torch.float32)
    logits = _logits(model)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # bf16-rounded weights, float32 arithmetic: no further from the float32 checkpoint than a bf16 run
    dev = (logits - ref32).abs()
    mean_noise, max_noise = noise[torch.bfloat16]
    assert dev.mean().item() <= MEAN_FACTOR * mean_noise, (dev.mean().item(), mean_noise)
    assert dev.max().item() <= MAX_FACTOR * max_noise, (dev.max().item(), max_noise)
