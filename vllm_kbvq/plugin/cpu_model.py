"""A transformers model of a KBVQ checkpoint that runs vLLM's native CPU kernels, its experts stacked as
the plugin stacks them.

Why it exists, and why here: :mod:`vllm_kbvq.reference` is the oracle the plugin and the kernels are
tested against, so it depends on the checkpoint format only and its forward is plain torch (clear, and
slow). Evaluations, the demo and users on CPU want the same transformers model at the kernels' speed.
That model runs what vLLM's CPU path runs: the routed experts' tensors stacked per bank exactly as the
plugin's loaders stack them (:mod:`.layout`), the codes in the kernels' layout, and the native ops as
:func:`vllm_kbvq.kernels.dispatch.bind` binds them. Being built from the plugin's own pieces, it lives on
the plugin's side, and the reference stays independent of them.

:func:`use_cpu_kernels` switches a loaded reference model to the kernels: each routed experts module
becomes a :class:`KernelExperts` and each shared expert's matrix a :class:`KernelLinear` (subclasses of
the reference modules, so ``isinstance`` checks hold; the class is swapped in place, as
``torch.nn.utils.parametrize`` does, and the reference's torch forward stays their path off CPU).
:func:`load_kbvq_model` is the loader users call: the reference loader, then on CPU the kernels.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .. import reference
from ..format import SUFFIXES
from ..kernels import cpu_moe, dispatch
from ..packing import unpack_codes
from ..reference import KBVQExperts, KBVQLinear
from .layout import load_tensor, moe_banks, process_codes

__all__ = ["KernelLinear", "KernelExperts", "use_cpu_kernels", "load_kbvq_model"]


class KernelLinear(KBVQLinear):
    """A :class:`~vllm_kbvq.reference.KBVQLinear` (a shared expert's matrix) on the native CPU linear: a copy
    of its codes in the kernels' layout (buffer ``cpu_codes``, made by :meth:`switch`)."""

    @classmethod
    def switch(cls, lin: KBVQLinear) -> KernelLinear:
        idx = unpack_codes(lin.vq_codes, lin.index_bits, lin.in_features // lin.vq_codebook.shape[-1])
        codes = cpu_moe.cpu_layout(idx.to(torch.int32 if lin.index_bits > 8 else torch.uint8), 1)
        lin.__class__ = cls
        lin.register_buffer("cpu_codes", codes, persistent=False)
        return lin

    def forward(self, x: torch.Tensor, bx: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type == "cpu" and self.vq_codebook.dtype == torch.float16:
            return dispatch.bind("linear", self.cpu_codes)(
                x, self.cpu_codes, self.vq_codebook[None], self.lr_a if self.rank else None, self.lr_b,
                self.affine_s, self.affine_b)
        return super().forward(x, bx)


class KernelExperts(KBVQExperts):
    """:class:`~vllm_kbvq.reference.KBVQExperts` on the native CPU MoE op: ``cpu_banks`` holds, per bank of
    experts of one width pair, its global -> slot map (None: one bank of all experts) and its tensors
    stacked as the plugin stacks them (:mod:`.layout`), codes in the kernels' layout."""

    cpu_banks: list[tuple[torch.Tensor | None, tuple[torch.Tensor | None, ...]]]

    @classmethod
    def switch(cls, experts: KBVQExperts) -> bool:
        """Stack ``experts``' tensors and make it a :class:`KernelExperts`; False (and no change) for a
        non-SiLU activation, which the kernel does not compute."""
        probe = torch.linspace(-8, 8, 65)
        if not torch.equal(experts.act_fn(probe), F.silu(probe)):  # transformers has its own SiLU classes
            return False
        banks = moe_banks(experts.cfg, experts.layer, experts.n_experts, experts.hidden, experts.inter)
        cpu_banks = []
        for bank in banks:
            tensors = []
            for group, layout in bank.layouts.items():
                wtypes = ("gate", "up") if group == "w13" else ("down",)
                params = {}
                for suffix, (shape, dtype) in layout.load_shapes().items():
                    per_layer = suffix == "lr_b"
                    dst = torch.zeros(shape if per_layer else (len(bank.experts), *shape), dtype=dtype)
                    for shard, wtype in enumerate(wtypes):
                        for slot, e in enumerate((0,) if per_layer else bank.experts):
                            src = getattr(experts[e].proj(wtype), suffix)
                            load_tensor(dst if per_layer else dst[slot], suffix, src.detach().cpu(), shard, layout)
                    params[suffix] = dst
                params["vq_codes"] = process_codes(params["vq_codes"], layout, cpu_kernels=True)
                tensors += [params.get(s) for s in SUFFIXES]
            cpu_banks.append((bank.slot_map(experts.n_experts) if len(banks) > 1 else None, tuple(tensors)))
        experts.__class__ = cls
        experts.cpu_banks = cpu_banks
        return True

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if hidden_states.device.type == "cpu":
            op = dispatch.bind("moe", self.cpu_banks[0][1][0])
            return sum(op(hidden_states, top_k_weights, top_k_index, slot_map, *tensors)
                       for slot_map, tensors in self.cpu_banks)
        return super().forward(hidden_states, top_k_index, top_k_weights)


def _switchable(m, base: type, fast: type) -> bool:
    """Whether ``m`` is one of the reference runtime's own ``base`` modules (or already ``fast``). The
    quantizer's subclasses (``quantize_tools.method.experts``) hold other tensors: no kernel runs them."""
    if type(m) in (base, fast):
        return True
    if isinstance(m, base):
        raise TypeError(f"{type(m).__name__} subclasses {base.__name__}: the native CPU kernels run only the "
                        f"reference runtime's own modules")
    return False


def use_cpu_kernels(model) -> bool:
    """Switch every KBVQ module of ``model`` (on CPU) to the native CPU kernels; False where they did not build."""
    if not cpu_moe.available():
        return False
    experts = [m for m in model.modules() if _switchable(m, KBVQExperts, KernelExperts)]
    routed = {id(lin) for m in experts for lin in m.modules() if isinstance(lin, KBVQLinear)}
    for m in experts:
        KernelExperts.switch(m)
    for m in model.modules():
        if _switchable(m, KBVQLinear, KernelLinear) and id(m) not in routed:  # a shared expert's matrix
            KernelLinear.switch(m)
    return True


def load_kbvq_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    cache_weights: bool = False, cpu_kernels: bool | None = None):
    """A transformers model running the KBVQ checkpoint at ``path``: :func:`vllm_kbvq.reference.load_kbvq_model`
    (the same arguments), then on CPU the native kernels.

    ``cpu_kernels`` runs the experts and shared experts through the native CPU kernels (what vLLM's CPU
    path runs); the default does on CPU unless ``cache_weights``. ``False`` keeps the reference's torch
    path, the oracle the tests compare against.
    """
    model = reference.load_kbvq_model(path, device=device, dtype=dtype, cache_weights=cache_weights)
    if cpu_kernels is None:
        cpu_kernels = torch.device(device).type == "cpu" and not cache_weights and dispatch.uses_cpu_kernels(device)
    if cpu_kernels and not use_cpu_kernels(model):
        raise RuntimeError("cpu_kernels=True, but the native CPU kernels are unavailable (see the warning above)")
    return model
