"""Class prototypes (per-class mean features) as computed, sent and read by FedGH and FedProto.

A client's prototype of class ``c`` is the mean of its model's 500-d representation over its training
samples of class ``c`` (Tan et al., FedProto, arXiv 2105.00243; Yi et al., FedGH, arXiv 2303.13137). On
the wire a client sends one ``prototype.<c>`` tensor (500,) per class it holds, and, where the server needs
it, ``count.<c>`` (a float32 scalar: its number of samples of class ``c``); absent classes send nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import partial

import torch

from pfedlora.algorithms.base import ClientContext, Upload
from pfedlora.algorithms.state import check_dtypes
from pfedlora.data import ClientData
from pfedlora.metrics import FlopMeter
from pfedlora.models import FeatureClassifier

PROTOTYPE_PREFIX = "prototype."
COUNT_PREFIX = "count."


def class_feature_means(
    model: FeatureClassifier,
    data: ClientData,
    num_classes: int,
    batch_size: int,
    meter: FlopMeter,
    kind: Hashable,
    represent: Callable[[torch.Tensor], torch.Tensor] | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean of ``model.features`` (or of ``represent(x)``, e.g. the logits, ``width`` wide) over
    the client's training data, and per-class counts.

    Runs in eval mode without autograd (the mode is restored after), every forward charged to ``meter``
    under ``kind``. Returns ``(means, counts)`` of shapes ``(num_classes, D)`` (float32, zero rows for
    classes the client lacks; D the representation's width, 500 for the CNNs' features) and
    ``(num_classes,)`` (int64).
    """
    represent = represent or model.features
    width = model.feature_dim if width is None else width
    was_training = model.training
    model.eval()
    device = data.train_indices.device
    sums = torch.zeros(num_classes, width, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def accumulate(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            features = represent(x)  # (B, D)
        sums.index_add_(0, y, features.to(torch.float64))
        counts.index_add_(0, y, torch.ones_like(y))

    try:
        for x, y in data.eval_batches("train", batch_size):
            meter.run(kind, len(y), partial(accumulate, x, y))
    finally:
        model.train(was_training)
    means = sums / counts.clamp_min(1).unsqueeze(1).to(torch.float64)  # (num_classes, D)
    return means.to(torch.float32), counts


def prototype_upload(
    model: FeatureClassifier,
    ctx: ClientContext,
    num_classes: int,
    batch_size: int,
    *,
    with_counts: bool,
    represent: Callable[[torch.Tensor], torch.Tensor] | None = None,
    width: int | None = None,
) -> Upload:
    """The class means of ``model``'s features (or of ``represent``, ``width`` wide) over the client's
    training data as its upload (:func:`prototype_payload`), their forward passes charged to ``ctx.meter``
    as the architecture's "prototypes" step."""
    means, counts = class_feature_means(
        model, ctx.data, num_classes, batch_size, ctx.meter, (ctx.arch, "prototypes"), represent, width
    )
    return Upload(prototype_payload(means, counts, with_counts=with_counts), ctx.data.num_train)


def check_prototype_upload(
    tensors: Mapping[str, torch.Tensor],
    num_classes: int,
    feature_dim: int,
    *,
    with_counts: bool,
    prefix: str = PROTOTYPE_PREFIX,
) -> None:
    """Raise ValueError unless ``tensors`` is a valid float32 payload for :func:`read_prototypes`."""
    read_prototypes(tensors, num_classes, feature_dim, with_counts=with_counts, prefix=prefix)
    check_dtypes(tensors, torch.float32)


def prototype_payload(
    means: torch.Tensor, counts: torch.Tensor, *, with_counts: bool
) -> dict[str, torch.Tensor]:
    """``prototype.<c>`` (and with ``with_counts`` also ``count.<c>``) for every class with samples."""
    payload: dict[str, torch.Tensor] = {}
    for c in torch.nonzero(counts > 0).flatten().tolist():
        payload[f"{PROTOTYPE_PREFIX}{c}"] = means[c].detach().clone()  # (500,)
        if with_counts:
            payload[f"{COUNT_PREFIX}{c}"] = counts[c].to(torch.float32)  # ()
    return payload


def read_prototypes(
    tensors: Mapping[str, torch.Tensor],
    num_classes: int,
    feature_dim: int,
    *,
    with_counts: bool,
    prefix: str = PROTOTYPE_PREFIX,
) -> dict[int, tuple[torch.Tensor, float]]:
    """Class -> (prototype (feature_dim,), count) from a payload; count is 1.0 when ``with_counts`` is off.
    ``prefix`` names the per-class vectors (``prototype.`` unless the vectors are something else, e.g.
    FedL2G's gradient rows).

    Raises ValueError on any key outside the scheme, a class out of range, a wrong shape, a prototype
    without its count (or the reverse) or a non-positive count.
    """
    prototypes: dict[int, torch.Tensor] = {}
    counts: dict[int, float] = {}
    for key, value in tensors.items():
        kind, _, label = key.rpartition(".")
        kind += "."
        if kind not in (prefix, COUNT_PREFIX) or (kind == COUNT_PREFIX and not with_counts):
            raise ValueError(f"unexpected tensor {key!r} in a payload of {prefix}<class> vectors")
        if not label.isdecimal() or not 0 <= int(label) < num_classes:
            raise ValueError(f"tensor {key!r} names no class in 0..{num_classes - 1}")
        if kind == prefix:
            if tuple(value.shape) != (feature_dim,):
                raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected ({feature_dim},)")
            prototypes[int(label)] = value
        else:
            if value.numel() != 1 or float(value) <= 0:
                raise ValueError(f"{key!r} must be one positive count, got {value.tolist()}")
            counts[int(label)] = float(value)
    if with_counts and counts.keys() != prototypes.keys():
        raise ValueError(
            f"prototypes and counts name different classes: {sorted(prototypes)} vs {sorted(counts)}"
        )
    return {c: (prototypes[c], counts.get(c, 1.0)) for c in sorted(prototypes)}


def uploaded_prototypes(
    uploads: Sequence[Upload], num_classes: int, feature_dim: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every prototype of count-free ``uploads`` stacked, (P, feature_dim), with its class, (P,); None
    where the uploads hold none."""
    pairs = [
        (prototype, label)
        for upload in uploads
        for label, (prototype, _) in read_prototypes(
            upload.tensors, num_classes, feature_dim, with_counts=False
        ).items()
    ]
    if not pairs:
        return None
    features = torch.stack([p for p, _ in pairs])  # (P, feature_dim)
    return features, torch.tensor([c for _, c in pairs], device=features.device)
