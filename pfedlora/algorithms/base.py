"""The contract between the one round loop and an algorithm.

An algorithm says what it shares (:meth:`Algorithm.is_shared`, a predicate over the client state's keys),
how a client trains on what the server sent (:meth:`Algorithm.train`), how the server combines uploads
(:meth:`Algorithm.aggregate`) and how a client predicts (:meth:`Algorithm.predict`). A client's private
state is an ``nn.Module`` owned by the round loop and passed in explicitly; the algorithm object itself
holds only frozen configuration, so the same instance serves the simulator and Flower alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pfedlora.algorithms.aggregate import weighted_average
from pfedlora.algorithms.screening import check_schema
from pfedlora.config import ExperimentConfig
from pfedlora.data import ClientData
from pfedlora.metrics import FlopMeter

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Upload:
    """What one client sends back: its tensors and the number of training samples behind them."""

    tensors: State
    num_examples: int


@dataclass
class ClientContext:
    """What a client's training round needs besides its own state."""

    client_id: int
    arch: str
    server_round: int
    data: ClientData
    generator: torch.Generator
    """Batch order and augmentation of this client in this round."""
    meter: FlopMeter


class Algorithm(ABC):
    """One federated algorithm; subclasses override the hooks below and nothing else."""

    name: ClassVar[str]
    uploads_global_state: ClassVar[bool] = False
    """True where a client uploads tensors of the broadcast global state's schema and the server averages
    them (so privacy clipping of upload − received, and Gaussian noise on the mean, apply)."""

    def __init__(self, config: ExperimentConfig, input_shape: tuple[int, int, int], num_classes: int) -> None:
        self.config = config
        self.input_shape = input_shape
        self.num_classes = num_classes

    @abstractmethod
    def create_client(self, arch: str, generator: torch.Generator) -> nn.Module:
        """A fresh private client state for architecture ``arch``, initialised from ``generator``."""

    @abstractmethod
    def is_shared(self, key: str) -> bool:
        """Whether the client-state tensor ``key`` is shared with the server (and thus sent)."""

    @abstractmethod
    def train(self, client: nn.Module, message: State, ctx: ClientContext) -> Upload:
        """Train ``client`` in place for one round, starting from the server's ``message``."""

    def shared_state(self, client: nn.Module) -> State:
        """The tensors of ``client`` that :meth:`is_shared` selects, detached."""
        return {k: v.detach() for k, v in client.state_dict().items() if self.is_shared(k)}

    def initial_server_state(self, template: nn.Module) -> State:
        """The global state before round 1, taken from a freshly initialised template client."""
        return {k: v.clone() for k, v in self.shared_state(template).items()}

    def broadcast(self, server_state: State, client_id: int, server_round: int) -> State:
        """What the server sends to ``client_id`` in ``server_round`` (by default the whole global state)."""
        return server_state

    def aggregate(self, server_state: State, uploads: Sequence[Upload], server_round: int) -> State:
        """The new global state: by default the sample-weighted mean of the uploads (FedAvg)."""
        if not uploads:
            return server_state
        return weighted_average([u.tensors for u in uploads], [u.num_examples for u in uploads])

    def check_upload(self, server_state: State, tensors: State) -> None:
        """Raise ValueError naming the problem unless ``tensors`` is what :meth:`aggregate` expects.

        By default: exactly the global state's tensors, with their shapes and dtypes.
        """
        check_schema(tensors, server_state)

    def predict(self, client: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Class scores of the client's personalized predictor for a batch ``x``."""
        return client(x)
