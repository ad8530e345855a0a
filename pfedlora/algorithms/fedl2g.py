"""FedL2G: guiding vectors, one per class, learned on the server from the clients' meta-gradients.

Zhang, Hua, Cao, Liu et al. "Adaptive Guidance for Local Training in Heterogeneous Federated Learning"
(FedL2G, "learning to guide"), arXiv 2410.06490; one of HtFLlib's methods, in two variants:

- ``fedl2g-feat``: a guiding vector per class in the models' feature space (500-d for the CNNs), and the
  local loss CE(z, y) + λ·MSE(h, v_y) with h the features and z the logits of a sample of class y;
- ``fedl2g-logit``: a guiding vector per class in the logit space, and CE(z, y) + λ·MSE(z, v_y).

λ = ``<name>.lambda``; the MSE is a mean over the batch's samples and the vector's entries. Each client
keeps a fixed quiz split: ``quiz_batches`` batches of its training data, drawn once from the run's seed
and the client's id, never trained on. A sampled client in round t

1. trains its whole model on the rest of its data (the study split) with the guided loss (not in the
   ``warm_up_rounds`` first rounds, where it only learns to guide);
2. takes one differentiable plain SGD step (lr ``train.lr``) on the guided loss of ``study_batches`` study
   batches, θ' = θ − η·∇θ L(θ; V), and uploads the gradient of the quiz loss CE(θ'; quiz) with respect to
   the guiding vectors V, a row per class with a nonzero row (the classes of its study batches).

The server averages each class's uploaded rows over the clients that sent one (unweighted; a class no
client sent gets a zero row), clips the gradient's norm to 100 and takes one plain SGD step of
``server_lr`` on V. V starts at N(0, 1) draws from the run's seed. A client predicts with its own model.

Where this follows HtFLlib's code (the authors'): every rule above, the meta step's plain SGD (no momentum
or weight decay: what a differentiable step of HtFLlib's optimizer is) and its clip of 100. Where it
departs: local training uses the run's optimizer (momentum, weight decay, clipping) as every other method
here; the second-order gradient is taken with ``torch.func.functional_call`` instead of the ``higher``
package; the quiz split is a seeded draw instead of the first samples of a pre-shuffled file;
``warm_up_rounds`` defaults to 0 rather than 50, as this library's schedules are tens of rounds, not
HtFLlib's 1,000.

Shared: down, ``guide`` (C, D) (D the feature width, or C for the logit variant); up, ``guide_grad.<c>``
(D,) for each class with a gradient. Private: the whole local model and its quiz split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pfedlora.algorithms.base import Algorithm, ClientContext, Upload, UploadBound, register_algorithm
from pfedlora.algorithms.prototypes import check_prototype_upload, read_prototypes
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import Batch, autocast, train_on_client_data
from pfedlora.config import AlgorithmOptions, option
from pfedlora.data import ClientData
from pfedlora.metrics import FlopMeter
from pfedlora.models import FeatureClassifier, build_model
from pfedlora.seeding import torch_generator

GUIDE = "guide"
"""The broadcast guiding vectors, (C, D)."""
GRADIENT_PREFIX = "guide_grad."
"""An uploaded row of the quiz loss's gradient with respect to the guiding vectors, per class."""
SERVER_GRAD_CLIP = 100.0
"""The most the norm of the averaged gradient may be before the server's step (HtFLlib's value)."""


@dataclass(frozen=True)
class FedL2GOptions(AlgorithmOptions):
    """FedL2G's ``[fedl2g-feat]`` / ``[fedl2g-logit]`` section."""

    lambda_: float = option(1.0, low=0)
    """λ (key ``lambda``): the weight of the MSE toward the guiding vector of a sample's class."""
    server_lr: float = option(0.01, low=0, low_inclusive=False)
    """Learning rate of the server's plain SGD step on the guiding vectors."""
    study_batches: int = option(1, low=1)
    """Study batches in the meta step's lookahead."""
    quiz_batches: int = option(1, low=1)
    """Batches of the client's data held out as its quiz split (at most half its data)."""
    warm_up_rounds: int = option(0, low=0)
    """First rounds in which clients only compute meta-gradients and do not train."""


def guided_loss(
    logits: torch.Tensor, guided: torch.Tensor, labels: torch.Tensor, guide: torch.Tensor, lam: float
) -> torch.Tensor:
    """CE(logits, labels) + λ·MSE(guided, guide[labels]): ``guided`` (B, D) the features or the logits."""
    ce = F.cross_entropy(logits, labels)
    if lam == 0:
        return ce
    return ce + lam * F.mse_loss(guided, guide[labels].to(guided.dtype))


def lookahead_gradient(
    model: nn.Module,
    guided: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    guide: torch.Tensor,
    study: Sequence[Batch],
    quiz: Sequence[Batch],
    lr: float,
    lam: float,
) -> torch.Tensor:
    """∂ CE(θ'; quiz) / ∂V (C, D), with θ' = θ − lr·∇θ L(θ; V) one plain SGD step on the mean over the
    ``study`` batches of :func:`guided_loss` (``guided(x)``: the logits and what V pulls, by ``model``'s
    parameters θ that require grad) and CE the mean over the ``quiz`` batches of ``model``'s logits at θ'.
    ``model``'s parameters are left as they were; zero where λ = 0 (V then plays no part)."""
    vectors = guide.detach().clone().requires_grad_(True)
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    pseudo = torch.stack([guided_loss(*guided(x), y, vectors, lam) for x, y in study]).mean()
    gradients = torch.autograd.grad(pseudo, list(parameters.values()), create_graph=True)
    looked_ahead = {name: p - lr * g for (name, p), g in zip(parameters.items(), gradients, strict=True)}
    quiz_loss = torch.stack([F.cross_entropy(functional_call(model, looked_ahead, (x,)), y) for x, y in quiz])
    (gradient,) = torch.autograd.grad(quiz_loss.mean(), vectors, allow_unused=True)  # None where λ = 0
    return torch.zeros_like(vectors) if gradient is None else gradient.detach()


@register_algorithm
class FedL2GFeat(Algorithm[FeatureClassifier]):
    """Guiding vectors in feature space, learned on the server from the clients' quiz gradients."""

    name = "fedl2g-feat"
    options_type: ClassVar[type[AlgorithmOptions]] = FedL2GOptions
    received = "guiding vectors"

    @property
    def guide_dim(self) -> int:
        """The width of a guiding vector: the models' feature width."""
        return self.feature_dim

    def guided(self, model: FeatureClassifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, what the guiding vectors pull) of a batch: the logits and the features."""
        features = model.features(x)  # (B, D)
        return model.head(features), features

    def create_client(self, arch: str, generator: torch.Generator) -> FeatureClassifier:
        return build_model(arch, self.input_shape, self.num_classes, generator, self.model_settings)

    def is_shared(self, key: str) -> bool:
        """The guiding vectors (down) and the rows of their gradient (up); no model tensor travels."""
        return key == GUIDE or key.startswith(GRADIENT_PREFIX)

    def initial_server_state(self, template: FeatureClassifier) -> State:
        """N(0, 1) guiding vectors from the run's seed (as ``nn.Embedding`` draws)."""
        generator = torch_generator(self.config.seed, "fedl2g-guide")
        device = next(template.parameters()).device
        return {GUIDE: torch.randn(self.num_classes, self.guide_dim, generator=generator).to(device)}

    def receive(self, client: FeatureClassifier, message: State) -> None:
        """Nothing to store: the guiding vectors serve this round's training only."""
        self.read_guide(message)

    def read_guide(self, message: State) -> torch.Tensor:
        """The guiding vectors of ``message`` (C, D); ValueError unless it holds exactly those."""
        expected = (self.num_classes, self.guide_dim)
        if set(message) != {GUIDE} or tuple(message[GUIDE].shape) != expected:
            shapes = {k: tuple(v.shape) for k, v in message.items()}
            raise ValueError(f"expected the global guiding vectors {{'guide': {expected}}}, got {shapes}")
        return message[GUIDE]

    def quiz_split(self, data: ClientData, client_id: int) -> tuple[ClientData, ClientData]:
        """(study, quiz): the client's fixed quiz split of ``quiz_batches`` batches (at most half its training
        data, drawn from the run's seed and the client's id) and the rest."""
        size = min(self.options.quiz_batches * self.config.train.batch_size, data.num_train // 2)
        generator = torch_generator(self.config.seed, "fedl2g-quiz", client_id)
        order = torch.randperm(data.num_train, generator=generator).to(data.train_indices.device)
        quiz = data.train_indices[order[:size]].sort().values
        study = data.train_indices[order[size:]].sort().values
        return dataclasses.replace(data, train_indices=study), dataclasses.replace(data, train_indices=quiz)

    def train(self, client: FeatureClassifier, message: State, ctx: ClientContext) -> Upload:
        guide = self.read_guide(message)
        options: FedL2GOptions = self.options
        study, quiz = self.quiz_split(ctx.data, ctx.client_id)
        if ctx.server_round > options.warm_up_rounds:

            def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                logits, guided = self.guided(client, x)
                return guided_loss(logits, guided, y, guide, options.lambda_)

            parameters = list(client.parameters())
            train_on_client_data(
                client, parameters, ctx, self.config.train, phase="local", loss_fn=loss, data=study
            )
        if quiz.num_train == 0:
            return Upload({}, study.num_train)
        gradient = self.quiz_gradient(client, guide, study, quiz, ctx)  # (C, D)
        rows = torch.nonzero(gradient.abs().sum(1) > 0).flatten().tolist()
        return Upload({f"{GRADIENT_PREFIX}{c}": gradient[c].clone() for c in rows}, study.num_train)

    def quiz_gradient(
        self,
        client: FeatureClassifier,
        guide: torch.Tensor,
        study: ClientData,
        quiz: ClientData,
        ctx: ClientContext,
    ) -> torch.Tensor:
        """:func:`lookahead_gradient` on the client's first ``study_batches`` study batches and
        ``quiz_batches`` quiz batches of this round: (C, D), float32. Charged to ``ctx.meter`` as the
        architecture's "meta" step."""
        options: FedL2GOptions = self.options
        train = self.config.train

        def batches(data: ClientData, count: int) -> list[Batch]:
            return list(islice(data.train_batches(train.batch_size, ctx.generator, shuffle=True), count))

        study_batches, quiz_batches = (
            batches(study, options.study_batches),
            batches(quiz, options.quiz_batches),
        )

        def step() -> torch.Tensor:
            with autocast(train, guide.device):
                return lookahead_gradient(
                    client,
                    partial(self.guided, client),
                    guide,
                    study_batches,
                    quiz_batches,
                    train.lr,
                    options.lambda_,
                )

        samples = sum(len(y) for _, y in study_batches) + sum(len(y) for _, y in quiz_batches)
        return ctx.meter.run((ctx.arch, "meta"), samples, step).float()

    def check_upload(self, server_state: State, tensors: State) -> None:
        """Gradient rows of classes in range, (D,) each, float32."""
        check_prototype_upload(
            tensors, self.num_classes, self.guide_dim, with_counts=False, prefix=GRADIENT_PREFIX
        )

    def upload_bound(self, server_state: State) -> UploadBound:
        """A float32 gradient row of every class."""
        return UploadBound(self.num_classes, self.num_classes * self.guide_dim * 4)

    def aggregate(
        self,
        server_state: State,
        uploads: Sequence[Upload],
        server_round: int,
        meter: FlopMeter | None = None,
    ) -> State:
        """V − server_lr·clip(G, 100): G's row c the mean of the rows of c uploaded this round (zero where
        none was)."""
        guide = server_state[GUIDE]
        sums = torch.zeros_like(guide, dtype=torch.float64)  # (C, D)
        senders = torch.zeros(self.num_classes, dtype=torch.float64, device=guide.device)  # (C,)
        for upload in uploads:
            for label, (row, _) in read_prototypes(
                upload.tensors, self.num_classes, self.guide_dim, with_counts=False, prefix=GRADIENT_PREFIX
            ).items():
                sums[label] += row.to(torch.float64)
                senders[label] += 1
        if not bool((senders > 0).any()):
            return server_state
        gradient = sums / senders.clamp_min(1).unsqueeze(1)  # (C, D)
        norm = float(gradient.norm())
        if norm > SERVER_GRAD_CLIP:
            gradient *= SERVER_GRAD_CLIP / (norm + 1e-6)  # as clip_grad_norm_ scales
        return {GUIDE: (guide.to(torch.float64) - self.options.server_lr * gradient).to(guide.dtype)}


@register_algorithm
class FedL2GLogit(FedL2GFeat):
    """Guiding vectors in logit space."""

    name = "fedl2g-logit"

    @property
    def guide_dim(self) -> int:
        """A guiding vector is a logit vector: one entry per class."""
        return self.num_classes

    def guided(self, model: FeatureClassifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, logits): the guiding vectors pull the logits."""
        logits = model(x)
        return logits, logits
