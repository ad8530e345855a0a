"""random_crop_flip: every output is a crop of the zero-padded input or its mirror; seeded; batched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pfedlora.data.augment import random_crop_flip
from pfedlora.errors import ConfigError


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _candidates(sample: torch.Tensor, padding: int) -> list[tuple[int, int, bool, torch.Tensor]]:
    """Every crop of the zero-padded sample (C, H, W), plain and mirrored."""
    _, height, width = sample.shape
    padded = F.pad(sample, (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + height, dx : dx + width]
            out += [(dy, dx, False, crop), (dy, dx, True, crop.flip(-1))]
    return out


def _matches(x: torch.Tensor, out: torch.Tensor, padding: int) -> list[tuple[int, int, bool]]:
    """The (dy, dx, flipped) of each output sample, found by brute force; fails if one matches nothing."""
    found = []
    for sample, result in zip(x, out, strict=True):
        hits = [(dy, dx, f) for dy, dx, f, c in _candidates(sample, padding) if torch.equal(c, result)]
        assert hits, "output is neither a crop of the padded input nor its mirror"
        found.append(hits[0])
    return found


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_every_output_is_a_crop_or_its_mirror(dtype: torch.dtype) -> None:
    # Non-square images with distinct positive values, so rows and columns cannot be confused.
    x = (torch.randint(1, 255, (64, 2, 5, 7), generator=_generator(0))).to(dtype)

    out = random_crop_flip(x, padding=2, generator=_generator(1))

    assert out.shape == x.shape and out.dtype == dtype
    found = _matches(x, out, padding=2)
    # Randomness is per sample: many offsets and both flip outcomes occur in one batch.
    assert len({(dy, dx) for dy, dx, _ in found}) > 10
    assert {f for _, _, f in found} == {True, False}


def test_padding_zero_only_flips() -> None:
    x = torch.randint(0, 256, (32, 3, 4, 4), dtype=torch.uint8, generator=_generator(0))
    out = random_crop_flip(x, padding=0, generator=_generator(2))
    for sample, result in zip(x, out, strict=True):
        assert torch.equal(result, sample) or torch.equal(result, sample.flip(-1))


def test_deterministic_per_generator_seed() -> None:
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=_generator(0))
    first = random_crop_flip(x, 4, _generator(7))
    assert torch.equal(first, random_crop_flip(x, 4, _generator(7)))
    assert not torch.equal(first, random_crop_flip(x, 4, _generator(8)))


def test_negative_padding_is_refused() -> None:
    with pytest.raises(ConfigError, match="padding=-1"):
        random_crop_flip(torch.zeros(1, 1, 2, 2), -1, _generator(0))
