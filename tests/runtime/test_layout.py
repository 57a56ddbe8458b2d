"""Tensor- and expert-parallel slicing of KBVQ tensors, against the unsharded reference runtime.

Each rank's runtime tensors are built from the checkpoint in vLLM's two phases, with the same
functions the plugin uses: :func:`vllm_kbvq.plugin.layout.load_tensor` copies every checkpoint
tensor into a parameter of ``load_shapes()`` (codes still packed), then
:func:`~vllm_kbvq.plugin.layout.process_codes` unpacks them into ``shapes()``. The ranks' partial
outputs, summed as vLLM's all-reduce sums them, must equal what ``load_kbvq_model``'s modules compute.
"""
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from tiny_models import ARCH_NAMES, MIXED
from vllm_kbvq.archs import ARCHS
from vllm_kbvq.format import SUFFIXES, FormatError, KBVQConfig
from vllm_kbvq.kernels import cpu_moe
from vllm_kbvq.kernels.cpu_moe import cpu_layout
from vllm_kbvq.kernels.torch_moe import kbvq_linear_torch, kbvq_moe_torch, kbvq_moe_torch_static
from vllm_kbvq.packing import pack_codes
from vllm_kbvq.plugin.layout import GroupLayout, load_tensor, moe_banks, moe_layouts, process_codes, shared_layout
from vllm_kbvq.reference import load_kbvq_model, moe_blocks

ATOL = 2e-5


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _load(dst, suffix, loaded, shard, layout):
    assert loaded.dtype == dst.dtype, f"{suffix}: the checkpoint's dtype is the parameter's (no conversion)"
    load_tensor(dst, suffix, loaded, shard, layout)


def _fill(layout: GroupLayout, sources, n_local=None, cpu_kernels=False):
    """Runtime tensors of ``layout`` from ``sources[shard](expert, suffix)`` (per expert when ``n_local``),
    loaded into ``load_shapes()`` and then processed, as vLLM's loader and ``process_weights_after_loading`` do
    (``cpu_kernels``: the codes in the CPU kernels' layout)."""
    def lead(suffix):
        return () if n_local is None or suffix == "lr_b" else (len(n_local),)

    params = {}
    for suffix, (shape, dtype) in layout.load_shapes().items():
        t = torch.zeros((*lead(suffix), *shape), dtype=dtype)
        for shard, src in enumerate(sources):
            if not lead(suffix):
                _load(t, suffix, src(0 if n_local else None, suffix), shard, layout)
            else:
                for j, e in enumerate(n_local):
                    _load(t[j], suffix, src(e, suffix), shard, layout)
        params[suffix] = t
    params["vq_codes"] = process_codes(params["vq_codes"], layout)
    assert {s: (tuple(t.shape), t.dtype) for s, t in params.items()} == {
        s: ((*lead(s), *shape), dtype) for s, (shape, dtype) in layout.shapes().items()}
    if cpu_kernels:
        params["vq_codes"] = cpu_layout(params["vq_codes"], len(layout.rows))
    return params


def _setup(path):
    """The checkpoint and its reference model's MoE layer with the most banks (widths; 1 when uniform)."""
    cfg = KBVQConfig.from_model_dir(path)
    model_cfg = json.loads((path / "config.json").read_text())
    arch = ARCHS[cfg.arch]
    model = load_kbvq_model(path, dtype=torch.float32)  # the torch oracle
    sizes = (arch.num_experts(model_cfg), model_cfg["hidden_size"], arch.expert_intermediate(model_cfg))
    layer, block = max(moe_blocks(model, arch), key=lambda lb: len(moe_banks(cfg, lb[0], *sizes)))
    return cfg, model_cfg, arch, _tensors(path), layer, block


def _checkpoint(kbvq_tiny, arch, mixed):
    return kbvq_tiny(arch, **(MIXED if mixed else {}))


def _routing(n_tokens, n_experts, top_k, seed=0):
    """Random top-k routing where expert 0 gets every token and the last expert none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n_experts - 2, generator=g)[: top_k - 1] + 1 for _ in range(n_tokens)])
    ids = torch.cat([torch.zeros(n_tokens, 1, dtype=torch.long), ids], dim=1)
    weights = torch.rand(n_tokens, top_k, generator=g)
    return ids, weights


def _moe_rank(cfg, arch, tensors, layer, n, hidden, inter, tp_rank, tp_size, experts, cpu_kernels=False):
    """One rank's routed-expert tensors (holding ``experts``), per bank of one width pair: (the bank's map
    from global expert ids to its slots, its tensors). A uniform checkpoint has one bank; its map is None
    (the caller's expert map applies)."""
    banks = moe_banks(cfg, layer, n, hidden, inter, tp_rank, tp_size)
    out = []
    for bank in banks:
        held = bank.held(list(experts))
        if not held:
            continue  # as the plugin does: a rank runs only the banks it holds experts of
        params = {}
        for group, layout in bank.layouts.items():
            wtypes = ("gate", "up") if group == "w13" else ("down",)
            srcs = [lambda e, s, w=w: tensors[arch.expert_tensor(layer, e, w, s)] for w in wtypes]
            params.update({f"{group}_{k}": v for k, v in _fill(layout, srcs, held, cpu_kernels).items()})
        out.append((bank.slot_map(n, list(experts)) if len(banks) > 1 else None, params))
    return out


def _moe(x, ids, w, expert_map, banks, impl=kbvq_moe_torch):
    """The rank's output: the op once per bank, summed (the plugin's ``apply``)."""
    return sum(impl(x, w, ids, expert_map if slot_map is None else slot_map,
                    *(p.get(f"{g}_{s}") for g in ("w13", "w2") for s in SUFFIXES)) for slot_map, p in banks)


_NATIVE = cpu_moe.available()
_needs_native = pytest.mark.skipif(not _NATIVE, reason="the native CPU kernels did not build here")
# the CPU loop, the CUDA-graph-safe path in its gather (few tokens) and masked (many) regimes, and the
# native CPU kernels in their lookup-table and tile-GEMM regimes
IMPLS = [(kbvq_moe_torch, 24), (kbvq_moe_torch_static, 1), (kbvq_moe_torch_static, 24),
         pytest.param(partial(cpu_moe.kbvq_moe_cpu, gemm_min_tokens=10**9), 24, marks=_needs_native),
         pytest.param(partial(cpu_moe.kbvq_moe_cpu, gemm_min_tokens=1), 24, marks=_needs_native)]


def _native(impl) -> bool:
    return isinstance(impl, partial) and impl.func in (cpu_moe.kbvq_moe_cpu, cpu_moe.kbvq_linear_cpu)




@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed"])
@pytest.mark.parametrize("impl,n_tokens", IMPLS, ids=["loop", "static-gather", "static-masked", "cpu-lut", "cpu-gemm"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_routed_experts_tp_and_ep_sum_to_reference(arch, impl, n_tokens, mixed, kbvq_tiny):
    """Mixed widths: one op call per bank of experts of one width pair, each with its slot map (composed
    with expert parallelism's), summed."""
    cfg, model_cfg, spec, tensors, layer, block = _setup(_checkpoint(kbvq_tiny, arch, mixed))
    n, hidden, inter = spec.num_experts(model_cfg), model_cfg["hidden_size"], spec.expert_intermediate(model_cfg)
    assert (len(moe_banks(cfg, layer, n, hidden, inter)) > 1) == mixed
    x = torch.randn(n_tokens, hidden, generator=torch.Generator().manual_seed(1))
    ids, w = _routing(n_tokens, n, 2)
    _moe_ = partial(_moe, impl=impl)
    _moe_rank_ = partial(_moe_rank, cpu_kernels=_native(impl))
    experts = getattr(block, spec.experts_attr)
    with torch.no_grad():
        ref = experts(x, ids, w)

    full = _moe_(x, ids, w, None, _moe_rank_(cfg, spec, tensors, layer, n, hidden, inter, 0, 1, range(n)))
    torch.testing.assert_close(full, ref, atol=ATOL, rtol=0)

    tp = sum(_moe_(x, ids, w, None, _moe_rank_(cfg, spec, tensors, layer, n, hidden, inter, r, 2, range(n)))
             for r in range(2))
    torch.testing.assert_close(tp, ref, atol=ATOL, rtol=0)

    # expert parallelism: rank r holds half the experts; global ids map to local slots, -1 elsewhere
    ep = 0
    for r in range(2):
        local = list(range(r * n // 2, (r + 1) * n // 2))
        expert_map = torch.full((n,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(len(local), dtype=torch.int32)
        ep = ep + _moe_(x, ids, w, expert_map, _moe_rank_(cfg, spec, tensors, layer, n, hidden, inter, 0, 1, local))
    torch.testing.assert_close(ep, ref, atol=ATOL, rtol=0)


def test_static_path_has_no_data_dependent_host_work(kbvq_tiny):
    """fullgraph tracing fails on a host sync (``.tolist()``, ``nonzero``): the CPU loop must fail it."""
    cfg, model_cfg, spec, tensors, layer, block = _setup(kbvq_tiny("qwen2_moe"))
    n, hidden, inter = spec.num_experts(model_cfg), model_cfg["hidden_size"], spec.expert_intermediate(model_cfg)
    p = _moe_rank(cfg, spec, tensors, layer, n, hidden, inter, 0, 1, range(n))
    torch._dynamo.reset()
    for n_tokens in (1, 3, 24):
        x = torch.randn(n_tokens, hidden, generator=torch.Generator().manual_seed(n_tokens))
        ids, w = _routing(n_tokens, n, 2)
        traced = _moe(x, ids, w, None, p, impl=torch.compile(kbvq_moe_torch_static, fullgraph=True, backend="eager"))
        torch.testing.assert_close(traced, _moe(x, ids, w, None, p), atol=ATOL, rtol=0)
    with pytest.raises((torch._dynamo.exc.Unsupported, GuardOnDataDependentSymNode), match="unique"):
        _moe(x, ids, w, None, p, impl=torch.compile(kbvq_moe_torch, fullgraph=True, backend="eager"))


LINEARS = [kbvq_linear_torch, pytest.param(partial(cpu_moe.kbvq_linear_cpu, gemm_min_tokens=10**9), marks=_needs_native),
           pytest.param(partial(cpu_moe.kbvq_linear_cpu, gemm_min_tokens=1), marks=_needs_native)]


@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed"])
@pytest.mark.parametrize("linear", LINEARS, ids=["torch", "cpu-lut", "cpu-gemm"])
@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2"])
def test_shared_expert_tp_sums_to_reference(arch, linear, mixed, kbvq_tiny):
    cfg, model_cfg, spec, tensors, layer, block = _setup(_checkpoint(kbvq_tiny, arch, mixed))
    hidden, si = model_cfg["hidden_size"], cfg.shared_intermediate_size
    shared = getattr(block, spec.shared_attr)
    x = torch.randn(5, 3, hidden, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = shared(x)

    def src(w):
        return lambda _e, s: tensors[spec.shared_tensor(layer, w, s)]

    out = 0
    for r in range(2):
        native = _native(linear)
        gu = _fill(shared_layout(cfg, layer, ("gate", "up"), (si, si), hidden, r, 2, split_out=True), [src("gate"), src("up")],
                   cpu_kernels=native)
        dn = _fill(shared_layout(cfg, layer, ("down",), (hidden,), si, r, 2, split_in=True), [src("down")], cpu_kernels=native)
        h = linear(x, *(gu.get(s) for s in SUFFIXES))
        g, u = h.chunk(2, dim=-1)
        out = out + linear(F.silu(g) * u, *(dn.get(s) for s in SUFFIXES))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_sizes_that_do_not_split_fail_clearly(kbvq_tiny):
    cfg = KBVQConfig.from_model_dir(kbvq_tiny("mixtral"))
    with pytest.raises(FormatError, match="not divisible by tensor-parallel size 3"):
        moe_layouts(cfg, 128, 96 + 1, 0, 3)
    with pytest.raises(FormatError, match="not a multiple of vector_dim 4"):
        moe_layouts(cfg, 128, 24, 0, 4)  # 6 inputs per rank


def test_loader_names_bad_tensors(kbvq_tiny):
    path = kbvq_tiny("qwen3_moe")
    cfg = KBVQConfig.from_model_dir(path)
    spec = ARCHS[cfg.arch]
    tensors = _tensors(path)
    layout = moe_layouts(cfg, 128, 64)["w13"]
    shape, dtype = layout.shapes()["vq_codebook"]
    dst = torch.zeros(shape, dtype=dtype)
    name = spec.expert_tensor(0, 1, "gate", "vq_codebook")
    with pytest.raises(FormatError, match=f"{name} has dtype torch.float32"):
        load_tensor(dst, "vq_codebook", tensors[name].float(), 0, layout, name)
    with pytest.raises(FormatError, match=rf"{name} has shape \[255, 4\]"):
        load_tensor(dst, "vq_codebook", tensors[name][:255], 0, layout, name)
    codes = spec.expert_tensor(0, 1, "gate", "vq_codes")
    shape, dtype = layout.load_shapes()["vq_codes"]
    dst = torch.zeros(shape, dtype=dtype)
    oc, words = tensors[codes].shape
    with pytest.raises(FormatError, match=rf"{codes} has shape \[{oc}, {words - 1}\], expected \[{oc}, {words}\]"):
        load_tensor(dst, "vq_codes", tensors[codes][:, :-1], 0, layout, codes)
    with pytest.raises(FormatError, match=f"{codes} has dtype torch.int64, expected torch.int32"):
        load_tensor(dst, "vq_codes", tensors[codes].long(), 0, layout, codes)
    with pytest.raises(FormatError, match=f"{name[:-len('vq_codebook')]}weight: unknown KBVQ suffix 'weight'"):
        load_tensor(dst, "weight", tensors[codes], 0, layout, name[:-len("vq_codebook")] + "weight")
    with pytest.raises(ValueError, match="load_shapes"):  # the runtime form is not processed twice
        process_codes(process_codes(dst, layout), layout)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("bits,d", [(2, 4), (3, 4), (3, 2), (4, 2), (2, 8)])
def test_each_rank_loads_whole_packed_rows_and_unpacks_its_window(bits, d, tp):
    """Index widths 8, 12 (codes straddle words), 6, 8 and 16 bits; windows off word boundaries."""
    cfg = KBVQConfig(bits=bits, vector_dim=d, arch="mixtral", rank={})
    rows, in_features, n_experts = (24, 40), 96, 3
    g = torch.Generator().manual_seed(bits * 10 + d)
    codes = [torch.randint(0, cfg.codebook_size, (n_experts, r, in_features // d), generator=g) for r in rows]
    packed = [pack_codes(c, cfg.index_bits) for c in codes]
    for split_out, matrices in ((True, (0, 1)), (False, (1,))):
        for r in range(tp):
            layout = GroupLayout(cfg.default_width, tuple(rows[m] for m in matrices), in_features, (0,) * len(matrices), r, tp,
                                 split_out=split_out, split_in=not split_out)
            shape, dtype = layout.load_shapes()["vq_codes"]
            assert dtype == torch.int32 and shape[1] == packed[0].shape[-1]
            loaded = torch.zeros((n_experts, *shape), dtype=dtype)
            for shard, m in enumerate(matrices):
                for e in range(n_experts):
                    load_tensor(loaded[e], "vq_codes", packed[m][e], shard, layout)
            # this rank's rows (all of them when the input is split), every word of each
            own = [slice(r * rows[m] // tp, (r + 1) * rows[m] // tp) if split_out else slice(None) for m in matrices]
            assert torch.equal(loaded, torch.cat([packed[m][:, o] for m, o in zip(matrices, own)], dim=1))
            idx = process_codes(loaded, layout)
            assert (tuple(idx.shape[1:]), idx.dtype) == layout.shapes()["vq_codes"]
            cols = slice(r * in_features // tp // d, (r + 1) * in_features // tp // d) if not split_out else slice(None)
            want = torch.cat([codes[m][:, o, cols] for m, o in zip(matrices, own)], dim=1)
            assert torch.equal(idx.long(), want)
