"""Seeded client sampling: each round draws from its own stream, so any round can be replayed alone."""

from __future__ import annotations

from pfedlora.config import clients_per_round
from pfedlora.seeding import numpy_generator

__all__ = ["clients_per_round", "evaluation_sample", "sample_clients"]


def evaluation_sample(num_clients: int, size: int, seed: int, server_round: int) -> list[int] | None:
    """Sorted ids of the clients scored after ``server_round`` when only ``size`` are (None: every client),
    drawn from the round's own stream."""
    if size == 0 or size >= num_clients:
        return None
    rng = numpy_generator(seed, "evaluation", server_round)
    return sorted(int(i) for i in rng.choice(num_clients, size=size, replace=False))


def sample_clients(num_clients: int, fraction: float, seed: int, server_round: int) -> list[int]:
    """Sorted ids of the clients sampled without replacement in ``server_round`` (1-based)."""
    count = clients_per_round(num_clients, fraction)
    if count == num_clients:
        return list(range(num_clients))
    rng = numpy_generator(seed, "sampling", server_round)
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))
