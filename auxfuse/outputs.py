"""Model outputs -> ordered heads, their names, weights and the main head.

Accepted outputs: a Tensor (one head), a namedtuple such as torchvision's ``GoogLeNetOutputs`` /
``InceptionOutputs`` (heads by field name, ``None`` fields skipped), a Mapping such as torchvision
segmentation's ``{"out": ..., "aux": ...}`` (heads by key) and a tuple or list (heads by position).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

Weights = Union[None, Sequence[float], Mapping[str, float]]

DEFAULT_AUX_WEIGHT = 0.3

# Weights from the papers and torchvision's reference scripts, chosen by the output's field names.
PRESETS = {
    frozenset({"logits", "aux_logits2", "aux_logits1"}): {"logits": 1.0, "aux_logits1": 0.3, "aux_logits2": 0.3},
    frozenset({"logits", "aux_logits"}): {"logits": 1.0, "aux_logits": 0.4},
    frozenset({"out", "aux"}): {"out": 1.0, "aux": 0.5},
}
MAIN_HEAD_NAMES = ("logits", "out")


@dataclass
class Heads:
    """The heads of one model output, in output order, with one weight each."""

    names: list[str]
    tensors: list[torch.Tensor]
    weights: list[float]
    main: int  # index of the main head in names / tensors
    positions: tuple[int, ...]  # index of each head among the output's values (None values are no heads)


def is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(obj, "_fields")


def _named_entries(outputs: Any) -> tuple[list[str], list[Any], bool]:
    """(names, values, by_name) for every accepted output type; values may hold None."""
    if isinstance(outputs, torch.Tensor):
        return ["output"], [outputs], False
    if is_namedtuple(outputs):
        return list(outputs._fields), list(outputs), True
    if isinstance(outputs, Mapping):
        return [str(k) for k in outputs.keys()], list(outputs.values()), True
    if isinstance(outputs, (tuple, list)):
        return [str(i) for i in range(len(outputs))], list(outputs), False
    raise TypeError(
        f"auxfuse: cannot read heads from a {type(outputs).__name__}; pass the model's output as it comes: "
        "a Tensor, a namedtuple (GoogLeNetOutputs / InceptionOutputs), a dict such as {'out': ..., 'aux': ...}, "
        "or a tuple / list of logits"
    )


def _main_index(names: list[str], present: list[bool], by_name: bool, main: Optional[Union[str, int]]) -> int:
    if main is None:
        if by_name:
            for candidate in MAIN_HEAD_NAMES:
                if candidate in names:
                    return names.index(candidate)
        return 0
    if isinstance(main, int) and not isinstance(main, bool):
        if not -len(names) <= main < len(names):
            raise ValueError(f"auxfuse: main={main} but the output has {len(names)} heads ({names})")
        return main % len(names)
    if str(main) not in names:
        raise ValueError(f"auxfuse: main={main!r} is not a head of this output; its heads are {names}")
    return names.index(str(main))


def _weights_by_name(
    names: list[str], present: list[bool], main: int, weights: Weights, aux_weight: float, by_name: bool
) -> dict[str, float]:
    if weights is None:
        preset = PRESETS.get(frozenset(names)) if by_name else None
        if preset is not None:
            return dict(preset)
        return {name: (1.0 if i == main else float(aux_weight)) for i, name in enumerate(names)}
    if isinstance(weights, Mapping):
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise ValueError(
                f"auxfuse: weights name {unknown} but the output's heads are {names}; "
                "rename the weights or pass them by position"
            )
        missing = [n for n, p in zip(names, present) if p and n not in weights]
        if missing:
            raise ValueError(
                f"auxfuse: head(s) {missing} have no weight; add them to weights (e.g. weights={{..., "
                f"{missing[0]!r}: 0.3}}) or drop them from the model's output"
            )
        return {k: float(v) for k, v in weights.items()}
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"auxfuse: weights must be a sequence or a mapping of floats, not {type(weights).__name__}")
    weights = [float(w) for w in weights]
    n_present = sum(present)
    if len(weights) == len(names):
        return dict(zip(names, weights))
    if len(weights) == n_present:
        return dict(zip([n for n, p in zip(names, present) if p], weights))
    raise ValueError(
        f"auxfuse: {len(weights)} weights for {n_present} heads {[n for n, p in zip(names, present) if p]}; "
        f"give one weight per head, in output order"
    )


def collect_heads(
    outputs: Any,
    weights: Weights = None,
    *,
    aux_weight: float = DEFAULT_AUX_WEIGHT,
    main: Optional[Union[str, int]] = None,
) -> Heads:
    """Turn a model output into its heads, names and weights; raise ValueError on any mismatch.

    A single Tensor is the main head alone (a model in eval mode) and gets the main head's weight.

    Example:
        >>> import torch
        >>> heads = collect_heads({"out": torch.randn(2, 3), "aux": torch.randn(2, 3)})
        >>> heads.names, heads.weights, heads.main
        (['out', 'aux'], [1.0, 0.5], 0)
    """
    names, values, by_name = _named_entries(outputs)
    present = [v is not None for v in values]
    for name, value in zip(names, values):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"auxfuse: head {name!r} is a {type(value).__name__}, not a Tensor of logits")
    if not any(present):
        raise ValueError(f"auxfuse: the output has no logits: every head {names} is None")
    main_index = _main_index(names, present, by_name, main)
    if not present[main_index]:
        raise ValueError(f"auxfuse: the main head {names[main_index]!r} is None; pick another with main=")
    if isinstance(outputs, torch.Tensor):
        if isinstance(weights, Mapping):
            main_weight = next((float(weights[n]) for n in MAIN_HEAD_NAMES if n in weights), 1.0)
        elif weights is not None and not isinstance(weights, (str, bytes)) and len(weights) > 0:
            main_weight = float(list(weights)[0])
        else:
            main_weight = 1.0
        by_head = {"output": main_weight}
    else:
        by_head = _weights_by_name(names, present, main_index, weights, aux_weight, by_name)

    kept = [i for i, p in enumerate(present) if p]
    head_weights = [by_head[names[i]] for i in kept]
    for i, w in zip(kept, head_weights):
        if not math.isfinite(w):
            raise ValueError(f"auxfuse: the weight of head {names[i]!r} is {w}; weights must be finite")
    return Heads(
        names=[names[i] for i in kept],
        tensors=[values[i] for i in kept],
        weights=head_weights,
        main=kept.index(main_index),
        positions=tuple(kept),
    )


def main_logits(outputs: Any, main: Optional[Union[str, int]] = None) -> torch.Tensor:
    """The main head's logits from any accepted model output: the head that predicts.

    Example:
        >>> import torch, torchvision
        >>> model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).train()
        >>> logits = main_logits(model(torch.randn(2, 3, 64, 64)))
        >>> logits.shape
        torch.Size([2, 1000])
    """
    heads = collect_heads(outputs, weights=None, main=main)
    return heads.tensors[heads.main]
