"""Parameter initialisation drawn from an explicit ``torch.Generator``; never from the global RNG."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


def default_bound(weight_shape: Sequence[int]) -> float:
    """``1/sqrt(fan_in)``: the bound of PyTorch's default Linear/Conv init for a weight of this shape."""
    fan_in = math.prod(weight_shape[1:])
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def _fill_(tensor: torch.Tensor, generator: torch.Generator, draw: Callable[[torch.Tensor], object]) -> None:
    # Draw on the generator's device so the values do not depend on where the tensor lives.
    with torch.no_grad():
        if tensor.device == generator.device:
            draw(tensor)
        else:
            scratch = torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)
            draw(scratch)
            tensor.copy_(scratch)


def kaiming_uniform_(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """PyTorch's default weight init (Kaiming-uniform, ``a=sqrt(5)``, i.e. U(±1/sqrt(fan_in))), in place."""
    _fill_(tensor, generator, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator))
    return tensor


def uniform_(tensor: torch.Tensor, bound: float, generator: torch.Generator) -> torch.Tensor:
    """Fill ``tensor`` with U(-bound, bound) in place."""
    _fill_(tensor, generator, lambda t: nn.init.uniform_(t, -bound, bound, generator=generator))
    return tensor
