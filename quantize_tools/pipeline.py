"""Layer-streaming KBVQ quantization of a Hugging Face MoE checkpoint.

One decoder layer at a time: its weights come from the shards, its calibration
inputs are the outputs of the already-quantized layers before it, and its
quantized tensors go to a per-layer shard in ``<output>.kbvq-partial``. That
folder is renamed to ``<output>`` only when everything is written, so a killed
run never leaves a loadable half checkpoint, and ``resume`` replays the
finished layers from their shards (bit-identical to an uninterrupted run).

Peak memory is about: calibration activations ``3 * nsamples * seqlen * hidden * 4`` bytes
(layer input, MoE input, layer output, float32) + one decoder layer in float32 +
the working set of one weight type (``n_experts * oc * ic * 4`` bytes a few times over); fine-tuning
adds one more copy of the activations (the FP block's outputs) and one layer's expert weights in float32.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vllm_kbvq.archs import WEIGHT_TYPES, arch_for_config, layer_prefix
from vllm_kbvq.format import REPORT_FILE, KBVQConfig, QuantizedMatrix, Width, layer_matrices, load_json
from vllm_kbvq.reference import KBVQExperts, KBVQLinear

from .baselines import quantize_moe_block_scalar
from .experts import DenseExperts
from .files import normal_permissions, write_json_atomic
from .layerwise import run_layer, stop_before
from .moe_layer import least_bits_per_weight, quantize_moe_block, ranks_for
from .options import METHODS, SCALAR_METHODS, QuantizeError, QuantizeOptions, check_device
from .report import summarize, summarize_scalar
from .shards import CheckpointError, ShardReader

__all__ = ["QuantizeOptions", "quantize", "QuantizeError", "preflight", "check_output", "check_device"]

PARTIAL_SUFFIX = ".kbvq-partial"  # the run's folder until it is complete
_PROGRESS = "progress.json"


# transformers' fused experts modules take (hidden_states, top_k_index, top_k_weights)
EXPERTS_INPUTS = ("hidden_states", "top_k_index", "top_k_weights")


class _ExpertsStandIn(torch.nn.Module):
    """Takes the experts' place while their routed inputs are captured, so their weights are never loaded."""

    def forward(self, *args):
        raise RuntimeError("the experts stand-in runs only under layerwise.stop_before")


def _fingerprint(model_dir: Path, opts: QuantizeOptions, tokens: torch.Tensor) -> str:
    h = hashlib.sha256()
    settings = dataclasses.asdict(opts)
    if opts.bits_budget is None:  # uniform runs fingerprint as before mixed precision existed
        del settings["bits_budget"], settings["candidate_widths"]
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(str(model_dir.resolve()).encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()


def partial_dir(output: Path) -> Path:
    """Where a run writes before its result is complete."""
    return output.parent / (output.name + PARTIAL_SUFFIX)


def is_kbvq_output(directory: Path) -> bool:
    """A finished kbvq-quantize output: it holds ``kbvq_report.json``, which every run writes last."""
    return (directory / REPORT_FILE).is_file()


def check_output(model_dir: Path, output: Path, overwrite: bool = False, resume: bool | str = False) -> None:
    """Refuse, before any work, an output that would lose what a user had.

    The output (and its partial folder) may not be, contain or lie inside the input model,
    symlinks resolved, whatever ``overwrite`` says; ``overwrite`` replaces only a previous
    kbvq-quantize output (see :func:`is_kbvq_output`) or an interrupted run's partial folder.
    """
    model, output = Path(model_dir).resolve(), Path(os.path.abspath(output))
    for target in (output, partial_dir(output)):
        t = target.resolve()
        if t == model or model in t.parents or t in model.parents:
            raise QuantizeError(f"--output {output} overlaps --model {model_dir} ({t} and {model}): write the "
                                "quantized checkpoint to a separate directory")
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise QuantizeError(f"--output {output} exists and is not a directory")
        try:
            has_files = any(output.iterdir())
        except OSError as e:
            raise QuantizeError(f"--output {output}: cannot be read ({e.strerror})") from None
        if has_files:
            if not is_kbvq_output(output):
                raise QuantizeError(
                    f"--output {output} is not empty and is not a kbvq-quantize output (it has no {REPORT_FILE}); "
                    "--overwrite replaces only an earlier kbvq-quantize output: choose another --output")
            if not overwrite and resume is False:  # resuming: decided once the run's fingerprint is known
                raise QuantizeError(f"--output {output} already holds a kbvq-quantize output; pass --overwrite "
                                    "to replace it")
    partial = partial_dir(output)
    if resume == "auto":
        pass  # continue the interrupted run if it has these settings, else start over
    elif resume:
        if not (partial / _PROGRESS).is_file():
            raise QuantizeError(f"--resume: no interrupted run found at {partial}")
    elif (partial.exists() or partial.is_symlink()) and not partial.is_dir():
        raise QuantizeError(f"{partial} exists and is not a directory; remove it")
    elif partial.exists() and not overwrite:
        raise QuantizeError(
            f"an interrupted run left {partial}; pass --resume to continue it or --overwrite to start over")
    parent = output.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantizeError(f"--output {output}: cannot write in {parent}")


def _prepare_output(model_dir: Path, output: Path, overwrite: bool, resume: bool | str, fingerprint: str) -> bool:
    """Make the partial folder ready; True when an interrupted run is continued."""
    check_output(model_dir, output, overwrite, resume)
    partial = partial_dir(output)
    state = _read_progress(partial)
    if resume and state is not None:
        if state.get("fingerprint") == fingerprint:
            return True
        if resume != "auto":
            raise QuantizeError(f"--resume: {partial} was made with other options, model or calibration data; "
                                "rerun with the same arguments or use --overwrite")
        print(f"kbvq-quantize: {partial} holds an interrupted run with other settings; starting over")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return False


def _read_progress(partial: Path, strict: bool = True) -> dict | None:
    """The state an interrupted run left (``None``: there is none); an unreadable one is an error if ``strict``."""
    if not (partial / _PROGRESS).is_file():
        return None
    try:
        state = load_json(partial / _PROGRESS, QuantizeError)
        if not isinstance(state, dict) or not isinstance(state.get("done"), list):
            raise QuantizeError(f"{partial / _PROGRESS} is not a kbvq-quantize progress file")
    except QuantizeError:
        if strict:
            raise
        return None
    return state


def preflight(model_dir: str | Path, output: str | Path, opts: QuantizeOptions, overwrite: bool = False,
              resume: bool | str = False) -> None:
    """Every check that needs no tensor data, so a bad option or path fails in seconds, not minutes."""
    opts.validate()
    check_device(opts.device)
    model_dir, output = Path(model_dir), Path(output)
    reader = ShardReader(model_dir)
    config = load_json(model_dir / "config.json", CheckpointError)
    arch = arch_for_config(config)
    try:
        n_experts = arch.num_experts(config)
        widths = {"hidden_size": config["hidden_size"], arch.expert_intermediate_attr: arch.expert_intermediate(config)}
    except (KeyError, TypeError, ValueError):
        n_experts, widths = 0, {}
    if n_experts < 2:
        raise QuantizeError(f"{model_dir}: config has {n_experts} routed experts ({arch.num_experts_attr}); "
                            "not a Mixture-of-Experts model")
    if opts.method == "kbvq":
        for name, width in widths.items():
            for d in _vector_dims(opts):
                if not isinstance(width, int) or width % d:
                    raise QuantizeError(f"{model_dir}: layer width {name}={width} is not divisible by vector length {d} "
                                        f"({'--candidate-widths' if opts.bits_budget else '--vector-dim'})")
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


def _expert_names(reader, arch, layer, n_experts) -> set[str]:
    """The routed experts' weights: never loaded into the layer (the stand-in takes their place)."""
    names = {arch.expert_tensor(layer, e, w) for e in range(n_experts) for w in WEIGHT_TYPES}
    return {n for n in names if n in reader}


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
    arch = arch_for_config(config)
    n_experts = arch.num_experts(config)
    device = check_device(opts.device)
    hidden = config.hidden_size
    inter = arch.expert_intermediate(config)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    layers = model.model.layers
    moe_layers = [i for i, layer in enumerate(layers)
                  if hasattr(getattr(layer, arch.moe_attr, None), arch.experts_attr)]
    if not moe_layers:
        raise QuantizeError(f"{model_dir}: no decoder layer has a MoE block")
    shared_inter = None
    if arch.shared_attr:
        lin = getattr(getattr(getattr(layers[moe_layers[0]], arch.moe_attr), arch.shared_attr),
                      arch.shared_proj_names["gate"])
        shared_inter = lin.out_features
        for d in _vector_dims(opts) if opts.method == "kbvq" else ():
            if shared_inter % d:
                raise QuantizeError(f"{model_dir}: shared-expert width {shared_inter} is not divisible by vector "
                                    f"length {d}")
    mixed = opts.bits_budget is not None and opts.method == "kbvq"
    bits, vector_dim = min(opts.candidate_widths, key=lambda w: Width(*w)) if mixed else (opts.bits, opts.vector_dim)
    cfg = KBVQConfig(
        bits=bits, vector_dim=vector_dim, arch=arch.name,
        rank=ranks_for(opts, hidden, inter, shared_inter), layers=moe_layers,
        shared_intermediate_size=shared_inter, idre=opts.idre, bcos=opts.bcos, rank_ratio=opts.rank_ratio,
        damp=opts.damp, kmeans_iters=opts.kmeans_iters, vq_method=opts.vq_method, seed=opts.seed,
        row_scale=opts.row_scale, finetune_steps=opts.finetune_steps,
        widths=[list(w) for w in opts.candidate_widths] if mixed else None,
        bits_budget=opts.bits_budget if mixed else None,
        calibration={**(calibration_info or {}), "nsamples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1])},
    )
    cfg.validate()
    if mixed:  # every MoE layer has the same matrices: one tells whether the budget can be met
        least = least_bits_per_weight(layer_matrices(arch, cfg, moe_layers[0], n_experts, hidden, inter),
                                      [Width(*w) for w in opts.candidate_widths])
        if opts.bits_budget < least:
            raise QuantizeError(f"--bits-budget {opts.bits_budget}: this model's layers need at least {least:.3f} bits "
                                "per expert weight, with every matrix at its cheapest of --candidate-widths")

    _check_checkpoint(reader, arch, cfg, n_experts, hidden, inter)
    fingerprint = _fingerprint(model_dir, opts, tokens)
    partial = partial_dir(output)
    if resume and is_kbvq_output(output):
        previous = load_json(output / REPORT_FILE, QuantizeError)
        run = previous.get("run") if isinstance(previous, dict) else None
        if resume == "auto" and isinstance(run, dict) and run.get("fingerprint") == fingerprint:
            if progress:
                print(f"kbvq-quantize: {output} already holds the result of these settings; nothing to do")
            return previous
        if not overwrite:
            other = " of other settings" if resume == "auto" else ""
            raise QuantizeError(f"--output {output} holds a kbvq-quantize output{other}; pass --overwrite to replace it")
    resumed = _prepare_output(model_dir, output, overwrite, resume, fingerprint)  # checked again: time has passed
    try:
        report = _run(model_dir, output, partial, reader, config, model, arch, cfg, tokens, opts, moe_layers,
                      n_experts, hidden, inter, shared_inter, overwrite, resumed, fingerprint, progress, device)
    except BaseException:
        # Keep an interrupted run when it has finished layers to resume from, or its whole result.
        state = _read_progress(partial, strict=False) or {}
        done = state.get("done", []) if isinstance(state.get("done"), list) else []
        if (partial / REPORT_FILE).is_file():
            print(f"kbvq-quantize: the finished result could not be moved to {output}; it is kept in {partial}")
        elif not done and partial.exists():
            shutil.rmtree(partial)
        elif partial.exists():
            print(f"kbvq-quantize: interrupted; {len(done)} finished layer(s) kept in {partial} (rerun the same "
                  "command with --resume, or --resume auto, to continue)")
        raise
    report["run"] = {"seconds": round(time.time() - t_start, 1), "peak_memory_bytes": _peak_memory_bytes(device),
                     "device": str(device), "fingerprint": fingerprint,
                     "cpu_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    write_json_atomic(output / REPORT_FILE, report)
    return report


def _check_checkpoint(reader, arch, cfg, n_experts, hidden, inter) -> None:
    """Every tensor finite, every expert matrix present with its shape, before any work is done."""
    for layer in cfg.layers:
        for ref in layer_matrices(arch, cfg, layer, n_experts, hidden, inter):
            name = ref.name("weight")
            if name not in reader:
                raise CheckpointError(f"{reader.dir}: expert tensor {name} is missing")
            t = reader.get(name)  # raises on NaN / inf
            if tuple(t.shape) != (ref.oc, ref.ic):
                raise CheckpointError(f"{reader.dir}: {name} has shape {list(t.shape)}, expected {[ref.oc, ref.ic]}")
    for name in reader.names():
        reader.get(name)


def _run(model_dir, output, partial, reader, config, model, arch, cfg, tokens, opts, moe_layers, n_experts, hidden,
         inter, shared_inter, overwrite, resumed, fingerprint, progress, device) -> dict:
    layers = model.model.layers
    backend = _BACKENDS[opts.method]
    state = {"fingerprint": fingerprint, "done": [], "reports": {}}
    if resumed:
        state = _read_progress(partial)
        if progress:
            print(f"kbvq-quantize: resuming the interrupted run in {partial}: {len(state['done'])} of "
                  f"{len(moe_layers)} MoE layers already done")
    write_json_atomic(partial / _PROGRESS, state)

    emb = reader.get("model.embed_tokens.weight", torch.float32)
    h = emb[tokens].to(device)  # [N, L, hidden]
    del emb
    rotary = type(model.model.rotary_emb)(config=config).to(device)
    pos = torch.arange(tokens.shape[1], device=device)[None]
    pe = rotary(h[:1], pos)  # (cos, sin), or one complex tensor (DeepSeek-V2)
    bs = max(1, opts.batch_size)

    bar = tqdm(range(len(layers)), desc="kbvq layers", unit="layer", disable=not progress)
    status = _Status(bar)
    for i in bar:
        layer = layers[i]
        is_moe = i in moe_layers
        block = getattr(layer, arch.moe_attr) if is_moe else None
        expert_names = _expert_names(reader, arch, i, n_experts) if is_moe else set()
        if is_moe:
            setattr(block, arch.experts_attr, _ExpertsStandIn())
        layer.to_empty(device=device)
        params = _layer_params(reader, arch, i, expert_names)
        missing, unexpected = layer.load_state_dict(params, strict=False)
        missing = [m for m in missing if not m.startswith(f"{arch.moe_attr}.{arch.experts_attr}.")]
        if missing:
            raise CheckpointError(f"{model_dir}: layer {i} tensors missing from the checkpoint: {missing[:5]}")
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
                        n = n_experts if group == "experts" else 1
                        return torch.stack([reader.get(arch.tensor(i, group, e, wtype), torch.float32) for e in range(n)])

                    bar.set_postfix_str(f"layer {i}: quantize")
                    tensors, rep = backend.quantize_block(
                        i, x, topk, weights, arch, n_experts, shared_inter is not None, _act_fn(config), opts, cfg,
                        device, lambda msg, i=i: status(f"layer {i}: {msg}"), block=block)
                    del x, topk
                    rep["seconds"] = round(time.time() - t0, 2)
                    save_file(tensors, str(shard), metadata={"format": "pt"})
                    state["reports"][str(i)] = rep
                if "width_of" in state["reports"][str(i)]:  # mixed precision: this layer's widths, for what follows
                    cfg.width_of = {**(cfg.width_of or {}), str(i): state["reports"][str(i)]["width_of"]}
                backend.install(block, arch, i, n_experts, hidden, inter, shared_inter, cfg, config, tensors, device)
            bar.set_postfix_str(f"layer {i}: forward")
            h = run_layer(layer, h, pos, pe, bs)
        layer.to_empty(device="meta")  # free the layer
        if is_moe and i not in state["done"]:
            state["done"].append(i)
            write_json_atomic(partial / _PROGRESS, state)
    bar.close()
    return _finalize(model_dir, output, partial, reader, arch, cfg, state, overwrite, opts, n_experts, hidden, inter)


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


def _install_quantized(block, arch, layer, n_experts, hidden, inter, shared_inter, cfg, config, tensors, device):
    experts = KBVQExperts(arch, n_experts, hidden, inter, cfg, _act_fn(config), layer, device=device)
    setattr(block, arch.experts_attr, experts)
    for ref in layer_matrices(arch, cfg, layer, n_experts, hidden, inter):
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


def _install_dense(block, arch, layer, n_experts, hidden, inter, shared_inter, cfg, config, tensors, device):
    """A scalar baseline's fake-quant weights, as plain modules."""
    setattr(block, arch.experts_attr, DenseExperts(arch, n_experts, hidden, inter, _act_fn(config), device=device))
    for ref in layer_matrices(arch, cfg, layer, n_experts, hidden, inter):
        _block_linear(block, arch, ref).weight.copy_(tensors[ref.name("weight")])


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _finalize(model_dir, output, partial, reader, arch, cfg, state, overwrite, opts, n_experts, hidden, inter) -> dict:
    """Write the remaining tensors, config, tokenizer and report; then move the result into place.

    A scalar baseline keeps the original config (its checkpoint is a plain one with dequantized weights)."""
    quantized = {ref.name("weight") for layer in cfg.layers
                 for ref in layer_matrices(arch, cfg, layer, n_experts, hidden, inter)}
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

    backend = _BACKENDS[opts.method]
    model_config = _read_config(model_dir)
    if backend.quant_config:
        model_config["quantization_config"] = cfg.to_dict()
    write_json_atomic(partial / "config.json", model_config)
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".gguf") and f.name not in (
            "config.json", "model.safetensors.index.json", REPORT_FILE):
            shutil.copy2(f, partial / f.name)
    report = backend.summarize(opts, cfg, state["reports"], partial, _read_config(model_dir), arch)
    write_json_atomic(partial / REPORT_FILE, report)
    (partial / _PROGRESS).unlink()
    normal_permissions(partial)
    _move_into_place(partial, output, overwrite)
    return report


def _move_into_place(partial: Path, output: Path, overwrite: bool) -> None:
    """Move the finished run to ``output``.

    An earlier KBVQ output there is set aside, then deleted. An existing empty folder (also a link
    to one, a mount point or the working directory) is filled in place, config.json and the report
    last, so it stays the folder the user made."""
    old = None
    if output.exists() and any(output.iterdir()):
        if not (overwrite and is_kbvq_output(output)):
            raise QuantizeError(f"--output {output} was filled by something else during the run; the result is "
                                f"left in {partial}")
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.kbvq-old-", dir=output.parent))
        os.replace(output, old / "previous")
        os.replace(partial, output)
        shutil.rmtree(old)  # holds only what was moved there; a symlink is removed, not followed
    elif output.exists():
        last = ("config.json", REPORT_FILE)
        for f in sorted(partial.iterdir(), key=lambda f: (f.name in last, last.index(f.name) if f.name in last else 0)):
            shutil.move(str(f), str(output / f.name))
        partial.rmdir()
    else:
        os.replace(partial, output)


@dataclass(frozen=True)
class _Backend:
    """What differs between KBVQ and the scalar baselines; the layer streaming around it is shared."""

    quantize_block: Callable  # (layer, x, topk, weights, arch, n_experts, shared, act_fn, opts, cfg, device, progress, block=)
    install: Callable  # the quantized experts into the block, for the forward that feeds the next layer
    summarize: Callable  # (opts, cfg, layer_reports, ckpt_dir, model_config, arch) -> report
    quant_config: bool  # config.json carries quantization_config (scalar checkpoints are plain ones)


def _scalar_block(layer, x, topk, weights, arch, n_experts, shared, act_fn, opts, cfg, device, progress, block=None):
    return quantize_moe_block_scalar(layer, x, topk, weights, arch, n_experts, shared, act_fn, opts, device)


_BACKENDS = {
    "kbvq": _Backend(quantize_moe_block, _install_quantized, lambda opts, *rest: summarize(*rest), True),
    **{m: _Backend(_scalar_block, _install_dense, summarize_scalar, False) for m in SCALAR_METHODS},
}
assert set(_BACKENDS) == set(METHODS)


def _read_config(model_dir: Path) -> dict:
    with open(model_dir / "config.json") as f:
        return json.load(f)
