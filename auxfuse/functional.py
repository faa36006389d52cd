"""multi_head_cross_entropy: read the heads, validate, pick a backend, call it."""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch

from .backends import AUTO_ORDER, BACKENDS, select_backend
from .backends.problem import BackendResult, Problem, acc_dtype_of, check_reduction_and_smoothing
from .outputs import DEFAULT_AUX_WEIGHT, Heads, Weights, collect_heads, is_namedtuple
from .targets import TARGET_RESIZE_MODES, is_per_head, per_head_values, target_positions

# One target (or class weight) for every head, or one per head: a sequence in the heads' order, a mapping by name.
Targets = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]
ClassWeights = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]], Mapping[str, Optional[torch.Tensor]]]


class _DetailFields(NamedTuple):
    loss: torch.Tensor
    head_losses: torch.Tensor
    head_correct: torch.Tensor
    count: torch.Tensor


class MultiHeadLossOutput(_DetailFields):
    """What ``return_details=True`` returns, all from the same fused pass: a named tuple of four.

    loss: the weighted total (what to call ``backward()`` on).
    head_losses: (H,) each head's unweighted loss, detached, in output order (reduced like ``loss``;
        by mean when ``reduction="none"``).
    head_correct: (H,) int64, each head's top-1 hits among the counted targets (for probability targets:
        rows whose argmax matches the target's argmax).
    count: () int64, the number of counted targets (not ``ignore_index``); with one target per head, (H,):
        each head's own (so ``head_correct / count`` is each head's accuracy either way).

    And one attribute that is not a tuple field (so ``loss, head_losses, head_correct, count = out`` keeps
    working; ``_replace`` and pytree rebuilds drop it):
    invalid_targets: () int64 on the heads' device: how many of the counted class indices are outside
        [0, C); the loss is NaN when it is not 0. Only the CUDA and Triton paths without
        ``check_targets=True`` can report more than 0: everywhere else an invalid index raises a ValueError
        before anything is computed. Counted on the device in the same pass: reading it is the only sync, and
        ``raise_if_invalid_targets()`` does that.

    Example (out-of-range indices on a GPU, counted every step, read at logging steps only):
        >>> out = criterion(outputs, target, return_details=True)    # doctest: +SKIP
        >>> out.loss.backward()                                      # doctest: +SKIP
        >>> invalid_seen = invalid_seen + out.invalid_targets        # doctest: +SKIP
        >>> if step % 100 == 0 and int(invalid_seen):                # doctest: +SKIP
        ...     raise ValueError(f"{int(invalid_seen)} class indices outside [0, C) so far")
        >>> out.raise_if_invalid_targets()  # this call's batch only  # doctest: +SKIP
    """

    invalid_targets: Optional[torch.Tensor] = None

    def __new__(cls, loss, head_losses, head_correct, count, invalid_targets: Optional[torch.Tensor] = None):
        self = super().__new__(cls, loss, head_losses, head_correct, count)
        self.invalid_targets = invalid_targets
        return self

    def raise_if_invalid_targets(self) -> None:
        """Raise a ValueError if any class index of this call was outside [0, C) and not ``ignore_index``
        (one host sync: it reads ``invalid_targets``). ``check_targets=True`` finds the first such index and
        its value, at the cost of a sync on every call.

        Example:
            >>> import torch, auxfuse
            >>> out = auxfuse.multi_head_cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]),
            ...                                        return_details=True)
            >>> out.raise_if_invalid_targets()  # nothing to report
        """
        invalid = 0 if self.invalid_targets is None else int(self.invalid_targets)
        if invalid:
            raise ValueError(
                f"auxfuse: {invalid} class {'index was' if invalid == 1 else 'indices were'} outside [0, C) and "
                f"not ignore_index, so the loss is NaN; pass check_targets=True to find the first one"
            )


def _check_heads(heads: Heads, shared: tuple[str, ...] = ("shape", "dtype", "device")) -> None:
    """ValueError unless the logits are floating point, not scalars, and every head has the first head's
    `shared` attributes (all three for a shared target; dtype and device with one target per head)."""
    first_name, first = heads.names[0], heads.tensors[0]
    if not first.is_floating_point():
        raise ValueError(f"auxfuse: head {first_name!r} holds {first.dtype}; logits must be floating point")
    why = " (they share one target)" if "shape" in shared else ""
    for name, x in zip(heads.names, heads.tensors):
        for what in shared:
            a, b = getattr(x, what), getattr(first, what)
            if a != b:
                raise ValueError(
                    f"auxfuse: head {name!r} has {what} {a} but head {first_name!r} has {b}; "
                    f"all heads must share one {what}{why}"
                )
    if first.dim() == 0:
        raise ValueError(f"auxfuse: head {first_name!r} is a scalar; logits need a class dimension (N, C, ...)")


# Pascal VOC / Cityscapes-style masks: the most common invalid index is the void label of a mask read with the
# default ignore_index (csrc/cpu/multihead_ce.cpp gives the same hint).
_VOID_HINT = "; segmentation masks often mark void pixels 255: pass ignore_index=255"


def _check_target_range(problem: Problem, backend, check_targets: bool) -> None:
    """Raise a ValueError for a class index outside [0, C) that is not ignore_index, unless the chosen backend
    checks itself (the cpu kernel, before it writes anything). CPU inputs are always checked (free: no device
    sync), CUDA inputs when asked (one host sync); not while torch.compile traces a CPU call (no graph break)."""
    if problem.prob_target or backend.checks_targets:
        return
    if not (check_targets or (problem.device.type == "cpu" and not torch.compiler.is_compiling())):
        return
    problem = problem.gathered()  # a resized target: the positions the head reads
    target, num_classes, ignore_index = problem.target, problem.num_classes, problem.ignore_index
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        position = int(bad.flatten().nonzero()[0])
        value = int(target.flatten()[position])
        raise ValueError(
            f"auxfuse: target value {value} is outside [0, {num_classes}) and is not ignore_index "
            f"({ignore_index}) (flattened position {position}); every class index must name one of the "
            f"{num_classes} classes" + (_VOID_HINT if value == 255 else "")
        )


def build_problem(
    heads: Heads,
    target: torch.Tensor,
    *,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    want_details: bool,
) -> tuple[Problem, tuple[int, ...]]:
    """Validate the options against the heads; return the backends' Problem and the shape of a 'none' loss."""
    _check_heads(heads)
    first = heads.tensors[0]
    check_reduction_and_smoothing(reduction, label_smoothing)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"auxfuse: target must be a Tensor, not {type(target).__name__}")
    if target.device != first.device:
        raise ValueError(f"auxfuse: target is on {target.device} but the heads are on {first.device}; move one")
    batched = first.dim() >= 2
    num_classes = first.shape[1] if batched else first.shape[0]
    index_shape = tuple(first.shape[:1]) + tuple(first.shape[2:]) if batched else ()
    if target.is_floating_point() and target.shape == first.shape:
        prob_target = True
    elif target.shape == index_shape and not target.is_floating_point() and not target.is_complex():
        prob_target = False
    else:
        hint = " (float class indices: convert with target.long())" if target.shape == index_shape else ""
        raise ValueError(
            f"auxfuse: target has shape {tuple(target.shape)} and dtype {target.dtype}{hint}; for heads of shape "
            f"{tuple(first.shape)} it must be class indices of shape {index_shape} (int64) or probabilities "
            f"of shape {tuple(first.shape)} (floating point)"
        )
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.shape != (num_classes,):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"auxfuse: weight must be a Tensor of shape ({num_classes},), one per class; got {shape}")
        if weight.device != first.device:
            raise ValueError(f"auxfuse: weight is on {weight.device} but the heads are on {first.device}; move one")
    template = Problem(
        inputs=[],
        names=heads.names,
        head_weights=[float(w) for w in heads.weights],
        input_target=None,
        prob_target=prob_target,
        class_weight=None,
        ignore_index=int(ignore_index),
        label_smoothing=float(label_smoothing),
        reduction=reduction,
        needs_grad=torch.is_grad_enabled() and any(x.requires_grad for x in heads.tensors),
        want_details=want_details,
    )
    return _with_tensors(template, heads.tensors, target, weight, batched), index_shape


def _with_tensors(
    template: Problem, heads: list[torch.Tensor], target: torch.Tensor, weight: Optional[torch.Tensor], batched: bool,
    target_positions: Optional[torch.Tensor] = None,
) -> Problem:
    """`template` (a validated Problem without tensors) for these tensors, normalized as the backends expect:
    one sample made a batch of one, class indices int64, probabilities and class weights in their dtypes."""
    dtype = heads[0].dtype
    target_dtype = dtype if template.prob_target else torch.int64
    if target.dtype != target_dtype:
        target = target.to(target_dtype)
    if not batched:  # one sample: a batch of one
        heads, target = [x.unsqueeze(0) for x in heads], target.unsqueeze(0)
    class_weight = None if weight is None else _kernel_class_weight(weight, dtype)
    return template.with_tensors(heads, target, class_weight, target_positions)


def _kernel_class_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Class weights as the kernels read them for logits of `dtype`: contiguous, in the accumulation dtype."""
    return weight.to(acc_dtype_of(dtype)).contiguous()


def multi_head_cross_entropy(
    outputs: Any,
    target: Targets,
    weights: Weights = None,
    *,
    aux_weight: float = DEFAULT_AUX_WEIGHT,
    main: Optional[Union[str, int]] = None,
    weight: ClassWeights = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    check_targets: bool = False,
    target_resize: Optional[str] = None,
    return_details: bool = False,
) -> Union[torch.Tensor, MultiHeadLossOutput]:
    """Weighted cross-entropy of every head of a model output, in one fused pass (forward and backward).

    Equals ``sum_h weights[h] * F.cross_entropy(head_h, target, weight, ignore_index=..., reduction=...,
    label_smoothing=...)`` for every input ``F.cross_entropy`` accepts.

    Args:
        outputs: the model's output as it comes: a Tensor, a namedtuple such as GoogLeNetOutputs /
            InceptionOutputs (``None`` fields skipped), a dict such as ``{"out": ..., "aux": ...}``, a tuple or list.
        target: class indices (N, d1, ...) or class probabilities (N, C, d1, ...), shared by every head; or one
            target per head (deep supervision, multi-token and multi-task heads): a sequence in the heads'
            order or a mapping by head name. Then each head and its target follow ``F.cross_entropy``'s rules
            on their own (heads may differ in spatial size, class count and row count; a mean is over the
            head's own counted targets), and ``count`` of the details is per head, (H,).
        weights: per-head weights, by position (sequence) or by name (mapping). None: the preset for the
            output type (GoogLeNet 1 / 0.3 / 0.3, Inception v3 1 / 0.4, segmentation out 1 / aux 0.5),
            else 1 for the main head and ``aux_weight`` for the others.
        aux_weight: weight of every non-main head when ``weights`` is None and no preset applies.
        main: the main head's name or position (default ``logits`` / ``out`` / the first).
        weight, ignore_index, label_smoothing, reduction: as in ``torch.nn.functional.cross_entropy``. ``weight``
            may also be one class-weight tensor (or None) per head, like ``target``; one tensor serves heads of
            one class count. ``reduction="none"`` with per-head targets needs heads whose per-element losses
            share one shape (they are summed elementwise).
        backend: ``auto``, ``cuda``, ``triton``, ``cpu`` or ``torch``; see ``auxfuse.available_backends()``.
        check_targets: on CUDA, check every class index now (one host sync) and raise a ValueError for one
            outside [0, C); without it an invalid index makes the loss NaN and is counted, on the device, in
            ``invalid_targets`` of ``return_details``. CPU always checks.
        target_resize: ``"nearest"`` or ``"nearest-exact"``: one full-resolution class-index target for heads at
            other resolutions (deep supervision); each head's target is what ``F.interpolate(target[:, None]
            .float(), size=head's spatial size, mode=target_resize)`` gives (``auxfuse.resize_target``).
        return_details: return a ``MultiHeadLossOutput`` (loss, head_losses, head_correct, count; and the
            ``invalid_targets`` attribute).

    The loss is float32 (float64 for float64 logits); gradients have the logits' dtype.

    Example:
        >>> import torch
        >>> from auxfuse import multi_head_cross_entropy
        >>> logits, aux = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10, requires_grad=True)
        >>> target = torch.randint(0, 10, (8,))
        >>> loss = multi_head_cross_entropy((logits, aux), target, weights=(1.0, 0.4))
        >>> loss.backward()
        >>> out = multi_head_cross_entropy({"out": logits, "aux": aux}, target, return_details=True)
        >>> out.head_losses.shape, int(out.count)
        (torch.Size([2]), 8)
    """
    if _takes_per_head_path(target, weight, target_resize):
        options = (aux_weight, main, ignore_index, label_smoothing, reduction, backend, check_targets, return_details,
                   target_resize, "per head")
        found = None if torch.compiler.is_compiling() else _signature(outputs, target, weights, weight, options)
        plan = None if found is None else _PLANS.get(found[0])
        if (plan is not None and plan.direct_options is not None
                and _per_head_unavailable_reason(plan.backends[0]) is None):
            # A known signature on a native backend: the op's arguments straight from the plan, no Problem per
            # head (at classifier sizes the front end's Python is a good part of a step: keep this path short).
            out = plan.run_direct(found[1], target, weight)
            if not return_details and reduction != "none":
                return out[0]
            return _per_head_output(BackendResult(out[0], out[1], out[2], out[3], out[6]), plan.index_shapes[0],
                                    reduction, return_details)
        return _per_head_cross_entropy(
            outputs, target, weights, found, plan, aux_weight=aux_weight, main=main, weight=weight,
            ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction, backend=backend,
            check_targets=check_targets, target_resize=target_resize, return_details=return_details,
        )
    options = (aux_weight, main, ignore_index, label_smoothing, reduction, backend, check_targets, return_details)
    found = None if torch.compiler.is_compiling() else _signature(outputs, target, weights, weight, options)
    plan = None if found is None else _PLANS.get(found[0])
    if plan is not None:
        problem = _with_tensors(plan.template, [found[1][i] for i in plan.positions], target, weight, plan.batched)
    else:
        heads = collect_heads(outputs, weights, aux_weight=aux_weight, main=main)
        problem, index_shape = build_problem(
            heads,
            target,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction,
            want_details=return_details,
        )
        plan = _Plan(heads.positions, problem.with_tensors([], None, None), select_backend(backend, problem),
                     index_shape)
        if found is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[found[0]] = plan
    _check_target_range(problem, plan.backend, check_targets)
    result = plan.backend.compute(problem)
    loss = result.loss.reshape(plan.index_shape) if reduction == "none" else result.loss
    if not return_details:
        return loss
    return MultiHeadLossOutput(loss, result.head_losses.detach(), result.head_correct, result.count, result.invalid)


def _takes_per_head_path(target: Targets, weight: ClassWeights, target_resize: Optional[str]) -> bool:
    """A call with a target or class weight per head, or a target to resize: each head gets its own."""
    return target_resize is not None or is_per_head(target) or is_per_head(weight)


def _per_head_targets(heads: Heads, target: Targets,
                      target_resize: Optional[str]) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Each head's (target, target_positions): its own target and None, or with target_resize the
    full-resolution target and where the head's positions read it (None where the sizes agree)."""
    if target_resize is None:
        if isinstance(target, torch.Tensor):  # shared by every head (the class weights are per head)
            return [(target, None)] * len(heads.names)
        entries = list(target.values() if isinstance(target, Mapping) else target)
        strays = [type(entry).__name__ for entry in entries if not isinstance(entry, torch.Tensor)]
        if strays:
            raise TypeError(f"auxfuse: target must be a Tensor, not {type(target).__name__} of {strays[0]} (or one "
                            f"Tensor per head: a list or a dict by head name)")
        return [(t, None) for t in per_head_values("targets", target, heads.names)]
    if target_resize not in TARGET_RESIZE_MODES:
        raise ValueError(f"auxfuse: target_resize={target_resize!r}; use one of {TARGET_RESIZE_MODES}")
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex() or target.dim() < 2:
        raise ValueError(
            "auxfuse: target_resize maps one class-index target (N, d1, ..., dk) onto every head's spatial size; "
            "give one such Tensor (probabilities and per-head targets are not resized)"
        )
    full = target.long()  # once for all heads (a uint8 mask, say)
    targets = []
    for name, x in zip(heads.names, heads.tensors):
        if x.dim() != target.dim() + 1 or x.shape[0] != target.shape[0]:
            raise ValueError(
                f"auxfuse: head {name!r} has shape {tuple(x.shape)}; target_resize needs heads (N, C, d1, ..., dk) "
                f"for the target {tuple(target.shape)} (N, e1, ..., ek): the same batch and {target.dim() - 1} "
                f"spatial dimensions"
            )
        targets.append((full, target_positions(target.shape[1:], x.shape[2:], target_resize, target.device)))
    return targets


def _per_head_class_weights(heads: Heads, weight: ClassWeights) -> list[Optional[torch.Tensor]]:
    if weight is None:
        return [None] * len(heads.names)
    if isinstance(weight, torch.Tensor):
        classes = {name: x.shape[1] if x.dim() > 1 else x.shape[0] for name, x in zip(heads.names, heads.tensors)}
        if len(set(classes.values())) > 1:
            raise ValueError(
                f"auxfuse: one class weight tensor for heads of different class counts {classes}; give one per "
                f"head (a sequence or a mapping by head name, None for a head without class weights)"
            )
        return [weight] * len(heads.names)
    return per_head_values("class weights", weight, heads.names)


def _stand_in_target(target: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """An int64 tensor of the shape `target` resized to `head` has, without memory (an expanded scalar)."""
    return torch.empty((), dtype=torch.int64, device=target.device).expand(head.shape[:1] + head.shape[2:])


def _per_head_problems(outputs: Any, target: Targets, weights: Weights, *, aux_weight: float,
                       main: Optional[Union[str, int]], weight: ClassWeights, ignore_index: int,
                       label_smoothing: float, reduction: str, target_resize: Optional[str],
                       want_details: bool) -> tuple[Heads, list[tuple[str, Problem, tuple[int, ...]]]]:
    """Each head with its own target and class weight, validated as a call of its own would be: the output's
    heads, and (name, its one-head Problem, the shape of its 'none' loss) per head."""
    heads = collect_heads(outputs, weights, aux_weight=aux_weight, main=main)
    _check_heads(heads, shared=("dtype", "device"))
    targets = _per_head_targets(heads, target, target_resize)
    class_weights = _per_head_class_weights(heads, weight)
    problems = []
    for name, x, head_weight, (head_target, positions), class_weight in zip(heads.names, heads.tensors,
                                                                            heads.weights, targets, class_weights):
        one_head = Heads(names=[name], tensors=[x], weights=[head_weight], main=0, positions=(0,))
        # A resized target is validated as the head's own would be: an int64 stand-in of its shape, no copy.
        checked_target = head_target if positions is None else _stand_in_target(head_target, x)
        try:
            problem, index_shape = build_problem(one_head, checked_target, weight=class_weight,
                                                 ignore_index=ignore_index, label_smoothing=label_smoothing,
                                                 reduction=reduction, want_details=want_details)
        except (ValueError, TypeError) as error:
            message = str(error).removeprefix("auxfuse: ")
            raise type(error)(f"auxfuse: head {name!r}: {message}") from None
        if positions is not None:
            problem = problem.with_tensors(problem.inputs, head_target, problem.class_weight, positions)
        problems.append((name, problem, index_shape))
    if reduction == "none":
        shapes = {name: index_shape for name, _, index_shape in problems}
        if len(set(shapes.values())) > 1:
            raise ValueError(
                f"auxfuse: reduction='none' sums the heads' per-element losses, but their shapes differ {shapes}; "
                f"use 'mean' or 'sum', or return_details=True for each head's loss"
            )
    return heads, problems


def _per_head_cross_entropy(outputs: Any, target: Targets, weights: Weights, found: Optional[tuple],
                            plan: Optional["_PerHeadPlan"], *, backend: str, check_targets: bool, return_details: bool,
                            **options: Any):
    """multi_head_cross_entropy with a target (and class weight) per head, past the direct path: one call of the
    fused op for all heads when every head picks the same backend and it offers one (compute_per_head); else one
    call per head. The loss is the weighted sum, the details per head. `found`: the call's signature and values
    (None: not plain, no plan kept); `plan`: the plan stored for it, if any."""
    if plan is not None:
        problems = plan.problems(found[1], target, options["weight"])
    else:
        heads, problems = _per_head_problems(outputs, target, weights, want_details=return_details, **options)
        plan = _PerHeadPlan.of(heads, problems, [select_backend(backend, problem) for _, problem, _ in problems],
                               target, options["target_resize"], check_targets)
        if found is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[found[0]] = plan
    chosen = plan.backends
    fused = chosen[0]
    # Asked on every call: a backend's answer may change (triton's, while a CUDA graph is being captured).
    one_call = plan.same_backend and _per_head_unavailable_reason(fused) is None
    if not (one_call and fused.reads_target_positions):  # a resized target copied for each head that needs it
        problems = [(name, problem.gathered(), index_shape) for name, problem, index_shape in problems]
    for (name, problem, _), head_backend in zip(problems, chosen):
        try:
            _check_target_range(problem, head_backend, check_targets)
        except ValueError as error:
            raise ValueError(f"auxfuse: head {name!r}: {str(error).removeprefix('auxfuse: ')}") from None
    if one_call:
        result = fused.compute_per_head([problem for _, problem, _ in problems])
        return _per_head_output(result, problems[0][2], options["reduction"], return_details)
    results = []
    for (_, problem, index_shape), head_backend in zip(problems, chosen):
        result = head_backend.compute(problem)
        results.append(result._replace(loss=result.loss.reshape(index_shape) if problem.reduction == "none"
                                       else result.loss))
    loss = results[0].loss
    for result in results[1:]:
        loss = loss + result.loss
    if not return_details:
        return loss
    return MultiHeadLossOutput(
        loss,
        torch.cat([r.head_losses for r in results]).detach(),
        torch.cat([r.head_correct for r in results]),
        torch.stack([r.count for r in results]),
        torch.stack([r.invalid for r in results]).sum(),
    )


def _per_head_output(result, index_shape: tuple[int, ...], reduction: str, return_details: bool):
    """The loss (shaped like a head's targets for 'none'), or the details, of one fused call for all heads."""
    loss = result.loss.reshape(index_shape) if reduction == "none" else result.loss
    if not return_details:
        return loss
    return MultiHeadLossOutput(loss, result.head_losses.detach(), result.head_correct, result.count, result.invalid)


class _PerHeadPlan(NamedTuple):
    """What the front end decided for one signature of a per-head call (_per_head_cross_entropy): where the heads
    are among the output's values, their names, each head's validated Problem without tensors (with its
    target_resize positions), the shape of its 'none' loss and backend, and whether all heads (more than one)
    chose one backend. `direct_options`: the op's arguments after the tensors when a later call may go straight
    to that backend's op (a native backend, batched heads, int64 class-index targets, no target_resize and no
    check left to the front end), else None. `take_heads`: the heads from the output's values (more than one: a
    tuple); `no_tensors`: None for every head (the op's target positions, and its class weights when there are
    none)."""

    positions: tuple[int, ...]
    names: list[str]
    templates: list[Problem]
    index_shapes: list[tuple[int, ...]]
    backends: list[Any]
    same_backend: bool
    target_resize: Optional[str]
    direct_options: Optional[tuple]
    take_heads: Callable[[tuple], tuple]
    no_tensors: list[None]

    @staticmethod
    def of(heads: Heads, problems: list, backends: list, target: Targets, target_resize: Optional[str],
           check_targets: bool) -> "_PerHeadPlan":
        same_backend = len(problems) > 1 and all(b is backends[0] for b in backends)
        templates = [problem.with_tensors([], None, None, problem.target_positions) for _, problem, _ in problems]
        fused = backends[0]
        direct = (same_backend and target_resize is None and hasattr(fused, "run_per_head")
                  and (fused.checks_targets or not check_targets)
                  and all(bool(shape) for _, _, shape in problems)
                  and all(t.dtype == torch.int64 for t in _each_head(target, heads.names)))
        return _PerHeadPlan(heads.positions, heads.names, templates, [shape for _, _, shape in problems], backends,
                            same_backend, target_resize,
                            fused.per_head_options([p for _, p, _ in problems]) if direct else None,
                            operator.itemgetter(*heads.positions), [None] * len(problems))

    def run_direct(self, values: tuple, target: Targets, weight: ClassWeights) -> tuple:
        """This call's heads, targets and class weights straight into the backend's op (direct_options set);
        the op's outputs."""
        no_tensors = self.no_tensors
        if weight is None:
            class_weights = no_tensors
        else:
            dtype = values[self.positions[0]].dtype
            class_weights = [None if w is None else _kernel_class_weight(w, dtype)
                             for w in _each_head(weight, self.names)]
        return self.backends[0].run_per_head(self.names, self.take_heads(values), _each_head(target, self.names),
                                             no_tensors, class_weights, self.direct_options)

    def problems(self, values: tuple, target: Targets, weight: ClassWeights) -> list:
        """(name, Problem, index shape) per head for this call's tensors, as _per_head_problems gives them."""
        resized = self.target_resize is not None  # one full-resolution mask, read through each head's positions
        targets = [target.long()] * len(self.names) if resized else _each_head(target, self.names)
        return [(name, _with_tensors(template, [values[position]], head_target, class_weight, bool(index_shape),
                                     template.target_positions), index_shape)
                for name, position, template, index_shape, head_target, class_weight
                in zip(self.names, self.positions, self.templates, self.index_shapes, targets,
                       _each_head(weight, self.names))]


def _each_head(value: Any, names: list[str]) -> Sequence:
    """One entry per head from a validated target or class weight: one Tensor (or None) for all heads, a sequence
    in the heads' order (a list or tuple as it is: nothing here changes it), or a mapping by head name."""
    if value is None or type(value) is torch.Tensor:
        return [value] * len(names)
    if type(value) is list or type(value) is tuple:
        return value
    if type(value) is dict or isinstance(value, Mapping):
        return [value[name] for name in names]
    return list(value)


def _per_head_unavailable_reason(backend: Any) -> Optional[str]:
    """Why `backend` cannot run heads with a target each in one call, or None."""
    if not hasattr(backend, "compute_per_head"):
        return f"the {backend.name} backend runs one head per call"
    return backend.per_head_unavailable_reason()


class _Plan(NamedTuple):
    """What the front end decided for one call signature: where the heads are among the output's values, the
    validated Problem without its tensors, the backend, and the shape of a 'none' loss."""

    positions: tuple[int, ...]
    template: Problem
    backend: Any
    index_shape: tuple[int, ...]

    @property
    def batched(self) -> bool:
        """Batched heads (N, C, ...) have N in the index shape; one sample's (C,) has ()."""
        return bool(self.index_shape)


# Plans per call signature (_signature): collect_heads, build_problem and select_backend decide from the
# signature alone, never from tensor values, so a later call with the same signature skips them: 62 -> 46 us
# per forward of 3 small CPU heads on a 2-core Xeon VM, host time that a GPU run at classifier sizes is made
# of. Per-head calls (_PerHeadPlan) keep theirs here too, under keys of their own. A program has a few
# signatures (one per batch shape); the cache is emptied when full. Not used while torch.compile traces (it
# sees the full path once).
_PLANS: dict = {}
_MAX_PLANS = 64
_SCALARS = frozenset((int, float, str, bool, type(None)))
_NUMBERS = frozenset((int, float))


def _signature(outputs: Any, target: Any, weights: Weights, weight: Any, options: tuple) -> Optional[tuple]:
    """(key, values): a hashable key of everything the front end decides from, and the output's values; None
    when an argument is not plain (a tensor subclass, a tensor or numpy weight, an odd output type), which then
    takes the full path every call. The key holds the output's type and head names, each head's shape, dtype,
    device and requires_grad, the target's and class weight's, the weights, the options and the grad mode:
    every input of collect_heads, build_problem and select_backend (strides are the backends' business, per
    call)."""
    kind = type(outputs)
    if kind is torch.Tensor:
        values, layout = (outputs,), kind
    elif kind is dict or kind is collections.OrderedDict:  # torchvision segmentation returns an OrderedDict
        values, layout = tuple(outputs.values()), (kind, tuple(outputs))
    elif kind is tuple or kind is list:
        values, layout = tuple(outputs), (kind, len(outputs))
    elif is_namedtuple(outputs):  # its type names the fields
        values, layout = outputs, kind
    else:
        return None
    facts = []
    for value in values:
        if value is None:
            facts.append(None)
        elif type(value) is torch.Tensor:
            facts.append((value.shape, value.dtype, value.device, value.requires_grad))
        else:
            return None
    target_facts, weight_facts = _tensor_facts(target), _tensor_facts(weight)
    if target_facts is None or (weight is not None and weight_facts is None):
        return None
    if weights is None:
        weights_key = None
    else:
        if type(weights) is dict:
            weights_key, numbers = (dict, tuple(weights.items())), weights.values()
        elif type(weights) is tuple or type(weights) is list:
            weights_key = numbers = tuple(weights)
        else:
            return None
        if not _NUMBERS.issuperset(map(type, numbers)):  # plain numbers only: a 0-dim tensor could change in place
            return None
    if not _SCALARS.issuperset(map(type, options)):
        return None
    if type(options[1]) is bool:  # main=True is no position (True == 1 as a key)
        return None
    key = (layout, tuple(facts), target_facts, weight_facts, weights_key, options, torch.is_grad_enabled())
    return key, values


def _tensor_facts(value: Any) -> Optional[tuple]:
    """Shape, dtype, device and requires_grad of a Tensor, or of each Tensor (or None) of a list, tuple or dict
    of them (per-head targets and class weights); None for anything else."""
    if type(value) is torch.Tensor:
        return (value.shape, value.dtype, value.device, value.requires_grad)
    if type(value) is list or type(value) is tuple:
        facts, items = [type(value)], value
    elif type(value) is dict:
        facts, items = [dict, tuple(value)], value.values()  # the keys, in order, then each value's facts
    else:
        return None
    for item in items:
        if item is None:
            facts.append(None)
        elif type(item) is torch.Tensor:
            facts.append((item.shape, item.dtype, item.device, item.requires_grad))
        else:
            return None
    return tuple(facts)


def explain_backend(outputs: Any, target: Targets, weights: Weights = None, *, backend: str = "auto",
                    **options: Any) -> dict:
    """Which backend a call with these arguments runs on, and why each one before it in auto's order was not used.

    Takes the arguments of ``multi_head_cross_entropy``. Returns ``{"chosen": name, "rejected": {name: [reasons]}}``;
    with one target per head, that for every head: ``{"per_head": {head name: {"chosen": ..., "rejected": ...}}}``.

    Example:
        >>> import torch, auxfuse
        >>> info = auxfuse.explain_backend(torch.randn(4, 10), torch.zeros(4, dtype=torch.long))
        >>> info["chosen"] in ("cpu", "torch")
        True
    """
    options.pop("check_targets", None)  # changes what is checked, not the backend
    known = dict(aux_weight=DEFAULT_AUX_WEIGHT, main=None, weight=None, ignore_index=-100, label_smoothing=0.0,
                 reduction="mean", target_resize=None, return_details=False)
    unexpected = sorted(set(options) - set(known))
    if unexpected:
        raise TypeError(f"auxfuse: unexpected arguments {unexpected}")
    options = {**known, **options}
    if _takes_per_head_path(target, options["weight"], options["target_resize"]):
        want_details = options.pop("return_details")
        _, problems = _per_head_problems(outputs, target, weights, want_details=want_details, **options)
        return {"per_head": {name: _explain(backend, problem) for name, problem, _ in problems}}
    heads = collect_heads(outputs, weights, aux_weight=options["aux_weight"], main=options["main"])
    problem, _ = build_problem(
        heads, target, weight=options["weight"], ignore_index=options["ignore_index"],
        label_smoothing=options["label_smoothing"], reduction=options["reduction"],
        want_details=options["return_details"],
    )
    return _explain(backend, problem)


def _explain(backend: str, problem: Problem) -> dict:
    chosen = select_backend(backend, problem).name
    candidates = AUTO_ORDER.get(problem.device.type, ()) if backend == "auto" else (backend,)
    rejected = {}
    for name in candidates:
        if name == chosen:
            break
        rejected[name] = BACKENDS[name].not_supported_reasons(problem)
    return {"chosen": chosen, "rejected": rejected}
