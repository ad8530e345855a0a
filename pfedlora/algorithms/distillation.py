"""Pieces shared by the baselines that train a private and a shared model side by side (FML, FedKD, FedAPEN).

SPEC §4: every KL term is KL(teacher ‖ student) with the teacher detached, reduced per sample
(``"batchmean"``) unless the algorithm's ``kl_reduction`` asks for the per-element mean (``"mean"``). The
client state of these baselines is a :class:`ModelPair` (private ``local`` model, ``shared`` copy of the small
homogeneous model), and both models step together on every batch (:func:`mutual_sgd`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.algorithms.base import Algorithm, ClientContext
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.config import ExperimentConfig, SharedModelOptions, TrainConfig, option
from pfedlora.data import ClientData
from pfedlora.models import FeatureClassifier, build_model, model_settings

KL_REDUCTIONS: tuple[str, ...] = ("batchmean", "mean")


@dataclass(frozen=True)
class DistillationOptions(SharedModelOptions):
    """Options of the algorithms that distil between a private and a shared model (FML, FedKD, FedAPEN)."""

    kl_reduction: str = option("batchmean", choices=KL_REDUCTIONS)
    """Reduction of every KL term: "batchmean" (per-sample mean, SPEC §4) or "mean" (per element)."""


def kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "batchmean"
) -> torch.Tensor:
    """KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s) over classes (dim 1), with the teacher detached.

    ``"batchmean"`` divides the total by the batch size; ``"mean"`` by the number of elements (batch size ×
    classes). Gradients reach only ``student_logits``.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is unknown; allowed: {', '.join(KL_REDUCTIONS)}")
    log_p_student = F.log_softmax(student_logits, dim=1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits.detach(), dim=1)  # (B, C)
    pointwise = log_p_teacher.exp() * (log_p_teacher - log_p_student)  # (B, C)
    # Written out rather than F.kl_div, whose "mean" warns that it will change meaning.
    return pointwise.sum() / pointwise.shape[0] if reduction == "batchmean" else pointwise.mean()


SHARED_PREFIX = "shared."
"""State-dict prefix of the shared homogeneous model in a :class:`ModelPair` (what FML/FedAPEN send)."""


class ModelPair(nn.Module):
    """A client's private model ``local`` (its own architecture) beside a copy of the ``shared`` model.

    Calling the pair runs ``local`` (the prediction of FML and FedKD); subclasses add private parameters.
    """

    def __init__(self, local: FeatureClassifier, shared: FeatureClassifier) -> None:
        super().__init__()
        self.local = local
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(x)


def build_pair(
    config: ExperimentConfig,
    arch: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    generator: torch.Generator,
) -> tuple[FeatureClassifier, FeatureClassifier]:
    """A private model of architecture ``arch`` and a model of the run's algorithm's ``shared_arch``, from
    ``generator``."""
    options = config.algorithm_options
    if not isinstance(options, SharedModelOptions):
        raise TypeError(f"algorithm {config.algorithm!r} shares no model (its options have no shared_arch)")
    settings = model_settings(config)
    local = build_model(arch, input_shape, num_classes, generator, settings)
    shared = build_model(options.shared_arch, input_shape, num_classes, generator, settings)
    return local, shared


def load_shared_(pair: ModelPair, message: Mapping[str, torch.Tensor]) -> None:
    """Overwrite ``pair.shared`` with the ``shared.*`` tensors of ``message`` (keys and shapes must match)."""
    foreign = [k for k in message if not k.startswith(SHARED_PREFIX)]
    if foreign:
        raise KeyError(f"message holds tensors outside {SHARED_PREFIX!r}: {', '.join(foreign)}")
    pair.shared.load_state_dict({k.removeprefix(SHARED_PREFIX): v for k, v in message.items()}, strict=True)


def mutual_sgd(
    pair: nn.Module,
    parameters: Sequence[nn.Parameter],
    losses: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    data: ClientData,
    ctx: ClientContext,
    train: TrainConfig,
    phase: str,
) -> None:
    """Train two models together for ``train.local_epochs``: one SGD step per batch on both, from that batch.

    ``losses(x, y)`` returns ``(loss_a, loss_b)``, each written so that its gradient reaches only its own
    model (the other model's outputs detached). One optimizer over the union of both parameter sets then
    steps on ``loss_a + loss_b``: the gradient of the sum w.r.t. model A's parameters is the gradient of
    ``loss_a`` alone (``loss_b`` sees A only through detached outputs) and vice versa, and SGD's momentum
    and weight decay act parameter by parameter, so this equals two optimizers stepping on their own loss.
    The one difference: gradient-norm clipping (``train.grad_clip``) is applied to the norm over the union,
    so when it triggers both models are scaled by the same factor. ``parameters`` lists what trains; every
    other parameter of ``pair`` is frozen meanwhile. Charged to ``ctx.meter`` as ``(ctx.arch, phase)``.
    """

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss_a, loss_b = losses(x, y)
        return loss_a + loss_b

    train_on_client_data(pair, parameters, ctx, train, phase=phase, loss_fn=loss, data=data)


PairT = TypeVar("PairT", bound=ModelPair)


class SharedModelAlgorithm(Algorithm[PairT]):
    """Base of FML, FedKD and FedAPEN: the shared small model (``shared.*``) is what travels, and each
    batch trains the private and the shared model together on the pair of losses of :meth:`losses`."""

    def is_shared(self, key: str) -> bool:
        return key.startswith(SHARED_PREFIX)

    @abstractmethod
    def losses(self, client: PairT, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_local, loss_shared)`` of one batch, each reaching only its own model's parameters."""

    def train_mutually(
        self, client: PairT, parameters: Sequence[nn.Parameter], ctx: ClientContext, data: ClientData
    ) -> None:
        """:func:`mutual_sgd` on ``parameters`` over ``data`` for ``train.local_epochs``."""
        mutual_sgd(
            client, parameters, partial(self.losses, client), data, ctx, self.config.train, phase="mutual"
        )
