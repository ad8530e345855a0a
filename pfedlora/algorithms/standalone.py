"""Standalone: every client trains its own model alone with cross-entropy; nothing travels.

The reference every personalized FL method must beat (used as such in pFedLoRA, arXiv 2310.13283, and the
baselines it compares against). Shared: nothing. Private: the whole model.
"""

from __future__ import annotations

import torch

from pfedlora.algorithms.base import Algorithm, ClientContext, Upload, register_algorithm
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.models import FeatureClassifier, build_model


@register_algorithm
class Standalone(Algorithm[FeatureClassifier]):
    """Each client trains alone for ``train.local_epochs`` epochs a round."""

    name = "standalone"

    def create_client(self, arch: str, generator: torch.Generator) -> FeatureClassifier:
        return build_model(arch, self.input_shape, self.num_classes, generator, self.model_settings)

    def is_shared(self, key: str) -> bool:
        return False

    def train(self, client: FeatureClassifier, message: State, ctx: ClientContext) -> Upload:
        train_on_client_data(client, list(client.parameters()), ctx, self.config.train, phase="local")
        return Upload({}, ctx.data.num_train)
