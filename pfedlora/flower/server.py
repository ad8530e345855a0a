"""The server side on Flower: the simulator's round loop, with clients reached through a Flower ``Grid``.

:class:`GridClients` is a :class:`~pfedlora.simulation.loop.ClientPool` whose clients are Flower nodes:
it asks every node once for its stable client id, then turns the loop's per-client messages into Flower
messages and the replies back into uploads. Sampling, dropout, screening, aggregation, evaluation and the
run directory are the simulator's own code, so a Flower run and a simulated run of the same configuration
and seed give the same metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Set
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from pfedlora.algorithms import State, Upload, create_algorithm
from pfedlora.config import ExperimentConfig, config_to_toml
from pfedlora.errors import PfedloraError
from pfedlora.flower.records import (
    METRICS,
    SETTINGS,
    TENSORS,
    ConfigValue,
    from_record,
    read_float,
    read_int,
    to_record,
)
from pfedlora.metrics import AccuracyReport
from pfedlora.simulation.federation import create_client_state, initial_global_state
from pfedlora.simulation.loop import ClientResult, Server, run_rounds
from pfedlora.simulation.records import Summary, summarize_records
from pfedlora.simulation.results import RunWriter

logger = logging.getLogger(__name__)


class FederationError(PfedloraError):
    """The Flower federation does not match the configuration (missing or duplicate clients)."""


class GridClients:
    """The clients of a run, reached through ``grid``; node ids are mapped to stable client ids."""

    def __init__(self, grid: Grid, config: ExperimentConfig, experiment: str, timeout: float) -> None:
        self.grid, self.config, self.experiment, self.timeout = grid, config, experiment, timeout
        self.settings: dict[str, ConfigValue] = {"config": config_to_toml(config), "experiment": experiment}
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.client_of_node: dict[int, int] = {}  # node id -> client id
        self.declared: dict[int, int] = {}
        self.input_shape: tuple[int, ...] = (0, 0, 0)
        self.num_classes = 0
        self._discover()

    def _send(self, messages: list[Message]) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=self.timeout)

    def _discover(self) -> None:
        """Ask every node who it is: its client id, training samples, input shape and classes."""
        node_ids = sorted(self.grid.get_node_ids())
        settings = ConfigRecord(self.settings)
        queries = [Message(RecordDict({SETTINGS: settings}), node, MessageType.QUERY) for node in node_ids]
        for reply in self._send(queries):
            if reply.has_error():
                logger.warning("node %d did not identify itself: %s", reply.metadata.src_node_id, reply.error)
                continue
            about = reply.content.config_records[METRICS]
            client_id = read_int(about, "client-id")
            if client_id in self.nodes:
                raise FederationError(f"two nodes claim client id {client_id}")
            self.nodes[client_id] = reply.metadata.src_node_id
            self.declared[client_id] = read_int(about, "num-train")
            shape = about["input-shape"]
            if not isinstance(shape, list) or len(shape) != 3:
                raise FederationError(f"client {client_id} declared input shape {shape!r}, not (C, H, W)")
            channels, height, width = (int(v) for v in shape)
            self.input_shape = (channels, height, width)
            self.num_classes = read_int(about, "num-classes")
        self.client_of_node = {node: client_id for client_id, node in self.nodes.items()}
        expected = set(range(self.config.federation.num_clients))
        missing = sorted(expected - set(self.nodes))
        if missing:
            raise FederationError(
                f"{len(missing)} of {len(expected)} clients did not answer (client ids {missing[:10]}); "
                "start one SuperNode per client with node config partition-id=<id>"
            )

    def declared_examples(self) -> Mapping[int, int]:
        return self.declared

    def _instruction(self, server_round: int, **extra: ConfigValue) -> ConfigRecord:
        return ConfigRecord({**self.settings, "round": server_round, **extra})

    def train(
        self, server_round: int, messages: Mapping[int, State], dropping: Set[int]
    ) -> dict[int, ClientResult]:
        outgoing = [
            Message(
                RecordDict(
                    {
                        TENSORS: to_record(message),
                        SETTINGS: self._instruction(server_round, drop=client_id in dropping),
                    }
                ),
                self.nodes[client_id],
                MessageType.TRAIN,
                group_id=str(server_round),
            )
            for client_id, message in messages.items()
        ]
        results = {}
        for reply in self._send(outgoing):
            client_id = self.client_of_node[reply.metadata.src_node_id]
            if reply.has_error():
                logger.info(
                    "round %d: client %d did not reply: %s", server_round, client_id, reply.error.reason
                )
                continue
            metrics = reply.content.metric_records[METRICS]
            tensors = reply.content.array_records[TENSORS]
            num_examples = metrics["num-examples"]  # screened as it came: a bad count is refused, not raised
            upload = Upload(from_record(tensors), num_examples)  # type: ignore[arg-type]
            results[client_id] = ClientResult(
                upload, read_float(metrics, "train-flops"), read_int(metrics, "train-samples")
            )
        return results

    def evaluate(self, server_round: int) -> AccuracyReport:
        clients = range(self.config.federation.num_clients)
        outgoing = [
            Message(
                RecordDict({SETTINGS: self._instruction(server_round)}),
                self.nodes[client_id],
                MessageType.EVALUATE,
                group_id=str(server_round),
            )
            for client_id in clients
        ]
        counts: dict[int, tuple[int, int]] = {}
        for reply in self._send(outgoing):
            if not reply.has_error():
                metrics = reply.content.metric_records[METRICS]
                counts[self.client_of_node[reply.metadata.src_node_id]] = (
                    read_int(metrics, "correct"),
                    read_int(metrics, "total"),
                )
        missing = [client_id for client_id in clients if client_id not in counts]
        if missing:
            logger.warning(
                "round %d: clients %s were not evaluated (counted as 0 of 0)", server_round, missing
            )
        return AccuracyReport(
            tuple(counts.get(c, (0, 0))[0] for c in clients), tuple(counts.get(c, (0, 0))[1] for c in clients)
        )


def run_server(
    grid: Grid, config: ExperimentConfig, out_dir: str | Path, experiment: str, timeout: float = 600.0
) -> Summary:
    """Run ``config`` over the nodes of ``grid`` and write the run directory; returns the summary."""
    started = time.perf_counter()
    clients = GridClients(grid, config, experiment, timeout)
    algorithm = create_algorithm(config, clients.input_shape, clients.num_classes)
    cpu = torch.device("cpu")  # the server only averages: its state stays on the CPU
    server = Server(config, algorithm, initial_global_state(algorithm, cpu))
    shared = algorithm.shared_state(create_client_state(algorithm, 0, cpu))
    writer = RunWriter(out_dir, config)
    try:
        records = run_rounds(server, clients, writer.append_round)
        summary = summarize_records(
            config, records, time.perf_counter() - started, sum(t.numel() for t in shared.values())
        )
        writer.write_summary(summary)
    finally:
        writer.close()
    return summary
