"""pFedMoE: the shared small extractor and the private one as two experts, mixed by a private per-sample gate.

Yi, Yu, Shi, Wang, Liu, Li. "pFedMoE: Data-Level Personalization with Mixture of Experts for
Model-Heterogeneous Personalized Federated Learning", arXiv 2402.01350; one of pFedLoRA's family. Every
client keeps its private model F (extractor F_ex and header F_hd, its own architecture), a copy of the
shared small model G (``pfedmoe.shared_arch``, cnn5 by default; its extractor G_ex is the global expert and
is what travels) and a private gate: a linear layer from the flattened sample to two weights, softmaxed. Per
batch

    (g_F, g_G) = softmax(W x + b),   ŷ = F_hd(g_F · F_ex(x) + g_G · G_ex(x)),   loss = CE(ŷ, y),

and F, G_ex and the gate train together for ``train.local_epochs`` (one phase); the client uploads G_ex and
the server takes the sample-weighted mean. Prediction: ŷ. The gate starts with zero weights (both experts
weighted 1/2).

No official code was found for pFedMoE; this follows the paper's abstract (a shared homogeneous small
feature extractor and a local gating network beside each client's heterogeneous model, mixing the experts'
features per sample and trained with them). The gate's exact architecture is not given there: one linear
layer on the flattened sample is our choice. It reads images: text clients are refused (their input is
token ids).

Shared: G's feature extractor (keys ``shared.*`` but its header's). Private: F (``local.*``), the gate
(``gate.*``) and G's unused header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pfedlora.algorithms.base import ClientContext, Upload, register_algorithm
from pfedlora.algorithms.distillation import ModelPair, build_pair
from pfedlora.algorithms.pfedafm import SharedExtractorAlgorithm
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.config import AlgorithmOptions, SharedModelOptions
from pfedlora.errors import ConfigError
from pfedlora.models import FeatureClassifier, is_transformer


@dataclass(frozen=True)
class PFedMoEOptions(SharedModelOptions):
    """pFedMoE's ``[pfedmoe]`` section: ``shared_arch``, whose extractor is the global expert."""


class GatedExperts(ModelPair):
    """F (``local``), G (``shared``) and the private per-sample gate (``gate``)."""

    def __init__(
        self, local: FeatureClassifier, shared: FeatureClassifier, input_shape: tuple[int, ...]
    ) -> None:
        super().__init__(local, shared)
        if local.feature_dim != shared.feature_dim:
            raise ConfigError(
                f"pfedmoe mixes features of one width: the private model's are {local.feature_dim}-d, the "
                f"shared model's {shared.feature_dim}-d"
            )
        device = next(local.parameters()).device
        self.gate = nn.Linear(math.prod(input_shape), 2, device="meta").to_empty(device=device)
        with torch.no_grad():  # both experts weighted 1/2 at first; no draw from any generator
            self.gate.weight.zero_()
            self.gate.bias.zero_()

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(g_F, g_G) of each sample, (B, 2), each row summing to 1."""
        return torch.softmax(self.gate(x.flatten(1)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates(x)  # (B, 2)
        mixed = g[:, :1] * self.local.features(x) + g[:, 1:] * self.shared.features(x)  # (B, D)
        logits: torch.Tensor = self.local.head(mixed)
        return logits


@register_algorithm
class PFedMoE(SharedExtractorAlgorithm[GatedExperts]):
    """The shared small extractor and the private one mixed per sample by a private gate; FedAvg of it."""

    name = "pfedmoe"
    options_type: ClassVar[type[AlgorithmOptions]] = PFedMoEOptions

    def create_client(self, arch: str, generator: torch.Generator) -> GatedExperts:
        if is_transformer(arch) or len(self.input_shape) != 3:
            raise ConfigError(
                f"algorithm 'pfedmoe' gates on the sample itself; architecture {arch!r} reads inputs of "
                f"shape {self.input_shape}, not images (channels × height × width)"
            )
        local, shared = build_pair(self.config, arch, self.input_shape, self.num_classes, generator)
        return GatedExperts(local, shared, self.input_shape)

    def train(self, client: GatedExperts, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)
        extractor = self.extractor_parameters(client)
        parameters = [*client.local.parameters(), *extractor, *client.gate.parameters()]
        train_on_client_data(client, parameters, ctx, self.config.train, phase="local")
        return Upload(self.shared_state(client), ctx.data.num_train)
