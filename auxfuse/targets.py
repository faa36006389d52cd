"""Per-head targets and the published per-head weights: deep supervision (one head per decoder scale),
multi-token prediction (head k predicts the token k steps further), multi-task heads.

``shifted_targets`` builds multi-token heads' targets, ``resize_target`` one scale's mask as ``F.interpolate``
would (``target_positions``: where each of a head's positions reads the full-resolution mask), and the weight
helpers give the schemes of nnU-Net, Medusa and DeepSeek-V3 by their names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch

TARGET_RESIZE_MODES = ("nearest", "nearest-exact")


def is_per_head(value: Any) -> bool:
    """Whether `value` gives one entry per head (a sequence or a mapping) rather than one for all heads."""
    kind = type(value)
    if kind is list or kind is tuple or kind is dict:  # the common answers first, without the ABCs' checks
        return True
    if kind is torch.Tensor or value is None:
        return False
    return isinstance(value, Mapping) or (isinstance(value, Sequence) and not isinstance(value, (str, bytes)))


def per_head_values(what: str, values: Any, names: list[str]) -> list:
    """One value per head, from a sequence in the heads' order or a mapping by head name; ValueError naming
    the heads otherwise."""
    if isinstance(values, Mapping):
        missing = [name for name in names if name not in values]
        if missing:
            raise ValueError(
                f"auxfuse: {what} has no entry for head {missing[0]!r}; give one per head, by name: {names}"
            )
        unknown = [key for key in values if key not in names]
        if unknown:
            raise ValueError(f"auxfuse: {what} names {unknown[0]!r}, which is not a head of this output ({names})")
        return [values[name] for name in names]
    values = list(values)
    if len(values) != len(names):
        raise ValueError(
            f"auxfuse: {len(values)} {what} for {len(names)} heads {names}; give one per head, in the heads' "
            f"order (None outputs are no heads), or a mapping by head name"
        )
    return values


def _source_indices(in_size: int, out_size: int, mode: str) -> torch.Tensor:
    """Which input position each output position reads, as ATen computes it for float32 input: the scale
    in/out rounded to float32, then floor(i * scale) or floor((i + 0.5) * scale) in float32."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    position = torch.arange(out_size, dtype=torch.float32)
    if mode == "nearest-exact":
        position = position + 0.5
    return (position * scale).floor().long().clamp_(max=in_size - 1)


def target_positions(spatial: Sequence[int], size: Sequence[int], mode: str = "nearest",
                     device: Union[torch.device, str] = "cpu") -> Optional[torch.Tensor]:
    """Where each position of a head of spatial size `size` reads a target of spatial size `spatial` under
    `target_resize=mode`: an int64 tensor of prod(size) flat indices into the target's d1 x ... x dk grid
    (row-major), or None when the sizes are equal. The fused kernels read the full-resolution target through
    it, so no downsampled copy is made; made once per (sizes, mode, device) and kept (a few KiB per scale).

    Example:
        >>> import auxfuse
        >>> auxfuse.target_positions((4, 4), (2, 2))
        tensor([ 0,  2,  8, 10])
    """
    if mode not in TARGET_RESIZE_MODES:
        raise ValueError(f"auxfuse: target_resize={mode!r}; use one of {TARGET_RESIZE_MODES}")
    spatial, size = tuple(int(d) for d in spatial), tuple(int(d) for d in size)
    if len(spatial) != len(size):
        raise ValueError(f"auxfuse: a target of spatial size {spatial} cannot be resized to {size}: the number of "
                         f"spatial dimensions differs")
    if spatial == size:
        return None
    key = (spatial, size, mode, torch.device(device))
    positions = _POSITIONS.get(key)
    if positions is None:
        positions = torch.zeros((), dtype=torch.int64)
        for in_size, out_size in zip(spatial, size):  # row-major: positions * in_size + this dimension's index
            positions = positions[..., None] * in_size + _source_indices(in_size, out_size, mode)
        positions = positions.reshape(-1).to(device)
        if len(_POSITIONS) >= _MAX_POSITIONS:
            _POSITIONS.clear()
        _POSITIONS[key] = positions
    return positions


_POSITIONS: dict = {}
_MAX_POSITIONS = 64


def resize_target(target: torch.Tensor, size: Sequence[int], mode: str = "nearest") -> torch.Tensor:
    """Class indices (N, d1, ..., dk) at spatial size `size`, as
    ``F.interpolate(target[:, None].float(), size=size, mode=mode)[:, 0].long()`` gives them, without the
    float copy (exact for any index, where float32 would round indices above 2^24). Checked equal to
    F.interpolate for every size pair up to 69 in 1-D, 2-D and 3-D, except three 1-D / 3-D ``nearest-exact``
    upsamplings (2 -> 41, 47, 55), where ATen's kernel rounds one position the other way. The loss's
    ``target_resize`` reads the same positions (``target_positions``) inside the kernels instead.

    Example:
        >>> import torch, auxfuse
        >>> mask = torch.arange(16).reshape(1, 4, 4)
        >>> auxfuse.resize_target(mask, (2, 2))
        tensor([[[ 0,  2],
                 [ 8, 10]]])
    """
    if target.dim() < 1:
        raise ValueError("auxfuse: a target to resize must be (N, d1, ..., dk)")
    positions = target_positions(target.shape[1:], size, mode, target.device)
    return target if positions is None else read_at_positions(target, positions, size)


def read_at_positions(target: torch.Tensor, positions: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """target (N, e1, ..., ek) read at `positions` (flat indices into e1 x ... x ek, target_positions'), as
    (N, *size): what a head of spatial size `size` reads (a copy)."""
    rows = target.reshape(target.shape[0], math.prod(target.shape[1:]))
    return rows.index_select(1, positions).view(target.shape[0], *size)


def shifted_targets(
    labels: torch.Tensor, shifts: Union[int, Sequence[int]], ignore_index: int = -100
) -> list[torch.Tensor]:
    """The targets of multi-token prediction heads: for each shift k, `labels` shifted left by k along the last
    dimension, the last k positions set to ``ignore_index`` (head k predicts the token k steps further; the
    tail has no such token). Each head's mean is then over its own counted positions.

    Args:
        labels: class indices (..., T), e.g. (batch, sequence) token ids, already aligned with the main head.
        shifts: the shift of each head, e.g. ``[0, 1, 2, 3]``; an int n means ``range(n)``.
        ignore_index: the value of positions with no target.

    Example:
        >>> import torch, auxfuse
        >>> auxfuse.shifted_targets(torch.tensor([[5, 6, 7, 8]]), 3)
        [tensor([[5, 6, 7, 8]]), tensor([[   6,    7,    8, -100]]), tensor([[   7,    8, -100, -100]])]
    """
    if labels.dim() == 0:
        raise ValueError("auxfuse: labels must have a sequence dimension (..., T)")
    shifts = list(range(shifts)) if isinstance(shifts, int) else list(shifts)
    length = labels.shape[-1]
    targets = []
    for head, shift in enumerate(shifts):
        if not isinstance(shift, int) or isinstance(shift, bool) or shift < 0:
            raise ValueError(f"auxfuse: shift {shift!r} of head {head} must be a non-negative int")
        if shift >= length:
            raise ValueError(
                f"auxfuse: shift {shift} of head {head} leaves no target in a sequence of length {length}; "
                f"every shift must be shorter than the sequence"
            )
        tail = labels.new_full((*labels.shape[:-1], shift), ignore_index)
        targets.append(torch.cat([labels[..., shift:], tail], dim=-1) if shift else labels)
    return targets


def nnunet_deep_supervision_weights(num_scales: int) -> list[float]:
    """nnU-Net's deep-supervision weights, highest resolution first: 1 / 2^i, the lowest resolution 0,
    normalised to sum to 1.

    Example:
        >>> import auxfuse
        >>> auxfuse.nnunet_deep_supervision_weights(4)
        [0.5714285714285714, 0.2857142857142857, 0.14285714285714285, 0.0]
    """
    if num_scales < 1:
        raise ValueError(f"auxfuse: num_scales={num_scales}; deep supervision needs at least one scale")
    if num_scales == 1:
        return [1.0]
    weights = [1.0 / 2**i for i in range(num_scales)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def medusa_head_weights(num_heads: int, *, coefficient: float = 0.2, decay: float = 0.8,
                        main_weight: Union[float, None] = 1.0) -> list[float]:
    """Medusa's weights: ``coefficient * decay^k`` for the k-th extra head (k = 0, 1, ...), after the main
    head's ``main_weight`` (None: no main head in the output).

    Example:
        >>> import auxfuse
        >>> [round(w, 3) for w in auxfuse.medusa_head_weights(3)]
        [1.0, 0.2, 0.16, 0.128]
    """
    extra = [coefficient * decay**k for k in range(num_heads)]
    return extra if main_weight is None else [float(main_weight), *extra]


def deepseek_mtp_weights(depth: int, *, lam: float = 0.3, main_weight: float = 1.0) -> list[float]:
    """DeepSeek-V3's multi-token prediction weights: the main head's ``main_weight``, then ``lam / depth`` for
    each of the ``depth`` MTP modules (lam = 0.3 early in training, 0.1 later).

    Example:
        >>> import auxfuse
        >>> auxfuse.deepseek_mtp_weights(1)
        [1.0, 0.3]
    """
    if depth < 1:
        raise ValueError(f"auxfuse: depth={depth}; multi-token prediction needs at least one module")
    return [float(main_weight)] + [lam / depth] * depth
