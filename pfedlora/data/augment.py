"""Batched data augmentation as tensor operations (no per-sample Python loop)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfedlora.errors import ConfigError


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero-padding by ``padding``, and a horizontal flip with p=0.5, per sample of x.

    ``x`` is (B, C, H, W); each sample is cropped back to (H, W) at its own random offset.

    Random numbers come from ``generator`` on its own device and are then moved to ``x``'s device; the dtype
    of ``x`` (uint8 or float) is kept.
    """
    if padding < 0:
        raise ConfigError(f"padding={padding} is invalid; it must be >= 0")
    batch, _, height, width = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device=generator.device)
    flips = torch.rand(batch, generator=generator, device=generator.device) < 0.5
    offsets, flips = offsets.to(x.device), flips.to(x.device)

    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H + 2p, W + 2p)
    rows = offsets[0, :, None] + torch.arange(height, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=x.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch_index = torch.arange(batch, device=x.device)[:, None, None, None]
    channel_index = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
