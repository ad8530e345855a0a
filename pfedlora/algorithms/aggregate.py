"""State-dict algebra used by servers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Σ_k w_k · state_k / Σ_k w_k, key by key, accumulated in float64 and returned in each key's dtype.

    All states must have the same keys and shapes (uploads are validated before they get here).
    """
    if len(states) != len(weights) or not states:
        raise ValueError(f"need one weight per state, and states, got {len(states)} and {len(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for state, weight in zip(states, weights, strict=True):
            acc += state[key].to(torch.float64) * (weight / total)
        out[key] = acc.to(first.dtype)
    return out
