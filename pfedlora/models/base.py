"""What every architecture a client runs is: a classifier split into a feature extractor and a head."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class FeatureClassifier(nn.Module):
    """``forward(x) = head(features(x))``; several baselines need the two parts (LG-FedAvg and FedGH share
    the head, FedGH and FedProto compare features, FedKD distils them)."""

    HEAD_NAME: ClassVar[str] = "head"
    """Attribute name of the head module (its state-dict prefix)."""
    input_shape: tuple[int, ...]
    num_classes: int
    feature_dim: int
    """Width of ``features(x)``."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the head classifies, (B, feature dim)."""
        raise NotImplementedError

    def default_adapter_layers(self) -> list[str] | None:
        """The layers LoRA may target when ``adapter.targets`` is empty (those of one name and shape across
        the federation among them); None: every nn.Linear / nn.Conv2d."""
        return None

    @property
    def head(self) -> nn.Module:
        """Whatever module currently sits at ``HEAD_NAME`` (a plain layer, or a LoRA wrapper around it)."""
        head: nn.Module = getattr(self, self.HEAD_NAME)
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``head(features(x))``."""
        logits: torch.Tensor = self.head(self.features(x))
        return logits  # (B, num_classes)
