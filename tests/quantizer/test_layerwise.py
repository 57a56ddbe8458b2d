"""The layer-at-a-time capture records a module's inputs however its caller passes them."""
import pytest
import torch

from quantize_tools.calibration.layerwise import StopForward, stop_before
from quantize_tools.pipeline import EXPERTS_INPUTS


class _Inner(torch.nn.Module):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise AssertionError("the captured module must not run")


class _Outer(torch.nn.Module):
    def __init__(self, style):
        super().__init__()
        self.inner, self.style = _Inner(), style

    def forward(self, x):
        idx, w = x.argmax(-1, keepdim=True), x.softmax(-1)[..., :1]
        if self.style == "positional":
            return self.inner(x * 2, idx, w)
        if self.style == "mixed":
            return self.inner(x * 2, top_k_weights=w, top_k_index=idx)
        return self.inner(hidden_states=x * 2, top_k_index=idx, top_k_weights=w)


@pytest.mark.parametrize("style", ["positional", "mixed", "keywords"])
def test_stop_before_records_inputs_in_parameter_order(style):
    x = torch.randn(3, 5)
    outer = _Outer(style)
    with stop_before(outer.inner, EXPERTS_INPUTS) as seen:
        with pytest.raises(StopForward):
            outer(x)
    (got,) = seen
    assert len(got) == 3
    assert torch.equal(got[0], x * 2)
    assert torch.equal(got[1], x.argmax(-1, keepdim=True))
    assert torch.equal(got[2], x.softmax(-1)[..., :1])
    # the hook is gone after the block: the module runs again
    with pytest.raises(AssertionError, match="must not run"):
        outer(x)


def test_stop_before_names_an_unplaceable_keyword():
    outer = _Outer("mixed")
    with stop_before(outer.inner) as seen:
        with pytest.raises(RuntimeError, match="top_k_index, top_k_weights"):
            outer(torch.randn(2, 4))
    assert seen == []
