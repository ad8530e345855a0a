from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from pfedlora.models import HeteroCNN, PersonalizedModel

from .helpers import CASES, LAYER_CASES, attach, batch, build, case_id


@dataclass
class Case:
    arch: str
    placement: str
    shape: tuple[int, int, int]
    base: HeteroCNN  # the unadapted model, left untouched
    model: PersonalizedModel  # an adapted deep copy of ``base`` (default targets conv1, fc3)
    x: torch.Tensor  # (B, C, H, W)


def _make_case(param: tuple[str, str, tuple[int, int, int]]) -> Case:
    arch, placement, shape = param
    base = build(arch, shape)
    model = attach(copy.deepcopy(base), placement, shape)
    return Case(arch, placement, shape, base, model, batch(shape))


@pytest.fixture(params=CASES, ids=[case_id(c) for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    """One row of the (arch x placement x input shape) table."""
    return _make_case(request.param)


@pytest.fixture(params=LAYER_CASES, ids=[case_id(c) for c in LAYER_CASES])
def layer_case(request: pytest.FixtureRequest) -> Case:
    """The rows of the table with placement "layers"."""
    return _make_case(request.param)
