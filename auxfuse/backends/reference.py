"""The `torch` backend: pure PyTorch, the fallback on every device and the oracle of the fused kernels.

All heads go through one autograd node that saves nothing of size N x C beyond the logits themselves (the
naive sum saves a log-probability tensor per head): the forward takes each head's fused log_softmax, reduces
it to per-row losses and drops it; backward rebuilds the softmax with ATen's fused kernel and folds every
coefficient into one scale per row. The per-row formulas are the ones of csrc/multihead_ce.h.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .problem import BackendResult, Problem

name = "torch"
checks_targets = False  # the caller checks class indices on CPU (or when asked)
reads_target_positions = False  # a resized target comes gathered (Problem.gathered)


def unavailable_reason() -> Optional[str]:
    return None


def not_supported_reasons(problem: Problem) -> list[str]:
    return []


def _over_classes(fn, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """log_softmax / softmax over the class dimension of (N, C, S). Classifier heads (S == 1) go through a
    2-D view: ATen's last-dimension kernels are many times faster than its strided ones."""
    if x.shape[2] == 1:
        return fn(x.squeeze(2), 1, dtype=acc).unsqueeze(2)
    return fn(x, 1, dtype=acc)


class _RowTerms:
    """Per-row quantities shared by every head: which rows count, and the loss / gradient coefficients."""

    def __init__(self, problem: Problem):
        acc = problem.acc_dtype
        C = problem.num_classes
        eps = problem.label_smoothing
        cw = problem.class_weight
        self.class_weight_b = None if cw is None else cw.view(1, C, 1)
        self.weight_sum = float(C) if cw is None else cw.sum()
        self.smooth_coef = eps / C
        target = problem.target
        if problem.prob_target:
            t = target.to(acc)
            if eps:
                t = t * (1.0 - eps) + eps / C
            self.weighted_target = t if cw is None else t * self.class_weight_b  # w_c * t'_c, (N, C, S)
            self.lse_coef = self.weighted_target.sum(1)
            rows = t.shape[0] * t.shape[2]
            self.valid = None
            self.count = target.new_full((), rows, dtype=torch.int64)  # no host-to-device copy (CUDA graphs)
            self.invalid = target.new_zeros((), dtype=torch.int64)
            self.denom = target.new_full((), float(rows), dtype=acc)
            return
        valid = target != problem.ignore_index
        in_range = (target >= 0) & (target < C)
        self.valid = valid
        # Out-of-range targets (only reachable on CUDA without check_targets) read class 0 and poison the loss.
        self.index = torch.where(in_range, target, 0).unsqueeze(1)
        self.bad_rows = valid & ~in_range
        w_y = valid.to(acc) if cw is None else torch.where(valid, cw[self.index.squeeze(1)], 0.0)
        self.target_coef = (1.0 - eps) * w_y
        self.lse_coef = torch.where(valid, self.target_coef + self.smooth_coef * self.weight_sum, 0.0)
        self.count = valid.sum()
        self.invalid = self.bad_rows.sum()
        self.denom = w_y.sum()

    def head_loss_rows(self, logp: torch.Tensor) -> torch.Tensor:
        """Each row's unweighted loss (N, S) from the head's log-probabilities (N, C, S)."""
        if self.valid is None:
            return -(self.weighted_target * logp).sum(1)
        rows = -self.target_coef * logp.gather(1, self.index).squeeze(1)
        if self.smooth_coef:
            weighted = logp if self.class_weight_b is None else logp * self.class_weight_b
            rows = rows - self.smooth_coef * weighted.sum(1)
        rows = torch.where(self.valid, rows, 0.0)
        return torch.where(self.bad_rows, float("nan"), rows)

    def head_grad(self, x: torch.Tensor, row_scale: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """d(sum_i row_scale_i * loss_i)/dx for one head, in x's dtype. row_scale is 0 on rows that do not
        count. grad = A * (p - B / A * onehot - C / A * w): the corrections go into the fp32 softmax (p - 1
        before any rounding) and the final scale by A writes x's dtype directly, so the N x C tensor is
        written once in fp32 and once in x's dtype."""
        scale = self.lse_coef * row_scale  # A, per row
        safe = torch.where(scale != 0, scale, 1.0)
        grad = _over_classes(torch.softmax, x, acc)
        if self.valid is None:
            grad.sub_(self.weighted_target * (row_scale / safe).unsqueeze(1))
        else:
            if self.smooth_coef:
                smooth = (row_scale * self.smooth_coef / safe).unsqueeze(1)
                grad.sub_(smooth if self.class_weight_b is None else smooth * self.class_weight_b)
            grad.scatter_add_(1, self.index, -(self.target_coef * row_scale / safe).unsqueeze(1))
        out = grad if x.dtype == acc else torch.empty_like(x, memory_format=torch.contiguous_format)
        return torch.mul(grad, scale.unsqueeze(1), out=out)

    def hits(self, scores: torch.Tensor, problem: Problem) -> torch.Tensor:
        """Top-1 hits among counted rows (first maximum of the logits, as torch.argmax)."""
        predicted = scores.argmax(1)
        if self.valid is None:
            return (predicted == problem.target.argmax(1)).sum()
        return ((predicted == problem.target) & self.valid).sum()


def _row_scale(problem: Problem, terms: _RowTerms, grad_loss: torch.Tensor) -> torch.Tensor:
    if problem.reduction == "none":
        scale = grad_loss
    elif problem.reduction == "mean":
        scale = grad_loss / terms.denom
    else:
        scale = grad_loss
    scale = scale.to(problem.acc_dtype).expand(problem.target.shape[0], problem.heads[0].shape[2])
    # Rows that count for nothing get exactly zero, also when every row is ignored (denom 0).
    return scale if terms.valid is None else torch.where(terms.valid, scale, 0.0)


class _MultiHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, *heads: torch.Tensor):
        acc = problem.acc_dtype
        terms = _RowTerms(problem)
        weighted_rows = None
        head_sums, hits = [], []
        for x, w in zip(heads, problem.head_weights):
            # ATen's fused log_softmax, in fp32 for fp16 / bf16 logits (fp16 log-probabilities overflow for
            # logits near its max), lives for this loop iteration only: nothing N x C is saved for backward.
            logp = _over_classes(torch.log_softmax, x, acc)
            rows = terms.head_loss_rows(logp)
            head_sums.append(rows.sum())
            if problem.reduction == "none":
                weighted_rows = rows * w if weighted_rows is None else weighted_rows + rows * w
            if problem.want_details:
                hits.append(terms.hits(x, problem))
            del logp
        head_sums = torch.stack(head_sums)
        weights = torch.stack([head_sums.new_full((), w) for w in problem.head_weights])  # no copy: CUDA graphs
        if problem.reduction == "sum":
            loss, head_losses = (head_sums * weights).sum(), head_sums
        else:
            head_losses = head_sums / terms.denom
            loss = weighted_rows if problem.reduction == "none" else (head_sums * weights).sum() / terms.denom
        ctx.problem, ctx.terms = problem, terms
        ctx.save_for_backward(*heads)
        head_correct = torch.stack(hits) if hits else None
        ctx.mark_non_differentiable(head_losses, terms.count, terms.invalid)
        return loss, head_losses, head_correct, terms.count, terms.invalid

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        problem, terms = ctx.problem, ctx.terms
        row_scale = _row_scale(problem, terms, grad_loss)
        grads = []
        for x, w, needs in zip(ctx.saved_tensors, problem.head_weights, ctx.needs_input_grad[1:]):
            grads.append(terms.head_grad(x, row_scale * w, problem.acc_dtype) if needs else None)
        return (None, *grads)


def _naive(problem: Problem) -> BackendResult:
    """The plain composition, for gradients w.r.t. probability targets or class weights."""
    target = problem.target if problem.prob_target else problem.target
    losses = [
        F.cross_entropy(
            x.to(problem.acc_dtype),
            target.to(problem.acc_dtype) if problem.prob_target else target,
            weight=problem.class_weight,
            ignore_index=problem.ignore_index,
            reduction=problem.reduction,
            label_smoothing=problem.label_smoothing,
        )
        for x in problem.heads
    ]
    loss = sum(w * l for w, l in zip(problem.head_weights, losses))
    terms = _RowTerms(problem)
    with torch.no_grad():
        if problem.reduction == "none":
            head_losses = torch.stack([l.sum() for l in losses]) / terms.denom
        else:
            head_losses = torch.stack(losses)
        hits = [terms.hits(x, problem) for x in problem.heads] if problem.want_details else None
    return BackendResult(loss, head_losses.detach(), torch.stack(hits) if hits else None, terms.count,
                         terms.invalid)


def compute(problem: Problem) -> BackendResult:
    """Weighted cross-entropy of all heads in one autograd node.

    Example:
        >>> import torch
        >>> from auxfuse.functional import multi_head_cross_entropy
        >>> multi_head_cross_entropy([torch.randn(4, 10), torch.randn(4, 10)], torch.tensor([1, 2, 3, 4]),
        ...                          backend="torch").shape
        torch.Size([])
    """
    target_needs_grad = problem.prob_target and problem.target.requires_grad
    weight_needs_grad = problem.class_weight is not None and problem.class_weight.requires_grad
    if torch.is_grad_enabled() and (target_needs_grad or weight_needs_grad):
        return _naive(problem)
    # The (N, C, S) / (N, S) views are made here, before the autograd.Function: made inside it (on first use),
    # torch.compile could not carry them out of its forward.
    heads, _ = problem.heads, problem.target
    return BackendResult(*_MultiHeadCrossEntropy.apply(problem, *heads))
