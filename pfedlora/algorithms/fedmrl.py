"""FedMRL: a shared small model whose features are fused with the private model's by a private projector.

Yi, Yu, Shi, Wang, Liu, Li. "Federated Model Heterogeneous Matryoshka Representation Learning", NeurIPS
2024, arXiv 2406.00488 (official code: LipingYi/FedMRL); one of HtFLlib's methods. Every client keeps its
private model F (extractor F_ex of width D, header F_hd), a copy of the shared small model S
(``fedmrl.shared_arch``, cnn5 by default: extractor S_ex of width d ≤ D, header S_hd) and a private
projector P, one linear layer (d + D → D). Per batch

    R = P([S_ex(x), F_ex(x)]),   ŷ_S = S_hd(R[:, :d]),   ŷ_F = F_hd(R),   loss = CE(ŷ_S, y) + CE(ŷ_F, y):

the fused representation is nested (Matryoshka): its first d features serve the shared header, all D the
private one. S, F and P train together for ``train.local_epochs`` (one SGD step on the summed loss per
batch); the client uploads S, the server takes the sample-weighted mean. Prediction: F_hd(R).

Where this differs from the official code, and why: the code stores every upload without copying it, so
its "average" is the last client's model; the mean here is a real one, as the paper describes. With the
default cnn5 beside the CNNs d = D = 500, as in the official heterogeneous script: both headers then read
the whole fused representation. One optimizer over S, F and P, fresh each round (the code keeps S's and
P's optimizers across clients, so their momentum carries over).

Shared: S (keys ``shared.*``). Private: F (``local.*``) and P (``projector.*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.algorithms.base import ClientContext, Upload, register_algorithm
from pfedlora.algorithms.distillation import ModelPair, SharedModelAlgorithm, build_pair
from pfedlora.algorithms.state import State
from pfedlora.config import AlgorithmOptions, SharedModelOptions
from pfedlora.errors import ConfigError
from pfedlora.models import FeatureClassifier, init_parameters_


@dataclass(frozen=True)
class FedMRLOptions(SharedModelOptions):
    """FedMRL's ``[fedmrl]`` section: ``shared_arch``, the small model that travels."""


class MatryoshkaPair(ModelPair):
    """F (``local``), S (``shared``) and the private projector P (``projector``)."""

    def __init__(
        self, local: FeatureClassifier, shared: FeatureClassifier, generator: torch.Generator
    ) -> None:
        super().__init__(local, shared)
        if shared.feature_dim > local.feature_dim:
            raise ConfigError(
                f"fedmrl nests the shared model's {shared.feature_dim} features in the private model's "
                f"{local.feature_dim}: choose a fedmrl.shared_arch no wider than the private models"
            )
        width = shared.feature_dim + local.feature_dim
        projector = nn.Linear(width, local.feature_dim, device="meta").to_empty(device="cpu")
        init_parameters_(projector, generator)
        self.projector = projector.to(next(local.parameters()).device)

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """R = P([S_ex(x), F_ex(x)]), (B, D)."""
        return self.projector(torch.cat([self.shared.features(x), self.local.features(x)], dim=1))

    def both_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ŷ_S, ŷ_F): the shared header on R's first d features, the private one on all of R."""
        fused = self.fused(x)
        return self.shared.head(fused[:, : self.shared.feature_dim]), self.local.head(fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.local.head(self.fused(x))
        return logits


@register_algorithm
class FedMRL(SharedModelAlgorithm[MatryoshkaPair]):
    """A shared small model fused with the private one by a private projector (nested representations)."""

    name = "fedmrl"
    uploads_global_state = True
    options_type: ClassVar[type[AlgorithmOptions]] = FedMRLOptions

    def create_client(self, arch: str, generator: torch.Generator) -> MatryoshkaPair:
        local, shared = build_pair(self.config, arch, self.input_shape, self.num_classes, generator)
        return MatryoshkaPair(local, shared, generator)

    def losses(
        self, client: MatryoshkaPair, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE(ŷ_S, y), CE(ŷ_F, y)); both reach S, F and P (one step on their sum)."""
        shared_logits, local_logits = client.both_logits(x)
        return F.cross_entropy(shared_logits, y), F.cross_entropy(local_logits, y)

    def train(self, client: MatryoshkaPair, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)  # the global S overwrites the client's copy
        self.train_mutually(client, list(client.parameters()), ctx, ctx.data)
        return Upload(self.shared_state(client), ctx.data.num_train)
