"""FD (federated distillation): clients share per-class mean logits and distil toward the global ones.

Jeong, Oh, Kim, Bennis, Kim. "Communication-Efficient On-Device Machine Learning: Federated Distillation
and Augmentation under Non-IID Private Data", NeurIPS 2018 workshop, arXiv 1811.11479; one of HtFLlib's
methods. Each round a sampled client stores the global per-class logits it receives and trains its whole
model on

    CE(z, y) + λ·KL(softmax(g_y) ‖ softmax(z))            (``fd.regulariser = "kl"``, the paper's)
    CE(z, y) + λ·MSE(z, g_y)                              (``fd.regulariser = "mse"``, HtFLlib's code)

where z is the model's logits of a sample of class y and g_y the global mean logits of class y (samples
whose class has no global logits yet contribute the cross-entropy alone), λ = ``fd.lambda``. Then it
computes with the trained model (eval mode, no gradients) the mean logit vector of each class it holds and
uploads them with their sample counts. The server's logits of class c are the count-weighted mean of the
uploaded ones (the mean over every sample of c that took part; HtFLlib weights each client's mean
equally); a class no upload of the round holds keeps its previous logits. Prediction: the local model.

Where this follows the paper rather than HtFLlib: the distillation term is the paper's divergence between
the softmax outputs (the teacher being the global mean logits), not HtFLlib's MSE between logits (kept as
an option); and the global logits are averaged over samples, as the paper's "global average logit" is.

Shared: down, ``prototype.<c>`` (C,) for each class with global logits; up, ``prototype.<c>`` (C,) and
``count.<c>`` for each class the client holds (the prototype scheme of :mod:`.prototypes`, over logits).
Private: the whole local model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pfedlora.algorithms.base import ClientContext, register_algorithm
from pfedlora.algorithms.distillation import kl_divergence
from pfedlora.algorithms.fedproto import FedProto, PrototypeClient
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.config import AlgorithmOptions, option
from pfedlora.models import FeatureClassifier

REGULARISERS: tuple[str, ...] = ("kl", "mse")


@dataclass(frozen=True)
class FDOptions(AlgorithmOptions):
    """FD's ``[fd]`` section."""

    lambda_: float = option(1.0, low=0)
    """λ (key ``lambda``): the weight of the distillation toward the global logits of a sample's class."""
    regulariser: str = option("kl", choices=REGULARISERS)
    """``kl``: KL(softmax(g_y) ‖ softmax(z)) per sample (the paper); ``mse``: MSE(z, g_y) (HtFLlib)."""


def distillation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    global_logits: torch.Tensor,
    mask: torch.Tensor,
    lam: float,
    regulariser: str = "kl",
) -> torch.Tensor:
    """CE(logits, labels) + λ·D(global logits of each label, logits) over the samples whose label has
    global logits (``mask``); D is the per-sample KL of :func:`kl_divergence` summed over those samples and
    divided by the batch size, or the MSE over all of the batch's elements with the others' rows zero."""
    if regulariser not in REGULARISERS:
        raise ValueError(f"regulariser {regulariser!r} is unknown; allowed: {', '.join(REGULARISERS)}")
    ce = F.cross_entropy(logits, labels)
    known = mask[labels]  # (B,)
    if not bool(known.any()) or lam == 0:
        return ce
    teacher = global_logits[labels]  # (B, C)
    if regulariser == "mse":
        return ce + lam * ((logits - teacher) * known.unsqueeze(1)).square().mean()
    kept = known.nonzero().flatten()
    total = kl_divergence(logits[kept], teacher[kept], "batchmean") * len(kept)
    return ce + lam * total / len(labels)


@register_algorithm
class FD(FedProto):
    """Per-class mean logits shared and averaged; local training distils toward the global ones."""

    name = "fd"
    options_type = FDOptions

    @property
    def prototype_dim(self) -> int:
        """A class's shared vector is a logit vector: one entry per class."""
        return self.num_classes

    def represent(self, model: FeatureClassifier) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model's logits."""
        return model

    def train_local(self, client: PrototypeClient, ctx: ClientContext) -> None:
        """SGD on :func:`distillation_loss` over the whole local model."""
        model, options = client.model, self.options
        global_logits, mask = client.global_prototypes, client.prototype_mask

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return distillation_loss(model(x), y, global_logits, mask, options.lambda_, options.regulariser)

        train_on_client_data(
            client, list(model.parameters()), ctx, self.config.train, phase="local", loss_fn=loss
        )

    def predict(self, client: PrototypeClient, x: torch.Tensor) -> torch.Tensor:
        """The local model's logits."""
        scores: torch.Tensor = client(x)
        return scores
