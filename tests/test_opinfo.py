"""PyTorch's own test inputs for cross_entropy (the OpInfo samples of torch.nn.functional.cross_entropy): every
sample on the cpu and torch backends against F.cross_entropy in float64, the loss and the gradients w.r.t. the
logits and, for probability targets that require grad, w.r.t. the target."""

import pytest
import torch
import torch.nn.functional as F

import auxfuse
from oracle import assert_matches_reference, random_grad_output, to_reference

common_methods_invocations = pytest.importorskip("torch.testing._internal.common_methods_invocations")
OPINFO = next(op for op in common_methods_invocations.op_db if op.name == "nn.functional.cross_entropy")
AVAILABLE = auxfuse.available_backends()
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(AVAILABLE[name] is not None, reason=str(AVAILABLE[name])))
            for name in ("cpu", "torch")]


def _samples(dtype):
    torch.manual_seed(0)  # the OpInfo draws its samples from the global generator
    return list(OPINFO.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
def test_every_opinfo_sample(backend, dtype):
    samples = _samples(dtype)
    assert len(samples) >= 20
    target_grads = 0
    for i, sample in enumerate(samples):
        x, target, options = sample.input, sample.args[0], dict(sample.kwargs)
        inputs = [x] + ([target] if target.requires_grad else [])
        ref_inputs = [to_reference(t).requires_grad_(True) for t in inputs]
        ref_target = ref_inputs[1] if target.requires_grad else target
        if options.get("weight") is not None:
            options["weight"] = options["weight"].detach()
        ours = auxfuse.multi_head_cross_entropy(x, target, backend=backend, **options)
        ref_options = {**options, "weight": to_reference(options.get("weight"))}
        theirs = F.cross_entropy(ref_inputs[0], ref_target, **ref_options)
        msg = f"sample {i}: x {tuple(x.shape)} target {tuple(target.shape)} {sorted(options)}"
        assert_matches_reference(ours, theirs, dtype, msg=msg)
        g = random_grad_output(theirs)
        for name, a, b in zip(("logits", "target"), torch.autograd.grad(ours, inputs, g.to(ours.dtype)),
                              torch.autograd.grad(theirs, ref_inputs, g)):
            assert_matches_reference(a, b, dtype, x.shape[1] if x.dim() > 1 else x.shape[0],
                                     msg=f"{msg}: gradient w.r.t. the {name}")
        target_grads += target.requires_grad
    assert target_grads > 0  # probability targets that require grad are among the samples
