"""The simulator's client pool: every client's data and private state in this process."""

from __future__ import annotations

from collections.abc import Mapping, Set

import torch
from torch import nn

from pfedlora.algorithms import AnyAlgorithm, ClientContext, State
from pfedlora.data import ClientData, Split
from pfedlora.metrics import AccuracyReport, FlopMeter
from pfedlora.seeding import torch_generator
from pfedlora.simulation.federation import Federation
from pfedlora.simulation.loop import ClientResult
from pfedlora.simulation.rounds import client_update

EVAL_BATCH_SIZE = 1024


def client_accuracy(
    algorithm: AnyAlgorithm, state: nn.Module, data: ClientData, split: Split
) -> tuple[int, int]:
    """(correct, total) of one client's personalized predictor on its ``split``."""
    state.eval()
    hits = count = 0
    with torch.inference_mode():
        for x, y in data.eval_batches(split, EVAL_BATCH_SIZE):
            hits += int((algorithm.predict(state, x).argmax(dim=1) == y).sum())
            count += len(y)
    return hits, count


def evaluate(federation: Federation) -> AccuracyReport:
    """Every client's personalized predictor on its own evaluation split."""
    split = federation.config.eval_split
    results = [
        client_accuracy(federation.algorithm, federation.client_states[cid], data, split)
        for cid, data in enumerate(federation.clients)
    ]
    return AccuracyReport(tuple(h for h, _ in results), tuple(n for _, n in results))


class LocalClients:
    """A :class:`~pfedlora.simulation.loop.ClientPool` whose clients all live in this process."""

    def __init__(self, federation: Federation, meter: FlopMeter) -> None:
        self.federation, self.meter = federation, meter

    def declared_examples(self) -> dict[int, int]:
        return {client_id: data.num_train for client_id, data in enumerate(self.federation.clients)}

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
            )
            upload = client_update(federation.algorithm, federation.client_states[client_id], message, ctx)
            results[client_id] = ClientResult(upload, meter.total, meter.samples - samples_before)
        return results

    def evaluate(self, server_round: int) -> AccuracyReport:
        return evaluate(self.federation)
