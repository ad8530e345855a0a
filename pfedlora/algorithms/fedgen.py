"""FedGen: LG-FedAvg's global head, plus a server-trained generator of features that clients learn from.

Zhu, Hong, Zhou. "Data-Free Knowledge Distillation for Heterogeneous Federated Learning", ICML 2021,
arXiv 2105.10056; one of HtFLlib's methods. Each round a sampled client overwrites its head with the global
one and trains its whole model for ``train.local_epochs`` on

    CE(model(x), y) + CE(head(G(ŷ, ε)), ŷ),    ŷ ~ the federation's label distribution, ε ~ N(0, I),

one batch of ``train.batch_size`` generated features per real batch (drawn from the client's round stream;
the generator runs in training mode without gradients), then uploads its head and the counts of its
training labels. The server takes the sample-weighted mean of the heads (LG-FedAvg) and trains the
generator G (noise ``fedgen.noise_dim`` and a one-hot label → Linear → BatchNorm → ReLU → Linear to the
feature width) for ``fedgen.server_steps`` Adam steps (lr ``fedgen.generator_lr``) on CE(h(G(ŷ, ε)), ŷ),
ŷ drawn from the round's uploaded label counts, h the ensemble of the uploaded heads weighted by samples.
Heads are linear, so that ensemble's logits are exactly those of the averaged head, which is what is used.

Where this follows HtFLlib's code rather than the paper (which adds a diversity term to the generator's
loss, distils toward the ensemble's softened outputs and decays the clients' weight of the generated
term): HtFLlib's form is the one heterogeneous-FL comparisons report, so its losses are kept (with the
paper's Gaussian noise where HtFLlib's code draws uniform noise). Unlike HtFLlib, whose server knows every
client's label counts before training starts, the label distribution is learned from what clients upload:
round 1 trains without the generated term.

Shared: down, the global head, the generator (``generator.*``) and ``label_distribution`` (C,); up, the
head and ``label_counts`` (C,). Private: the rest of the model. Prediction: the local model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.algorithms.base import ClientContext, Upload, UploadBound, register_algorithm
from pfedlora.algorithms.lg_fedavg import LGFedAvg
from pfedlora.algorithms.state import State, check_dtypes, check_schema
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.config import AlgorithmOptions, option
from pfedlora.metrics import FlopMeter
from pfedlora.models import FeatureClassifier, init_parameters_
from pfedlora.seeding import torch_generator

GENERATOR_PREFIX = "generator."
LABEL_COUNTS, LABEL_DISTRIBUTION = "label_counts", "label_distribution"


@dataclass(frozen=True)
class FedGenOptions(AlgorithmOptions):
    """FedGen's ``[fedgen]`` section."""

    noise_dim: int = option(32, low=1)
    """Width of the generator's noise ε."""
    hidden_dim: int = option(256, low=1)
    """Width of the generator's hidden layer."""
    server_steps: int = option(100, low=1)
    """Adam steps of the generator per round on the server."""
    generator_lr: float = option(0.005, low=0, low_inclusive=False)
    """The server's Adam learning rate for the generator."""


class FeatureGenerator(nn.Module):
    """G(ŷ, ε): noise and a one-hot label to a feature of the models' width."""

    def __init__(self, noise_dim: int, num_classes: int, hidden_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.noise_dim, self.num_classes = noise_dim, num_classes
        self.hidden = nn.Linear(noise_dim + num_classes, hidden_dim, device="meta")
        self.norm = nn.BatchNorm1d(hidden_dim, device="meta")
        self.out = nn.Linear(hidden_dim, feature_dim, device="meta")

    def forward(self, labels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([noise, F.one_hot(labels, self.num_classes).to(noise.dtype)], dim=1)  # (B, ε + C)
        return self.out(F.relu(self.norm(self.hidden(inputs))))  # (B, feature_dim)


def draw_labels_and_noise(
    distribution: torch.Tensor, batch_size: int, noise_dim: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` labels drawn from ``distribution`` (C,) and Gaussian noise (B, noise_dim)."""
    labels = torch.multinomial(distribution.float(), batch_size, replacement=True, generator=generator)
    return labels, torch.randn(batch_size, noise_dim, generator=generator)


@register_algorithm
class FedGen(LGFedAvg):
    """LG-FedAvg's global head plus a server-trained feature generator used as extra training signal."""

    name = "fedgen"
    uploads_global_state = False  # label counts go up beside the head; the generator only comes down
    options_type: ClassVar[type[AlgorithmOptions]] = FedGenOptions

    def make_generator(self) -> FeatureGenerator:
        options: FedGenOptions = self.options
        return FeatureGenerator(options.noise_dim, self.num_classes, options.hidden_dim, self.feature_dim)

    def load_generator(self, state: State) -> FeatureGenerator:
        """The generator held in ``state`` (its ``generator.*`` tensors)."""
        module = self.make_generator().to_empty(device="cpu")
        tensors = {
            k.removeprefix(GENERATOR_PREFIX): v for k, v in state.items() if k.startswith(GENERATOR_PREFIX)
        }
        module.load_state_dict(tensors, strict=True)
        return module.to(next(iter(tensors.values())).device)

    def is_shared(self, key: str) -> bool:
        return key.startswith((self.head_prefix, GENERATOR_PREFIX)) or key in (
            LABEL_COUNTS,
            LABEL_DISTRIBUTION,
        )

    def initial_server_state(self, template: FeatureClassifier) -> State:
        """The template's head, a generator drawn from the run's seed, and no labels seen yet."""
        module = self.make_generator().to_empty(device="cpu")
        init_parameters_(module, torch_generator(self.config.seed, "fedgen-generator"))
        module.norm.reset_parameters()  # weight 1, bias 0, running mean 0 and variance 1
        device = next(template.parameters()).device
        state = {k: v.clone() for k, v in self.shared_state(template).items()}
        state.update({f"{GENERATOR_PREFIX}{k}": v.to(device) for k, v in module.state_dict().items()})
        state[LABEL_COUNTS] = torch.zeros(self.num_classes, device=device)
        return state

    def broadcast(self, server_state: State, client_id: int, server_round: int) -> State:
        """The head, the generator and the label distribution of the last round's uploads."""
        message = {k: v for k, v in server_state.items() if k != LABEL_COUNTS}
        counts = server_state[LABEL_COUNTS]
        message[LABEL_DISTRIBUTION] = counts / counts.sum().clamp_min(1.0)
        return message

    def receive(self, client: FeatureClassifier, message: State) -> None:
        """The global head overwrites the client's (the generator and labels serve training only)."""
        super().receive(client, {k: v for k, v in message.items() if k.startswith(self.head_prefix)})

    def train(self, client: FeatureClassifier, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)
        distribution = message[LABEL_DISTRIBUTION]
        generator = self.load_generator(message).train() if bool(distribution.sum() > 0) else None
        options: FedGenOptions = self.options
        batch_size = self.config.train.batch_size

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            real = F.cross_entropy(client(x), y)
            if generator is None:
                return real
            labels, noise = draw_labels_and_noise(distribution, batch_size, options.noise_dim, ctx.generator)
            with torch.no_grad():
                features = generator(labels.to(x.device), noise.to(x.device))  # (B, feature_dim)
            return real + F.cross_entropy(client.head(features), labels.to(x.device))

        train_on_client_data(
            client,
            list(client.parameters()),
            ctx,
            self.config.train,
            phase="local" if generator is None else "local+generated",  # steps of other FLOPs
            loss_fn=loss,
        )
        labels = ctx.data.dataset.train_y[ctx.data.train_indices]
        counts = torch.bincount(labels, minlength=self.num_classes).to(torch.float32)
        return Upload({**self.shared_state(client), LABEL_COUNTS: counts}, ctx.data.num_train)

    def check_upload(self, server_state: State, tensors: State) -> None:
        """The head's tensors as the global head, and finite non-negative label counts (C,), float32."""
        head = {k: v for k, v in server_state.items() if k.startswith(self.head_prefix)}
        counts = tensors.get(LABEL_COUNTS)
        check_schema({k: v for k, v in tensors.items() if k != LABEL_COUNTS}, head)
        if counts is None or tuple(counts.shape) != (self.num_classes,):
            raise ValueError(f"expected {LABEL_COUNTS!r} of shape ({self.num_classes},)")
        check_dtypes({LABEL_COUNTS: counts}, torch.float32)
        if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
            raise ValueError(f"{LABEL_COUNTS!r} must be finite and non-negative")

    def upload_bound(self, server_state: State) -> UploadBound:
        head = [v for k, v in server_state.items() if k.startswith(self.head_prefix)]
        return UploadBound(
            len(head) + 1, sum(t.numel() * t.element_size() for t in head) + 4 * self.num_classes
        )

    def aggregate(
        self,
        server_state: State,
        uploads: Sequence[Upload],
        server_round: int,
        meter: FlopMeter | None = None,
    ) -> State:
        """The heads combined as LG-FedAvg does (by ``federation.aggregator``, sample-weighted), then the
        generator trained against the new head on the round's labels."""
        if not uploads:
            return server_state
        heads = [{k: v for k, v in u.tensors.items() if k != LABEL_COUNTS} for u in uploads]
        head = self.combine(heads, [u.num_examples for u in uploads])
        counts = torch.stack([u.tensors[LABEL_COUNTS] for u in uploads]).sum(0)
        state = {**server_state, **head, LABEL_COUNTS: counts}
        if float(counts.sum()) > 0:
            state.update(self.train_generator(state, counts, server_round, meter or FlopMeter()))
        return state

    def train_generator(
        self, state: State, counts: torch.Tensor, server_round: int, meter: FlopMeter
    ) -> State:
        """``fedgen.server_steps`` Adam steps of the generator on CE(head(G(ŷ, ε)), ŷ), ŷ ~ ``counts``."""
        options: FedGenOptions = self.options
        module = self.load_generator(state).train()
        weight, bias = state[f"{self.head_prefix}weight"], state[f"{self.head_prefix}bias"]
        optimizer = torch.optim.Adam(module.parameters(), lr=options.generator_lr)
        stream = torch_generator(self.config.seed, "fedgen-server", server_round)
        batch_size = self.config.train.batch_size
        device = weight.device

        def step() -> None:
            labels, noise = draw_labels_and_noise(counts, batch_size, options.noise_dim, stream)
            labels, noise = labels.to(device), noise.to(device)
            loss = F.cross_entropy(F.linear(module(labels, noise), weight, bias), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(options.server_steps):
            meter.run("server-generator", batch_size, step)
        if not all(math.isfinite(float(p.detach().abs().max())) for p in module.parameters()):
            raise FloatingPointError(
                "the generator's parameters became non-finite; lower fedgen.generator_lr"
            )
        return {f"{GENERATOR_PREFIX}{k}": v.detach().clone() for k, v in module.state_dict().items()}
