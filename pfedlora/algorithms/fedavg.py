"""FedAvg: the whole model is shared and averaged (reference; homogeneous federations only).

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, arXiv 1602.05629. Each round a sampled client replaces its model with
the global one, trains it with cross-entropy for ``train.local_epochs`` epochs and uploads it with its
sample count; the server takes the sample-weighted mean. Averaging needs one architecture for every
client, so a federation with several is refused. Prediction: the client's latest local model.

Shared: the whole model. Private: nothing.
"""

from __future__ import annotations

import torch

from pfedlora.algorithms.base import Algorithm, ClientContext, Upload, register_algorithm
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.config import ExperimentConfig
from pfedlora.errors import ConfigError
from pfedlora.models import FeatureClassifier, build_model


def require_one_architecture(config: ExperimentConfig, why: str) -> None:
    """ConfigError (saying ``why``) unless every client of ``config`` has the same architecture."""
    architectures = config.federation.architectures
    if len(set(architectures)) != 1:
        configured = "[" + ", ".join(f'"{a}"' for a in architectures) + "]"
        raise ConfigError(
            f"{why}, so every client needs the same architecture, but "
            f"federation.architectures={configured}; set one, e.g. "
            f'federation.architectures=["{architectures[0]}"]'
        )


@register_algorithm
class FedAvg(Algorithm[FeatureClassifier]):
    """Whole-model FedAvg; needs one architecture for every client."""

    name = "fedavg"
    uploads_global_state = True
    one_architecture = True

    def __init__(self, config: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
        require_one_architecture(config, "fedavg averages whole models")
        super().__init__(config, input_shape, num_classes)
        self.model_keys = frozenset(self.probe.state_dict())

    def create_client(self, arch: str, generator: torch.Generator) -> FeatureClassifier:
        return build_model(arch, self.input_shape, self.num_classes, generator, self.model_settings)

    def is_shared(self, key: str) -> bool:
        """Every tensor of the model."""
        return key in self.model_keys

    def train(self, client: FeatureClassifier, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)  # every tensor is shared: the global model overwrites the client's
        train_on_client_data(client, list(client.parameters()), ctx, self.config.train, phase="local")
        return Upload(self.shared_state(client), ctx.data.num_train)
