"""FedAPEN: a private and a shared model trained mutually, mixed by a learned per-client weight λ.

Qin, Deng, Zhao, Yan. "FedAPEN: Personalized Cross-silo Federated Learning with Adaptability to
Statistical Heterogeneity", KDD 2023, DOI 10.1145/3580305.3599344 (no arXiv version found; the arXiv id
2310.08681 sometimes quoted for it belongs to a different paper). One of pFedLoRA's baselines (arXiv
2310.13283). Every client keeps a private model p (its own architecture), a copy of the shared model s
(``fedapen.shared_arch``, cnn5 by default) and a mixing weight λ ∈ [0, 1] (initially 0.5). A fraction
``fedapen.holdout_fraction`` of its training data, drawn once and for all from its seed and
``client_id``, is its adaptability set and is never trained on. Each round a sampled client (SPEC §4):

1. overwrites s with the global one;
2. fits λ with p and s frozen: ``fedapen.lambda_epochs`` passes of plain SGD (no momentum or
   weight decay) with lr ``fedapen.lambda_lr`` on CE(λ z_p + (1−λ) z_s) over the adaptability
   set, λ clamped to [0, 1] after every step;
3. with λ fixed, trains p and s together for ``train.local_epochs`` on the rest, per batch
   loss_p = CE(z_p) + KL(s ‖ p) + CE(λ z_p + (1−λ) z_s.detach()) and
   loss_s = CE(z_s) + KL(p ‖ s) + CE(λ z_p.detach() + (1−λ) z_s);
4. uploads s with the number of samples it trained on; the server takes the sample-weighted mean.

Prediction: λ z_p + (1−λ) z_s (a mix of logits, as SPEC §4 writes it).

Shared: s (state-dict keys ``shared.*``). Private: p (``local.*``) and λ (``mixing_weight``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.algorithms.base import ClientContext, Upload, register_algorithm
from pfedlora.algorithms.distillation import (
    DistillationOptions,
    ModelPair,
    SharedModelAlgorithm,
    build_pair,
    kl_divergence,
)
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.config import option
from pfedlora.data import ClientData
from pfedlora.models import FeatureClassifier
from pfedlora.seeding import torch_generator

INITIAL_MIXING_WEIGHT = 0.5


class MixedPair(ModelPair):
    """The FedAPEN client: private ``local`` (p), ``shared`` (s) and λ (``mixing_weight``)."""

    def __init__(self, local: FeatureClassifier, shared: FeatureClassifier) -> None:
        super().__init__(local, shared)
        self.mixing_weight = nn.Parameter(torch.tensor(INITIAL_MIXING_WEIGHT))  # λ, a scalar

    def mix(self, z_local: torch.Tensor, z_shared: torch.Tensor) -> torch.Tensor:
        """λ z_p + (1−λ) z_s."""
        return self.mixing_weight * z_local + (1 - self.mixing_weight) * z_shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.local(x), self.shared(x))


def split_holdout(
    data: ClientData, fraction: float, generator: torch.Generator
) -> tuple[ClientData, ClientData]:
    """``(rest, holdout)``: two views of ``data`` that split its training indices at random.

    The permutation comes from ``generator``; the holdout gets round(fraction · n) of the n samples, at
    least 1 and at most n − 1 (none if n < 2). The views share ``data``'s dataset; only indices are new.
    """
    n = data.num_train
    size = min(max(1, round(fraction * n)), n - 1) if n >= 2 else 0
    order = torch.randperm(n, generator=generator).to(data.train_indices.device)
    shuffled = data.train_indices[order]
    holdout = dataclasses.replace(data, train_indices=shuffled[:size].sort().values)
    rest = dataclasses.replace(data, train_indices=shuffled[size:].sort().values)
    return rest, holdout


@dataclasses.dataclass(frozen=True)
class FedAPENOptions(DistillationOptions):
    """FedAPEN's ``[fedapen]`` section."""

    holdout_fraction: float = option(0.05, low=0, high=0.5, low_inclusive=False)
    """The share of each client's training data held out, once and for all, as its adaptability set."""
    lambda_epochs: int = option(5, low=1)
    """Passes over the adaptability set that fit λ each round."""
    lambda_lr: float = option(0.01, low=0, low_inclusive=False)
    """Learning rate of λ's projected SGD."""


@register_algorithm
class FedAPEN(SharedModelAlgorithm[MixedPair]):
    """Mutual learning of the private model and a shared small model, mixed by a learned weight λ."""

    name = "fedapen"
    uploads_global_state = True
    options_type = FedAPENOptions

    def create_client(self, arch: str, generator: torch.Generator) -> MixedPair:
        return MixedPair(*build_pair(self.config, arch, self.input_shape, self.num_classes, generator))

    def split(self, data: ClientData, client_id: int) -> tuple[ClientData, ClientData]:
        """``(rest, adaptability set)`` of client ``client_id``: the same split in every round."""
        generator = torch_generator(self.config.seed, "fedapen-holdout", client_id)
        return split_holdout(data, self.options.holdout_fraction, generator)

    def losses(
        self, client: MixedPair, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_p, loss_s)`` on one batch with λ fixed; each reaches only its own model."""
        reduction = self.options.kl_reduction
        z_local, z_shared = client.local(x), client.shared(x)  # (B, C) each
        mixing = client.mixing_weight.detach()
        loss_local = (
            F.cross_entropy(z_local, y)
            + kl_divergence(z_local, z_shared, reduction)
            + F.cross_entropy(mixing * z_local + (1 - mixing) * z_shared.detach(), y)
        )
        loss_shared = (
            F.cross_entropy(z_shared, y)
            + kl_divergence(z_shared, z_local, reduction)
            + F.cross_entropy(mixing * z_local.detach() + (1 - mixing) * z_shared, y)
        )
        return loss_local, loss_shared

    def fit_mixing_weight(self, client: MixedPair, holdout: ClientData, ctx: ClientContext) -> None:
        """λ by projected SGD on CE(λ z_p + (1−λ) z_s) over ``holdout``, both models frozen: after every
        step λ is clamped back into [0, 1]."""
        weight = client.mixing_weight

        def clamp() -> None:
            with torch.no_grad():
                weight.clamp_(0.0, 1.0)

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                z_local, z_shared = client.local(x), client.shared(x)  # (B, C) each
            return F.cross_entropy(client.mix(z_local, z_shared), y)

        options: FedAPENOptions = self.options
        train = self.config.train
        plain = dataclasses.replace(train, momentum=0.0, weight_decay=0.0)
        if holdout.num_train > 0:
            train_on_client_data(
                client,
                [weight],
                ctx,
                plain,
                phase="mixing-weight",
                epochs=options.lambda_epochs,
                lr=options.lambda_lr,
                loss_fn=loss,
                data=holdout,
                after_step=clamp,
            )

    def train(self, client: MixedPair, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)  # the global shared model overwrites the client's copy
        rest, holdout = self.split(ctx.data, ctx.client_id)
        self.fit_mixing_weight(client, holdout, ctx)
        self.train_mutually(client, [*client.local.parameters(), *client.shared.parameters()], ctx, rest)
        return Upload(self.shared_state(client), rest.num_train)
