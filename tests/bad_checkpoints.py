"""Broken copies of a tiny 2-bit Qwen2-MoE KBVQ checkpoint, one per kind of mistake, with the words
the error must contain. Shared by the reference-runtime and the vLLM load tests."""
import json
import shutil

from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _edit_tensor(ckpt, name, fn):
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            if name in h.keys():
                sd = load_file(f)
                fn(sd)
                save_file(sd, f, metadata={"format": "pt"})
                return
    raise KeyError(name)


def _edit_config(ckpt, fn):
    cfg = json.loads((ckpt / "config.json").read_text())
    fn(cfg["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(cfg))


_MISSING = "model.layers.1.mlp.experts.5.down_proj.vq_codebook"
_SHAPE = "model.layers.0.mlp.experts.2.gate_proj.lr_a"
_DTYPE = "model.layers.0.mlp.shared_expert.up_proj.affine_s"

# case -> (edit, words the error names)
CASES = {
    "missing": (lambda c: _edit_tensor(c, _MISSING, lambda sd: sd.pop(_MISSING)), f"{_MISSING} is missing"),
    "shape": (lambda c: _edit_tensor(c, _SHAPE, lambda sd: sd.__setitem__(_SHAPE, sd[_SHAPE][:-1])),
              f"{_SHAPE} has shape"),
    "dtype": (lambda c: _edit_tensor(c, _DTYPE, lambda sd: sd.__setitem__(_DTYPE, sd[_DTYPE].float())),
              f"{_DTYPE} has dtype F32"),
    "version": (lambda c: _edit_config(c, lambda q: q.__setitem__("format_version", 2)), "format_version is 2"),
    "bits": (lambda c: _edit_config(c, lambda q: (q.__setitem__("bits", 3), q.pop("codebook_size"),
                                                  q.pop("index_bits"))), "bits=3, vector_dim=4"),
    "method": (lambda c: _edit_config(c, lambda q: q.__setitem__("quant_method", "gptq")), "quant_method is 'gptq'"),
    "arch": (lambda c: _edit_config(c, lambda q: q.__setitem__("arch", "llama")),
             "quantization_config.arch 'llama' is not one of"),
}


def broken_copy(src, dst, case):
    shutil.copytree(src, dst)
    CASES[case][0](dst)
    return dst, CASES[case][1]
