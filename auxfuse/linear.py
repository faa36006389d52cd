"""Fused linear + multi-head cross-entropy: the heads' logits are never held whole.

For every head h with hidden states x_h (N_h, D), a projection W_h (V, D) (one shared by every head, or one
per head) and an optional bias b_h (V,):

    z_h = x_h @ W_h^T + b_h,   z_h = softcap * tanh(z_h / softcap) when softcap is set
    loss = sum_h w_h * reduce_h(CE(z_h, target_h) + z_loss * lse(z_h)^2)

reduce_h is the reduction over the head's counted rows (mean divides by their number). The rows go in chunks:
per chunk one matmul makes the chunk's logits, the cross-entropy kernel (the fused CPU / CUDA op, the Triton
kernels, or PyTorch) turns them into the loss and the logits' gradient in place of the logits, and two matmuls
take that gradient to the hidden states' gradient and into the projection's (and bias's) gradient, accumulated
in float32. So no
more than one chunk of logits (and its gradient) exists at a time, and the gradients are done when the forward
returns: backward only scales them by grad_output (read on the device: no host sync). With
``reduction="none"`` grad_output is per row, so the forward keeps only the losses and backward recomputes the
chunks (one matmul more).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backends import triton as triton_backend
from .backends.native import cpu as native_cpu
from .backends.native import cuda as native_cuda
from .backends.problem import check_reduction_and_smoothing
from .functional import MultiHeadLossOutput
from .outputs import DEFAULT_AUX_WEIGHT, Weights, collect_heads
from .targets import is_per_head, per_head_values

LINEAR_BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
CHUNK_LOGITS = 1 << 22  # logits per chunk by default (16 MiB of float32), whatever the vocabulary size


class _Spec(NamedTuple):
    """Everything but the tensors: per head its weight, projection / bias index, target and row count."""

    weights: list[float]
    projection_of: list[int]  # head -> index into the projections
    bias_of: list[Optional[int]]  # head -> index into the biases, or None
    targets: list[torch.Tensor]
    shared_target: bool
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]
    reduction: str
    chunk_rows: list[int]
    kernel: str  # each chunk's cross-entropy: "op" (the fused CPU / CUDA op), "triton" or "torch" (PyTorch)


def _chunk_rows_and_grad(spec: _Spec, z: torch.Tensor, target: torch.Tensor, want_grad: bool):
    """One chunk's per-row losses (float32 / float64), top-1 hits, and the gradient of their sum w.r.t. z
    (z's dtype, or float32 when a softcap applies), ignored rows 0."""
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    capped = None
    if spec.softcap is not None:
        capped = torch.tanh(z.to(acc) / spec.softcap)
        z = capped * spec.softcap
    if spec.kernel == "op":
        rows, _, hits, _, _, grad, invalid = torch.ops.auxfuse.multihead_ce_forward(
            [z], target, None, [1.0], spec.ignore_index, spec.label_smoothing, 0, 1 if want_grad else 0)
        rows, hits = rows.reshape(-1), hits[0]
        grad = grad[0] if want_grad else None
    elif spec.kernel == "triton":
        rows, hits, invalid, grad = triton_backend.linear_chunk_rows_and_grad(z, target, spec.ignore_index,
                                                                              spec.label_smoothing, want_grad)
    else:
        rows, hits, invalid, grad = _torch_rows_and_grad(spec, z.to(acc), target, want_grad)
    if grad is not None and capped is not None:
        grad = grad.to(acc) * (1.0 - capped * capped)  # d softcap * tanh(z / softcap) / dz
    return rows, hits, invalid, grad


def _torch_rows_and_grad(spec: _Spec, z: torch.Tensor, target: torch.Tensor, want_grad: bool):
    """The per-row cross-entropy with label smoothing and z-loss in PyTorch (z in the accumulation dtype)."""
    C, eps = z.shape[1], spec.label_smoothing
    counted = target != spec.ignore_index
    in_range = (target >= 0) & (target < C)
    index = torch.where(counted & in_range, target, 0).unsqueeze(1)
    lse = torch.logsumexp(z, 1)
    rows = (1.0 - eps) * (lse - z.gather(1, index).squeeze(1))
    if eps:
        rows = rows + eps * (lse - z.mean(1))
    if spec.z_loss:
        rows = rows + spec.z_loss * lse * lse
    invalid = counted & ~in_range
    rows = torch.where(counted, rows, 0.0)
    rows = torch.where(invalid, float("nan"), rows)  # an invalid index poisons its row and is never read
    hits = ((z.argmax(1) == target) & counted).sum()
    if not want_grad:
        return rows, hits, invalid.sum(), None
    grad = torch.exp(z - lse.unsqueeze(1))
    if spec.z_loss:
        grad.mul_((1.0 + 2.0 * spec.z_loss * lse).unsqueeze(1))
    grad.scatter_add_(1, index, torch.full_like(lse, eps - 1.0).unsqueeze(1))
    if eps:
        grad.sub_(eps / C)
    return rows, hits, invalid.sum(), grad.mul_(counted.unsqueeze(1))


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: every head's chunks, their loss, and (mean / sum) every gradient. Backward: those gradients
    times grad_output, or (none) the chunks again with each row's grad_output. `tensors` are the hidden
    states, the projections and the biases, in that order; `layout` how many hidden states and projections."""

    @staticmethod
    def forward(ctx, spec: _Spec, layout: tuple[int, int], *tensors):
        needs = ctx.needs_input_grad[2:] if spec.reduction != "none" else (False,) * len(tensors)
        result = _run(spec, tensors, layout, needs=needs, row_scales=None)
        ctx.spec, ctx.layout = spec, layout
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(result.head_losses, result.head_correct, result.count, result.invalid)
        # Saved tensors are freed after a backward that does not keep the graph (and a second one then raises
        # autograd's own error): the inputs for none, whose backward recomputes the chunks, else the gradients.
        ctx.save_for_backward(*(tensors if spec.reduction == "none" else result.grads))
        return result.loss, result.head_losses, result.head_correct, result.count, result.invalid

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        saved = ctx.saved_tensors
        if grad_loss is None:
            grads = [None] * len(saved)
        elif ctx.spec.reduction == "none":
            grads = _run(ctx.spec, saved, ctx.layout, needs=ctx.needs_input_grad[2:], row_scales=grad_loss).grads
        else:
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in saved]
        return (None, None, *grads)


class _RunResult(NamedTuple):
    loss: torch.Tensor
    head_losses: torch.Tensor
    head_correct: torch.Tensor
    count: torch.Tensor
    invalid: torch.Tensor
    grads: list  # per input tensor (hiddens, projections, biases), in their dtypes, or None


def _split(values: Sequence, layout: tuple[int, int]) -> tuple:
    """(hidden states, projections, biases) of a sequence laid out as _LinearCrossEntropy's inputs."""
    num_hiddens, num_projections = layout
    return (values[:num_hiddens], values[num_hiddens:num_hiddens + num_projections],
            values[num_hiddens + num_projections:])


def _run(spec: _Spec, tensors: Sequence[torch.Tensor], layout: tuple[int, int], *, needs: Sequence[bool],
         row_scales: Optional[torch.Tensor]):
    """Every head's chunks, and the gradients of the inputs whose `needs` flag is set (both laid out as
    _LinearCrossEntropy's inputs). row_scales (reduction none, backward): grad_output per row; the gradients
    are then those of sum_rows row_scale * loss."""
    hiddens, projections, biases = _split(tensors, layout)
    needs_hidden, needs_projection, needs_bias = _split(needs, layout)
    device = hiddens[0].device
    acc = torch.float64 if hiddens[0].dtype == torch.float64 else torch.float32
    want_grad = any(needs)
    grad_hiddens = [torch.empty_like(x) if n else None for x, n in zip(hiddens, needs_hidden)]
    grad_projections = [torch.zeros(W.shape, dtype=acc, device=device) if n else None
                        for W, n in zip(projections, needs_projection)]
    grad_biases = [torch.zeros(b.shape, dtype=acc, device=device) if n else None for b, n in zip(biases, needs_bias)]
    head_sums, head_hits, counts, none_rows = [], [], [], None
    invalid = torch.zeros((), dtype=torch.int64, device=device)
    for h, x in enumerate(hiddens):
        W = projections[spec.projection_of[h]]
        b = None if spec.bias_of[h] is None else biases[spec.bias_of[h]]
        target = spec.targets[h]
        count = (target != spec.ignore_index).sum()
        # The gradient's scale per head: w_h (sum), w_h / count (mean), w_h * grad_output[row] (none).
        scale = torch.full((), spec.weights[h], dtype=acc, device=device)
        if spec.reduction == "mean":  # every row ignored: a NaN loss and zero gradients, as in PyTorch
            scale = scale / count.clamp(min=1)
        loss_sum, hits = torch.zeros((), dtype=acc, device=device), torch.zeros((), dtype=torch.int64, device=device)
        rows_of_head = []
        step = spec.chunk_rows[h]
        for start in range(0, x.shape[0], step):
            stop = min(start + step, x.shape[0])
            x_chunk = x[start:stop]
            z = F.linear(x_chunk, W, b)
            rows, chunk_hits, chunk_invalid, grad = _chunk_rows_and_grad(spec, z, target[start:stop], want_grad)
            loss_sum = loss_sum + rows.sum()
            hits, invalid = hits + chunk_hits, invalid + chunk_invalid
            if spec.reduction == "none":
                rows_of_head.append(rows)
            if grad is None:
                continue
            # In place: the chunk's gradient is a fresh buffer of the CE step.
            if row_scales is None:
                grad.mul_(scale)
            else:
                grad.mul_((row_scales[start:stop].to(acc) * spec.weights[h]).unsqueeze(1).to(grad.dtype))
            grad = grad.to(x.dtype)
            if grad_hiddens[h] is not None:
                torch.mm(grad, W, out=grad_hiddens[h][start:stop])
            # The projection's and bias's gradients accumulate in float32 (float64 for float64 inputs).
            if grad_projections[spec.projection_of[h]] is not None:
                grad_projections[spec.projection_of[h]].addmm_(grad.t().to(acc), x_chunk.to(acc))
            if b is not None and grad_biases[spec.bias_of[h]] is not None:
                grad_biases[spec.bias_of[h]].add_(grad.sum(0, dtype=acc))
        head_sums.append(loss_sum)
        head_hits.append(hits)
        counts.append(count)
        if spec.reduction == "none":
            weighted = torch.cat(rows_of_head) * spec.weights[h]
            none_rows = weighted if none_rows is None else none_rows + weighted
    head_sums, counts = torch.stack(head_sums), torch.stack(counts)
    weights = torch.stack([head_sums.new_full((), w) for w in spec.weights])  # fills, no copy: CUDA graphs
    if spec.reduction == "sum":
        loss, head_losses = (head_sums * weights).sum(), head_sums
    else:
        head_losses = head_sums / counts
        loss = none_rows if spec.reduction == "none" else (head_losses * weights).sum()
    grads = (grad_hiddens + [None if g is None else g.to(W.dtype) for g, W in zip(grad_projections, projections)]
             + [None if g is None else g.to(b.dtype) for g, b in zip(grad_biases, biases)])
    count = counts[0] if spec.shared_target else counts
    return _RunResult(loss, head_losses, torch.stack(head_hits), count, invalid, grads)


def _per_head_tensors(what: str, value: Any, names: list[str], optional: bool) -> tuple[list, list[Optional[int]]]:
    """A tensor shared by every head, or one per head: (the distinct tensors, each head's index into them)."""
    if value is None:
        if not optional:
            raise ValueError(f"auxfuse: {what} is required")
        return [], [None] * len(names)
    if isinstance(value, torch.Tensor):
        return [value], [0] * len(names)
    per_head = per_head_values(what, value, names)
    tensors, index_of = [], []
    for name, tensor in zip(names, per_head):
        if tensor is None:
            if not optional:
                raise ValueError(f"auxfuse: head {name!r} has no {what}")
            index_of.append(None)
        else:
            index_of.append(len(tensors))
            tensors.append(tensor)
    return tensors, index_of


def _check(names, hiddens, projections, projection_of, biases, bias_of, targets, reduction, ignore_index,
           label_smoothing, z_loss, softcap):
    check_reduction_and_smoothing(reduction, label_smoothing)
    if z_loss < 0 or not math.isfinite(z_loss):
        raise ValueError(f"auxfuse: z_loss={z_loss} must be a finite number >= 0")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"auxfuse: softcap={softcap} must be > 0 (or None for no softcap)")
    first = hiddens[0]
    for name, x, p, bi, t in zip(names, hiddens, projection_of, bias_of, targets):
        W = projections[p]
        if x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"auxfuse: head {name!r}: hidden states must be a floating-point (N, D) tensor; got "
                             f"{x.dtype} {tuple(x.shape)}")
        if x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"auxfuse: head {name!r} is {x.dtype} on {x.device}, head {names[0]!r} {first.dtype} "
                             f"on {first.device}: all hidden states must share one dtype and device")
        if W.dim() != 2 or W.shape[1] != x.shape[1]:
            raise ValueError(f"auxfuse: head {name!r}: the projection must be (V, D) with D = {x.shape[1]} (the "
                             f"hidden size); got {tuple(W.shape)}")
        if W.dtype != x.dtype or W.device != x.device:
            raise ValueError(f"auxfuse: head {name!r}: the projection is {W.dtype} on {W.device}, the hidden states "
                             f"{x.dtype} on {x.device}")
        if bi is not None:
            b = biases[bi]
            if b.shape != (W.shape[0],) or b.dtype != x.dtype or b.device != x.device:
                raise ValueError(f"auxfuse: head {name!r}: the bias must be a ({W.shape[0]},) {x.dtype} tensor on "
                                 f"{x.device}; got {b.dtype} {tuple(b.shape)} on {b.device}")
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],) or t.is_floating_point():
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"auxfuse: head {name!r}: the target must be class indices of shape ({x.shape[0]},), "
                             f"one per row of its hidden states; got {got}")
        if t.device != x.device:
            raise ValueError(f"auxfuse: head {name!r}: the target is on {t.device}, the hidden states on {x.device}")
    if reduction == "none" and len({x.shape[0] for x in hiddens}) > 1:
        raise ValueError("auxfuse: reduction='none' sums the heads' per-row losses, so every head needs the same "
                         "number of rows; use 'mean' or 'sum'")


def _select(backend: str, hiddens, z_loss: float) -> tuple[str, str]:
    """(the backend's name, the chunks' cross-entropy kernel: _Spec.kernel); ValueError with the reasons for a
    named backend that cannot run. `auto` takes the fused op of the hidden states' device, else PyTorch."""
    device = hiddens[0].device.type
    reasons = {}
    for name, unavailable in (("cpu", native_cpu.unavailable_reason()), ("cuda", native_cuda.unavailable_reason()),
                              ("triton", triton_backend.unavailable_reason())):
        why = [unavailable] if unavailable else []
        if name != "triton" and device != name:
            why.append(f"the hidden states are on {device}")
        if name == "triton" and device != "cuda" and not triton_backend.INTERPRET:
            why.append(f"the hidden states are on {device}; the Triton kernels run on CUDA")
        if name == "triton" and hiddens[0].dtype not in triton_backend.DTYPES:
            why.append(f"the Triton kernels take float32 / float16 / bfloat16, not {hiddens[0].dtype}")
        if z_loss:
            why.append("z_loss is computed by the torch backend only")
        reasons[name] = why
    if backend == "auto":
        if device in ("cpu", "cuda") and not reasons[device]:
            return device, "op"
        return "torch", "torch"
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"auxfuse: unknown backend {backend!r}; choose one of {list(LINEAR_BACKENDS)}")
    if backend == "torch":
        return "torch", "torch"
    if reasons[backend]:
        raise ValueError(f"auxfuse: backend {backend!r} cannot run this input: " + "; ".join(reasons[backend]))
    return backend, "triton" if backend == "triton" else "op"


def multi_head_linear_cross_entropy(
    hiddens: Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]],
    projection: Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]],
    target: Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]],
    weights: Weights = None,
    *,
    bias: Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]], Mapping[str, Optional[torch.Tensor]]] = None,
    aux_weight: float = DEFAULT_AUX_WEIGHT,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    return_details: bool = False,
) -> Union[torch.Tensor, MultiHeadLossOutput]:
    """Weighted cross-entropy of many vocabulary-sized heads, each ``x_h @ W_h^T + b_h``, without holding any
    head's logits: rows go in chunks, each chunk's logits become their gradient and are gone.

    Equals ``sum_h w_h * (F.cross_entropy(z_h, target_h, ignore_index=..., label_smoothing=...,
    reduction=...) + z_loss * lse(z_h)^2 reduced the same way over the counted rows)`` with
    ``z_h = softcap * tanh(F.linear(x_h, W_h, b_h) / softcap)`` (no tanh without softcap).

    Args:
        hiddens: one (N_h, D) tensor per head: a sequence (the first is the main head) or a mapping by name.
        projection: the (V, D) output layer shared by every head (tied, as DeepSeek's MTP and Meta's
            multi-token heads), or one per head (Medusa), as a sequence or mapping.
        target: (N,) class indices shared by every head, or one per head (``auxfuse.shifted_targets``).
        weights: per-head weights by position or name; None: 1 for the first head, ``aux_weight`` for the rest.
        bias: None, one (V,) bias for every head, or one (or None) per head.
        ignore_index, label_smoothing, reduction: as in ``F.cross_entropy`` (mean: over the head's own counted
            rows). reduction="none" returns the weighted per-row sum (heads of one row count).
        z_loss: the weight of each counted row's squared log-sum-exp (PaLM's z-loss).
        softcap: Gemma 2's logit soft-capping, ``softcap * tanh(z / softcap)``.
        backend: ``auto`` (the fused CE op of the hidden states' device, else ``torch``), ``cpu``, ``cuda``,
            ``triton`` (the per-head Triton kernels on each chunk; eager mode only), ``torch``.
        chunk_size: rows per chunk (default: about 4M logits per chunk).
        return_details: a ``MultiHeadLossOutput`` (loss, head_losses, head_correct, count); count is () for a
            shared target, (H,) for one target per head.

    Gradients reach the hidden states, the projection(s) and the bias(es); for bf16 / fp16 inputs the logits
    are made in the inputs' dtype (as ``F.linear`` makes them), the cross-entropy and the projection's
    gradient accumulate in float32.

    Example:
        >>> import torch, auxfuse
        >>> W = torch.randn(1000, 64, requires_grad=True)          # a shared output layer, V = 1000
        >>> hiddens = [torch.randn(2 * 16, 64, requires_grad=True) for _ in range(3)]
        >>> labels = torch.randint(0, 1000, (2, 16))
        >>> targets = [t.reshape(-1) for t in auxfuse.shifted_targets(labels, 3)]
        >>> loss = auxfuse.multi_head_linear_cross_entropy(hiddens, W, targets, auxfuse.deepseek_mtp_weights(2))
        >>> loss.backward()
    """
    heads = collect_heads(hiddens if not isinstance(hiddens, torch.Tensor) else [hiddens], weights,
                          aux_weight=aux_weight)
    names, tensors = heads.names, heads.tensors
    projections, projection_of = _per_head_tensors("projection", projection, names, optional=False)
    biases, bias_of = _per_head_tensors("bias", bias, names, optional=True)
    shared_target = isinstance(target, torch.Tensor)
    targets = [target] * len(names) if shared_target else per_head_values("targets", target, names)
    _check(names, tensors, projections, projection_of, biases, bias_of, targets, reduction, ignore_index,
           float(label_smoothing), float(z_loss), softcap)
    backend_name, kernel = _select(backend, tensors, float(z_loss))
    if backend_name == "cpu" and not torch.compiler.is_compiling():
        _raise_if_invalid(names, targets, projections, projection_of, ignore_index)
    vocab = [projections[p].shape[0] for p in projection_of]
    chunk_rows = [max(1, chunk_size or CHUNK_LOGITS // v) for v in vocab]
    spec = _Spec(
        weights=[float(w) for w in heads.weights], projection_of=projection_of, bias_of=bias_of,
        targets=[t.long() for t in targets], shared_target=shared_target, ignore_index=int(ignore_index),
        label_smoothing=float(label_smoothing), z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap), reduction=reduction, chunk_rows=chunk_rows, kernel=kernel,
    )
    loss, head_losses, head_correct, count, invalid = _LinearCrossEntropy.apply(
        spec, (len(tensors), len(projections)), *tensors, *projections, *biases)
    if not return_details:
        return loss
    return MultiHeadLossOutput(loss, head_losses, head_correct, count, invalid)


def _raise_if_invalid(names, targets, projections, projection_of, ignore_index):
    """CPU inputs: a class index outside [0, V) that is not ignore_index is a ValueError naming the head."""
    for name, t, p in zip(names, targets, projection_of):
        vocab = projections[p].shape[0]
        bad = ((t < 0) | (t >= vocab)) & (t != ignore_index)
        if bool(bad.any()):
            position = int(bad.nonzero()[0])
            raise ValueError(f"auxfuse: head {name!r}: target value {int(t[position])} at row {position} is outside "
                             f"[0, {vocab}) and is not ignore_index ({ignore_index})")


class MultiHeadLinearLoss(nn.Module):
    """The module form of ``multi_head_linear_cross_entropy``: ``criterion(hiddens, projection, target)``.

    Example:
        >>> import torch, auxfuse
        >>> head = torch.nn.Linear(64, 1000, bias=False)              # the tied output layer
        >>> criterion = auxfuse.MultiHeadLinearLoss(auxfuse.medusa_head_weights(2), z_loss=1e-4)
        >>> hiddens = [torch.randn(32, 64, requires_grad=True) for _ in range(3)]
        >>> labels = torch.randint(0, 1000, (32,))
        >>> criterion(hiddens, head.weight, auxfuse.shifted_targets(labels, 3)).backward()
    """

    def __init__(self, weights: Weights = None, *, aux_weight: float = DEFAULT_AUX_WEIGHT, ignore_index: int = -100,
                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: Optional[float] = None,
                 reduction: str = "mean", backend: str = "auto", chunk_size: Optional[int] = None):
        super().__init__()
        self.weights = dict(weights) if isinstance(weights, dict) else weights
        self.aux_weight, self.ignore_index, self.label_smoothing = aux_weight, ignore_index, label_smoothing
        self.z_loss, self.softcap, self.reduction = z_loss, softcap, reduction
        self.backend, self.chunk_size = backend, chunk_size

    def forward(self, hiddens, projection, target, bias=None, return_details: bool = False):
        return multi_head_linear_cross_entropy(
            hiddens, projection, target, self.weights, bias=bias, aux_weight=self.aux_weight,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            softcap=self.softcap, reduction=self.reduction, backend=self.backend, chunk_size=self.chunk_size,
            return_details=return_details)

    def extra_repr(self) -> str:
        return (f"weights={self.weights}, z_loss={self.z_loss}, softcap={self.softcap}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
