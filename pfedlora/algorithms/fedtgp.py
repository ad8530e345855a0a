"""FedTGP: FedProto's clients, with global prototypes trained by the server under an adaptive margin.

Zhang, Liu, Hua, Cao. "FedTGP: Trainable Global Prototypes with Adaptive-Margin-Enhanced Contrastive
Learning for Data and Model Heterogeneity in Federated Learning", AAAI 2024, arXiv 2401.03230; one of
HtFLlib's methods. Clients are FedProto's (:mod:`.fedproto`): CE + λ·MSE toward the global prototype of a
sample's class (λ = ``fedtgp.lambda``), then the mean feature of each class they hold goes up (without
counts: the server treats every client prototype as one sample). Prediction: the nearest global prototype.

The server keeps a prototype generator: a learned embedding e_c (D,) per class followed by a two-layer MLP
(D → D with ReLU → D), P̂_c = MLP(e_c). Each round it takes the cluster centre Q_c of each uploaded class
(the mean of the round's client prototypes of c), the margin

    δ = min(max_c min_{c' ≠ c} ‖Q_c − Q_c'‖, τ)       (τ = ``fedtgp.margin_cap``; δ = τ with one class)

and trains the generator for ``fedtgp.server_epochs`` passes of plain SGD (lr ``fedtgp.server_lr``,
shuffled batches of ``fedtgp.server_batch_size`` client prototypes from a seeded stream) on the
contrastive loss CE(−(d(P, P̂) + δ·onehot(y)), y), with d the Euclidean distance of a client prototype P of
class y to every P̂. The generated prototypes of the classes uploaded so far are broadcast.

Where this follows the paper rather than HtFLlib's code: the same rule (HtFLlib's code is the authors');
only the classes some client has uploaded are broadcast and scored (HtFLlib broadcasts every class's
generated prototype, including those of classes no client has shown); distances are clamped at 1e-12
before the square root (a zero distance would give an infinite gradient).

Shared: down, ``prototype.<c>`` (D,) for each class uploaded so far; up, ``prototype.<c>`` for each class
the client holds. Private: the whole local model. Server only: the generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from pfedlora.algorithms.base import Upload, register_algorithm
from pfedlora.algorithms.fedproto import PRESENT, FedProto, FedProtoOptions, PrototypeClient
from pfedlora.algorithms.prototypes import PROTOTYPE_PREFIX, uploaded_prototypes
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import run_sgd
from pfedlora.config import AlgorithmOptions, TrainConfig, option
from pfedlora.metrics import FlopMeter
from pfedlora.models._init import default_bound, kaiming_uniform_, uniform_
from pfedlora.seeding import torch_generator

GENERATOR_KEYS: tuple[str, ...] = (
    "generator.embedding",  # (C, D)
    "generator.hidden.weight",  # (D, D)
    "generator.hidden.bias",  # (D,)
    "generator.out.weight",  # (D, D)
    "generator.out.bias",  # (D,)
)
"""The server state's generator tensors, in the order :func:`generate` takes them."""

PLAIN_SGD = TrainConfig(momentum=0.0, weight_decay=0.0, grad_clip=math.inf)


@dataclass(frozen=True)
class FedTGPOptions(FedProtoOptions):
    """FedTGP's ``[fedtgp]`` section (``lambda``: the clients' weight of the MSE, as FedProto's)."""

    margin_cap: float = option(100.0, low=0)
    """τ: the most the adaptive margin δ may be."""
    server_epochs: int = option(100, low=1)
    """Passes over the round's client prototypes that train the generator."""
    server_lr: float = option(0.01, low=0, low_inclusive=False)
    """Learning rate of the server's plain SGD."""
    server_batch_size: int = option(64, low=1)
    """Client prototypes per server step."""


def generate(parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every class's prototype (C, D) from the generator's tensors (in :data:`GENERATOR_KEYS` order)."""
    embedding, hidden_w, hidden_b, out_w, out_b = parameters
    return F.linear(F.relu(F.linear(embedding, hidden_w, hidden_b)), out_w, out_b)


def adaptive_margin(centres: dict[int, torch.Tensor], cap: float) -> float:
    """δ = min(max_c min_{c' ≠ c} ‖Q_c − Q_c'‖, cap); ``cap`` with fewer than two classes."""
    if len(centres) < 2:
        return cap
    stacked = torch.stack([centres[c] for c in sorted(centres)]).double()  # (K, D)
    distances = torch.cdist(stacked, stacked)  # (K, K)
    distances.fill_diagonal_(math.inf)
    return min(float(distances.min(1).values.max()), cap)


def margin_loss(
    prototypes: torch.Tensor, labels: torch.Tensor, generated: torch.Tensor, margin: float
) -> torch.Tensor:
    """CE(−(d + δ·onehot(y)), y): d (B, C) the Euclidean distances of the client prototypes (B, D) to the
    generated ones (C, D), the true class's pushed out by the margin δ."""
    squared = (
        prototypes.square().sum(1, keepdim=True)  # (B, 1)
        - 2 * prototypes @ generated.T  # (B, C)
        + generated.square().sum(1)  # (C,)
    )
    distances = squared.clamp_min(1e-12).sqrt()  # (B, C)
    pushed = distances + margin * F.one_hot(labels, generated.shape[0]).to(distances.dtype)
    return F.cross_entropy(-pushed, labels)


@register_algorithm
class FedTGP(FedProto):
    """FedProto's clients; the server trains the global prototypes with a margin-enhanced contrastive loss."""

    name = "fedtgp"
    options_type: ClassVar[type[AlgorithmOptions]] = FedTGPOptions
    sends_counts = False

    def initial_server_state(self, template: PrototypeClient) -> State:
        """A freshly drawn generator (from the run's seed) and no class uploaded yet."""
        generator = torch_generator(self.config.seed, "fedtgp-generator")
        width, classes = self.prototype_dim, self.num_classes
        embedding = torch.randn(classes, width, generator=generator)  # as nn.Embedding draws, N(0, 1)
        state = {"generator.embedding": embedding}
        for layer in ("hidden", "out"):
            weight = kaiming_uniform_(torch.empty(width, width), generator)
            state[f"generator.{layer}.weight"] = weight
            state[f"generator.{layer}.bias"] = uniform_(
                torch.empty(width), default_bound(weight.shape), generator
            )
        state[PRESENT] = torch.zeros(classes)
        return state

    def broadcast(self, server_state: State, client_id: int, server_round: int) -> State:
        """The generated prototypes of the classes uploaded so far."""
        present = torch.nonzero(server_state[PRESENT] > 0).flatten().tolist()
        if not present:
            return {}
        with torch.no_grad():
            generated = generate([server_state[key] for key in GENERATOR_KEYS])  # (C, D)
        return {f"{PROTOTYPE_PREFIX}{c}": generated[c].clone() for c in present}

    def aggregate(
        self,
        server_state: State,
        uploads: Sequence[Upload],
        server_round: int,
        meter: FlopMeter | None = None,
    ) -> State:
        """The generator trained on the round's client prototypes with the adaptive margin."""
        uploaded = uploaded_prototypes(uploads, self.num_classes, self.prototype_dim)
        if uploaded is None:
            return server_state
        features, labels = uploaded  # (P, D), (P,)
        classes = labels.unique().tolist()
        options: FedTGPOptions = self.options
        margin = adaptive_margin({c: features[labels == c].mean(0) for c in classes}, options.margin_cap)
        parameters = [torch.nn.Parameter(server_state[key].detach().clone()) for key in GENERATOR_KEYS]
        features = features.to(parameters[0].dtype)
        shuffle = torch_generator(self.config.seed, "fedtgp-server", server_round)

        def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
            order = torch.randperm(len(labels), generator=shuffle).to(labels.device)
            size = options.server_batch_size
            return [
                (features[order[i : i + size]], labels[order[i : i + size]])
                for i in range(0, len(order), size)
            ]

        run_sgd(
            parameters,
            options.server_epochs,
            batches,
            lambda x, y: margin_loss(x, y, generate(parameters), margin),
            PLAIN_SGD,
            options.server_lr,
            meter or FlopMeter(),
            kind="server-prototypes",
            cost_key=lambda x: None,  # the generator runs on every class whatever the batch size
        )
        state = {key: p.detach() for key, p in zip(GENERATOR_KEYS, parameters, strict=True)}
        seen = torch.zeros_like(server_state[PRESENT])
        seen[classes] = 1.0
        state[PRESENT] = torch.maximum(server_state[PRESENT], seen)
        return state
