"""Layer-streaming KBVQ quantization of a Hugging Face MoE checkpoint.

One decoder layer at a time: its weights come from the shards, its calibration
inputs are the outputs of the already-quantized layers before it, the method
(:mod:`.method.block`) quantizes its experts, and its quantized tensors go to a
per-layer shard in the run folder (:mod:`.run_folder`: resumable, moved into place
only when complete; a resumed run replays the finished layers from their shards,
bit-identical to an uninterrupted run).

Peak memory is about: calibration activations ``3 * nsamples * seqlen * hidden * 4`` bytes
(layer input, MoE input, layer output, float32) + one decoder layer in float32 +
the working set of one weight type (``n_experts * oc * ic * 4`` bytes a few times over); fine-tuning
adds one more copy of the activations (the FP block's outputs) and one layer's expert weights in float32.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vllm_kbvq.archs import WEIGHT_TYPES, ModelConfigError, MoEGeometry, arch_for_config, layer_prefix
from vllm_kbvq.format import REPORT_FILE, KBVQConfig, QuantizedMatrix, Width, layer_matrices, load_json
from vllm_kbvq.reference import KBVQExperts, KBVQLinear

from . import run_folder
from .calibration.layerwise import run_layer, stop_before
from .method.block import quantize_moe_block
from .method.experts import DenseExperts
from .method.idre import ranks_for
from .method.mixed import least_bits_per_weight
from .method.scalar import quantize_moe_block_scalar
from .options import METHODS, SCALAR_METHODS, QuantizeError, QuantizeOptions, check_device
from .report import summarize, summarize_scalar
from .run_folder import check_output, partial_dir, write_json_atomic
from .shards import CheckpointError, ShardReader

__all__ = ["QuantizeOptions", "quantize", "QuantizeError", "preflight", "check_output", "check_device"]


# transformers' fused experts modules take (hidden_states, top_k_index, top_k_weights)
EXPERTS_INPUTS = ("hidden_states", "top_k_index", "top_k_weights")


class _ExpertsStandIn(torch.nn.Module):
    """Takes the experts' place while their routed inputs are captured, so their weights are never loaded."""

    def forward(self, *args):
        raise RuntimeError("the experts stand-in runs only under layerwise.stop_before")


def preflight(model_dir: str | Path, output: str | Path, opts: QuantizeOptions, overwrite: bool = False,
              resume: bool | str = False) -> None:
    """Every check that needs no tensor data, so a bad option or path fails in seconds, not minutes."""
    opts.validate()
    check_device(opts.device)
    model_dir, output = Path(model_dir), Path(output)
    reader = ShardReader(model_dir)
    config = load_json(model_dir / "config.json", CheckpointError)
    arch_for_config(config)  # an unsupported model_type is named before its fields
    try:
        geom = MoEGeometry.from_config(config, str(model_dir / "config.json"))
    except ModelConfigError as e:
        raise QuantizeError(str(e)) from None
    if opts.method == "kbvq":
        for name, width in {"hidden_size": geom.hidden, geom.arch.expert_intermediate_attr: geom.inter}.items():
            for d in _vector_dims(opts):
                if width % d:
                    raise QuantizeError(f"{model_dir}: layer width {name}={width} is not divisible by vector length {d} "
                                        f"({'--candidate-widths' if opts.bits_budget else '--vector-dim'})")
        for d in _vector_dims(opts) if geom.shared_inter else ():
            if geom.shared_inter % d:
                raise QuantizeError(f"{model_dir}: shared-expert width {geom.shared_inter} is not divisible by vector "
                                    f"length {d}")
    del reader
    check_output(model_dir, output, overwrite, resume)


def _vector_dims(opts: QuantizeOptions) -> list[int]:
    return sorted({d for _, d in opts.candidate_widths}) if opts.bits_budget is not None else [opts.vector_dim]


def _layer_params(reader: ShardReader, arch, layer: int, expert_names: set[str]) -> dict[str, torch.Tensor]:
    prefix = layer_prefix(layer)
    out = {}
    for name in reader.names():
        if name.startswith(prefix) and name not in expert_names:
            out[arch.to_memory_name(name)[len(prefix):]] = reader.get(name, torch.float32)
    return out


def _expert_names(reader, geom: MoEGeometry, layer: int) -> set[str]:
    """The routed experts' weights: never loaded into the layer (the stand-in takes their place)."""
    names = {geom.arch.expert_tensor(layer, e, w) for e in range(geom.n_experts) for w in WEIGHT_TYPES}
    return {n for n in names if n in reader}


@dataclass
class _Job:
    """What every stage of one run reads: where from and to, the model's geometry, the options."""

    model_dir: Path
    output: Path
    reader: ShardReader
    config: object  # the transformers config
    geom: MoEGeometry
    cfg: KBVQConfig
    opts: QuantizeOptions
    overwrite: bool
    fingerprint: str
    progress: bool
    device: torch.device

    @property
    def partial(self) -> Path:
        return partial_dir(self.output)


def quantize(
    model_dir: str | Path,
    output: str | Path,
    tokens: torch.Tensor,
    opts: QuantizeOptions,
    overwrite: bool = False,
    resume: bool | str = False,
    calibration_info: dict | None = None,
    progress: bool = True,
) -> dict:
    """Quantize ``model_dir`` into ``output``; returns the report (also written as ``kbvq_report.json``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    t_start = time.time()
    model_dir, output = Path(model_dir), Path(os.path.abspath(output))  # "--output ." names a directory too
    preflight(model_dir, output, opts, overwrite, resume)
    reader = ShardReader(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    geom = MoEGeometry.from_config(config)
    device = check_device(opts.device)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    arch = geom.arch
    moe_layers = [i for i, layer in enumerate(model.model.layers)
                  if hasattr(getattr(layer, arch.moe_attr, None), arch.experts_attr)]
    if not moe_layers:
        raise QuantizeError(f"{model_dir}: no decoder layer has a MoE block")
    mixed = opts.bits_budget is not None and opts.method == "kbvq"
    bits, vector_dim = min(opts.candidate_widths, key=lambda w: Width(*w)) if mixed else (opts.bits, opts.vector_dim)
    cfg = KBVQConfig(
        bits=bits, vector_dim=vector_dim, arch=arch.name,
        rank=ranks_for(opts, geom), layers=moe_layers,
        shared_intermediate_size=geom.shared_inter, idre=opts.idre, bcos=opts.bcos, rank_ratio=opts.rank_ratio,
        damp=opts.damp, kmeans_iters=opts.kmeans_iters, vq_method=opts.vq_method, seed=opts.seed,
        row_scale=opts.row_scale, finetune_steps=opts.finetune_steps,
        widths=[list(w) for w in opts.candidate_widths] if mixed else None,
        bits_budget=opts.bits_budget if mixed else None,
        calibration={**(calibration_info or {}), "nsamples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1])},
    )
    cfg.validate()
    if mixed:  # every MoE layer has the same matrices: one tells whether the budget can be met
        least = least_bits_per_weight(layer_matrices(geom, cfg, moe_layers[0]),
                                      [Width(*w) for w in opts.candidate_widths])
        if opts.bits_budget < least:
            raise QuantizeError(f"--bits-budget {opts.bits_budget}: this model's layers need at least {least:.3f} bits "
                                "per expert weight, with every matrix at its cheapest of --candidate-widths")

    _check_checkpoint(reader, geom, cfg, progress)
    fingerprint = run_folder.fingerprint(model_dir, opts, tokens)
    previous = run_folder.previous_result(output, fingerprint, overwrite, resume, progress)
    if previous is not None:
        return previous
    resumed = run_folder.prepare(model_dir, output, overwrite, resume, fingerprint)  # checked again: time has passed
    job = _Job(model_dir, output, reader, config, geom, cfg, opts, overwrite, fingerprint, progress, device)
    try:
        report = _run(job, model, tokens, resumed)
    except BaseException:
        run_folder.keep_interrupted(job.partial, output)
        raise
    report["run"] = {"seconds": round(time.time() - t_start, 1), "peak_memory_bytes": _peak_memory_bytes(device),
                     "device": str(device), "fingerprint": fingerprint, "kmeans_sample": opts.kmeans_sample,
                     "cpu_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    write_json_atomic(output / REPORT_FILE, report)
    return report


def _check_checkpoint(reader, geom: MoEGeometry, cfg: KBVQConfig, progress: bool = False) -> None:
    """Every tensor finite, every expert matrix present with its shape, before any work is done (a bar: reading a
    28 GB model takes minutes)."""
    for layer in cfg.layers:
        for ref in layer_matrices(geom, cfg, layer):
            name = ref.name("weight")
            if name not in reader:
                raise CheckpointError(f"{reader.dir}: expert tensor {name} is missing")
            shape = reader.shape(name)
            if shape != (ref.oc, ref.ic):
                raise CheckpointError(f"{reader.dir}: {name} has shape {list(shape)}, expected {[ref.oc, ref.ic]}")
    for name in tqdm(reader.names(), desc="kbvq checks", unit="tensor", disable=not progress):
        reader.get(name)  # raises on NaN / inf
    reader.release()


def _run(job: _Job, model, tokens: torch.Tensor, resumed: bool) -> dict:
    reader, config, geom, cfg, opts, device, partial = (job.reader, job.config, job.geom, job.cfg, job.opts,
                                                        job.device, job.partial)
    arch = geom.arch
    layers = model.model.layers
    backend = _BACKENDS[opts.method]
    state = {"fingerprint": job.fingerprint, "done": [], "reports": {}}
    if resumed:
        state = run_folder.read_progress(partial)
        if job.progress:
            print(f"kbvq-quantize: resuming the interrupted run in {partial}: {len(state['done'])} of "
                  f"{len(cfg.layers)} MoE layers already done")
    run_folder.write_progress(partial, state)

    emb = reader.get("model.embed_tokens.weight", torch.float32)
    h = emb[tokens].to(device)  # [N, L, hidden]
    del emb
    rotary = type(model.model.rotary_emb)(config=config).to(device)
    pos = torch.arange(tokens.shape[1], device=device)[None]
    pe = rotary(h[:1], pos)  # (cos, sin), or one complex tensor (DeepSeek-V2)
    bs = max(1, opts.batch_size)
    act_fn = _act_fn(config)

    bar = tqdm(range(len(layers)), desc="kbvq layers", unit="layer", disable=not job.progress)
    status = _Status(bar)
    for i in bar:
        layer = layers[i]
        is_moe = i in cfg.layers
        block = getattr(layer, arch.moe_attr) if is_moe else None
        expert_names = _expert_names(reader, geom, i) if is_moe else set()
        if is_moe:
            setattr(block, arch.experts_attr, _ExpertsStandIn())
        layer.to_empty(device=device)
        params = _layer_params(reader, arch, i, expert_names)
        missing, unexpected = layer.load_state_dict(params, strict=False)
        missing = [m for m in missing if not m.startswith(f"{arch.moe_attr}.{arch.experts_attr}.")]
        if missing:
            raise CheckpointError(f"{job.model_dir}: layer {i} tensors missing from the checkpoint: {missing[:5]}")
        layer.eval()
        shard = partial / f"layer-{i:05d}.safetensors"
        with torch.no_grad():
            if is_moe:
                if i in state["done"]:
                    bar.set_postfix_str(f"layer {i}: replay")
                    tensors = load_file(str(shard))
                else:
                    t0 = time.time()
                    bar.set_postfix_str(f"layer {i}: capture")
                    with stop_before(getattr(block, arch.experts_attr), EXPERTS_INPUTS) as seen:
                        run_layer(layer, h, pos, pe, bs)
                    x = torch.cat([a[0].reshape(-1, a[0].shape[-1]) for a in seen])
                    topk = torch.cat([a[1].reshape(a[0].shape[0], -1) for a in seen])
                    del seen

                    def weights(group, wtype, member=None, i=i):
                        """``[n, oc, ic]`` for the group, or ``[oc, ic]`` of one member."""
                        if member is not None:
                            return reader.get(arch.tensor(i, group, member, wtype), torch.float32)
                        n = geom.n_experts if group == "experts" else 1
                        return torch.stack([reader.get(arch.tensor(i, group, e, wtype), torch.float32) for e in range(n)])

                    bar.set_postfix_str(f"layer {i}: quantize")
                    tensors, rep = backend.quantize_block(
                        i, x, topk, weights, geom, act_fn, opts, cfg, device,
                        lambda msg, i=i: status(f"layer {i}: {msg}"), block=block)
                    del x, topk
                    rep["seconds"] = round(time.time() - t0, 2)
                    save_file(tensors, str(shard), metadata={"format": "pt"})
                    state["reports"][str(i)] = rep
                if "width_of" in state["reports"][str(i)]:  # mixed precision: this layer's widths, for what follows
                    cfg.width_of = {**(cfg.width_of or {}), str(i): state["reports"][str(i)]["width_of"]}
                backend.install(block, geom, i, cfg, act_fn, tensors, device)
            bar.set_postfix_str(f"layer {i}: forward")
            h = run_layer(layer, h, pos, pe, bs)
        layer.to_empty(device="meta")  # free the layer
        reader.release()  # and unmap what was read for it
        if is_moe and i not in state["done"]:
            state["done"].append(i)
            run_folder.write_progress(partial, state)
    bar.close()
    if job.progress:
        print(f"kbvq-quantize: writing the checkpoint to {job.output}", file=sys.stderr, flush=True)
    return _finalize(job, state)


class _Status:
    """The bar's stage text, redrawn at most twice a second: a layer reports each k-means iteration."""

    def __init__(self, bar, interval: float = 0.5):
        self.bar, self.interval, self.last = bar, interval, 0.0

    def __call__(self, msg: str) -> None:
        now = time.monotonic()
        self.bar.set_postfix_str(msg, refresh=now - self.last >= self.interval)
        if now - self.last >= self.interval:
            self.last = now


def _act_fn(config):
    from transformers.activations import ACT2FN

    return ACT2FN[config.hidden_act]


def _install_quantized(block, geom: MoEGeometry, layer: int, cfg: KBVQConfig, act_fn, tensors, device) -> None:
    arch = geom.arch
    experts = KBVQExperts(arch, geom.n_experts, geom.hidden, geom.inter, cfg, act_fn, layer, device=device)
    setattr(block, arch.experts_attr, experts)
    for ref in layer_matrices(geom, cfg, layer):
        new = None if ref.group == "experts" else (lambda old, ref=ref: KBVQLinear(
            old.in_features, old.out_features, ref.width, ref.rank, True, device=device))
        _block_linear(block, arch, ref, new).load(QuantizedMatrix.read(tensors, ref))


def _block_linear(block, arch, ref, new=None):
    """The module of matrix ``ref`` in a MoE block; with ``new``, put there first (replacing a shared linear)."""
    if ref.group == "experts":
        return getattr(getattr(block, arch.experts_attr)[ref.member], arch.proj_names[ref.wtype])
    mlp, name = getattr(block, arch.shared_attr), arch.shared_proj_names[ref.wtype]
    if new is not None:
        setattr(mlp, name, new(getattr(mlp, name)))
    return getattr(mlp, name)


def _install_dense(block, geom: MoEGeometry, layer: int, cfg: KBVQConfig, act_fn, tensors, device) -> None:
    """A scalar baseline's fake-quant weights, as plain modules."""
    setattr(block, geom.arch.experts_attr, DenseExperts(geom, act_fn, device=device))
    for ref in layer_matrices(geom, cfg, layer):
        _block_linear(block, geom.arch, ref).weight.copy_(tensors[ref.name("weight")])


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _finalize(job: _Job, state: dict) -> dict:
    """Write the remaining tensors, config, tokenizer and report; then move the result into place.

    A scalar baseline keeps the original config (its checkpoint is a plain one with dequantized weights)."""
    reader, cfg, partial, model_dir = job.reader, job.cfg, job.partial, job.model_dir
    quantized = {ref.name("weight") for layer in cfg.layers for ref in layer_matrices(job.geom, cfg, layer)}
    rest = {n: reader.get(n) for n in reader.names() if n not in quantized}
    shards = [partial / f"layer-{i:05d}.safetensors" for i in sorted(cfg.layers)]
    rest_file = partial / "rest.safetensors"
    save_file(rest, str(rest_file), metadata={"format": "pt"})
    files = [rest_file] + shards
    total = len(files)
    weight_map = {}
    for k, f in enumerate(files, 1):
        final_name = f"model-{k:05d}-of-{total:05d}.safetensors"
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                weight_map[name] = final_name
        os.replace(f, partial / final_name)
    write_json_atomic(partial / "model.safetensors.index.json", {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))})

    backend = _BACKENDS[job.opts.method]
    model_config = _read_config(model_dir)
    if backend.quant_config:
        model_config["quantization_config"] = cfg.to_dict()
    write_json_atomic(partial / "config.json", model_config)
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".gguf") and f.name not in (
            "config.json", "model.safetensors.index.json", REPORT_FILE):
            shutil.copy2(f, partial / f.name)
    report = backend.summarize(job.opts, cfg, state["reports"], partial, job.geom)
    write_json_atomic(partial / REPORT_FILE, report)
    (partial / run_folder.PROGRESS_FILE).unlink()
    run_folder.normal_permissions(partial)
    run_folder.move_into_place(partial, job.output, job.overwrite)
    return report


@dataclass(frozen=True)
class _Backend:
    """What differs between KBVQ and the scalar baselines; the layer streaming around it is shared."""

    quantize_block: Callable  # (layer, x, topk, weights, geom, act_fn, opts, cfg, device, progress, block=)
    install: Callable  # (block, geom, layer, cfg, act_fn, tensors, device): the quantized experts into the block
    summarize: Callable  # (opts, cfg, layer_reports, ckpt_dir, geom) -> report
    quant_config: bool  # config.json carries quantization_config (scalar checkpoints are plain ones)


def _scalar_block(layer, x, topk, weights, geom, act_fn, opts, cfg, device, progress, block=None):
    return quantize_moe_block_scalar(layer, x, topk, weights, geom, act_fn, opts, device)


_BACKENDS = {
    "kbvq": _Backend(quantize_moe_block, _install_quantized, lambda opts, *rest: summarize(*rest), True),
    **{m: _Backend(_scalar_block, _install_dense, summarize_scalar, False) for m in SCALAR_METHODS},
}
assert set(_BACKENDS) == set(METHODS)


def _read_config(model_dir: Path) -> dict:
    with open(model_dir / "config.json") as f:
        return json.load(f)
