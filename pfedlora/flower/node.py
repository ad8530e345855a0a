"""What a Flower node does for one message: the client side of the simulator's code, on one client.

A node is one client, named by a stable id (``partition-id`` in its node config, the simulator's client
id). Its private state (the algorithm's whole client module: local model, shared copies, adapters, any
learned coefficients; no optimizer state outlives a round) lives in a per-client checkpoint file
``<state-dir>/<experiment>/client-<id>.safetensors``, written atomically after every round it trains, so
nothing depends on the process (Flower runs every message in a new one) or on ``context.state``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pfedlora.algorithms import AnyAlgorithm, ClientContext, State, create_algorithm
from pfedlora.config import ExperimentConfig
from pfedlora.data import ClientData, Dataset, load_dataset
from pfedlora.errors import ConfigError
from pfedlora.metrics import FlopMeter
from pfedlora.models import MODELS
from pfedlora.seeding import torch_generator
from pfedlora.simulation.checkpoint import save_atomic
from pfedlora.simulation.federation import build_clients, create_client_state, resolve_device
from pfedlora.simulation.local import client_accuracy
from pfedlora.simulation.loop import ClientResult
from pfedlora.simulation.rounds import client_update

DEFAULT_STATE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pfedlora" / "flower"


@dataclass(frozen=True)
class NodeSettings:
    """What a node's own configuration says: who it is, its architecture, its data and state folders."""

    client_id: int
    num_clients: int | None = None
    arch: str | None = None
    data_dir: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> NodeSettings:
        """From Flower node config keys ``partition-id`` (required), ``num-partitions``, ``arch``,
        ``data-dir`` and ``state-dir``."""
        if "partition-id" not in node_config:
            raise ConfigError("node config lacks partition-id (the stable client id of this node)")
        arch = node_config.get("arch")
        if arch is not None:
            MODELS.get(str(arch), "node config arch")
        total = node_config.get("num-partitions")
        return cls(
            client_id=_integer(node_config["partition-id"], "partition-id"),
            num_clients=_integer(total, "num-partitions") if total is not None else None,
            arch=str(arch) if arch is not None else None,
            data_dir=str(node_config["data-dir"]) if "data-dir" in node_config else None,
            state_dir=Path(str(node_config.get("state-dir", DEFAULT_STATE_DIR))),
        )


def _integer(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"node config {key}: expected an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"node config {key}: expected an integer, got {value!r}") from None


@functools.lru_cache(maxsize=4)
def _dataset(name: str, data_dir: str | None, download: bool) -> Dataset:
    return load_dataset(name, data_dir, download=download)


class Node:
    """One client of one experiment, on the node that holds its data."""

    def __init__(self, config: ExperimentConfig, settings: NodeSettings, experiment: str) -> None:
        fed = config.federation
        if settings.num_clients is not None and settings.num_clients != fed.num_clients:
            raise ConfigError(
                f"node {settings.client_id} was started for {settings.num_clients} partitions, "
                f"the run has federation.num_clients = {fed.num_clients}"
            )
        if not 0 <= settings.client_id < fed.num_clients:
            raise ConfigError(f"partition-id {settings.client_id} is outside 0..{fed.num_clients - 1}")
        self.config, self.settings = config, settings
        self.client_id = settings.client_id
        self.arch = settings.arch or config.architecture_of(self.client_id)
        self.device = resolve_device(config.device)
        data_dir = settings.data_dir or config.data.data_dir or None
        dataset = _dataset(config.data.dataset, data_dir, config.data.download)
        self.input_shape, self.num_classes = dataset.input_shape, dataset.num_classes
        self.data: ClientData = build_clients(config, dataset, self.device)[self.client_id]
        self.algorithm: AnyAlgorithm = create_algorithm(config, dataset.input_shape, dataset.num_classes)
        self.checkpoint = settings.state_dir / experiment / f"client-{self.client_id}.safetensors"

    def load_state(self) -> nn.Module:
        """The client's private state: its checkpoint, or the seeded initial state before its first round."""
        state = create_client_state(self.algorithm, self.client_id, self.device, self.arch)
        if self.checkpoint.is_file():
            state.load_state_dict(load_file(str(self.checkpoint), device=str(self.device)))
        return state

    def train(self, message: State, server_round: int) -> ClientResult:
        """One round of the algorithm's client training; the new state is checkpointed before replying."""
        state, meter = self.load_state(), FlopMeter()
        ctx = ClientContext(
            client_id=self.client_id,
            arch=self.arch,
            server_round=server_round,
            data=self.data,
            generator=torch_generator(self.config.seed, "train", self.client_id, server_round),
            meter=meter,
        )
        upload = client_update(self.algorithm, state, {k: v.to(self.device) for k, v in message.items()}, ctx)
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(state.state_dict(), self.checkpoint)
        return ClientResult(upload, meter.total, meter.samples)

    @property
    def num_eval(self) -> int:
        """Samples of this client's evaluation split."""
        data = self.data
        return data.num_validation if self.config.eval_split == "validation" else data.num_test

    def evaluate(self) -> tuple[int, int]:
        """(correct, total) of the personalized predictor on this client's evaluation split."""
        return client_accuracy(self.algorithm, self.load_state(), self.data, self.config.eval_split)


def release_memory() -> None:
    """Forget cached datasets (tests start many nodes in one process)."""
    _dataset.cache_clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
