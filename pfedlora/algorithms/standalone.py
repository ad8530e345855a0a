"""Standalone: every client trains its own model alone on its task's loss; nothing travels.

The reference every personalized FL method must beat (used as such in pFedLoRA, arXiv 2310.13283, and the
baselines it compares against). Shared: nothing. Private: the whole model
(for a language model: its private LoRA adapter on the frozen base).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pfedlora.algorithms.base import Algorithm, ClientContext, Upload, register_algorithm
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import train_on_client_data


@register_algorithm
class Standalone(Algorithm[nn.Module]):
    """Each client trains alone for ``train.local_epochs`` epochs a round (a language model: its private
    adapter)."""

    name = "standalone"
    tasks: ClassVar[tuple[str, ...]] = ("classification", "language-modeling")

    def create_client(self, arch: str, generator: torch.Generator) -> nn.Module:
        return self.build_private_model(arch, generator)

    def is_shared(self, key: str) -> bool:
        return False

    def train(self, client: nn.Module, message: State, ctx: ClientContext) -> Upload:
        train_on_client_data(client, list(client.parameters()), ctx, self.config.train, phase="local")
        return Upload({}, ctx.data.num_train)
