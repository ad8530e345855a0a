"""Every architecture a client can run, by name (the ``federation.architectures`` and
``baselines.shared_arch`` values). A model family joins by registering its members: the CNN family of
the paper registers cnn1..cnn5 (:mod:`pfedlora.models.cnn`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pfedlora.config import ModelConfig
from pfedlora.models.base import FeatureClassifier
from pfedlora.registry import Registry

ModelSettings = ModelConfig
"""The ``[model]`` section of the configuration: what a family may need beyond shapes (e.g. a checkpoint)."""
ModelBuilder = Callable[[Sequence[int], int, torch.Generator, ModelSettings], FeatureClassifier]
"""(input_shape, num_classes, generator, settings) -> a freshly initialised model."""

MODELS: Registry[ModelBuilder] = Registry("architecture")


def build_model(
    arch: str,
    input_shape: Sequence[int],
    num_classes: int,
    generator: torch.Generator,
    settings: ModelSettings | None = None,
) -> FeatureClassifier:
    """The architecture named ``arch`` (a ``MODELS`` name), initialised from ``generator``."""
    return MODELS[arch](input_shape, num_classes, generator, settings or ModelSettings())
