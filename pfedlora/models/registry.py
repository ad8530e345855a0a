"""Every architecture a client can run, by name (the ``federation.architectures`` and
the algorithms' ``shared_arch`` options). A model family joins by registering its members: the CNN family of
the paper registers cnn1..cnn5 (:mod:`pfedlora.models.cnn`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pfedlora.config import ModelConfig
from pfedlora.models.base import FeatureClassifier
from pfedlora.registry import Registry


@dataclass(frozen=True)
class ModelSettings(ModelConfig):
    """What a model family may need beyond shapes: the ``[model]`` section of the configuration (e.g. a
    checkpoint), and what the run's other clients decide about the input (for text: which tokenizations a
    batch holds, and whether features share one width). Made from a configuration by
    :func:`pfedlora.models.model_settings`."""

    views: tuple[str, ...] = ()
    """The families whose tokenizations a text batch holds, in order: sample i is ``(2·len(views), L)``,
    token ids and mask of each view in turn (a model reads its own family's). Empty: one view."""
    project_features: bool = False
    """Where the federation mixes transformer widths: every transformer client projects its pooled feature
    to ``feature_dim`` with a private linear layer, so that heads, prototypes and headers are of one
    shape."""

    @classmethod
    def of(cls, settings: ModelConfig) -> ModelSettings:
        """``settings`` as ModelSettings (a bare ``[model]`` section: one view, no projection)."""
        if isinstance(settings, ModelSettings):
            return settings
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(ModelConfig)})


ModelBuilder = Callable[[Sequence[int], int, torch.Generator, ModelSettings], FeatureClassifier]
"""(input_shape, num_classes, generator, settings) -> a freshly initialised model."""

MODELS: Registry[ModelBuilder] = Registry("architecture")


def build_model(
    arch: str,
    input_shape: Sequence[int],
    num_classes: int,
    generator: torch.Generator,
    settings: ModelConfig | None = None,
) -> FeatureClassifier:
    """The architecture named ``arch`` (a ``MODELS`` name), initialised from ``generator``."""
    return MODELS[arch](input_shape, num_classes, generator, ModelSettings.of(settings or ModelConfig()))
