"""Central differential privacy with client-side clipping, on the shared tensors (off by default).

A client scales its update Δ = upload − received (all shared tensors as one vector) to L2 norm at most
``clip_norm`` and sends received + Δ·min(1, clip_norm/‖Δ‖). The server averages the clipped uploads with
equal weights (sample counts would let one client's weight, and so its sensitivity, grow) and adds
Gaussian noise N(0, σ²) with σ = noise_multiplier · clip_norm / m to every coordinate of the mean of the
m uploads it aggregates. This is the Gaussian mechanism of DP-FedAvg (McMahan et al., ICLR 2018) with
client-level sensitivity ``clip_norm / m``. What it does not give: a privacy accountant (ε, δ over rounds
are not computed here), protection against a curious server before the noise is added (the server sees
each clipped update), or any protection of what is not shared (the private model never leaves anyway).
"""

from __future__ import annotations

import torch

from pfedlora.algorithms.state import State


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
