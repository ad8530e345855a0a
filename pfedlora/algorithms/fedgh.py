"""FedGH: a generalized global header trained by the server on the clients' class-mean features.

Yi, Yu, Wang, Liu. "FedGH: Heterogeneous Federated Learning with Generalized Global Header", ACM MM 2023,
arXiv 2303.13137. Each round a sampled client overwrites its head (fc3, the same shape on every
architecture) with the global header, trains its whole model with cross-entropy, then computes with the
trained model (eval mode, no gradients) the mean 500-d feature of each class it holds and uploads those
class means. The server trains the global header with cross-entropy on the (class mean, class) pairs of
all uploads (``fedgh.server_epochs`` epochs of plain SGD, lr ``fedgh.server_lr``, all
pairs in one batch per epoch) and broadcasts it. Prediction: the local model with its own head.

Shared (:meth:`FedGH.is_shared`): down, the global header (``fc3.weight``, ``fc3.bias``); up,
``prototype.<c>`` (500,) for each class the client holds. Private: the whole local model; no sample counts
are sent (the server does not weight the pairs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.algorithms.base import ClientContext, Upload, UploadBound, register_algorithm
from pfedlora.algorithms.lg_fedavg import LGFedAvg
from pfedlora.algorithms.prototypes import (
    PROTOTYPE_PREFIX,
    check_prototype_upload,
    prototype_upload,
    uploaded_prototypes,
)
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import run_sgd
from pfedlora.config import AlgorithmOptions, TrainConfig, option
from pfedlora.metrics import FlopMeter
from pfedlora.models import FeatureClassifier


@dataclass(frozen=True)
class FedGHOptions(AlgorithmOptions):
    """FedGH's ``[fedgh]`` section: the server's training of the global header."""

    server_lr: float = option(0.01, low=0, low_inclusive=False)
    """Learning rate of the server's plain SGD on the (class mean, class) pairs."""
    server_epochs: int = option(1, low=1)
    """Passes over all pairs (one batch each) per round."""


PLAIN_SGD = TrainConfig(momentum=0.0, weight_decay=0.0, grad_clip=math.inf)
"""The server's optimiser settings: plain SGD (run_sgd takes its lr separately)."""


@register_algorithm
class FedGH(LGFedAvg):
    """Global header trained by the server on uploaded class-mean features."""

    name = "fedgh"
    options_type = FedGHOptions
    uploads_global_state = False  # prototypes go up, the header comes down

    def is_shared(self, key: str) -> bool:
        """The header (down; also the client state's tensors that the header overwrites) and the class
        prototypes (up)."""
        return key in (f"{self.head_prefix}weight", f"{self.head_prefix}bias") or key.startswith(
            PROTOTYPE_PREFIX
        )

    def train(self, client: FeatureClassifier, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)  # the global header overwrites the client's head
        self.train_whole_model(client, ctx)
        return prototype_upload(
            client, ctx, self.num_classes, self.config.train.batch_size, with_counts=False
        )

    def check_upload(self, server_state: State, tensors: State) -> None:
        """Prototypes of classes in range, (feature_dim,) float32 each, no counts."""
        check_prototype_upload(tensors, self.num_classes, self.feature_dim, with_counts=False)

    def upload_bound(self, server_state: State) -> UploadBound:
        """A float32 prototype of every class."""
        return UploadBound(self.num_classes, self.num_classes * self.feature_dim * 4)

    def aggregate(
        self,
        server_state: State,
        uploads: Sequence[Upload],
        server_round: int,
        meter: FlopMeter | None = None,
    ) -> State:
        """The global header after SGD on CE over every uploaded (class mean, class) pair."""
        uploaded = uploaded_prototypes(uploads, self.num_classes, self.feature_dim)
        if uploaded is None:
            return server_state
        features, labels = uploaded  # (P, feature_dim), (P,)
        return train_header(
            server_state,
            features.to(server_state[f"{self.head_prefix}weight"].dtype),
            labels,
            epochs=self.options.server_epochs,
            lr=self.options.server_lr,
            meter=meter or FlopMeter(),
        )


def train_header(
    header: State,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    meter: FlopMeter,
) -> State:
    """``epochs`` full-batch steps of plain SGD (no momentum, weight decay or clipping) on CE, charged to the
    server's ``meter``.

    ``header`` holds the head's weight (C, feature_dim) and bias (C,) (``fc3.weight``, ``fc3.bias`` for the
    CNNs); a new state is returned.
    """
    (weight_key,) = [key for key in header if key.endswith(".weight")]
    (bias_key,) = [key for key in header if key.endswith(".bias")]
    weight = nn.Parameter(header[weight_key].detach().clone())
    bias = nn.Parameter(header[bias_key].detach().clone())
    run_sgd(
        [weight, bias],
        epochs,
        lambda: [(features, labels)],
        lambda x, y: F.cross_entropy(F.linear(x, weight, bias), y),
        PLAIN_SGD,
        lr,
        meter,
        kind="server-header",
    )
    return {weight_key: weight.detach(), bias_key: bias.detach()}
