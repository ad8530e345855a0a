"""Central differential privacy with client-side clipping, on the shared tensors (off by default).

A client scales its update Δ = upload − received (all shared tensors as one vector) to L2 norm at most
``clip_norm`` and sends received + Δ·min(1, clip_norm/‖Δ‖). The server averages the clipped uploads with
equal weights (sample counts would let one client's weight, and so its sensitivity, grow) and adds
Gaussian noise N(0, σ²) with σ = noise_multiplier · clip_norm / m to every coordinate of the mean of the
m uploads it aggregates. This is the Gaussian mechanism of DP-FedAvg (McMahan et al., ICLR 2018) with
client-level sensitivity ``clip_norm / m``. :func:`privacy_spent` accounts the ε spent over the rounds with
Opacus's RDP accountant (the subsampled Gaussian mechanism, sampling rate q = m/N, one step per round).
What it does not give: protection against a curious server before the noise is added (the server sees each
clipped update), or any protection of what is not shared (the private model never leaves anyway).
"""

from __future__ import annotations

import functools
import math
from typing import TypedDict

import torch

from pfedlora.algorithms.state import State
from pfedlora.errors import ConfigError

ACCOUNTING_ASSUMPTIONS = (
    "client-level (ε, δ)-DP of the sequence of released global states, by Rényi DP of the subsampled "
    "Gaussian mechanism (Opacus RDPAccountant) with Poisson sampling at rate q = clients per round / "
    "num_clients (pfedlora samples a fixed number without replacement: the usual approximation), noise "
    "multiplier σ on the sum of updates clipped to clip_norm, one step per round, and a server that adds "
    "the noise honestly"
)


class PrivacySpent(TypedDict):
    """The privacy budget of a run (``privacy`` in its summary)."""

    epsilon: float | None
    """ε after every round (None without noise: no guarantee)."""
    epsilon_one_round: float | None
    """ε of one round alone."""
    delta: float
    noise_multiplier: float
    sample_rate: float
    rounds: int
    assumptions: str


@functools.lru_cache(maxsize=4096)
def epsilon_spent(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε after ``rounds`` steps of the subsampled Gaussian mechanism (Opacus's RDP accountant); inf without
    noise."""
    if noise_multiplier <= 0:
        return math.inf
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        raise ConfigError(
            "privacy.noise_multiplier > 0 needs the privacy accountant: pip install 'pfedlora[privacy]'"
        ) from None
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    orders = [*RDPAccountant.DEFAULT_ALPHAS, 80, 128, 256, 512, 1024]  # large σ needs large orders
    return float(accountant.get_epsilon(delta, alphas=orders))


def privacy_spent(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> PrivacySpent:
    """ε spent after ``rounds`` rounds and by one round, with the assumptions they rest on."""

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {
        "epsilon": finite(epsilon_spent(noise_multiplier, sample_rate, rounds, delta)),
        "epsilon_one_round": finite(epsilon_spent(noise_multiplier, sample_rate, 1, delta)),
        "delta": delta,
        "noise_multiplier": noise_multiplier,
        "sample_rate": sample_rate,
        "rounds": rounds,
        "assumptions": ACCOUNTING_ASSUMPTIONS,
    }


def clip_update(received: State, uploaded: State, clip_norm: float) -> State:
    """``received + Δ·min(1, clip_norm/‖Δ‖)`` with Δ = uploaded − received over all tensors jointly."""
    delta = {key: uploaded[key].to(torch.float64) - received[key].to(torch.float64) for key in uploaded}
    norm = torch.sqrt(sum((d.square().sum() for d in delta.values()), torch.zeros((), dtype=torch.float64)))
    scale = min(1.0, clip_norm / float(norm)) if float(norm) > 0 else 1.0
    return {key: (received[key] + (delta[key] * scale).to(received[key].dtype)) for key in uploaded}


def add_gaussian_noise(state: State, std: float, generator: torch.Generator) -> State:
    """Every tensor plus independent N(0, std²) noise, drawn from ``generator`` (on the CPU, for
    reproducibility across devices)."""
    noisy = {}
    for key, value in state.items():
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64) * std
        noisy[key] = value + noise.to(device=value.device, dtype=value.dtype)
    return noisy
