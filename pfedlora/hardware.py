"""What the machine offers: the device a run's ``device`` names, whether bfloat16 pays on it, and PyTorch's
intra-op threads for a block of work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(name: str) -> torch.device:
    """ "auto" picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_is_fast(device: torch.device) -> bool:
    """True where bfloat16 matrix products are faster than fp32 on ``device``: a CUDA GPU with bf16 support,
    a CPU with AMX tiles. On a CPU without AMX they are no faster, often slower (one core of an Intel Xeon
    without AMX: about 80 GFLOP/s in bf16 against 140 in fp32; with AMX, 1,365 in bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: True)())
    return False


def runs_in_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``train.precision`` means bfloat16 on ``device``: "bf16" always, "auto" where
    :func:`bf16_is_fast`, "fp32" never."""
    return precision == "bf16" or (precision == "auto" and bf16_is_fast(device))


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``threads`` within the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
