"""The one round loop, shared by every algorithm and by both runtimes (this simulator and Flower).

Per round: sample clients (seeded); send each the server's message through the byte-counting channel;
let the client pool train them (:class:`~pfedlora.simulation.local.LocalClients` in the simulator, Flower
nodes in :mod:`pfedlora.flower`) and take their uploads back through the channel; then screen the uploads
and let the algorithm aggregate (:mod:`pfedlora.simulation.rounds`). Every ``eval_every`` rounds (and
after the last), every client evaluates its personalized predictor on its own split. Costs are measured,
not estimated: bytes from the tensors sent, FLOPs from PyTorch's counter, seconds from the clock. The
server's own computation (its messages, the aggregation) runs on :data:`SERVER_THREADS` intra-op threads
whatever the runtime and the machine's cores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pfedlora.algorithms import AnyAlgorithm, State, Upload
from pfedlora.config import ExperimentConfig
from pfedlora.hardware import intra_op_threads
from pfedlora.metrics import AccuracyReport, Channel
from pfedlora.simulation.records import ClientCost, RoundRecord, RoundResult, privacy_budget
from pfedlora.simulation.rounds import drops_out, server_update
from pfedlora.simulation.sampling import evaluation_sample, sample_clients
from pfedlora.simulation.screening import Reply
from pfedlora.simulation.store import SavedFiles, StateFiles

logger = logging.getLogger(__name__)

SERVER_THREADS = 1
"""Intra-op threads of the server's computation. A kernel may split a reduction (a matrix product, an SVD)
by its thread count, so the last bits of e.g. FedKD's factorised messages, and through them the run, would
otherwise depend on the cores of the machine that runs the server: one thread, as each worker gives its
clients."""


@dataclass(frozen=True)
class ClientResult:
    """What one client's training in one round produced: its upload and what the training cost."""

    upload: Upload
    train_flops: float
    train_samples: int
    problem: str | None = None
    """Why the reply itself is unusable (a malformed Flower reply): refused like a bad upload."""


class ServerSide(Protocol):
    """What the round loop needs of the server: the configuration, the algorithm and the global state."""

    config: ExperimentConfig
    algorithm: AnyAlgorithm
    server_state: State


@dataclass
class Server:
    """The server's side of a run whose clients live elsewhere (worker processes, Flower nodes)."""

    config: ExperimentConfig
    algorithm: AnyAlgorithm
    server_state: State


class ClientPool(Protocol):
    """Where a run's clients live and train: in this process (simulator) or on Flower nodes."""

    def declared_examples(self) -> Mapping[int, int]:
        """Each client's number of training samples, as the client declared it."""
        ...

    def train(
        self, server_round: int, messages: Mapping[int, State], dropping: Set[int]
    ) -> dict[int, ClientResult]:
        """Deliver each client its message; clients in ``dropping`` (and any that fail) do not reply."""
        ...

    def evaluate(
        self, server_round: int, global_state: State | None = None, client_ids: Sequence[int] | None = None
    ) -> AccuracyReport:
        """Every client's (or only ``client_ids``') personalized predictor on its own evaluation split; with
        ``global_state``, each client is scored right after taking in what the server would send it next
        (on a copy: the client's own state is unchanged)."""
        ...


class StatefulPool(ClientPool, Protocol):
    """A client pool whose private states can be saved and restored (checkpoints)."""

    def save_states(self, client_ids: Set[int], folder: Path, server_round: int) -> SavedFiles:
        """Write the private states of ``client_ids`` into ``folder`` (files named by
        :func:`~pfedlora.simulation.store.checkpoint_file`); the name and SHA-256 of each client's file."""
        ...

    def restore_states(self, files: StateFiles) -> None:
        """Take the private states of the clients in ``files`` from those safetensors files (each with its
        SHA-256, if known); ValueError where a file does not hold the client's tensors."""
        ...


def broadcast(server: ServerSide, client_id: int, server_round: int) -> State:
    """The server's message to ``client_id``; RuntimeError if it holds a tensor the algorithm does not
    declare shared (a bug in the algorithm, never sent)."""
    algorithm = server.algorithm
    message = algorithm.broadcast(server.server_state, client_id, server_round)
    undeclared = [key for key in message if not algorithm.is_shared(key)]
    if undeclared:
        raise RuntimeError(f"{algorithm.name} would send tensors it does not share: {', '.join(undeclared)}")
    return message


def run_round(server: ServerSide, clients: ClientPool, server_round: int, channel: Channel) -> RoundResult:
    """One round of training and aggregation, in either runtime; returns what the round did and cost.

    A client that drops out (``federation.drop_rate``) receives the server's message but never replies;
    invalid uploads are refused (see :mod:`pfedlora.simulation.screening`).
    """
    config, algorithm = server.config, server.algorithm
    sampled = sample_clients(
        config.federation.num_clients, config.federation.sample_fraction, config.seed, server_round
    )
    channel.reset()
    with intra_op_threads(SERVER_THREADS):
        messages = {
            client_id: channel.download(client_id, broadcast(server, client_id, server_round))
            for client_id in sampled
        }
    dropping = {client_id for client_id in sampled if drops_out(config, client_id, server_round)}
    results = clients.train(server_round, messages, dropping)
    replies: list[Reply] = []
    per_client: list[ClientCost] = []
    for client_id in sampled:
        if client_id not in results:
            continue
        result = results[client_id]
        received = channel.upload(client_id, result.upload.tensors)
        replies.append(Reply(client_id, Upload(received, result.upload.num_examples), result.problem))
        per_client.append(
            {
                "client_id": client_id,
                "num_examples": result.upload.num_examples,
                "bytes_down": channel.bytes_down[client_id],
                "bytes_up": channel.bytes_up[client_id],
                "train_flops": result.train_flops,
            }
        )
    with intra_op_threads(SERVER_THREADS):
        outcome = server_update(
            algorithm, server.server_state, replies, clients.declared_examples(), server_round
        )
    server.server_state = outcome.server_state
    return {
        "round": server_round,
        "sampled": sampled,
        "dropped": [client_id for client_id in sampled if client_id not in results],
        "refused": [{"client_id": r.client_id, "reason": r.reason} for r in outcome.refused],
        "aggregated": outcome.aggregated,
        "bytes_down": channel.total_down,
        "bytes_up": channel.total_up,
        "train_flops": sum(c["train_flops"] for c in per_client),
        "train_samples": sum(result.train_samples for result in results.values()),
        "clients": per_client,
        "server_flops": outcome.server_flops,
    }


RoundCallback = Callable[[RoundRecord], None]
AfterRound = Callable[[int, list[RoundRecord]], None]


def run_rounds(
    server: ServerSide,
    clients: ClientPool,
    on_round: RoundCallback | None = None,
    done: Sequence[RoundRecord] = (),
    after_round: AfterRound | None = None,
) -> list[RoundRecord]:
    """The rounds after those in ``done`` (records of rounds 1..k of this run, when resuming), in either
    runtime; each finished round's record goes to ``on_round``, then ``after_round(round, records)`` runs.
    Returns the records of all rounds."""
    fed_cfg = server.config.federation
    channel = Channel()
    records: list[RoundRecord] = list(done)
    cumulative_bytes = records[-1]["cumulative_bytes"] if records else 0
    cumulative_flops = records[-1]["cumulative_train_flops"] if records else 0.0
    warned_empty = False
    # An algorithm whose predictions never change is scored once per set of clients (its figures repeat;
    # a report with clients that gave none, on Flower, is not kept).
    scored: dict[tuple[int, ...] | None, AccuracyReport] = {}
    for server_round in range(len(records) + 1, fed_cfg.rounds + 1):
        started = time.perf_counter()
        result = run_round(server, clients, server_round, channel)
        seconds = time.perf_counter() - started
        cumulative_bytes += result["bytes_down"] + result["bytes_up"]
        cumulative_flops += result["train_flops"]
        record: RoundRecord = {
            **result,
            "cumulative_bytes": cumulative_bytes,
            "cumulative_train_flops": cumulative_flops,
            "round_seconds": seconds,
            "train_samples_per_second": result["train_samples"] / seconds if seconds > 0 else 0.0,
        }
        budget = privacy_budget(server.config, server_round)
        if budget is not None:
            record["privacy_epsilon"] = budget["epsilon"]
        if server_round % fed_cfg.eval_every == 0 or server_round == fed_cfg.rounds:
            download = fed_cfg.evaluate == "after-download"
            last = server_round == fed_cfg.rounds
            seed, size = server.config.seed, fed_cfg.eval_sample
            sample = None if last else evaluation_sample(fed_cfg.num_clients, size, seed, server_round)
            key = None if sample is None else tuple(sample)
            if key in scored:
                report = scored[key]
            else:
                report = clients.evaluate(server_round, server.server_state if download else None, sample)
                if not server.algorithm.changes_predictions and not report.unanswered:
                    scored[key] = report
            record["mean_accuracy"] = report.mean
            record["weighted_accuracy"] = report.weighted
            record["std_accuracy"] = report.std
            record["client_accuracies"] = list(report.per_client)
            if report.losses is not None:  # language modeling: accuracies are next-token top-1
                record["mean_perplexity"] = report.mean_perplexity
                record["median_perplexity"] = report.median_perplexity
                record["client_perplexities"] = list(report.per_client_perplexity)
            if sample is not None:
                record["evaluated_clients"] = sample
            record["clients_without_eval_samples"] = report.without_samples
            if report.unanswered:
                record["clients_unanswered"] = report.unanswered
            if report.without_samples and not warned_empty:
                warned_empty = True
                logger.warning(
                    "%d of %d clients have no %s samples: they are left out of the mean accuracy "
                    "(clients_without_eval_samples in the records and the summary)",
                    report.without_samples,
                    len(report.totals),
                    server.config.eval_split,
                )
            if report.losses is not None:
                logger.info("round %d: mean perplexity %.3f", server_round, report.mean_perplexity)
            else:
                logger.info("round %d: mean accuracy %.4f", server_round, report.mean)
        records.append(record)
        if on_round is not None:
            on_round(record)
        if after_round is not None:
            after_round(server_round, records)
    return records
