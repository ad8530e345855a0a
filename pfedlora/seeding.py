"""Explicit random generators derived from one experiment seed; pfedlora never touches the global RNG.

Every consumer (partition, model init of client 3, batch order of client 3 in round 7, ...) gets its own
stream from ``(seed, *keys)``, so adding a consumer never shifts another one's numbers.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _key_to_int(key: int | str) -> int:
    if isinstance(key, str):
        return zlib.crc32(key.encode("utf-8"))
    if key < 0:
        raise ValueError(f"seed keys must be non-negative, got {key}")
    return int(key)


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``keys`` (strings hashed stably)."""
    entropy = [_key_to_int(seed), *(_key_to_int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def numpy_generator(seed: int, *keys: int | str) -> np.random.Generator:
    """A NumPy generator for the stream ``(seed, *keys)``."""
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator for the stream ``(seed, *keys)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *keys))
    return generator
