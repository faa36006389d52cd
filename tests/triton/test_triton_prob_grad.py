"""The triton backend's gradients w.r.t. probability targets (a teacher's soft labels being trained), against the
float64 naive sum of F.cross_entropy with the targets attached, in Triton's interpreter on CPU tensors (or on
CUDA), like test_triton_interpret.py:

    TRITON_INTERPRET=1 python -m pytest tests/triton/test_triton_prob_grad.py -q

Every grad mode of the shared-target path (grad-in-forward for spatial heads, lse for classifier heads and
reduction none, none for the heads when only the target needs a gradient), the per-head path's one call, and the
traced paths under torch.compile. backend="triton" is named, so a fallback to another backend would raise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oracle import assert_matches_reference, generator, random_grad_output, to_reference
# pytestmark: the same skips and warning filters.
from test_triton_interpret import DEVICE, _interpreter_keeps_op_whole, _problem, pytestmark  # noqa: F401

import auxfuse
from auxfuse.backends import triton as tb


@pytest.fixture
def one_call(monkeypatch):
    """The per-head tests must take compute_per_head's one call: the per-head fallback (tb.compute) fails."""

    def per_head_call(problem):
        raise AssertionError("the triton backend ran one call per head")

    monkeypatch.setattr(tb, "compute", per_head_call)


def _randn(shape, g, dtype=torch.float32, requires_grad=True):
    return (torch.randn(shape, generator=g) * 2).to(dtype).to(DEVICE).requires_grad_(requires_grad)


def _soft(shape, g, dtype=torch.float32, requires_grad=True):
    """A probability target over dimension 1 (a teacher's softened prediction)."""
    return torch.softmax(torch.randn(shape, generator=g) * 3, 1).to(dtype).to(DEVICE).requires_grad_(requires_grad)


def _class_weight(C, g):
    return (torch.rand(C, generator=g) + 0.5).to(DEVICE)


def check_target_grads(heads, targets, weights, *, call_target, class_weights, compile_backend=None, **options):
    """The loss and its gradients w.r.t. every head and every target that requires grad (a target shared by the
    heads once) against the naive loop in float64 with the targets attached (random grad_output). `targets` is
    each head's target, `call_target` and `class_weights` what the call gets."""
    dtype = heads[0].dtype
    per_head_weights = class_weights if isinstance(class_weights, list) else [class_weights] * len(heads)
    leaves = [x for x in dict.fromkeys([*heads, *targets]) if x.requires_grad]
    reference = {x: to_reference(x).requires_grad_(x.requires_grad) for x in dict.fromkeys([*heads, *targets])}

    def call(*heads):
        return auxfuse.multi_head_cross_entropy(heads, call_target, weights, weight=class_weights, backend="triton",
                                                **options)

    if compile_backend is None:
        ours = call(*heads)
    else:
        torch._dynamo.reset()
        with _interpreter_keeps_op_whole():
            ours = torch.compile(call, fullgraph=True, backend=compile_backend)(*heads)
    ref = sum(w * F.cross_entropy(reference[x], reference[t], weight=to_reference(cw), **options)
              for w, x, t, cw in zip(weights, heads, targets, per_head_weights))
    assert_matches_reference(ours, ref, dtype, msg="loss")
    g = random_grad_output(ref)
    got = torch.autograd.grad(ours, leaves, g.to(ours.dtype))
    want = torch.autograd.grad(ref, [reference[x] for x in leaves], g)
    for i, (x, a, b) in enumerate(zip(leaves, got, want)):
        kind = "target" if any(x is t for t in targets) else "head"
        assert a.dtype == x.dtype and a.shape == x.shape, f"leaf {i} ({kind})"
        assert_matches_reference(a, b, dtype, x.shape[1], msg=f"gradient w.r.t. leaf {i} ({kind})")


def test_not_supported_reasons():
    """A probability target that requires grad is no reason to fall back (a class weight that does still is)."""
    g = generator("prob-grad-reasons")
    heads = [_randn((4, 5), g)]
    assert tb.not_supported_reasons(_problem(heads, _soft((4, 5), g), [1.0])) == []
    weight = _class_weight(5, g).requires_grad_(True)
    assert any("class weights" in r
               for r in tb.not_supported_reasons(_problem(heads, _soft((4, 5), g), [1.0], weight=weight)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", ["plain", "smooth-weight"])
@pytest.mark.parametrize("shape", [(4, 6, 3), (5, 7)], ids=["spatial", "classifier"])
def test_shared_target(shape, variant, reduction):
    """Two heads read one probability target that requires grad: spatial heads take the grad-in-forward mode
    for mean / sum, classifier heads and reduction none the lse mode."""
    g = generator(("prob-grad-shared", shape, variant, reduction))
    heads = [_randn(shape, g) for _ in range(2)]
    target = _soft(shape, g)
    smooth = variant == "smooth-weight"
    check_target_grads(heads, [target] * 2, [1.0, 0.4], call_target=target,
                       class_weights=_class_weight(shape[1], g) if smooth else None,
                       label_smoothing=0.1 if smooth else 0.0, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shared_target_only(reduction):
    """Heads without gradient (a frozen student): only the target's gradient, class weights and smoothing."""
    g = generator(("prob-grad-target-only", reduction))
    heads = [_randn((3, 5, 4), g, requires_grad=False) for _ in range(2)]
    target = _soft((3, 5, 4), g)
    check_target_grads(heads, [target] * 2, [1.0, 0.4], call_target=target, class_weights=_class_weight(5, g),
                       label_smoothing=0.2, reduction=reduction)


def test_shared_target_bfloat16():
    """bf16 heads and target: the target's gradient in bf16, from fp32 log-probabilities."""
    g = generator("prob-grad-bf16")
    heads = [_randn((4, 6, 3), g, torch.bfloat16) for _ in range(2)]
    target = _soft((4, 6, 3), g, torch.bfloat16)
    check_target_grads(heads, [target] * 2, [1.0, 0.4], call_target=target, class_weights=None, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("heads_grad", [True, False], ids=["heads-grad", "heads-frozen"])
def test_per_head_targets(one_call, heads_grad, reduction):
    """A probability target per head, in one call: the first requires grad (class weights, smoothing), the
    second does not; a third head with class indices in the same call."""
    g = generator(("prob-grad-per-head", heads_grad, reduction))
    heads = [_randn((4, 6, 3), g, requires_grad=heads_grad) for _ in range(3)]
    targets = [_soft((4, 6, 3), g), _soft((4, 6, 3), g, requires_grad=False),
               torch.randint(0, 6, (4, 3), generator=g).to(DEVICE)]
    class_weights = [_class_weight(6, g), None, _class_weight(6, g)]
    check_target_grads(heads, targets, [1.0, 0.4, 0.2], call_target=targets, class_weights=class_weights,
                       label_smoothing=0.1, reduction=reduction)


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_torch_compile_fullgraph(per_head):
    """torch.compile(fullgraph=True): the target's gradient in the traced backward of the triton_op (shared
    target) and of auxfuse::triton_per_head_forward (aot_eager on CPU, Inductor on a GPU)."""
    backend = "aot_eager" if DEVICE == "cpu" else "inductor"
    g = generator(("prob-grad-compile", per_head))
    heads = [_randn((4, 6, 3), g) for _ in range(2)]
    if per_head:
        targets = [_soft((4, 6, 3), g), _soft((4, 6, 3), g, requires_grad=False)]
        call_target, class_weights = targets, [_class_weight(6, g), None]
    else:
        targets = [_soft((4, 6, 3), g)] * 2
        call_target, class_weights = targets[0], _class_weight(6, g)
    check_target_grads(heads, targets, [1.0, 0.4], call_target=call_target, class_weights=class_weights,
                       label_smoothing=0.1, compile_backend=backend)
