"""pFedES: a small shared image-to-image extractor in front of each private model, trained in two phases.

Yi, Yu, Wang, Liu. "pFedES: Model Heterogeneous Personalized Federated Learning with Feature Extractor
Sharing", AAAI 2025, arXiv 2311.06879 (official code: LipingYi/pFedES); one of pFedLoRA's family. Every
client keeps its private model F of its own architecture and a copy of the shared proxy extractor G (two
3×3 convolutions, channels → ``pfedes.width`` → channels, each followed by ReLU, padded so that G(x) has
x's shape). Each round a sampled client overwrites G with the global one, then

1. trains F with G frozen for ``train.local_epochs`` on (1 − μ)·CE(F(x), y) + μ·CE(F(G(x)), y)
   (μ = ``pfedes.mu``): F learns from the raw input and from what the shared extractor makes of it;
2. trains G with F frozen for ``pfedes.extractor_epochs`` on CE(F(G(x)), y): the private model's knowledge
   flows into the shared extractor;

and uploads G; the server takes the sample-weighted mean. Prediction: F(x) on the raw input, as the
official code scores it.

As in the official code, both phases use the clients' SGD settings (``train.lr`` and its momentum and
weight decay), with a fresh optimizer per phase (the code keeps one extractor optimizer across clients and
rounds, so momentum carries over from client to client; that is not reproduced). The official
heterogeneous script trains G for ten epochs more than F; here the two counts are options of their own.
The extractor works on images: text clients are refused (their input is token ids).

Shared: G (state-dict keys ``extractor.*``, 440 parameters on 3-channel images). Private: F (``local.*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.algorithms.base import Algorithm, ClientContext, Upload, register_algorithm
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.config import AlgorithmOptions, option
from pfedlora.errors import ConfigError
from pfedlora.models import FeatureClassifier, build_model, init_parameters_, is_transformer

EXTRACTOR_PREFIX = "extractor."


@dataclass(frozen=True)
class PFedESOptions(AlgorithmOptions):
    """pFedES's ``[pfedes]`` section."""

    mu: float = option(0.5, low=0, high=1)
    """μ: the weight of the private model's loss on the extractor's output in the first phase."""
    extractor_epochs: int = option(1, low=1)
    """Epochs of the second phase (the extractor trained, the private model frozen)."""
    width: int = option(8, low=1)
    """Channels of the extractor's hidden layer."""


class ProxyExtractor(nn.Module):
    """G: two 3×3 convolutions with ReLU, channels → width → channels, shape-preserving."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, device="meta")
        self.conv2 = nn.Conv2d(width, channels, 3, padding=1, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))))


class ExtractedModel(nn.Module):
    """A client's private model ``local`` and its copy of the shared ``extractor``."""

    def __init__(self, local: FeatureClassifier, extractor: ProxyExtractor) -> None:
        super().__init__()
        self.local = local
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The private model on the raw input (the prediction)."""
        logits: torch.Tensor = self.local(x)
        return logits


@register_algorithm
class PFedES(Algorithm[ExtractedModel]):
    """A shared proxy extractor in front of private models, trained in alternating phases; FedAvg of it."""

    name = "pfedes"
    uploads_global_state = True
    received = "extractor"
    options_type: ClassVar[type[AlgorithmOptions]] = PFedESOptions

    def create_client(self, arch: str, generator: torch.Generator) -> ExtractedModel:
        if is_transformer(arch) or len(self.input_shape) != 3:
            raise ConfigError(
                f"algorithm 'pfedes' shares an image-to-image extractor; architecture {arch!r} reads "
                f"inputs of shape {self.input_shape}, not images (channels × height × width)"
            )
        options: PFedESOptions = self.options
        local = build_model(arch, self.input_shape, self.num_classes, generator, self.model_settings)
        extractor = ProxyExtractor(self.input_shape[0], options.width).to_empty(device="cpu")
        init_parameters_(extractor, generator)
        device = next(local.parameters()).device
        return ExtractedModel(local, extractor.to(device))

    def is_shared(self, key: str) -> bool:
        return key.startswith(EXTRACTOR_PREFIX)

    def train(self, client: ExtractedModel, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)
        options: PFedESOptions = self.options
        mu = options.mu

        def local_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                extracted = client.extractor(x)
            return (1 - mu) * F.cross_entropy(client.local(x), y) + mu * F.cross_entropy(
                client.local(extracted), y
            )

        def extractor_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(client.local(client.extractor(x)), y)

        train = self.config.train
        train_on_client_data(
            client, list(client.local.parameters()), ctx, train, phase="local", loss_fn=local_loss
        )
        train_on_client_data(
            client,
            list(client.extractor.parameters()),
            ctx,
            train,
            phase="extractor",
            epochs=options.extractor_epochs,
            loss_fn=extractor_loss,
        )
        return Upload(self.shared_state(client), ctx.data.num_train)
