"""FedSSA: the header's rows of the classes a client has seen, aggregated class by class.

Yi, Yu, Shi, Wang, Liu, Li. "FedSSA: Semantic Similarity-based Aggregation for Efficient
Model-Heterogeneous Personalized Federated Learning", IJCAI 2024, arXiv 2312.09006 (official code:
LipingYi/FedSSA); one of pFedLoRA's family. The header (fc3 of the CNNs, the same shape on every
architecture) is shared one class at a time: a class's unit is its weight row and bias. Each round a
sampled client, for every class c it holds,

1. stabilises its row: θ_c ← μ_t·θ_c(local) + (1 − μ_t)·θ_c(global), with
   μ_t = μ·cos((t − 1)π / (2·T)) in rounds t ≤ T + 1 and 0 after (μ = ``fedssa.mu``, T =
   ``fedssa.decay_rounds``): early on a client keeps part of what it had, later it takes the global row;
2. trains its whole model with cross-entropy for ``train.local_epochs``;
3. uploads the rows of its classes.

The server's row of class c is the plain mean of the round's uploaded rows of c (a class no upload holds
keeps its row); it starts from a template model's header. Prediction: the local model.

Where this differs from the official code, and why: the code adds the two rows (μ·local + global, so a
row's scale grows by up to 1 + μ in the first rounds); the convex mix is the default here, and
``fedssa.stabilization = "additive"`` gives the code's form. The code averages each class over the cached
rows of every client that ever uploaded it, selected this round or not; here over the round's uploads (as
every other method here treats partial participation), so the server keeps no per-client state. The server
sends the whole global header (every class's row, 2 KB each on the CNNs) rather than a client's own
classes, so it never needs to know which classes a client holds.

Shared: down, ``header.weight`` (C, D) and ``header.bias`` (C,); up, ``header.<c>`` (D + 1,), the weight row
and bias of each class c the client holds. Private: the rest of the model (and the other classes' rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from pfedlora.algorithms.base import Algorithm, ClientContext, Upload, UploadBound, register_algorithm
from pfedlora.algorithms.state import State, check_dtypes
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.config import AlgorithmOptions, option
from pfedlora.metrics import FlopMeter
from pfedlora.models import FeatureClassifier, build_model

HEADER_WEIGHT, HEADER_BIAS, ROW_PREFIX = "header.weight", "header.bias", "header."
STABILIZATIONS: tuple[str, ...] = ("convex", "additive")


@dataclass(frozen=True)
class FedSSAOptions(AlgorithmOptions):
    """FedSSA's ``[fedssa]`` section: the adaptive parameter stabilization."""

    mu: float = option(0.5, low=0, high=1)
    """μ: the share of its own row a client keeps in round 1."""
    decay_rounds: int = option(2, low=1)
    """T: μ_t decays to 0 over this many rounds (a cosine), and stays 0 after."""
    stabilization: str = option("convex", choices=STABILIZATIONS)
    """``convex``: μ_t·local + (1 − μ_t)·global; ``additive``: μ_t·local + global (the official code)."""


def head_tensors(client: FeatureClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight (C, D) and bias (C,) of ``client``'s linear head."""
    weight, bias = client.head.weight, client.head.bias
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise TypeError(f"{type(client).__name__}'s head is not a linear layer with a bias")
    return weight, bias


def stabilization_weight(mu: float, decay_rounds: int, server_round: int) -> float:
    """μ_t of round ``server_round`` (1-based): μ·cos((t − 1)π / (2T)) while t − 1 ≤ T, else 0."""
    step = server_round - 1
    return mu * math.cos(step * math.pi / (2 * decay_rounds)) if step <= decay_rounds else 0.0


@register_algorithm
class FedSSA(Algorithm[FeatureClassifier]):
    """Header rows of the classes each client holds, averaged class by class; the rest stays private."""

    name = "fedssa"
    options_type: ClassVar[type[AlgorithmOptions]] = FedSSAOptions
    received = "header"

    def create_client(self, arch: str, generator: torch.Generator) -> FeatureClassifier:
        return build_model(arch, self.input_shape, self.num_classes, generator, self.model_settings)

    def is_shared(self, key: str) -> bool:
        """The global header (down) and the class rows (up); no client tensor travels as it is."""
        return key.startswith(ROW_PREFIX)

    def initial_server_state(self, template: FeatureClassifier) -> State:
        weight, bias = head_tensors(template)
        return {HEADER_WEIGHT: weight.detach().clone(), HEADER_BIAS: bias.detach().clone()}

    def receive(self, client: FeatureClassifier, message: State) -> None:
        """Check the global header's keys and shapes; nothing is overwritten as it comes: the rows of the
        client's classes are mixed in at the start of :meth:`train`, which knows the round (so a client scored
        right after a download, ``federation.evaluate = "after-download"``, is scored as it stands)."""
        if set(message) != {HEADER_WEIGHT, HEADER_BIAS}:
            raise ValueError(
                f"expected the global {self.received} {[HEADER_WEIGHT, HEADER_BIAS]}, got {sorted(message)}"
            )
        weight, _ = head_tensors(client)
        if message[HEADER_WEIGHT].shape != weight.shape:
            shapes = f"{tuple(message[HEADER_WEIGHT].shape)}, the client's {tuple(weight.shape)}"
            raise ValueError(f"the global header has shape {shapes}")

    def train(self, client: FeatureClassifier, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)
        options: FedSSAOptions = self.options
        held = self.held_classes(ctx)
        mu = stabilization_weight(options.mu, options.decay_rounds, ctx.server_round)
        keep = 1.0 if options.stabilization == "additive" else 1.0 - mu
        weight, bias = head_tensors(client)
        with torch.no_grad():
            weight[held] = mu * weight[held] + keep * message[HEADER_WEIGHT][held].to(weight.dtype)
            bias[held] = mu * bias[held] + keep * message[HEADER_BIAS][held].to(bias.dtype)
        train_on_client_data(client, list(client.parameters()), ctx, self.config.train, phase="local")
        return Upload(self.class_rows(client, held), ctx.data.num_train)

    def held_classes(self, ctx: ClientContext) -> torch.Tensor:
        """The classes of the client's training samples, ascending."""
        return torch.unique(ctx.data.dataset.train_y[ctx.data.train_indices])

    def class_rows(self, client: FeatureClassifier, classes: torch.Tensor) -> State:
        """``header.<c>``: the weight row and the bias of each class in ``classes``."""
        weight, bias = (t.detach() for t in head_tensors(client))
        return {f"{ROW_PREFIX}{c}": torch.cat([weight[c], bias[c : c + 1]]).clone() for c in classes.tolist()}

    def read_rows(self, tensors: State) -> dict[int, torch.Tensor]:
        """Class -> row (D + 1,) of an upload; ValueError naming any key, class or shape out of the scheme."""
        width = self.feature_dim + 1
        rows: dict[int, torch.Tensor] = {}
        for key, value in tensors.items():
            label = key.removeprefix(ROW_PREFIX)
            if not key.startswith(ROW_PREFIX) or not label.isdecimal() or int(label) >= self.num_classes:
                raise ValueError(
                    f"unexpected tensor {key!r} in a header-row upload (expected header.<class>)"
                )
            if tuple(value.shape) != (width,):
                raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected ({width},)")
            rows[int(label)] = value
        return rows

    def check_upload(self, server_state: State, tensors: State) -> None:
        """Rows ``header.<c>`` of classes in range, of the header's width plus one, float32."""
        self.read_rows(tensors)
        check_dtypes(tensors, torch.float32)

    def upload_bound(self, server_state: State) -> UploadBound:
        """A row of every class."""
        return UploadBound(self.num_classes, self.num_classes * (self.feature_dim + 1) * 4)

    def aggregate(
        self,
        server_state: State,
        uploads: Sequence[Upload],
        server_round: int,
        meter: FlopMeter | None = None,
    ) -> State:
        """Each class's row: the plain mean of the round's uploaded rows of that class; others kept."""
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        for upload in uploads:
            for label, row in self.read_rows(upload.tensors).items():
                sums[label] = sums.get(label, torch.zeros_like(row, dtype=torch.float64)) + row.double()
                counts[label] = counts.get(label, 0) + 1
        weight, bias = server_state[HEADER_WEIGHT].clone(), server_state[HEADER_BIAS].clone()
        for label, total in sums.items():
            mean = total / counts[label]
            weight[label] = mean[:-1].to(weight.dtype)
            bias[label] = mean[-1].to(bias.dtype)
        return {HEADER_WEIGHT: weight, HEADER_BIAS: bias}
