"""Shared builders for the models tests: tiny batches, explicit generators, the case table."""

from __future__ import annotations

import torch
from torch import nn

from pfedlora.models import (
    ARCHITECTURES,
    PLACEMENTS,
    HeteroCNN,
    PersonalizedModel,
    attach_adapter,
    build_model,
)

ARCHS = tuple(ARCHITECTURES)
INPUT_SHAPES = ((1, 28, 28), (3, 32, 32))
NUM_CLASSES = 10
RANK = 4
ALPHA = 8.0
DEFAULT_TARGETS = ("conv1", "fc3")
BATCH = 3

# (arch, placement, input_shape): the table that feeds the behavioural checks.
CASES = [(arch, placement, shape) for arch in ARCHS for placement in PLACEMENTS for shape in INPUT_SHAPES]
LAYER_CASES = [case for case in CASES if case[1] == "layers"]


def case_id(case: tuple[str, str, tuple[int, int, int]]) -> str:
    arch, placement, (c, h, w) = case
    return f"{arch}-{placement}-{c}x{h}x{w}"


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(arch: str, shape: tuple[int, int, int], seed: int = 0) -> HeteroCNN:
    return build_model(arch, shape, NUM_CLASSES, generator(seed))


def attach(
    model: HeteroCNN,
    placement: str,
    shape: tuple[int, int, int],
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    seed: int = 1,
) -> PersonalizedModel:
    return attach_adapter(
        model,
        placement=placement,
        rank=RANK,
        alpha=ALPHA,
        targets=targets,
        input_shape=shape,
        num_classes=NUM_CLASSES,
        generator=generator(seed),
    )


def batch(shape: tuple[int, int, int], seed: int = 2) -> torch.Tensor:
    return torch.randn(BATCH, *shape, generator=generator(seed))  # (B, C, H, W)


def zero_started_factors(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters that start at zero: every lora_B and the branch's fc_B."""
    return [p for name, p in model.named_parameters() if {"lora_B", "fc_B"} & set(name.split("."))]


def perturb_zero_started_factors_(model: nn.Module, seed: int = 3) -> None:
    gen = generator(seed)
    with torch.no_grad():
        for p in zero_started_factors(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
