"""The server side on Flower: the simulator's round loop, with clients reached through a Flower ``Grid``.

:class:`GridClients` is a :class:`~pfedlora.simulation.loop.ClientPool` whose clients are Flower nodes:
it asks every node once for its stable client id, then turns the loop's per-client messages into Flower
messages and the replies back into uploads. Sampling, dropout, screening, aggregation, evaluation and the
run directory are the simulator's own code, so a Flower run and a simulated run of the same configuration
and seed give the same metrics; so are the checkpoints, from which a restarted ServerApp continues.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from pfedlora.algorithms import AnyAlgorithm, State, Upload, UploadBound, create_algorithm
from pfedlora.config import ExperimentConfig, config_to_toml
from pfedlora.errors import ConfigError, PfedloraError
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
from pfedlora.simulation.checkpoint import CHECKPOINT_DIR, check_config, read_manifest
from pfedlora.simulation.experiment import continue_run, finish_run, setup_stopped
from pfedlora.simulation.federation import initial_global_state
from pfedlora.simulation.lock import directory_lock
from pfedlora.simulation.loop import ClientResult, Server
from pfedlora.simulation.records import Summary
from pfedlora.simulation.results import (
    CONFIG_FILE,
    SUMMARY_FILE,
    RunWriter,
    new_run_directory,
    write_atomic,
)
from pfedlora.simulation.store import SavedFiles, StateFiles
from pfedlora.tasks import TASKS, Counts

logger = logging.getLogger(__name__)


class FederationError(PfedloraError):
    """The Flower federation does not match the configuration (missing or duplicate clients)."""


DEFAULT_QUIET_ROUNDS = 3
"""Rounds a node that did not answer is left alone before it is asked again (``quiet-rounds``)."""


class GridClients:
    """The clients of a run, reached through ``grid``; node ids are mapped to stable client ids.

    A node that does not answer a message within ``timeout`` (a hung or unreachable device) is not sent
    anything for the next ``quiet_rounds`` rounds (its clients count as dropped out, and unscored), then
    probed again, so that one hung node costs one timeout, not one per message; messages carry a time to
    live of ``timeout``, so a node never works on one the server stopped waiting for. An upload larger than
    the algorithm's uploads can be (:meth:`~pfedlora.algorithms.Algorithm.upload_bound`) is refused from
    the record's sizes, before any of it is turned into tensors.
    """

    def __init__(
        self,
        grid: Grid,
        config: ExperimentConfig,
        experiment: str,
        timeout: float,
        in_flight: int = 0,
        quiet_rounds: int = DEFAULT_QUIET_ROUNDS,
    ) -> None:
        """``timeout``: seconds to wait for the replies to one batch of messages; ``in_flight``: the most
        messages sent at once (0: all of a step at once), the rest following as replies come back."""
        if timeout <= 0 or quiet_rounds < 0:
            raise ConfigError(
                f"round-timeout {timeout:g} and quiet-rounds {quiet_rounds} are out of range; allowed: a "
                "timeout > 0 seconds and 0 or more rounds"
            )
        self.grid, self.config, self.experiment, self.timeout = grid, config, experiment, timeout
        self.in_flight, self.quiet_rounds = in_flight, quiet_rounds
        self.settings: dict[str, ConfigValue] = {
            "config": config_to_toml(config),
            "experiment": experiment,
            "time-limit": timeout,
        }
        self.silent: dict[int, int] = {}
        """Client id -> the last round in which its node did not answer (cleared when it answers again)."""
        self.upload_bound: UploadBound | None = None
        """The largest valid upload (set by :func:`run_server` once the algorithm is known)."""
        self.nodes: dict[int, int] = {}  # client id -> node id
        self.client_of_node: dict[int, int] = {}  # node id -> client id
        self.declared: dict[int, int] = {}
        self.declared_eval: dict[int, int] = {}
        self.input_shape: tuple[int, ...] = (0, 0, 0)
        self.num_classes = 0
        self.algorithm: AnyAlgorithm | None = None
        """Set once the data's shape is known (it builds what ``after-download`` evaluation sends)."""
        self._discover()

    def _send(self, messages: list[Message]) -> Iterator[Message]:
        """Send ``messages`` (``in_flight`` at a time) and yield the replies. Flower's simulation engine
        scans every pending message for every node on each pass, so a thousand messages at once stall it
        (1,000 at once: 166 nodes identified in 10 minutes; 25 at a time: all in 3; README, *Scale*)."""
        batch = self.in_flight or max(1, len(messages))
        for start in range(0, len(messages), batch):
            yield from self.grid.send_and_receive(messages[start : start + batch], timeout=self.timeout)

    def _discover(self) -> None:
        """Ask every node who it is: its client id, training samples, input shape and classes."""
        node_ids = sorted(self.grid.get_node_ids())
        settings = ConfigRecord(self.settings)
        queries = [Message(RecordDict({SETTINGS: settings}), node, MessageType.QUERY) for node in node_ids]
        for reply in self._send(queries):
            node = reply.metadata.src_node_id
            if reply.has_error():
                logger.warning("node %d did not identify itself: %s", node, reply.error)
                continue
            try:
                about = reply.content.config_records[METRICS]
                client_id = read_int(about, "client-id")
                declared = read_int(about, "num-train"), read_int(about, "num-eval")
                shape = about["input-shape"]
                dims = [v for v in shape if type(v) is int and v > 0] if isinstance(shape, list) else []
                if not isinstance(shape, list) or len(dims) != len(shape) or len(dims) not in (2, 3):
                    raise ValueError(f"input shape {shape!r} is neither (C, H, W) nor (2·views, length)")
                input_shape = tuple(int(v) for v in dims)
                num_classes = read_int(about, "num-classes")
            except (KeyError, TypeError, ValueError) as error:
                logger.warning("node %d sent a malformed identity and is ignored: %s", node, _describe(error))
                continue
            if client_id in self.nodes:
                logger.warning(
                    "node %d claims client id %d, which node %d claimed first: node %d is refused for this "
                    "run (its replies are ignored); give each SuperNode its own partition-id",
                    node,
                    client_id,
                    self.nodes[client_id],
                    node,
                )
                continue
            self.nodes[client_id] = node
            self.declared[client_id], self.declared_eval[client_id] = declared
            self.input_shape, self.num_classes = input_shape, num_classes
        self.client_of_node = {node: client_id for client_id, node in self.nodes.items()}
        expected = set(range(self.config.federation.num_clients))
        missing = sorted(expected - set(self.nodes))
        if missing:
            raise FederationError(
                f"{len(missing)} of {len(expected)} clients were identified by no node (client ids "
                f"{missing[:10]}); start one SuperNode per client with node config partition-id=<id>"
            )

    def declared_examples(self) -> Mapping[int, int]:
        return self.declared

    def save_states(self, client_ids: Set[int], folder: Path, server_round: int) -> SavedFiles:
        """Nothing: private states live on the nodes (see :mod:`pfedlora.flower.node`)."""
        return {}

    def restore_states(self, files: StateFiles) -> None:
        """Nothing to restore: each node restores its own state for the round it is asked to train."""

    def _instruction(self, server_round: int, **extra: ConfigValue) -> ConfigRecord:
        return ConfigRecord({**self.settings, "round": server_round, **extra})

    def _message(self, content: RecordDict, client_id: int, kind: str, server_round: int) -> Message:
        node = self.nodes[client_id]
        return Message(content, node, kind, ttl=self.timeout, group_id=str(server_round))

    def _askable(self, client_ids: Iterable[int], server_round: int) -> list[int]:
        """The clients among ``client_ids`` whose nodes may be asked now: all but those that did not answer
        within the last ``quiet_rounds`` rounds (or earlier in this one)."""
        return [
            client_id
            for client_id in client_ids
            if self.silent.get(client_id, -self.quiet_rounds - 1) + self.quiet_rounds < server_round
        ]

    def _heard(self, asked: Iterable[int], heard: Set[int], server_round: int, step: str) -> None:
        """Remember which of the ``asked`` clients answered (in time, any answer) this step."""
        for client_id in asked:
            if client_id in heard:
                self.silent.pop(client_id, None)
                continue
            self.silent[client_id] = server_round
            logger.warning(
                "round %d: client %d (node %d) did not answer the %s within %g s: it is not asked again "
                "before round %d",
                server_round,
                client_id,
                self.nodes[client_id],
                step,
                self.timeout,
                server_round + self.quiet_rounds + 1,
            )

    def train(
        self, server_round: int, messages: Mapping[int, State], dropping: Set[int]
    ) -> dict[int, ClientResult]:
        asked = self._askable(messages, server_round)
        outgoing = [
            self._message(
                RecordDict(
                    {
                        TENSORS: to_record(messages[client_id]),
                        SETTINGS: self._instruction(server_round, drop=client_id in dropping),
                    }
                ),
                client_id,
                MessageType.TRAIN,
                server_round,
            )
            for client_id in asked
        ]
        results: dict[int, ClientResult] = {}
        heard: set[int] = set()
        for reply in self._send(outgoing):
            client_id = self._sender(reply, set(asked), heard, server_round)
            if client_id is None:
                continue
            heard.add(client_id)
            if reply.has_error():
                logger.info(
                    "round %d: client %d did not reply: %s", server_round, client_id, reply.error.reason
                )
                continue
            try:
                results[client_id] = _train_result(reply, self.upload_bound)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                what = "oversized upload" if isinstance(error, OversizedUploadError) else "malformed reply"
                problem = f"{what} from node {reply.metadata.src_node_id}: {_describe(error)}"
                results[client_id] = ClientResult(Upload({}, 0), 0.0, 0, problem)
        self._heard(asked, heard, server_round, "training")
        return results

    def _sender(self, reply: Message, asked: Set[int], answered: Set[int], server_round: int) -> int | None:
        """The client id of the node that sent ``reply``; None (logged) for a node that was not asked or
        has already answered this round."""
        node = reply.metadata.src_node_id
        client_id = self.client_of_node.get(node)
        if client_id is None or client_id not in asked:
            logger.warning("round %d: ignored a reply from node %d, which was not asked", server_round, node)
            return None
        if client_id in answered:
            logger.warning("round %d: ignored a second reply from node %d", server_round, node)
            return None
        return client_id

    def evaluate(
        self, server_round: int, global_state: State | None = None, client_ids: Sequence[int] | None = None
    ) -> AccuracyReport:
        clients = range(self.config.federation.num_clients) if client_ids is None else client_ids

        def content(client_id: int) -> RecordDict:
            records: dict[str, ConfigRecord | ArrayRecord | MetricRecord] = {
                SETTINGS: self._instruction(server_round)
            }
            if global_state is not None:  # after-download: scored right after taking this in
                if self.algorithm is None:
                    raise RuntimeError(
                        "GridClients.algorithm must be set before an after-download evaluation"
                    )
                message = self.algorithm.broadcast(global_state, client_id, server_round + 1)
                records[TENSORS] = to_record(message)
            return RecordDict(records)

        asked = self._askable(clients, server_round)
        outgoing = [
            self._message(content(client_id), client_id, MessageType.EVALUATE, server_round)
            for client_id in asked
        ]
        counts: dict[int, Counts] = {}
        heard: set[int] = set()
        for reply in self._send(outgoing):
            client_id = self._sender(reply, set(asked), heard, server_round)
            if client_id is None:
                continue
            heard.add(client_id)
            if reply.has_error():
                continue
            try:
                counts[client_id] = self._evaluation(reply, client_id)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                logger.warning(
                    "round %d: refused the evaluation of client %d (node %d): %s",
                    server_round,
                    client_id,
                    reply.metadata.src_node_id,
                    _describe(error),
                )
        self._heard(asked, heard, server_round, "evaluation")
        missing = [client_id for client_id in clients if client_id not in counts]
        if missing:
            logger.warning(
                "round %d: clients %s gave no valid evaluation (no answer in time, or a refused one): they "
                "are left out of the means",
                server_round,
                missing,
            )
        none = Counts(0, 0)
        generative = TASKS[self.config.data.task].generative
        return AccuracyReport(
            tuple(counts.get(c, none).correct for c in clients),
            tuple(counts.get(c, none).total for c in clients),
            tuple(c in counts for c in clients),
            tuple(counts.get(c, none).loss_sum for c in clients) if generative else None,
        )

    def _evaluation(self, reply: Message, client_id: int) -> Counts:
        """(correct, total, summed NLL) of an evaluation reply; ValueError unless 0 <= correct <= total,
        total is the size of the evaluation split the client declared (for language modeling its scored
        tokens) and, where the task reports perplexity, the summed NLL is a finite number >= 0."""
        metrics = reply.content.metric_records[METRICS]
        correct, total = read_int(metrics, "correct"), read_int(metrics, "total")
        if not 0 <= correct <= total:
            raise ValueError(f"correct = {correct} of total = {total} is impossible")
        if total != self.declared_eval[client_id]:
            raise ValueError(
                f"total = {total}, but the client declared {self.declared_eval[client_id]} evaluation items"
            )
        if not TASKS[self.config.data.task].generative:
            return Counts(correct, total)
        loss = metrics["loss"]
        if isinstance(loss, bool) or not isinstance(loss, int | float) or not 0 <= loss < float("inf"):
            raise ValueError(f"loss = {loss!r} is not a finite number >= 0")
        return Counts(correct, total, float(loss))


def _train_result(reply: Message, bound: UploadBound | None = None) -> ClientResult:
    """The upload and costs of a train reply; KeyError, TypeError or ValueError where it is malformed, or
    holds more tensors or bytes than ``bound`` allows (told from the record's sizes, before conversion)."""
    metrics = reply.content.metric_records[METRICS]
    tensors = reply.content.array_records[TENSORS]
    if bound is not None:
        check_upload_size(tensors, bound)
    num_examples = metrics["num-examples"]  # screened next: a bad count is refused with its reason
    upload = Upload(from_record(tensors), num_examples)  # type: ignore[arg-type]
    return ClientResult(upload, read_float(metrics, "train-flops"), read_int(metrics, "train-samples"))


ARRAY_HEADER_BYTES = 256
"""What one serialized array may hold beyond its values (its NumPy header)."""


class OversizedUploadError(ValueError):
    """An upload holds more arrays or bytes than the algorithm's uploads can."""


def check_upload_size(record: ArrayRecord, bound: UploadBound) -> None:
    """:class:`OversizedUploadError` where ``record`` holds more arrays, or more bytes, than an upload within
    ``bound`` can (the bytes received, headers allowed for), so that it is never turned into tensors."""
    received = sum(len(array.data) for array in record.values())
    allowed = bound.bytes + ARRAY_HEADER_BYTES * bound.tensors
    if len(record) > bound.tensors or received > allowed:
        raise OversizedUploadError(
            f"the upload holds {len(record):,} arrays of {received:,} bytes, more than the algorithm's "
            f"uploads can ({bound.tensors:,} arrays, {allowed:,} bytes); refused unread"
        )


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"it lacks {error}"
    return str(error) or type(error).__name__


def run_server(
    grid: Grid,
    config: ExperimentConfig,
    out_dir: str | Path,
    experiment: str,
    timeout: float = 600.0,
    resume: bool = False,
    in_flight: int = 0,
    quiet_rounds: int = DEFAULT_QUIET_ROUNDS,
) -> Summary:
    """Run ``config`` over the nodes of ``grid`` and write the run directory; returns the summary.

    The server checkpoints its global state every ``federation.checkpoint_every`` rounds, as the simulator
    does (the clients' private states live on their nodes, which keep what a restart needs). ``resume``:
    continue the unfinished run in ``out_dir`` from its last checkpoint (under the same configuration), or
    start it when ``out_dir`` holds none; the metrics equal an uninterrupted run's. ``timeout`` and
    ``in_flight``, ``quiet_rounds``: see :class:`GridClients`. ``out_dir`` is locked for this process
    while it runs.
    """
    out_dir = Path(out_dir)
    resuming = resume and (out_dir / CONFIG_FILE).is_file()
    claim = directory_lock(out_dir) if resuming else new_run_directory(out_dir)
    try:
        with claim:
            return _serve(grid, config, out_dir, experiment, timeout, resuming, in_flight, quiet_rounds)
    except KeyboardInterrupt as stop:
        raise setup_stopped(stop, out_dir, config.federation.rounds) from None


def _serve(
    grid: Grid,
    config: ExperimentConfig,
    out_dir: Path,
    experiment: str,
    timeout: float,
    resuming: bool,
    in_flight: int,
    quiet_rounds: int,
) -> Summary:
    """:func:`run_server` once this process holds the lock of ``out_dir``."""
    started = time.perf_counter()
    manifest = None
    if resuming:
        if (out_dir / SUMMARY_FILE).is_file():
            raise ConfigError(
                f"{str(out_dir)!r} holds a finished run (it has {SUMMARY_FILE}); nothing to resume"
            )
        manifest = read_manifest(out_dir)
        if manifest is not None:
            check_config(manifest, config, out_dir / CHECKPOINT_DIR)
    clients = GridClients(grid, config, experiment, timeout, in_flight, quiet_rounds)
    algorithm = create_algorithm(config, clients.input_shape, clients.num_classes)
    clients.algorithm = algorithm
    cpu = torch.device("cpu")  # the server only averages: its state stays on the CPU
    server = Server(config, algorithm, initial_global_state(algorithm, cpu))
    clients.upload_bound = algorithm.upload_bound(server.server_state)
    if resuming:
        write_atomic(out_dir / CONFIG_FILE, config_to_toml(config))
        writer, done = continue_run(out_dir, server, clients, manifest)
    else:
        writer, done = RunWriter(out_dir, config), []
    return finish_run(server, clients, writer, None, done, started, manifest)
