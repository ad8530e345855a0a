"""The simulator's client pool in this process: the clients of a :class:`Federation`, trained one after
another (a worker process of :mod:`pfedlora.simulation.workers` runs one over its share of the clients)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence, Set
from pathlib import Path

import torch
from torch import nn

from pfedlora.algorithms import AnyAlgorithm, ClientContext, State
from pfedlora.algorithms.training import autocast
from pfedlora.data import ClientData, Split
from pfedlora.metrics import AccuracyReport, FlopMeter
from pfedlora.seeding import torch_generator
from pfedlora.simulation.federation import Federation
from pfedlora.simulation.loop import ClientResult
from pfedlora.simulation.rounds import client_update
from pfedlora.simulation.store import SavedFiles, StateFiles, checkpoint_file
from pfedlora.tasks import Counts

EVAL_BATCH_SIZE = 1024


def client_accuracy(
    algorithm: AnyAlgorithm, state: nn.Module, data: ClientData, split: Split
) -> tuple[int, int]:
    """(correct, total) of one client's personalized predictor on its ``split``."""
    counts = client_counts(algorithm, state, data, split)
    return counts.correct, counts.total


def client_counts(algorithm: AnyAlgorithm, state: nn.Module, data: ClientData, split: Split) -> Counts:
    """(correct, total, summed NLL) of one client's personalized predictor on its ``split``: over samples,
    or for language modeling over the tokens of its text (:meth:`~pfedlora.tasks.Task.counts`)."""
    state.eval()
    task = algorithm.task
    sums = torch.zeros(3, dtype=torch.float64, device=data.train_indices.device)
    # A language model's scores are (B, L, vocabulary): evaluated in training-sized batches.
    batch_size = algorithm.config.train.batch_size if task.generative else EVAL_BATCH_SIZE
    with torch.inference_mode(), autocast(algorithm.config.train, data.train_indices.device):
        for x, y in data.eval_batches(split, batch_size):
            sums += task.batch_counts(lambda batch: algorithm.predict(state, batch), state, x, y)
    correct, total, loss_sum = sums.tolist()  # one device-to-host copy per client, not per batch
    return Counts(round(correct), round(total), loss_sum)


def scored_state(
    algorithm: AnyAlgorithm, state: nn.Module, client_id: int, server_round: int, global_state: State | None
) -> nn.Module:
    """The state a client is scored with after ``server_round``: its own, or (``global_state`` given,
    ``federation.evaluate = "after-download"``) a copy that has taken in the next broadcast."""
    if global_state is None:
        return state
    downloaded = copy.deepcopy(state)
    algorithm.receive(downloaded, algorithm.broadcast(global_state, client_id, server_round + 1))
    return downloaded


def evaluate(federation: Federation) -> AccuracyReport:
    """Every client's personalized predictor on its own evaluation split."""
    counts = LocalClients(federation, FlopMeter()).evaluate_counts()
    generative = federation.algorithm.task.generative
    return AccuracyReport.from_counts(counts, len(federation.clients), losses=generative)


class LocalClients:
    """A :class:`~pfedlora.simulation.loop.ClientPool` of the clients whose states ``federation`` holds."""

    def __init__(self, federation: Federation, meter: FlopMeter) -> None:
        self.federation, self.meter = federation, meter
        self.declared: dict[int, int] | None = None

    def declared_examples(self) -> dict[int, int]:
        if self.declared is None:  # once: every round asks, and a dict of a million entries takes 0.16 s
            self.declared = {cid: data.num_train for cid, data in enumerate(self.federation.clients)}
        return self.declared

    def train(
        self, server_round: int, messages: Mapping[int, State], dropping: Set[int]
    ) -> dict[int, ClientResult]:
        federation, meter = self.federation, self.meter
        config = federation.config
        results = {}
        for client_id, message in messages.items():
            if client_id in dropping:
                continue
            meter.reset()
            samples_before = meter.samples
            ctx = ClientContext(
                client_id=client_id,
                arch=config.architecture_of(client_id),
                server_round=server_round,
                data=federation.clients[client_id],
                generator=torch_generator(config.seed, "train", client_id, server_round),
                meter=meter,
                task=federation.algorithm.task,
            )
            upload = client_update(federation.algorithm, federation.client_states[client_id], message, ctx)
            results[client_id] = ClientResult(upload, meter.total, meter.samples - samples_before)
        return results

    def evaluate_counts(
        self,
        server_round: int = 0,
        global_state: State | None = None,
        client_ids: Sequence[int] | None = None,
    ) -> dict[int, Counts]:
        """(correct, total, summed NLL) of every held client (of those in ``client_ids``, if given) on its
        evaluation split (see :func:`scored_state`)."""
        federation = self.federation
        algorithm, split, store = federation.algorithm, federation.config.eval_split, federation.client_states
        wanted = store if client_ids is None else sorted(set(client_ids) & store.owned)
        return {
            cid: client_counts(
                algorithm,
                scored_state(algorithm, store.view(cid), cid, server_round, global_state),
                federation.clients[cid],
                split,
            )
            for cid in wanted
        }

    def evaluate(
        self, server_round: int, global_state: State | None = None, client_ids: Sequence[int] | None = None
    ) -> AccuracyReport:
        counts = self.evaluate_counts(server_round, global_state, client_ids)
        everyone = len(self.federation.clients)
        generative = self.federation.algorithm.task.generative
        return AccuracyReport.from_counts(
            counts, everyone if client_ids is None else client_ids, losses=generative
        )

    def save_states(self, client_ids: Set[int], folder: Path, server_round: int) -> SavedFiles:
        store = self.federation.client_states
        saved = {}
        for cid in sorted(client_ids & store.owned):
            name = checkpoint_file(cid, server_round)
            saved[cid] = (name, store.save(cid, folder / name))
        return saved

    def restore_states(self, files: StateFiles) -> None:
        store = self.federation.client_states
        for cid, (path, digest) in files.items():
            if cid in store.owned:
                store.restore(cid, path, digest)
