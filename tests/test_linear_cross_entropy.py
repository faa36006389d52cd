"""multi_head_linear_cross_entropy (issue #19) against the float64 naive sum
sum_h w_h * (F.cross_entropy(softcap(F.linear(x_h, W_h, b_h)), t_h) + z_loss * reduce(lse^2)): shared and
per-head projections, with and without bias, every reduction with a random grad_output, ignore_index, label
smoothing, z-loss, softcap, fp32 / bf16 / fp64, chunk boundaries, on every backend that runs here."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import auxfuse
from oracle import assert_matches_reference, generator, random_grad_output, to_reference

AVAILABLE = auxfuse.available_backends()
BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(AVAILABLE["cpu"] is not None,
                                                                   reason=str(AVAILABLE["cpu"])))]
V, D = 53, 12


def naive(hiddens, projections, biases, targets, weights, *, reduction="mean", label_smoothing=0.0, z_loss=0.0,
          softcap=None, ignore_index=-100):
    """What users write by hand, one head at a time (float64 in, float64 out)."""
    total = 0.0
    for x, W, b, t, w in zip(hiddens, projections, biases, targets, weights):
        z = F.linear(x, W, b)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        loss = F.cross_entropy(z, t, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index)
        if z_loss:
            counted = t != ignore_index
            rows = torch.where(counted, torch.logsumexp(z, 1) ** 2, 0.0)
            loss = loss + z_loss * {"none": rows, "sum": rows.sum(), "mean": rows.sum() / counted.sum()}[reduction]
        total = total + w * loss
    return total


def _inputs(g, dtype, num_heads, shared, bias, rows=(23, 23, 23)):
    hiddens = [torch.randn(n, D, generator=g).to(dtype) for n in rows[:num_heads]]
    projections = [(torch.randn(V, D, generator=g) * 0.5).to(dtype) for _ in range(1 if shared else num_heads)]
    biases = [(torch.randn(V, generator=g)).to(dtype) for _ in range(1 if shared else num_heads)] if bias else []
    labels = torch.randint(0, V, (max(rows),), generator=g)
    labels[3] = -100
    targets = [t[: n] for t, n in zip(auxfuse.shifted_targets(labels, num_heads), rows)]
    return hiddens, projections, biases, targets


def check(backend, hiddens, projections, biases, targets, weights, shared, **options):
    dtype = hiddens[0].dtype
    leaves = [t.clone().requires_grad_(True) for t in hiddens + projections + biases]
    ours_h = leaves[:len(hiddens)]
    ours_p = leaves[len(hiddens):len(hiddens) + len(projections)]
    ours_b = leaves[len(hiddens) + len(projections):]
    out = auxfuse.multi_head_linear_cross_entropy(
        ours_h, ours_p[0] if shared else ours_p, targets, weights,
        bias=(ours_b[0] if shared else ours_b) if ours_b else None, backend=backend, return_details=True, **options)
    refs = [to_reference(t).requires_grad_(True) for t in hiddens + projections + biases]
    ref_h, ref_p, ref_b = refs[:len(hiddens)], refs[len(hiddens):len(hiddens) + len(projections)], \
        refs[len(hiddens) + len(projections):]
    H = len(hiddens)
    expand = (lambda xs: xs * H) if shared else (lambda xs: xs)
    ref_options = {k: v for k, v in options.items() if k != "chunk_size"}
    ref = naive(ref_h, expand(ref_p), expand(ref_b) if ref_b else [None] * H, targets, weights, **ref_options)
    assert_matches_reference(out.loss, ref, dtype, msg="loss")
    g = random_grad_output(ref)
    ours = torch.autograd.grad(out.loss, leaves, g.to(out.loss.dtype))
    theirs = torch.autograd.grad(ref, refs, g)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == dtype and a.shape == b.shape, i
        if dtype in (torch.float16, torch.bfloat16):
            # These gradients are matmuls of the logits' gradient rounded to bf16 (as F.linear's backward rounds
            # it): PyTorch's naive bf16 sum is off by up to ~1% of the largest element (this code by ~0.5%).
            scale = float(b.abs().max())
            torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2 * scale, msg=f"gradient of input {i}")
        else:
            assert_matches_reference(a, b, dtype, V, msg=f"gradient of input {i}")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-head"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_option(backend, shared, bias, reduction):
    g = generator(("linear", backend, shared, bias, reduction))
    for dtype, smoothing, softcap, chunk in itertools.product(
            (torch.float32, torch.float64), (0.0, 0.1), (None, 4.0), (5, None)):
        hiddens, projections, biases, targets = _inputs(g, dtype, 3, shared, bias)
        check(backend, hiddens, projections, biases, targets, [1.0, 0.3, 0.2], shared, reduction=reduction,
              label_smoothing=smoothing, softcap=softcap, chunk_size=chunk)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss(reduction):
    """z-loss (torch backend; auto picks it when z_loss > 0)."""
    g = generator(("z_loss", reduction))
    hiddens, projections, biases, targets = _inputs(g, torch.float32, 2, True, True)
    for softcap in (None, 3.0):
        check("torch", hiddens, projections, biases, targets, [1.0, 0.5], True, reduction=reduction, z_loss=1e-2,
              label_smoothing=0.05, softcap=softcap, chunk_size=7)
    x = [h.requires_grad_() for h in hiddens]
    with pytest.raises(ValueError, match="z_loss is computed by the torch backend only"):
        auxfuse.multi_head_linear_cross_entropy(x, projections[0], targets, z_loss=1e-2, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend):
    """bf16 hidden states and projection: logits made in bf16 (as F.linear makes them), the rest in fp32."""
    g = generator(("bf16", backend))
    hiddens, projections, biases, targets = _inputs(g, torch.bfloat16, 2, True, False)
    check(backend, hiddens, projections, biases, targets, [1.0, 0.3], True, label_smoothing=0.1, chunk_size=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_of_different_rows_and_details(backend):
    """Per-head targets of different lengths (a mapping by name), details per head."""
    g = generator(("rows", backend))
    hiddens, projections, biases, targets = _inputs(g, torch.float32, 3, True, False, rows=(23, 17, 9))
    out = check(backend, hiddens, projections, biases, targets, [1.0, 0.3, 0.2], True, chunk_size=4)
    assert out.count.tolist() == [int((t != -100).sum()) for t in targets]
    named = auxfuse.multi_head_linear_cross_entropy(dict(zip("abc", hiddens)), projections[0],
                                                    dict(zip("cba", reversed(targets))), {"a": 1.0, "b": 0.3, "c": 0.2},
                                                    backend=backend)
    assert_matches_reference(named, naive([to_reference(h) for h in hiddens], [to_reference(projections[0])] * 3,
                                          [None] * 3, targets, [1.0, 0.3, 0.2]), torch.float32)
    for h, (x, t) in enumerate(zip(hiddens, targets)):
        z = F.linear(to_reference(x), to_reference(projections[0]))
        assert_matches_reference(out.head_losses[h], F.cross_entropy(z, t), torch.float32)
        assert int(out.head_correct[h]) == int(((z.argmax(1) == t) & (t != -100)).sum())


def test_all_ignored_and_frozen_projection():
    """Every target of a head ignored: a NaN mean and zero gradients, as PyTorch; a projection that needs no
    gradient gets none (and costs no matmul)."""
    g = generator("ignored")
    x = torch.randn(5, D, generator=g, requires_grad=True)
    W = torch.randn(V, D, generator=g)
    loss = auxfuse.multi_head_linear_cross_entropy([x], W, torch.full((5,), -100))
    (grad,) = torch.autograd.grad(loss, [x])
    assert torch.isnan(loss) and torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_through_a_kept_graph(reduction):
    """retain_graph=True: a second backward gives the same gradients; once the graph is freed, autograd's own
    error."""
    g = generator(("kept", reduction))
    hiddens, projections, biases, targets = _inputs(g, torch.float32, 2, True, True)
    leaves = [t.requires_grad_(True) for t in hiddens + projections + biases]
    loss = auxfuse.multi_head_linear_cross_entropy(leaves[:2], leaves[2], targets, bias=leaves[3],
                                                   reduction=reduction, chunk_size=7)
    grad_output = random_grad_output(loss).to(loss.dtype)
    first = torch.autograd.grad(loss, leaves, grad_output, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, grad_output)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, leaves, grad_output)


def test_module_and_compile_fullgraph():
    g = generator("module")
    hiddens, projections, biases, targets = _inputs(g, torch.float32, 2, True, True)
    criterion = auxfuse.MultiHeadLinearLoss([1.0, 0.4], label_smoothing=0.1, chunk_size=8)
    x = [h.requires_grad_() for h in hiddens]
    eager = criterion(x, projections[0], targets, bias=biases[0])
    ref = naive([to_reference(h) for h in hiddens], [to_reference(projections[0])] * 2,
                [to_reference(biases[0])] * 2, targets, [1.0, 0.4], label_smoothing=0.1)
    assert_matches_reference(eager, ref, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, W, bias: criterion([a, b], W, targets, bias=bias), fullgraph=True,
                             backend="aot_eager")
    got = compiled(*x, projections[0], biases[0])
    torch.testing.assert_close(got, eager)
    for a, b in zip(torch.autograd.grad(got, x), torch.autograd.grad(eager, x)):
        torch.testing.assert_close(a, b)


ERRORS = [
    ("a projection of the wrong width", dict(projection=torch.zeros(V, D + 1)), r"the projection must be \(V, D\)"),
    ("a target per row missing", dict(target=torch.zeros(4, dtype=torch.long)), "the target must be class indices"),
    ("too few projections", dict(projection=[torch.zeros(V, D)]), "1 projection for 2 heads"),
    ("a bias of the wrong size", dict(bias=torch.zeros(V + 1)), r"the bias must be a \(53,\)"),
    ("an invalid class index", dict(target=torch.full((6,), V)), r"head '0': target value 53 at row 0 is outside"),
    ("an unknown backend", dict(backend="fast"), "unknown backend 'fast'"),
    ("a negative softcap", dict(softcap=-1.0), "softcap=-1.0 must be > 0"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(case):
    _, overrides, message = case
    g = generator("errors")
    args = dict(hiddens=[torch.randn(6, D, generator=g), torch.randn(6, D, generator=g)],
                projection=torch.randn(V, D, generator=g), target=torch.randint(0, V, (6,), generator=g))
    args.update(overrides)
    options = {k: v for k, v in args.items() if k not in ("hiddens", "projection", "target")}
    with pytest.raises(ValueError, match=message):
        auxfuse.multi_head_linear_cross_entropy(args["hiddens"], args["projection"], args["target"], **options)


@pytest.mark.slow
def test_multi_token_example(tmp_path, capsys):
    """examples/train_multi_token.py --compare: the naive and the fused loss train the same model to the same
    per-head losses (same seed), each in its own process, and the plot is drawn."""
    from test_training import _load_example

    example = _load_example("train_multi_token")
    plot = tmp_path / "heads.png"
    naive, fused = example.main(["--compare", "--steps", "3", "--context", "16", "-b", "4", "--width", "32",
                                 "--vocab-size", "512", "--corpus-chars", "50000", "--no-progress",
                                 "--plot", str(plot)])
    assert (naive["loss"], fused["loss"]) == ("naive", "auxfuse")
    for a, b in zip(naive["history"], fused["history"]):
        assert a == pytest.approx(b, rel=1e-3)
    assert fused["tokens_per_s"] > 0 and fused["peak_MiB"] > 0 and plot.stat().st_size > 10_000
    assert "tokens/s" in capsys.readouterr().out
