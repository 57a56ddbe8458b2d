"""Running a model one decoder layer at a time over calibration windows.

The quantizer (and the sparse testbed builder) never run the whole model: they push every
window through one layer, keep what they need, and move to the next. Capturing the input of a
module inside the layer and stopping there saves the rest of the layer's compute, and lets the
quantizer leave the experts' weights unloaded while it gathers their routed inputs.
"""
from __future__ import annotations

import contextlib

import torch


class StopForward(Exception):
    """Ends a layer's forward once a capture has what it needs."""


@contextlib.contextmanager
def stop_before(module: torch.nn.Module, names: tuple[str, ...] = ()):
    """Within the block, each call of ``module`` records its inputs and ends the forward.

    Yields the list the inputs go to (one tuple per batch, in call order). ``names`` are the
    parameter names of the inputs, so that a caller passing some of them by keyword records the
    same tuple. ``module`` itself never runs.
    """
    with _recording(module, names, stop=True) as seen:
        yield seen


@contextlib.contextmanager
def record_inputs(module: torch.nn.Module, names: tuple[str, ...] = ()):
    """As :func:`stop_before`, but ``module`` and the rest of the forward run: for capturing inside a whole model."""
    with _recording(module, names, stop=False) as seen:
        yield seen


@contextlib.contextmanager
def _recording(module: torch.nn.Module, names: tuple[str, ...], stop: bool):
    seen: list[tuple] = []

    def hook(_m, args, kwargs):
        rest = [n for n in names[len(args):] if n in kwargs]
        unknown = sorted(set(kwargs) - set(rest))
        if unknown:
            raise RuntimeError(f"{type(module).__name__} was called with keyword input(s) {', '.join(unknown)}, "
                               f"which layerwise cannot place among its inputs (names: {names})")
        inputs = tuple(args) + tuple(kwargs[n] for n in rest)
        seen.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in inputs))
        if stop:
            raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def run_layer(layer: torch.nn.Module, hs: torch.Tensor, pos: torch.Tensor, pe, batch_size: int):
    """``layer`` over the windows ``hs`` in batches of ``batch_size``: its output, or None if a capture stopped it."""
    outs, batch_size = [], max(1, batch_size)
    for i in range(0, hs.shape[0], batch_size):
        try:
            o = layer(hs[i:i + batch_size], attention_mask=None, position_ids=pos, position_embeddings=pe)
        except StopForward:
            continue
        outs.append(o[0] if isinstance(o, tuple) else o)
    return torch.cat(outs) if outs else None
