"""What a Flower node does for one message: the client side of the simulator's code, on one client.

A node is one client, named by a stable id (``partition-id`` in its node config, the simulator's client
id). Its private state (the algorithm's whole client module: local model, shared copies, adapters, any
learned coefficients; no optimizer state outlives a round) lives in per-round checkpoint files
``<state-dir>/<experiment>/client-<id>-r<round>.safetensors``, written atomically after every round it
trains, so nothing depends on the process (Flower runs every message in a new one) or on
``context.state``. Training round R starts from the newest file of a round before R; evaluation in round R
reads the newest of a round up to R. A node keeps the newest file no later than the server's last
checkpoint (round ⌊(R−1)/checkpoint_every⌋·checkpoint_every) and every later one, so that a restarted
server replaying the rounds after its checkpoint finds each client as it was then.
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
from pfedlora.data import ClientData, Dataset
from pfedlora.errors import ConfigError
from pfedlora.metrics import FlopMeter
from pfedlora.models import MODELS
from pfedlora.models.causal_lm import LANGUAGE_MODELS
from pfedlora.models.transformer import families_read_by
from pfedlora.seeding import torch_generator
from pfedlora.simulation.federation import (
    build_clients,
    create_client_state,
    load_run_dataset,
    resolve_device,
)
from pfedlora.simulation.local import client_counts
from pfedlora.simulation.loop import ClientResult
from pfedlora.simulation.results import save_atomic
from pfedlora.simulation.rounds import client_update
from pfedlora.tasks import Counts

STATE_SUFFIX = ".safetensors"
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
        if arch is not None and str(arch) not in LANGUAGE_MODELS:  # a classifier's, or a language model's
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
def _dataset(config: ExperimentConfig, data_dir: str | None, arch: str) -> Dataset:
    """The run's dataset on this node; text tokenized by the tokenizers this node's client reads (its
    family's, a shared model's and a text branch's), the other families' views left empty."""
    return load_run_dataset(config, data_dir, families=families_read_by(config, arch))


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
        dataset = _dataset(config, settings.data_dir or None, self.arch)
        self.input_shape, self.num_classes = dataset.input_shape, dataset.num_classes
        self.data: ClientData = build_clients(config, dataset, self.device)[self.client_id]
        self.algorithm: AnyAlgorithm = create_algorithm(config, dataset.input_shape, dataset.num_classes)
        self.folder = settings.state_dir / experiment

    def _saved(self) -> dict[int, Path]:
        """Round -> this client's state file of that round."""
        prefix = f"client-{self.client_id}-r"
        if not self.folder.is_dir():
            return {}
        return {
            int(path.name[len(prefix) : -len(STATE_SUFFIX)]): path
            for path in self.folder.glob(f"{prefix}*{STATE_SUFFIX}")
            if path.name[len(prefix) : -len(STATE_SUFFIX)].isdigit()
        }

    def load_state(self, before_round: int) -> nn.Module:
        """The client's private state as it was before ``before_round``: the newest file of an earlier
        round, or the seeded initial state when it has not trained before."""
        state = create_client_state(self.algorithm, self.client_id, self.device, self.arch)
        saved = self._saved()
        earlier = [r for r in saved if r < before_round]
        if earlier:
            path = saved[max(earlier)]
            state.load_state_dict(load_file(str(path), device=str(self.device)))
        return state

    def _save(self, state: nn.Module, server_round: int) -> None:
        """Write the state after ``server_round``; drop files a restarted server can no longer need (older
        than the newest one up to its last checkpoint) and any from a timeline it abandoned (later rounds)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        save_atomic(
            state.state_dict(), self.folder / f"client-{self.client_id}-r{server_round}{STATE_SUFFIX}"
        )
        every = self.config.federation.checkpoint_every
        checkpointed = (server_round - 1) // every * every if every else server_round
        saved = self._saved()
        base = max((r for r in saved if r <= checkpointed), default=0)
        for saved_round, path in saved.items():
            if saved_round < base or saved_round > server_round:
                path.unlink(missing_ok=True)

    def train(self, message: State, server_round: int) -> ClientResult:
        """One round of the algorithm's client training; the new state is checkpointed before replying."""
        state, meter = self.load_state(server_round), FlopMeter()
        ctx = ClientContext(
            client_id=self.client_id,
            arch=self.arch,
            server_round=server_round,
            data=self.data,
            generator=torch_generator(self.config.seed, "train", self.client_id, server_round),
            meter=meter,
            task=self.algorithm.task,
        )
        upload = client_update(self.algorithm, state, {k: v.to(self.device) for k, v in message.items()}, ctx)
        self._save(state, server_round)
        return ClientResult(upload, meter.total, meter.samples)

    @property
    def num_eval(self) -> int:
        """Items its evaluation scores: the samples of its evaluation split (for language modeling their
        scored tokens)."""
        data, task, split = self.data, self.algorithm.task, self.config.eval_split
        if task.generative:
            return sum(task.scored_items(x) for x, _ in data.eval_batches(split, 1024))
        return data.num_validation if split == "validation" else data.num_test

    def evaluate(self, server_round: int, download: State | None = None) -> Counts:
        """(correct, total, summed NLL) of the personalized predictor, as it is after ``server_round`` (having
        taken in ``download`` when given; nothing is saved), on this client's evaluation split."""
        state = self.load_state(server_round + 1)
        if download is not None:
            self.algorithm.receive(state, {k: v.to(self.device) for k, v in download.items()})
        return client_counts(self.algorithm, state, self.data, self.config.eval_split)


def release_memory() -> None:
    """Forget cached datasets (tests start many nodes in one process)."""
    _dataset.cache_clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
