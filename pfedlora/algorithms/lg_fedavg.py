"""LG-FedAvg in its model-heterogeneous form: a global head on private, heterogeneous bodies.

Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency. "Think Locally, Act Globally:
Federated Learning with Local and Global Representations", arXiv 2001.01523. Every client keeps its own
representation layers and shares only the top layer, which has the same shape on every architecture of
the CNN family (SPEC §4). Each round a sampled client overwrites its head with the global one, trains the
whole model with cross-entropy for ``train.local_epochs`` epochs and uploads its head with its sample
count; the server takes the sample-weighted mean. Prediction: the local model with its own head.

Shared: the head (``fc3.weight``, ``fc3.bias``). Private: everything else (conv1, conv2, fc1, fc2).
"""

from __future__ import annotations

import torch

from pfedlora.algorithms.base import Algorithm, ClientContext, Upload, register_algorithm
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.models import FeatureClassifier, build_model


@register_algorithm
class LGFedAvg(Algorithm[FeatureClassifier]):
    """Global head (fc3 of the CNNs) averaged by FedAvg; private heterogeneous bodies."""

    name = "lg-fedavg"
    uploads_global_state = True
    received = "head"

    def create_client(self, arch: str, generator: torch.Generator) -> FeatureClassifier:
        return build_model(arch, self.input_shape, self.num_classes, generator, self.model_settings)

    def is_shared(self, key: str) -> bool:
        return key.startswith(self.head_prefix)

    def train(self, client: FeatureClassifier, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)  # the global head overwrites the client's
        self.train_whole_model(client, ctx)
        return Upload(self.shared_state(client), ctx.data.num_train)

    def train_whole_model(self, client: FeatureClassifier, ctx: ClientContext) -> None:
        """``train.local_epochs`` epochs of SGD on CE, every parameter trainable."""
        train_on_client_data(client, list(client.parameters()), ctx, self.config.train, phase="local")
