"""FedProto: clients share class prototypes, regularise their features towards them, predict by the nearest.

Tan, Long, Liu, Zhou, Lu, Jiang, Zhang. "FedProto: Federated Prototype Learning across Heterogeneous
Clients", AAAI 2022, arXiv 2105.00243. Each round a sampled client stores the global prototypes it
receives, trains its whole model on CE + λ·MSE(feature, global prototype of the label) with
λ = ``fedproto.lambda`` (plain CE while no global prototype exists), then computes with the
trained model (eval mode, no gradients) the mean 500-d feature of each class it holds and uploads those
with their sample counts. The server's prototype of class c is the count-weighted mean of the uploaded
prototypes of c; a class no upload of the round holds keeps its previous prototype. A client predicts the
class whose global prototype is nearest (squared Euclidean distance) to its feature.

Shared: down, ``prototype.<c>`` (500,) for each class with a global prototype; up, ``prototype.<c>``
(500,) and ``count.<c>`` () for each class the client holds. Private: the whole local model (and the last
global prototypes it received).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.algorithms.base import Algorithm, ClientContext, Upload, UploadBound, register_algorithm
from pfedlora.algorithms.prototypes import (
    COUNT_PREFIX,
    PROTOTYPE_PREFIX,
    check_prototype_upload,
    prototype_upload,
    read_prototypes,
)
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.config import AlgorithmOptions, option
from pfedlora.metrics import FlopMeter
from pfedlora.models import FeatureClassifier, build_model


@dataclass(frozen=True)
class FedProtoOptions(AlgorithmOptions):
    """FedProto's ``[fedproto]`` section."""

    lambda_: float = option(10.0, low=0)
    """λ (key ``lambda``): the weight of the MSE between a feature and its class's global prototype."""


PROTOTYPES, PRESENT = "prototypes", "present"
"""Server-state keys: every class's global prototype (C, 500) and whether it exists yet (C,), 0/1."""


class PrototypeClient(nn.Module):
    """A private model plus the last global prototypes received, kept as buffers."""

    global_prototypes: torch.Tensor  # (C, 500)
    prototype_mask: torch.Tensor  # (C,) bool: which classes have a global prototype

    def __init__(self, model: FeatureClassifier, num_classes: int, width: int | None = None) -> None:
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        width = model.feature_dim if width is None else width  # the prototypes' width: features by default
        self.register_buffer("global_prototypes", torch.zeros(num_classes, width, device=device))
        self.register_buffer("prototype_mask", torch.zeros(num_classes, dtype=torch.bool, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The local model's logits."""
        return self.model(x)

    def load_prototypes(self, prototypes: dict[int, torch.Tensor]) -> None:
        """Replace the stored global prototypes with ``prototypes`` (class -> (500,)); others are unset."""
        with torch.no_grad():
            self.global_prototypes.zero_()
            self.prototype_mask.zero_()
            for label, prototype in prototypes.items():
                self.global_prototypes[label] = prototype
                self.prototype_mask[label] = True

    def prototype_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Negative squared distance of each feature to each global prototype; -inf where none exists."""
        features = self.model.features(x)  # (B, 500)
        prototypes = self.global_prototypes  # (C, 500)
        squared = (
            features.square().sum(1, keepdim=True)  # (B, 1)
            - 2 * features @ prototypes.T  # (B, C)
            + prototypes.square().sum(1)  # (C,)
        ).clamp_min(0)
        return (-squared).masked_fill(~self.prototype_mask, float("-inf"))  # (B, C)


def prototype_loss(
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """CE(logits, labels) + λ·MSE(features, global prototype of each label).

    As in the authors' code, the MSE is a mean over all of the batch's samples and feature dimensions,
    samples whose label has no global prototype (``mask`` False) contributing zero.
    """
    has_prototype = mask[labels].unsqueeze(1)  # (B, 1)
    error = (features - prototypes[labels]) * has_prototype  # (B, 500), zero rows without a prototype
    return F.cross_entropy(logits, labels) + lam * error.square().mean()


@register_algorithm
class FedProto(Algorithm[PrototypeClient]):
    """Class prototypes shared and averaged; local training pulls features to them."""

    name = "fedproto"
    options_type: ClassVar[type[AlgorithmOptions]] = FedProtoOptions  # FD, FedTGP: options of their own
    sends_counts: ClassVar[bool] = True
    """Whether a client's prototypes go up with their sample counts."""

    @property
    def prototype_dim(self) -> int:
        """The width of a class's shared vector: the models' feature width."""
        return self.feature_dim

    def represent(self, model: FeatureClassifier) -> Callable[[torch.Tensor], torch.Tensor]:
        """What a class's shared vector is the mean of, for a batch: the model's features."""
        return model.features

    def create_client(self, arch: str, generator: torch.Generator) -> PrototypeClient:
        model = build_model(arch, self.input_shape, self.num_classes, generator, self.model_settings)
        return PrototypeClient(model, self.num_classes, self.prototype_dim)

    def is_shared(self, key: str) -> bool:
        """Prototypes (both ways) and their counts (up); no client-state tensor travels as it is."""
        return key.startswith((PROTOTYPE_PREFIX, COUNT_PREFIX))

    def initial_server_state(self, template: PrototypeClient) -> State:
        device = template.global_prototypes.device
        return {
            PROTOTYPES: torch.zeros(self.num_classes, self.prototype_dim, device=device),
            PRESENT: torch.zeros(self.num_classes, device=device),
        }

    def broadcast(self, server_state: State, client_id: int, server_round: int) -> State:
        """Only the classes that have a global prototype."""
        present = torch.nonzero(server_state[PRESENT] > 0).flatten().tolist()
        return {f"{PROTOTYPE_PREFIX}{c}": server_state[PROTOTYPES][c] for c in present}

    def receive(self, client: PrototypeClient, message: State) -> None:
        """The global prototypes replace the client's stored ones."""
        received = read_prototypes(message, self.num_classes, self.prototype_dim, with_counts=False)
        client.load_prototypes({c: prototype for c, (prototype, _) in received.items()})

    def train(self, client: PrototypeClient, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)
        self.train_local(client, ctx)
        return prototype_upload(
            client.model,
            ctx,
            self.num_classes,
            self.config.train.batch_size,
            with_counts=self.sends_counts,
            represent=self.represent(client.model),
            width=self.prototype_dim,
        )

    def train_local(self, client: PrototypeClient, ctx: ClientContext) -> None:
        """SGD on :func:`prototype_loss` over the whole local model."""
        model, train = client.model, self.config.train
        lam = self.options.lambda_
        prototypes, mask = client.global_prototypes, client.prototype_mask
        regularise = bool(mask.any()) and lam > 0

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            features = model.features(x)  # (B, 500)
            logits = model.head(features)  # (B, C)
            if not regularise:
                return F.cross_entropy(logits, y)
            return prototype_loss(logits, features, y, prototypes, mask, lam)

        train_on_client_data(client, list(model.parameters()), ctx, train, phase="local", loss_fn=loss)

    def check_upload(self, server_state: State, tensors: State) -> None:
        """Prototypes (and positive counts of the same classes), in range, float32."""
        check_prototype_upload(tensors, self.num_classes, self.prototype_dim, with_counts=self.sends_counts)

    def upload_bound(self, server_state: State) -> UploadBound:
        """A float32 prototype (and count) of every class."""
        per_class = 2 if self.sends_counts else 1
        width = self.prototype_dim + (1 if self.sends_counts else 0)
        return UploadBound(per_class * self.num_classes, self.num_classes * width * 4)

    def aggregate(
        self,
        server_state: State,
        uploads: Sequence[Upload],
        server_round: int,
        meter: FlopMeter | None = None,
    ) -> State:
        """Per class, the count-weighted mean of the uploaded prototypes; other classes keep theirs."""
        sums = torch.zeros_like(server_state[PROTOTYPES], dtype=torch.float64)  # (C, 500)
        totals = torch.zeros_like(server_state[PRESENT], dtype=torch.float64)  # (C,)
        for upload in uploads:
            for label, (prototype, count) in read_prototypes(
                upload.tensors, self.num_classes, self.prototype_dim, with_counts=True
            ).items():
                sums[label] += count * prototype.to(torch.float64)
                totals[label] += count
        updated = totals > 0  # (C,)
        prototypes = server_state[PROTOTYPES].clone()
        prototypes[updated] = (sums[updated] / totals[updated].unsqueeze(1)).to(prototypes.dtype)
        present = torch.where(updated, torch.ones_like(server_state[PRESENT]), server_state[PRESENT])
        return {PROTOTYPES: prototypes, PRESENT: present}

    def predict(self, client: PrototypeClient, x: torch.Tensor) -> torch.Tensor:
        """Nearest global prototype; the local model's logits while the client has received none."""
        if not bool(client.prototype_mask.any()):
            return client(x)
        return client.prototype_scores(x)
