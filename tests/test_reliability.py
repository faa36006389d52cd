"""Bad and edge inputs, table-driven, on every backend that runs here: each gets a clear error (type and the
words of the message) or exactly PyTorch's answer. Then gradcheck, determinism, memory, threads and
indexing past 2^31."""

import os
import subprocess
import sys
import threading

import pytest
import torch
import torchvision

import auxfuse
from oracle import assert_matches_reference, check_backend, generator, to_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_BACKENDS = [name for name in ("torch", "cpu") if auxfuse.available_backends()[name] is None]
FUSED_CPU = [name for name in ("cpu",) if name in CPU_BACKENDS]


def _g(seed=0):
    return generator(seed)


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    return (torch.randn(*shape, generator=_g(seed)) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Inputs that must raise: (id, outputs, target, kwargs, exception, words of the message).
ERRORS = [
    ("target >= C", randn(2, 3), torch.tensor([0, 3]), {}, ValueError,
     r"target value 3 is outside \[0, 3\) and is not ignore_index \(-100\)"),
    ("negative target", randn(2, 3), torch.tensor([-1, 0]), {}, ValueError, r"target value -1 is outside \[0, 3\)"),
    ("void label, default ignore_index", randn(2, 3, 2, 2), torch.tensor([[[0, 1], [255, 2]]] * 2), {}, ValueError,
     r"target value 255 is outside \[0, 3\) .* 3 classes; segmentation masks often mark void pixels 255: "
     r"pass ignore_index=255$"),
    ("negative target, other ignore_index", randn(2, 3), torch.tensor([-100, 0]), {"ignore_index": 255},
     ValueError, r"target value -100 is outside \[0, 3\) and is not ignore_index \(255\)"),
    ("float class indices", randn(2, 3), torch.tensor([0.0, 1.0]), {}, ValueError,
     r"float class indices: convert with target.long\(\)"),
    ("wrong target shape", randn(2, 3), torch.tensor([0, 1, 2]), {}, ValueError,
     r"target has shape \(3,\).*class indices of shape \(2,\) \(int64\) or probabilities of shape \(2, 3\)"),
    ("spatial target missing a dim", randn(2, 3, 4, 5), torch.zeros(2, 4, dtype=torch.long), {}, ValueError,
     r"class indices of shape \(2, 4, 5\)"),
    ("heads of different shapes", {"out": randn(2, 3), "aux": randn(2, 4)}, torch.tensor([0, 1]), {}, ValueError,
     r"head 'aux' has shape torch.Size\(\[2, 4\]\) but head 'out' has torch.Size\(\[2, 3\]\)"),
    ("heads of different dtypes", {"out": randn(2, 3), "aux": randn(2, 3, dtype=torch.float64)},
     torch.tensor([0, 1]), {}, ValueError, r"head 'aux' has dtype torch.float64 but head 'out' has torch.float32"),
    ("heads on different devices", {"out": randn(2, 3), "aux": torch.empty(2, 3, device="meta")},
     torch.tensor([0, 1]), {}, ValueError, r"head 'aux' has device meta but head 'out' has cpu"),
    ("target on another device", randn(2, 3), torch.empty(2, dtype=torch.long, device="meta"), {}, ValueError,
     r"target is on meta but the heads are on cpu"),
    ("more weights than heads", (randn(2, 3), randn(2, 3)), torch.tensor([0, 1]), {"weights": [1.0, 0.3, 0.3]},
     ValueError, r"3 weights for 2 heads \['0', '1'\]; give one weight per head"),
    ("fewer weights than heads", (randn(2, 3), randn(2, 3), randn(2, 3)), torch.tensor([0, 1]),
     {"weights": [1.0, 0.3]}, ValueError, r"2 weights for 3 heads"),
    ("weight name that is no head", {"out": randn(2, 3), "aux": randn(2, 3)}, torch.tensor([0, 1]),
     {"weights": {"out": 1.0, "aux": 0.5, "aux2": 0.5}}, ValueError,
     r"weights name \['aux2'\] but the output's heads are \['out', 'aux'\]"),
    ("head with no weight", {"out": randn(2, 3), "aux": randn(2, 3)}, torch.tensor([0, 1]),
     {"weights": {"out": 1.0}}, ValueError, r"head\(s\) \['aux'\] have no weight"),
    ("nan weight", randn(2, 3), torch.tensor([0, 1]), {"weights": [float("nan")]}, ValueError,
     r"the weight of head 'output' is nan; weights must be finite"),
    ("inf weight", (randn(2, 3), randn(2, 3)), torch.tensor([0, 1]), {"weights": [1.0, float("inf")]},
     ValueError, r"the weight of head '1' is inf"),
    ("bad reduction", randn(2, 3), torch.tensor([0, 1]), {"reduction": "avg"}, ValueError, r"reduction='avg'; use one of"),
    ("bad label_smoothing", randn(2, 3), torch.tensor([0, 1]), {"label_smoothing": 1.5}, ValueError,
     r"label_smoothing=1.5 must be in \[0, 1\]"),
    ("class weight of the wrong size", randn(2, 3), torch.tensor([0, 1]), {"weight": torch.ones(4)}, ValueError,
     r"weight must be a Tensor of shape \(3,\), one per class; got \(4,\)"),
    ("main out of range", (randn(2, 3), randn(2, 3)), torch.tensor([0, 1]), {"main": 2}, ValueError,
     r"main=2 but the output has 2 heads"),
    ("main name missing", {"out": randn(2, 3)}, torch.tensor([0, 1]), {"main": "logits"}, ValueError,
     r"main='logits' is not a head of this output; its heads are \['out'\]"),
    ("no logits at all", (None, None), torch.tensor([0, 1]), {}, ValueError, r"the output has no logits"),
    ("main head is None", torchvision.models.GoogLeNetOutputs(None, randn(2, 3), randn(2, 3)), torch.tensor([0, 1]),
     {}, ValueError, r"the main head 'logits' is None; pick another with main="),
    ("output of an unknown type", "logits", torch.tensor([0, 1]), {}, TypeError, r"cannot read heads from a str"),
    ("a head that is no tensor", (randn(2, 3), "aux"), torch.tensor([0, 1]), {}, TypeError,
     r"head '1' is a str, not a Tensor of logits"),
    ("integer logits", torch.randint(0, 3, (2, 3)), torch.tensor([0, 1]), {}, ValueError,
     r"head 'output' holds torch.int64; logits must be floating point"),
    ("scalar logits", torch.tensor(1.0), torch.tensor(0), {}, ValueError, r"logits need a class dimension"),
    ("target not a tensor", randn(2, 3), [0, 1], {}, TypeError, r"target must be a Tensor, not list"),
    ("unknown backend", randn(2, 3), torch.tensor([0, 1]), {"backend": "fast"}, ValueError,
     r"unknown backend 'fast'; choose one of \['auto', 'cuda', 'triton', 'cpu', 'torch'\]"),
    ("backend that cannot run", randn(2, 3), torch.tensor([0, 1]), {"backend": "cuda"}, ValueError,
     r"backend 'cuda' cannot run this input: .*"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_input_raises(backend, case):
    _, outputs, target, kwargs, error, words = case
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(error, match=words):
        auxfuse.multi_head_cross_entropy(outputs, target, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_invalid_target_raises_before_anything_is_computed(backend):
    heads = [randn(4, 5).requires_grad_(), randn(4, 5, seed=1).requires_grad_()]
    criterion = auxfuse.MultiHeadLoss(backend=backend)
    with pytest.raises(ValueError, match=r"target value 7 is outside \[0, 5\)"):
        criterion(heads, torch.tensor([0, 1, 7, 2]))
    assert all(h.grad is None for h in heads)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_counts_invalid_targets(reduction):
    """The oracle of the CUDA / Triton `invalid` output: the torch backend, called past the front end's check
    (as a CUDA call without check_targets is), counts the out-of-range rows and makes only their losses NaN."""
    from auxfuse.backends import reference
    from auxfuse.functional import build_problem
    from auxfuse.outputs import collect_heads

    heads = [randn(3, 5, 2).requires_grad_(), randn(3, 5, 2, seed=1).requires_grad_()]
    good = torch.tensor([[0, 1], [2, 3], [4, 0]])
    problem, _ = build_problem(collect_heads(heads, [1.0, 0.3]), good, weight=None, ignore_index=-100,
                               label_smoothing=0.1, reduction=reduction, want_details=True)
    problem.input_target = torch.tensor([[0, 5], [-100, 3], [-2, 0]])  # two invalid, one ignored
    result = reference.compute(problem)
    assert int(result.invalid) == 2 and int(result.count) == 5
    if reduction == "none":
        assert result.loss.isnan().tolist() == [[False, True], [False, False], [True, False]]
    else:
        assert torch.isnan(result.loss)


# ---------------------------------------------------------------------------------------------------------
# Edge inputs that must give exactly PyTorch's answer: (id, heads, target, options).
def _fp16_near_max():
    x = randn(4, 6, scale=6e4).clamp(-6.5e4, 6.5e4).half()
    return [x, x.flip(0).contiguous()], torch.tensor([0, 1, 2, 3]), {}


def _nan_inf():
    x = randn(5, 4)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    return [x, randn(5, 4, seed=1)], torch.tensor([0, 1, 2, 3, 1]), {}


def _masked():
    x = randn(5, 6)
    x[:, 4:] = float("-inf")
    return [x, x * 2], torch.tensor([0, 1, 2, 3, 1]), {}


def _ignored_with_inf():
    x = randn(3, 4)
    x[1] = float("inf")  # the ignored row's values must not leak
    return [x, randn(3, 4, seed=2)], torch.tensor([0, -100, 2]), {"label_smoothing": 0.1}


def _ignored_pixel_with_inf():
    x = randn(2, 3, 4, 5)
    x[0, :, 1, 2] = float("inf")  # an ignored pixel
    target = torch.randint(0, 3, (2, 4, 5), generator=_g(1))
    target[0, 1, 2] = 255
    return [x, randn(2, 3, 4, 5, seed=1)], target, {"ignore_index": 255}


def _prob_not_normalized():
    return [randn(4, 5), randn(4, 5, seed=1)], torch.rand(4, 5, generator=_g(3)) * 3, {"label_smoothing": 0.1}


def _prob_negative():
    return [randn(4, 5), randn(4, 5, seed=1)], randn(4, 5, seed=5), {}


EDGES = [
    ("empty batch", lambda: ([randn(0, 5), randn(0, 5)], torch.zeros(0, dtype=torch.long), {})),
    ("empty batch, sum", lambda: ([randn(0, 5), randn(0, 5)], torch.zeros(0, dtype=torch.long), {"reduction": "sum"})),
    ("every target ignored", lambda: ([randn(3, 5), randn(3, 5)], torch.full((3,), -100), {})),
    ("every target ignored, smoothing", lambda: ([randn(3, 5)], torch.full((3,), -100), {"label_smoothing": 0.2})),
    ("every target ignored, sum", lambda: ([randn(3, 5)], torch.full((3,), -100), {"reduction": "sum"})),
    ("nan and inf logits", _nan_inf),
    ("-inf for masked classes", _masked),
    ("ignored row holding inf", _ignored_with_inf),
    ("ignored pixel holding inf", _ignored_pixel_with_inf),
    ("logits +-1e4 fp32", lambda: ([randn(6, 7, scale=1e4), randn(6, 7, scale=1e4, seed=1)],
                                   torch.tensor([0, 1, 2, 3, 4, 5]), {"label_smoothing": 0.1})),
    ("logits near the fp16 max", _fp16_near_max),
    ("C = 1", lambda: ([randn(4, 1), randn(4, 1, seed=1)], torch.zeros(4, dtype=torch.long), {})),
    ("C = 1, smoothing", lambda: ([randn(4, 1)], torch.zeros(4, dtype=torch.long), {"label_smoothing": 0.3})),
    ("N = 1", lambda: ([randn(1, 9), randn(1, 9, seed=1)], torch.tensor([4]), {})),
    ("unbatched (C,)", lambda: ([randn(9), randn(9, seed=1)], torch.tensor(4), {})),
    ("C = 262144", lambda: ([randn(2, 262144), randn(2, 262144, seed=1)], torch.tensor([5, 262143]),
                           {"label_smoothing": 0.1})),
    ("probability targets not summing to 1", _prob_not_normalized),
    ("negative probability targets", _prob_negative),
    ("channels_last heads", lambda: ([randn(2, 4, 3, 5).to(memory_format=torch.channels_last)] * 2,
                                     torch.randint(0, 4, (2, 3, 5), generator=_g()), {})),
    ("non-contiguous heads", lambda: ([randn(6, 20)[:, ::2], randn(10, 6, seed=1).t()],
                                      torch.randint(0, 10, (6,), generator=_g()), {})),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", EDGES, ids=[c[0] for c in EDGES])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_edge_input_equals_pytorch(backend, case, reduction):
    _, make = case
    heads, target, options = make()
    options = {"reduction": reduction, **options} if "reduction" not in options else options
    weights = [1.0, 0.4, 0.3][: len(heads)]
    check_backend(backend, heads, target, weights, **options)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_heads", range(1, 17))
def test_one_to_sixteen_heads(backend, num_heads):
    heads = [randn(5, 7, seed=h) for h in range(num_heads)]
    check_backend(backend, heads, torch.tensor([0, 6, 3, -100, 2]), [1.0 / (h + 1) for h in range(num_heads)],
                  label_smoothing=0.05)


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("prob", [False, True])
def test_gradcheck_fp64(backend, prob):
    heads = [randn(3, 5, 2, dtype=torch.float64, seed=s).requires_grad_() for s in range(2)]
    if prob:
        target = torch.softmax(randn(3, 5, 2, dtype=torch.float64, seed=9), 1)
    else:
        target = torch.tensor([[0, 4], [-100, 2], [3, 3]])
    weight = torch.rand(5, dtype=torch.float64, generator=_g(4)) + 0.5
    for reduction in ("mean", "sum", "none"):
        def f(a, b):
            return auxfuse.multi_head_cross_entropy((a, b), target, [1.0, 0.4], weight=weight, label_smoothing=0.1,
                                                    reduction=reduction, backend=backend)
        assert torch.autograd.gradcheck(f, heads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_through_a_kept_graph(backend, reduction):
    """retain_graph=True: every backward must give the same gradient. (The cpu kernel hands its gradient buffer
    to the first backward when the graph is freed; a kept graph still owns it, so each backward gets a copy.)"""
    heads = [randn(6, 5, seed=s).requires_grad_() for s in range(2)]
    target = torch.tensor([0, 4, -100, 2, 3, 1])
    loss = auxfuse.multi_head_cross_entropy(heads, target, [1.0, 0.4], reduction=reduction, backend=backend)
    grad_output = torch.ones_like(loss) if reduction == "mean" else torch.rand(loss.shape, generator=_g(3))
    copies = [to_reference(h).requires_grad_() for h in heads]
    ref = sum(w * torch.nn.functional.cross_entropy(x, target, reduction=reduction) for w, x in zip([1.0, 0.4], copies))
    ref_grads = torch.autograd.grad(ref, copies, grad_output.double())
    for _ in range(3):
        loss.backward(grad_output, retain_graph=True)
    first = torch.autograd.grad(loss, heads, grad_output, retain_graph=True)
    last = torch.autograd.grad(loss, heads, 2 * grad_output)
    for h, f, l, r in zip(heads, first, last, ref_grads):
        assert_matches_reference(h.grad, 3 * r, torch.float32, 5, msg="accumulated")
        assert_matches_reference(f, r, torch.float32, 5, msg="first")
        assert_matches_reference(l, 2 * r, torch.float32, 5, msg="last")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bitwise_deterministic_across_runs_and_threads(backend):
    heads = [randn(64, 1000, seed=s).requires_grad_() for s in range(3)]
    target = torch.randint(0, 1000, (64,), generator=_g())
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, max(2, threads)):
            torch.set_num_threads(n)
            loss = auxfuse.multi_head_cross_entropy(heads, target, [1.0, 0.3, 0.3], label_smoothing=0.1,
                                                    backend=backend)
            grads = torch.autograd.grad(loss, heads)
            results.append((loss.detach(), *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_memory_growth_over_1000_calls(backend):
    code = f"""
import resource, torch, auxfuse
heads = [torch.randn(64, 100, requires_grad=True) for _ in range(3)]
target = torch.randint(0, 100, (64,))
def step():
    loss = auxfuse.multi_head_cross_entropy(heads, target, backend={backend!r}, return_details=True).loss
    loss.backward()
    for h in heads: h.grad = None
for _ in range(200): step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(1000): step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(after - before)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    growth_kib = int(result.stdout.strip().splitlines()[-1])
    assert growth_kib < 2048, f"max RSS grew by {growth_kib} KiB over 1000 calls"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_two_threads_at_once(backend):
    inputs = [([randn(128, 500, seed=10 * t + h) for h in range(2)], torch.randint(0, 500, (128,), generator=_g(t)))
              for t in range(2)]
    expected = [auxfuse.multi_head_cross_entropy(h, t, backend=backend) for h, t in inputs]
    results, errors = [None, None], []

    def worker(i):
        try:
            for _ in range(50):
                results[i] = auxfuse.multi_head_cross_entropy(inputs[i][0], inputs[i][1], backend=backend)
                assert torch.equal(results[i], expected[i])
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_CPU)
def test_indexing_past_2_pow_31_elements(backend):
    """One bf16 head of 2^31 + 3 x 2^15 elements: rows past the int32 range must be right (loss and grad)."""
    C = 32768
    N = 2**31 // C + 3
    head = torch.empty(N, C, dtype=torch.bfloat16)
    head.view(-1, C)[:] = randn(1, C, dtype=torch.bfloat16)  # cheap fill; rows differ only by target
    head[-3:] = randn(3, C, dtype=torch.bfloat16, scale=3.0, seed=1)
    head.requires_grad_()
    target = torch.randint(0, C, (N,), generator=_g())
    loss = auxfuse.multi_head_cross_entropy(head, target, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss[-3:].sum(), head)
    tail = to_reference(head[-3:]).requires_grad_()
    ref = torch.nn.functional.cross_entropy(tail, target[-3:], reduction="none")
    (ref_grad,) = torch.autograd.grad(ref.sum(), tail)
    torch.testing.assert_close(loss[-3:].double(), ref.detach(), rtol=1e-5, atol=1e-5)  # fp32 from bf16 values
    assert_matches_reference(grad[-3:], ref_grad, torch.bfloat16, C)
    assert grad[0].abs().max() == 0 and grad[N // 2].abs().max() == 0  # rows with grad_output 0
