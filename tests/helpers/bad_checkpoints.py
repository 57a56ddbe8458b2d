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
    "version": (lambda c: _edit_config(c, lambda q: q.__setitem__("format_version", 3)), "format_version is 3"),
    "bits": (lambda c: _edit_config(c, lambda q: (q.__setitem__("bits", 3), q.pop("codebook_size"),
                                                  q.pop("index_bits"))), "bits=3, vector_dim=4"),
    "method": (lambda c: _edit_config(c, lambda q: q.__setitem__("quant_method", "gptq")), "quant_method is 'gptq'"),
    "arch": (lambda c: _edit_config(c, lambda q: q.__setitem__("arch", "llama")),
             "quantization_config.arch must be one of"),
}


def broken_copy(src, dst, case):
    shutil.copytree(src, dst)
    CASES[case][0](dst)
    return dst, CASES[case][1]


# ---- corruption of any kind, table-driven: every file truncated, every config field of a wrong type or range

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# field -> values that must be refused (wrong type, then wrong range)
BAD_FIELDS = {
    "bits": ["2", 2.0, True, 0, 9],
    "vector_dim": [2.5, "4", 0, 3],  # 3: a power of 2 is needed (the GPU kernels load vectors with tl.arange)
    "arch": [["qwen2_moe"], 5, "llama"],
    "rank": [5, "x", {"experts": {"gate": "x"}}, {"experts": {"gate": -1}}, {"routed": {}}],
    "layers": [5, "0,1", [0.5], [-1], [0, 0]],
    "shared_intermediate_size": ["big", 0],
    "idre": ["yes", 1],
    "bcos": [None],
    "rank_ratio": ["x", 2, -0.1],
    "damp": ["x", -1],
    "kmeans_iters": [1.5, -1],
    "vq_method": [3],
    "seed": ["x", 1.5],
    "calibration": [[], "x"],
    "codebook_size": ["256", 255],
    "index_bits": [8.0, 9],
    "quant_method": [5, "gptq"],
    "format_version": ["1", 3],
}


def corrupt_cases(ckpt):
    """``(case id, edit, words the error must contain)`` for every file and every config field of ``ckpt``."""
    cases = []
    for f in sorted(ckpt.iterdir()):
        if f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json"):
            cases.append((f"truncated-{f.name}", lambda c, n=f.name: _truncate(c / n), f.name))
    cases.append(("config-not-json", lambda c: (c / "config.json").write_text("{\"quantization_config\": {"),
                  "config.json: not valid JSON"))
    cases.append(("config-not-object", lambda c: (c / "config.json").write_text("[1, 2]"), "config.json: not a JSON object"))
    for field, values in BAD_FIELDS.items():
        for k, v in enumerate(values):
            cases.append((f"{field}-{k}", lambda c, f=field, v=v: _edit_config(c, lambda q: q.__setitem__(f, v)),
                          f"quantization_config.{field}"))
    for field in ("bits", "vector_dim", "arch", "rank", "layers"):
        cases.append((f"no-{field}", lambda c, f=field: _edit_config(c, lambda q: q.pop(f)), repr(field)))
    cases.append(("qconfig-not-object", lambda c: _edit_model_config(c, "quantization_config", [1]),
                  "quantization_config must be a JSON object"))
    for field, value in (("hidden_size", "big"), ("num_experts", -1), ("moe_intermediate_size", None)):
        cases.append((f"model-{field}", lambda c, f=field, v=value: _edit_model_config(c, f, v), field))
    return cases


def _edit_model_config(ckpt, field, value):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
