"""State dicts as the server sees them: the type, their checks and their algebra.

A *state* is a flat mapping from tensor names to tensors: the global state a server keeps, a message it
broadcasts, an upload a client sends back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from pfedlora.config import AGGREGATORS

State = dict[str, torch.Tensor]


def check_schema(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError unless ``tensors`` has exactly the keys, shapes and dtypes of ``expected``."""
    missing = [key for key in expected if key not in tensors]
    extra = [key for key in tensors if key not in expected]
    if missing:
        raise ValueError(f"missing tensors: {', '.join(missing)}")
    if extra:
        raise ValueError(f"unexpected tensors: {', '.join(extra)}")
    for key, reference in expected.items():
        value = tensors[key]
        if value.shape != reference.shape:
            raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}")
        if value.dtype != reference.dtype:
            raise ValueError(f"{key} has dtype {value.dtype}, expected {reference.dtype}")


def check_dtypes(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Raise ValueError unless every tensor has ``dtype``."""
    for key, value in tensors.items():
        if value.dtype != dtype:
            raise ValueError(f"{key} has dtype {value.dtype}, expected {dtype}")


def combine(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    rule: str = "mean",
    trim_fraction: float = 0.0,
) -> State:
    """The states combined key by key: "mean" is :func:`weighted_average`; "median" (coordinate-wise, the
    mean of the two middle values for an even count) and "trimmed-mean" (per coordinate, the lowest and the
    highest ``floor(trim_fraction · n)`` values dropped, at least one value kept, the rest averaged) ignore
    the weights, so no client's declared sample count moves them."""
    if rule == "mean":
        return weighted_average(states, weights)
    if rule not in AGGREGATORS or not states:
        raise ValueError(f"aggregator {rule!r} with {len(states)} states; allowed: {', '.join(AGGREGATORS)}")
    n = len(states)
    out: State = {}
    for key, first in states[0].items():
        ordered = torch.stack([state[key].to(torch.float64) for state in states]).sort(dim=0).values
        if rule == "median":
            value = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        else:
            cut = min(int(trim_fraction * n), (n - 1) // 2)
            value = ordered[cut : n - cut].mean(dim=0)
        out[key] = value.to(first.dtype)
    return out


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """Σ_k w_k · state_k / Σ_k w_k, key by key, accumulated in float64 and returned in each key's dtype.

    All states must have the same keys and shapes (uploads are validated before they get here).
    """
    if len(states) != len(weights) or not states:
        raise ValueError(f"need one weight per state, and states, got {len(states)} and {len(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    out: State = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for state, weight in zip(states, weights, strict=True):
            acc += state[key].to(torch.float64) * (weight / total)
        out[key] = acc.to(first.dtype)
    return out
