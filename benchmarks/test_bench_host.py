"""Host overhead (pytest-benchmark): the time of a loss call on heads so small that the kernels take nothing,
on the current device. At classifier sizes on a GPU (GoogLeNet's 3 x 256 x 1000: microseconds of kernel
time) this overhead is the whole loss, so it is what auxfuse has to beat the naive sum on there.

    pytest benchmarks/test_bench_host.py --benchmark-only

Providers: the naive sum of F.cross_entropy, `MultiHeadLoss` on a GoogLeNetOutputs (the whole front end:
output parsing, validation or its cached plan, the backend's call), the fused op called directly with its
C++ autograd (no Python front end), and on CUDA `MultiHeadLoss(backend="triton")` (Triton's launcher
included, which the interpreter-based --host-overhead of benchmarks/triton_bench.py leaves out). Modes:
forward alone (heads requiring grad), and forward + backward (torch.autograd.grad of the loss w.r.t. the
heads, as benchmarks/gpu_bench.py does). Each round times
CALLS calls back to back, without a device sync between them; the summary table is microseconds per call.
"""

import collections

import pytest
import torch
import torch.nn.functional as F

import auxfuse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CALLS = 200
HEADS, N, C = 3, 4, 10
WEIGHTS = [1.0, 0.3, 0.3]
GoogLeNetOutputs = collections.namedtuple("GoogLeNetOutputs", "logits aux_logits2 aux_logits1")


def _naive(heads, target):
    return sum(w * F.cross_entropy(x, target) for w, x in zip(WEIGHTS, heads))


_criterion = auxfuse.MultiHeadLoss()
_triton_criterion = auxfuse.MultiHeadLoss(backend="triton")


def _multi_head_loss(heads, target):
    return _criterion(GoogLeNetOutputs(*heads), target)


def _multi_head_loss_triton(heads, target):
    return _triton_criterion(GoogLeNetOutputs(*heads), target)


def _fused_op(heads, target):
    grad_mode = 1 if DEVICE == "cpu" else 2  # what the backend picks for these heads on this device
    return torch.ops.auxfuse.multihead_ce_forward(heads, target, None, WEIGHTS, -100, 0.0, 1, grad_mode)[0]


PROVIDERS = {"naive": _naive, "MultiHeadLoss": _multi_head_loss, "fused op": _fused_op,
             "MultiHeadLoss triton": _multi_head_loss_triton}


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_host_overhead(benchmark, bench_results, provider, mode):
    if provider == "fused op" and auxfuse.available_backends().get(DEVICE) is not None:
        pytest.skip(f"the fused op does not run on {DEVICE} here")
    if provider == "MultiHeadLoss triton" and (DEVICE != "cuda" or auxfuse.available_backends().get("triton")):
        pytest.skip("the triton backend runs on CUDA tensors (on CPU only in Triton's interpreter)")
    loss_fn = PROVIDERS[provider]
    g = torch.Generator().manual_seed(0)
    heads = [torch.randn(N, C, generator=g).to(DEVICE).requires_grad_(True) for _ in range(HEADS)]
    target = torch.randint(0, C, (N,), generator=g).to(DEVICE)

    def one_call():
        loss = loss_fn(heads, target)
        if mode == "forward+backward":
            torch.autograd.grad(loss, heads)

    def calls():
        for _ in range(CALLS):
            one_call()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    calls()  # warm-up: the front end's plan, the allocator's cache
    benchmark.group = f"host overhead {DEVICE} {HEADS} x {N} x {C} {mode}"
    benchmark.pedantic(calls, rounds=30, warmup_rounds=2)
    per_call_us = benchmark.stats.stats.median / CALLS * 1e6
    benchmark.extra_info.update(calls_per_round=CALLS, median_us_per_call=per_call_us)
    bench_results[(f"host overhead, us per call ({DEVICE}, {HEADS} x {N} x {C})", provider, mode)] = (
        f"{per_call_us:.1f}"
    )
