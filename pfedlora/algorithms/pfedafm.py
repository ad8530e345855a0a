"""pFedAFM: a shared small feature extractor mixed into each private model's features by learned weights.

Yi, Yu, Shi, Wang, Liu, Li. "pFedAFM: Adaptive Feature Mixture for Batch-Level Personalization in
Heterogeneous Federated Learning", arXiv 2404.17847 (official code: LipingYi/pFedAFM); one of pFedLoRA's
family. Every client keeps its private model F (extractor F_ex and header F_hd, its own architecture), a
copy of the shared small model G (``pfedafm.shared_arch``, cnn5 by default; only its feature extractor
G_ex is used and travels) and a private mixing vector α ∈ [0, 1]^D (one weight per feature, initially 1:
the client starts from its own features). Each round a sampled client overwrites G_ex with the global one,
then

1. trains F and α with G frozen for ``train.local_epochs`` on CE(F_hd(α ⊙ F_ex(x) + (1 − α) ⊙ G_ex(x)), y)
   (α stepped with F by the clients' SGD, as in the official heterogeneous script, where both learning
   rates are 0.01; clamped to [0, 1] after every step);
2. trains G_ex with F frozen for ``train.local_epochs`` on CE(F_hd(G_ex(x)), y): the shared extractor learns
   to feed the client's own header;

and uploads G_ex; the server takes the sample-weighted mean. Prediction: F_hd(α ⊙ F_ex(x) + (1 − α) ⊙
G_ex(x)).

Where this differs from the official code, and why: the code keeps one α object for all clients (each
client starts from the last trained client's α) and averages uploads that all alias the last client's
model; α is private and the mean is a real mean here, as the paper describes. G's own header is never used
and does not travel (the code sends it untrained). One optimizer per phase, fresh each round.

Shared: G's feature extractor (keys ``shared.*`` but its header's). Private: F (``local.*``), α
(``mixing``) and G's unused header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.algorithms.base import Algorithm, ClientContext, Upload, register_algorithm
from pfedlora.algorithms.distillation import SHARED_PREFIX, ModelPair, PairT, build_pair
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.config import AlgorithmOptions, SharedModelOptions
from pfedlora.errors import ConfigError
from pfedlora.models import FeatureClassifier


@dataclass(frozen=True)
class PFedAFMOptions(SharedModelOptions):
    """pFedAFM's ``[pfedafm]`` section: ``shared_arch``, the small model whose extractor is shared."""


class MixedFeatures(ModelPair):
    """F (``local``), G (``shared``) and the private mixing weights α (``mixing``, one per feature)."""

    def __init__(self, local: FeatureClassifier, shared: FeatureClassifier) -> None:
        super().__init__(local, shared)
        if local.feature_dim != shared.feature_dim:
            raise ConfigError(
                f"pfedafm mixes features of one width: the private model's are {local.feature_dim}-d, the "
                f"shared model's {shared.feature_dim}-d"
            )
        self.mixing = nn.Parameter(torch.ones(local.feature_dim, device=next(local.parameters()).device))

    def mixed_features(self, x: torch.Tensor) -> torch.Tensor:
        """α ⊙ F_ex(x) + (1 − α) ⊙ G_ex(x), (B, D)."""
        return self.mixing * self.local.features(x) + (1 - self.mixing) * self.shared.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.local.head(self.mixed_features(x))
        return logits


class SharedExtractorAlgorithm(Algorithm[PairT]):
    """Base of pFedAFM and pFedMoE: the shared small model's feature extractor is what travels (its header,
    never used, stays behind); the server takes the sample-weighted mean."""

    uploads_global_state = True
    received = "extractor"

    @property
    def shared_head_prefix(self) -> str:
        return f"{SHARED_PREFIX}{self.head_prefix}"

    def is_shared(self, key: str) -> bool:
        return key.startswith(SHARED_PREFIX) and not key.startswith(self.shared_head_prefix)

    def extractor_parameters(self, client: PairT) -> list[nn.Parameter]:
        """The parameters of the client's copy of the shared extractor."""
        return [p for name, p in client.shared.named_parameters() if self.is_shared(f"{SHARED_PREFIX}{name}")]


@register_algorithm
class PFedAFM(SharedExtractorAlgorithm[MixedFeatures]):
    """A shared small extractor mixed into private features by learned per-feature weights; FedAvg of it."""

    name = "pfedafm"
    options_type: ClassVar[type[AlgorithmOptions]] = PFedAFMOptions

    def create_client(self, arch: str, generator: torch.Generator) -> MixedFeatures:
        return MixedFeatures(*build_pair(self.config, arch, self.input_shape, self.num_classes, generator))

    def train(self, client: MixedFeatures, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)
        train = self.config.train

        def clamp() -> None:
            with torch.no_grad():
                client.mixing.clamp_(0.0, 1.0)

        train_on_client_data(
            client,
            [*client.local.parameters(), client.mixing],
            ctx,
            train,
            phase="local",
            after_step=clamp,
        )
        extractor = self.extractor_parameters(client)

        def extractor_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(client.local.head(client.shared.features(x)), y)

        train_on_client_data(client, extractor, ctx, train, phase="extractor", loss_fn=extractor_loss)
        return Upload(self.shared_state(client), ctx.data.num_train)
