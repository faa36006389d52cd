"""The front end's plans (auxfuse/functional.py): a call whose signature was seen before skips collect_heads,
build_problem and the backend choice. Every test here makes the second call hit a plan (or checks that it
must not) and compares it with the oracle, so that a signature missing one of the facts the front end
decides from would show up as a wrong loss or a missing error."""

import collections
import gc
import weakref

import pytest
import torch

import auxfuse
from auxfuse import functional
from oracle import (assert_matches_naive, assert_matches_reference, check_per_head, generator, naive_loss,
                    naive_per_head, to_reference)

GoogLeNetOutputs = collections.namedtuple("GoogLeNetOutputs", "logits aux_logits2 aux_logits1")


@pytest.fixture(autouse=True)
def no_plans():
    functional._PLANS.clear()
    yield
    functional._PLANS.clear()


def _heads(shape=(5, 7), n=3, seed=0):
    g = generator(seed)
    return [torch.randn(shape, generator=g).requires_grad_(True) for _ in range(n)]


def _target(shape=(5,), C=7, seed=1):
    return torch.randint(0, C, shape, generator=generator(seed))


OUTPUT_TYPES = {
    # name: (make the output from three heads, the heads that count and their weights, the call's weights)
    "tensor": (lambda h: h[0], lambda h: ([h[0]], [1.0]), None),
    "namedtuple": (lambda h: GoogLeNetOutputs(*h), lambda h: (h, [1.0, 0.3, 0.3]), None),
    "namedtuple-none": (lambda h: GoogLeNetOutputs(h[0], None, h[2]), lambda h: ([h[0], h[2]], [1.0, 0.3]), None),
    "dict": (lambda h: {"out": h[0], "aux": h[1]}, lambda h: (h[:2], [1.0, 0.5]), None),
    "ordered-dict": (lambda h: collections.OrderedDict(out=h[0], aux=h[1]), lambda h: (h[:2], [1.0, 0.5]), None),
    "tuple": (lambda h: tuple(h), lambda h: (h, [1.0, 0.2, 0.1]), (1.0, 0.2, 0.1)),
    "list": (lambda h: list(h), lambda h: (h, [1.0, 0.3, 0.3]), None),
    "dict-named-weights": (lambda h: {"a": h[0], "b": h[1]}, lambda h: (h[:2], [0.7, 0.4]), {"a": 0.7, "b": 0.4}),
}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("output_type", list(OUTPUT_TYPES))
@pytest.mark.parametrize("options", [{}, {"reduction": "sum", "label_smoothing": 0.1}, {"reduction": "none"},
                                     {"ignore_index": 2, "weight": True}], ids=["mean", "sum-smooth", "none", "ignore-weight"])
def test_second_call_uses_the_plan_and_matches_the_oracle(backend, output_type, options):
    make_output, counted, weights = OUTPUT_TYPES[output_type]
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.rand(7, generator=generator("class weight")) + 0.5
    for call in range(3):  # the first call makes the plan, the others use it: new values every time
        heads, target = _heads(seed=call), _target(seed=10 + call)
        out = auxfuse.multi_head_cross_entropy(make_output(heads), target, weights, backend=backend,
                                               return_details=True, **options)
        assert len(functional._PLANS) == 1  # every output type here has a plan
        used, used_weights = counted(heads)
        assert_matches_naive(out.loss, used, target, used_weights, msg=f"call {call}", **options)
        assert int(out.count) == int((target != options.get("ignore_index", -100)).sum())


def test_weights_changed_in_place_are_seen():
    heads, target = _heads(), _target()
    weights = {"logits": 1.0, "aux_logits1": 0.3, "aux_logits2": 0.3}
    criterion = auxfuse.MultiHeadLoss(weights)
    first = criterion(GoogLeNetOutputs(*heads), target)
    criterion.weights["aux_logits1"] = 0.9  # the criterion's own dict, changed in place
    second = criterion(GoogLeNetOutputs(*heads), target)
    assert_matches_naive(second, heads, target, [1.0, 0.3, 0.9])
    assert not torch.equal(first, second)
    sequence = [1.0, 0.5, 0.5]
    a = auxfuse.multi_head_cross_entropy(tuple(heads), target, sequence)
    sequence[2] = 0.0
    b = auxfuse.multi_head_cross_entropy(tuple(heads), target, sequence)
    assert_matches_naive(b, heads, target, [1.0, 0.5, 0.0])
    assert not torch.equal(a, b)


def test_a_class_weight_changed_in_place_is_seen():
    heads, target = _heads(), _target()
    weight = torch.ones(7)
    criterion = auxfuse.MultiHeadLoss(weight=weight)
    criterion(tuple(heads), target)
    criterion.weight[3] = 5.0
    assert_matches_naive(criterion(tuple(heads), target), heads, target, [1.0, 0.3, 0.3], weight=criterion.weight)


def test_every_fact_of_the_signature_makes_a_new_plan():
    """Calls that differ in one fact each: a plan apiece, each loss right."""
    base_heads, target = _heads(), _target()
    variants = {
        "base": (tuple(base_heads), target, {}),
        "no-grad heads": (tuple(h.detach() for h in base_heads), target, {}),
        "float64": (tuple(h.detach().double().requires_grad_(True) for h in base_heads), target, {}),
        "int32 target": (tuple(base_heads), target.int(), {}),
        "two heads": (tuple(base_heads[:2]), target, {}),
        "batch 4": (tuple(h[:4] for h in base_heads), target[:4], {}),
        "main": (tuple(base_heads), target, {"main": 1}),
        "aux_weight": (tuple(base_heads), target, {"aux_weight": 0.7}),
        "details": (tuple(base_heads), target, {"return_details": True}),
    }
    for name, (outputs, tgt, options) in variants.items():
        out = auxfuse.multi_head_cross_entropy(outputs, tgt, **options)
        loss = out.loss if isinstance(out, auxfuse.MultiHeadLossOutput) else out
        heads = list(outputs)
        main = options.get("main", 0)
        weights = [1.0 if i == main else options.get("aux_weight", 0.3) for i in range(len(heads))]
        ref = naive_loss([to_reference(h) for h in heads], tgt.long(), weights)
        assert_matches_reference(loss, ref, heads[0].dtype, msg=name)
    assert len(functional._PLANS) == len(variants)
    with torch.no_grad():
        loss = auxfuse.multi_head_cross_entropy(tuple(base_heads), target)
    assert loss.grad_fn is None and len(functional._PLANS) == len(variants) + 1


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_strides_are_decided_per_call(backend):
    """Strides are not part of a signature: heads of other strides (one transposed, one a slice) use the
    plan made for contiguous ones."""
    for call in range(3):
        heads = _heads(seed=call)
        if call == 1:
            heads[1] = torch.randn(7, 5).t().requires_grad_(True)
        if call == 2:
            heads = [torch.randn(5, 9)[:, 1:8].requires_grad_(True) for _ in range(3)]
        target = _target(seed=call)
        loss = auxfuse.multi_head_cross_entropy(tuple(heads), target, backend=backend)
        assert_matches_naive(loss, heads, target, [1.0, 0.3, 0.3], grad_output="1", msg=f"call {call}")
    assert len(functional._PLANS) == 1


def test_errors_are_raised_on_every_call():
    """Value checks are not part of a plan: an invalid class index after valid calls of the same signature
    still raises; so does a call whose signature differs by a mistake."""
    heads = _heads()
    for backend in ("cpu", "torch"):
        for _ in range(2):
            auxfuse.multi_head_cross_entropy(tuple(heads), _target(), backend=backend)
        bad = _target()
        bad[2] = 7
        with pytest.raises(ValueError, match="target value 7"):
            auxfuse.multi_head_cross_entropy(tuple(heads), bad, backend=backend)
    with pytest.raises(ValueError, match="head '1' has shape"):
        auxfuse.multi_head_cross_entropy((heads[0], heads[1][:, :6]), _target())
    with pytest.raises(ValueError, match="main=True"):
        for _ in range(2):
            auxfuse.multi_head_cross_entropy(tuple(heads), _target(), main=True)


def test_the_class_weight_is_part_of_the_signature():
    """A class weight of another shape still gets the front end's error after valid calls; one that requires
    grad does not use the plan made for one that does not."""
    heads, target = _heads(), _target()
    for _ in range(2):
        auxfuse.multi_head_cross_entropy(tuple(heads), target, weight=torch.rand(7))
    with pytest.raises(ValueError, match=r"weight must be a Tensor of shape \(7,\)"):
        auxfuse.multi_head_cross_entropy(tuple(heads), target, weight=torch.rand(6))
    # A weight that requires grad goes to the torch backend, which does what F.cross_entropy does with class
    # indices: refuse (the plan's cpu kernel would silently give no gradient).
    weight = torch.rand(7, requires_grad=True)
    assert auxfuse.explain_backend(tuple(heads), target, weight=weight)["chosen"] == "torch"
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        auxfuse.multi_head_cross_entropy(tuple(heads), target, weight=weight)


def test_arguments_that_are_not_plain_take_the_full_path():
    heads, target = _heads(), _target()
    auxfuse.multi_head_cross_entropy(tuple(heads), target, (1.0, torch.tensor(0.3), 0.3))  # a tensor weight
    auxfuse.multi_head_cross_entropy(tuple(heads), target, label_smoothing=torch.tensor(0.1))
    auxfuse.multi_head_cross_entropy(tuple(torch.nn.Parameter(h.detach()) for h in heads), target)
    assert len(functional._PLANS) == 0


def test_plans_hold_no_tensors():
    """A plan must not keep the first call's heads (and with them the model's graph) alive."""
    heads, target = _heads(), _target()
    weight = torch.rand(7)
    auxfuse.MultiHeadLoss(weight=weight)(GoogLeNetOutputs(*heads), target).backward()
    refs = [weakref.ref(t) for t in [*heads, target, weight]]
    del heads, target, weight
    gc.collect()
    assert len(functional._PLANS) == 1 and all(ref() is None for ref in refs)


def test_the_plans_are_bounded():
    target = _target()
    for batch in range(1, functional._MAX_PLANS + 10):
        auxfuse.multi_head_cross_entropy(torch.randn(batch, 7), target[:1].expand(batch))
    assert len(functional._PLANS) <= functional._MAX_PLANS


def test_torchvision_segmentation_output_uses_a_plan():
    """torchvision's segmentation models return an OrderedDict: it gets a plan like a dict."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=5,
                                                        aux_loss=True).train()
    criterion = auxfuse.MultiHeadLoss(ignore_index=255)
    for seed in range(2):
        g = generator(seed)
        outputs = model(torch.randn(2, 3, 32, 32, generator=g))
        masks = torch.randint(0, 5, (2, 32, 32), generator=g)
        masks[0, :4] = 255
        loss = criterion(outputs, masks)
        assert type(outputs) is collections.OrderedDict and len(functional._PLANS) == 1
        assert_matches_naive(loss, [outputs["out"], outputs["aux"]], masks, [1.0, 0.5], ignore_index=255)


# Per-head targets (_PerHeadPlan): the same rules, with the targets' and class weights' facts in the signature.

def _pyramid(seed, sizes=((8, 6), (4, 3), (2, 2)), C=5):
    g = generator(("plan pyramid", seed))
    heads = [torch.randn(2, C, *size, generator=g).requires_grad_(True) for size in sizes]
    targets = [torch.randint(0, C, (2, *size), generator=g) for size in sizes]
    return heads, targets


PER_HEAD_CALLS = {
    # name: (the call's output, target and options from heads and targets; the naive loop's targets and options)
    "list": (lambda h, t: (h, t, {}), lambda h, t: (t, {})),
    "dict": (lambda h, t: ({"a": h[0], "b": h[1], "c": h[2]}, {"c": t[2], "a": t[0], "b": t[1]}, {}),
             lambda h, t: (t, {})),
    "class weights": (lambda h, t: (h, t, {"weight": [None, torch.arange(1.0, 6.0), None]}),
                      lambda h, t: (t, {"class_weights": [None, torch.arange(1.0, 6.0), None]})),
    "resize": (lambda h, t: (h, t[0], {"target_resize": "nearest"}),
               lambda h, t: ([auxfuse.resize_target(t[0], x.shape[2:]) for x in h], {})),
}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("kind", list(PER_HEAD_CALLS))
def test_per_head_calls_use_a_plan_and_match_the_oracle(backend, kind):
    make_call, make_naive = PER_HEAD_CALLS[kind]
    weights = [1.0, 0.5, 0.25]
    for call in range(3):  # new values every time
        heads, targets = _pyramid(call)
        outputs, target, options = make_call(heads, targets)
        loss = auxfuse.multi_head_cross_entropy(outputs, target, weights, backend=backend, **options)
        assert len(functional._PLANS) == 1
        naive_targets, naive_options = make_naive(heads, targets)
        want = naive_per_head([to_reference(h) for h in heads], naive_targets, weights, **naive_options)
        assert_matches_reference(loss, want, torch.float32, msg=f"call {call}")


@pytest.mark.parametrize("options", [
    {}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1, "ignore_index": 1},
    {"class_weights": [torch.arange(1.0, 8.0), None, torch.tensor([0.5, 2.0])]},
], ids=["mean", "sum", "none", "smoothing-ignore", "class-weights"])
def test_per_head_plans_call_the_cpu_op_directly(monkeypatch, options):
    """A known per-head signature on cpu goes straight to the fused op (no Problem per head, _PerHeadPlan
    .run_direct) and matches the naive loop in loss, gradients and details, for multi-task heads."""
    cpu = auxfuse.backends.BACKENDS["cpu"]
    if cpu.per_head_unavailable_reason() is not None:
        pytest.skip(cpu.per_head_unavailable_reason())

    def multi_task(seed):
        g = generator(("direct", seed))
        heads = [torch.randn(6, c, generator=g) for c in (7, 3, 2)]
        return heads, [torch.randint(0, c, (6,), generator=g) for c in (7, 3, 2)]

    check_per_head("cpu", *multi_task(0), [1.0, 0.5, 0.25], **options)  # makes the plan
    (plan,) = functional._PLANS.values()
    assert plan.direct_options is not None
    monkeypatch.setattr(functional._PerHeadPlan, "problems", lambda *args: pytest.fail("a Problem per head"))
    for seed in (1, 2):
        check_per_head("cpu", *multi_task(seed), [1.0, 0.5, 0.25], **options)
    assert len(functional._PLANS) == 1


def test_per_head_targets_in_other_mappings_take_the_full_path():
    """An OrderedDict of targets has no plan (its signature is not taken): every call is validated in full."""
    heads, targets = _pyramid(0)
    outputs = collections.OrderedDict(zip("abc", heads))
    for _ in range(2):
        loss = auxfuse.multi_head_cross_entropy(outputs, collections.OrderedDict(zip("cba", targets[::-1])),
                                                backend="cpu")
        assert_matches_reference(loss, naive_per_head([to_reference(h) for h in heads], targets, [1.0, 0.3, 0.3]),
                                 torch.float32)
    assert not functional._PLANS


def test_per_head_plans_convert_other_target_dtypes():
    """int32 targets are converted for the kernels on every call: such a plan does not take the direct path."""
    heads, targets = _pyramid(0)
    for _ in range(2):
        loss = auxfuse.multi_head_cross_entropy(heads, [t.int() for t in targets], backend="cpu")
        assert_matches_reference(loss, naive_per_head([to_reference(h) for h in heads], targets, [1.0, 0.3, 0.3]),
                                 torch.float32)
    (plan,) = functional._PLANS.values()
    assert plan.direct_options is None


def test_per_head_plans_keep_every_check():
    """After valid calls of one signature: an invalid class index still raises, a target of another shape gets
    the front end's error, a target for a head of another size makes a plan of its own."""
    heads, targets = _pyramid(0)
    for backend in ("cpu", "torch"):
        for _ in range(2):
            auxfuse.multi_head_cross_entropy(heads, targets, backend=backend)
        bad = [t.clone() for t in targets]
        bad[1][0, 0, 0] = 9
        with pytest.raises(ValueError, match="head '1': target value 9"):
            auxfuse.multi_head_cross_entropy(heads, bad, backend=backend)
    with pytest.raises(ValueError, match="head '2': target has shape"):
        auxfuse.multi_head_cross_entropy(heads, [targets[0], targets[1], targets[1]])
    plans = len(functional._PLANS)
    other, other_targets = _pyramid(1, sizes=((8, 6), (4, 3), (3, 3)))
    loss = auxfuse.multi_head_cross_entropy(other, other_targets)
    assert len(functional._PLANS) == plans + 1
    assert_matches_reference(loss, naive_per_head([to_reference(h) for h in other], other_targets, [1.0, 0.3, 0.3]),
                             torch.float32)


def test_per_head_plans_ask_for_the_fused_call_every_time(monkeypatch):
    """Whether the backend takes all heads in one call is asked on every call, not kept in the plan: triton
    says no while a CUDA graph is being captured. A plan made when it said yes then runs one call per head."""
    cpu = auxfuse.backends.BACKENDS["cpu"]
    if cpu.per_head_unavailable_reason() is not None:
        pytest.skip(cpu.per_head_unavailable_reason())
    heads, targets = _pyramid(0)
    auxfuse.multi_head_cross_entropy(heads, targets, backend="cpu")
    monkeypatch.setattr(type(cpu), "per_head_unavailable_reason", lambda self: "a CUDA graph is being captured")
    monkeypatch.setattr(type(cpu), "compute_per_head", lambda self, problems: pytest.fail("one call for all heads"))
    loss = auxfuse.multi_head_cross_entropy(heads, targets, backend="cpu")
    assert len(functional._PLANS) == 1
    assert_matches_reference(loss, naive_per_head([to_reference(h) for h in heads], targets, [1.0, 0.3, 0.3]),
                             torch.float32)
