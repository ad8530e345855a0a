"""FML: federated mutual learning between a private model and a shared small model.

Shen, Wang, Kuang, Lyu, Wu, Zhou, Wu. "Federated Mutual Learning", arXiv 2006.16765. Every client keeps
its private model (its own architecture) and a copy of a small shared model G (``fml.shared_arch``,
cnn5 by default; the paper's "meme" model). Each round a sampled client overwrites G with the global one,
then trains both models together on every batch (SPEC §4):

    loss_local = α·CE(local) + (1−α)·KL(G ‖ local),   loss_G = β·CE(G) + (1−β)·KL(local ‖ G),

with α = ``fml.alpha`` and β = ``fml.beta``, and uploads G; the server takes the
sample-weighted mean. Prediction uses the private model.

Shared: G (state-dict keys ``shared.*``). Private: the local model (``local.*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pfedlora.algorithms.base import ClientContext, Upload, register_algorithm
from pfedlora.algorithms.distillation import (
    DistillationOptions,
    ModelPair,
    SharedModelAlgorithm,
    build_pair,
    kl_divergence,
)
from pfedlora.algorithms.state import State
from pfedlora.config import option


@dataclass(frozen=True)
class FmlOptions(DistillationOptions):
    """FML's ``[fml]`` section."""

    alpha: float = option(0.5, low=0, high=1)
    """α: the weight of the private model's cross-entropy against its KL toward G."""
    beta: float = option(0.5, low=0, high=1)
    """β: the weight of G's cross-entropy against its KL toward the private model."""


@register_algorithm
class FML(SharedModelAlgorithm[ModelPair]):
    """Mutual learning of the private model and a shared small model, FedAvg of the shared one."""

    name = "fml"
    uploads_global_state = True
    options_type = FmlOptions

    def create_client(self, arch: str, generator: torch.Generator) -> ModelPair:
        return ModelPair(*build_pair(self.config, arch, self.input_shape, self.num_classes, generator))

    def losses(
        self, client: ModelPair, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_local, loss_G)`` on one batch; each reaches only its own model (the other one detached)."""
        options: FmlOptions = self.options
        alpha, beta, reduction = options.alpha, options.beta, options.kl_reduction
        z_local, z_shared = client.local(x), client.shared(x)  # (B, C) each
        loss_local = alpha * F.cross_entropy(z_local, y) + (1 - alpha) * kl_divergence(
            z_local, z_shared, reduction
        )
        loss_shared = beta * F.cross_entropy(z_shared, y) + (1 - beta) * kl_divergence(
            z_shared, z_local, reduction
        )
        return loss_local, loss_shared

    def train(self, client: ModelPair, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)  # the global shared model overwrites the client's copy
        self.train_mutually(client, list(client.parameters()), ctx, ctx.data)
        return Upload(self.shared_state(client), ctx.data.num_train)
