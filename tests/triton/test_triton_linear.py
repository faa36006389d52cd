"""The fused linear + cross-entropy on the triton backend (each chunk's cross-entropy in one launch of the
per-head Triton kernels), in Triton's interpreter, against the float64 naive sum: shared and per-head
projections, bias, every reduction with a random grad_output, ignore_index, label smoothing, softcap, chunk
boundaries, bf16."""

import pytest
import torch

import auxfuse
from oracle import generator
from test_linear_cross_entropy import _inputs, check

pytestmark = pytest.mark.skipif(auxfuse.available_backends()["triton"] is not None,
                                reason=str(auxfuse.available_backends()["triton"]))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("shared, bias", [(True, False), (False, True)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_option(shared, bias, reduction):
    g = generator(("linear triton", shared, bias, reduction))
    hiddens, projections, biases, targets = (_on_device(x) for x in _inputs(g, torch.float32, 3, shared, bias))
    check("triton", hiddens, projections, biases, targets, [1.0, 0.3, 0.2], shared, reduction=reduction,
          label_smoothing=0.1, softcap=None if shared else 4.0, chunk_size=7)


def test_bf16_and_details():
    g = generator("linear triton bf16")
    hiddens, projections, biases, targets = (_on_device(x) for x in _inputs(g, torch.bfloat16, 2, True, False))
    out = check("triton", hiddens, projections, biases, targets, [1.0, 0.3], True, chunk_size=6)
    assert out.count.tolist() == [int((t != -100).sum()) for t in targets]  # a target per head: (H,)


def test_errors_name_the_reason():
    g = generator("linear triton errors")
    hiddens, projections, _, targets = (_on_device(x) for x in _inputs(g, torch.float32, 2, True, False))
    with pytest.raises(ValueError, match="z_loss is computed by the torch backend only"):
        auxfuse.multi_head_linear_cross_entropy(hiddens, projections[0], targets, z_loss=1e-3, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        auxfuse.multi_head_linear_cross_entropy([h.double() for h in hiddens], projections[0].double(), targets,
                                                backend="triton")
