"""The one round loop, shared by every algorithm and by both runtimes (this simulator and Flower).

Per round: sample clients (seeded); send each the server's message through the byte-counting channel;
let the client pool train them (:class:`LocalClients` here, Flower nodes in :mod:`pfedlora.flower`) and
take their uploads back through the channel; then screen the uploads and let the algorithm aggregate.
Every ``eval_every`` rounds (and after the last), every client evaluates its personalized predictor on
its own split. Costs are measured, not estimated: bytes from the tensors sent, FLOPs from PyTorch's
counter, seconds from the clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pfedlora.algorithms import Algorithm, ClientContext, State, Upload, create_algorithm
from pfedlora.algorithms.screening import Reply
from pfedlora.config import ExperimentConfig, load_config
from pfedlora.data import (
    ClientData,
    Dataset,
    build_client_data,
    carve_validation,
    load_dataset,
    make_partition,
)
from pfedlora.errors import ConfigError
from pfedlora.metrics import AccuracyReport, Channel, FlopMeter, progress_to_target, summarize_curve
from pfedlora.models import check_homogeneous
from pfedlora.rounds import client_update, drops_out, server_update
from pfedlora.seeding import numpy_generator, torch_generator
from pfedlora.simulation.checkpoint import Checkpointer, restore
from pfedlora.simulation.results import CONFIG_FILE, SUMMARY_FILE, RunWriter, read_records
from pfedlora.simulation.sampling import sample_clients

logger = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 1024
TIMING_KEYS = frozenset({"wall_seconds", "train_samples_per_second", "round_seconds"})
"""Record and summary keys that measure the clock; everything else is identical for identical seeds."""


def resolve_device(name: str) -> torch.device:
    """ "auto" picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def eval_split(config: ExperimentConfig) -> str:
    """The split clients are evaluated on: validation when one is carved, else test."""
    return "validation" if config.data.validation_fraction > 0 else "test"


@dataclass
class Federation:
    """Everything a run works on: the algorithm, each client's data and private state, the global state."""

    config: ExperimentConfig
    algorithm: Algorithm
    clients: list[ClientData]
    client_states: dict[int, nn.Module]
    server_state: State

    @property
    def eval_split(self) -> str:
        return eval_split(self.config)


def build_clients(config: ExperimentConfig, dataset: Dataset, device: torch.device) -> list[ClientData]:
    """Every client's data (index views of ``dataset`` on ``device``), partitioned from the seed."""
    data_cfg, fed_cfg = config.data, config.federation
    partition = make_partition(
        data_cfg.partition,
        dataset.train_y.numpy(),
        dataset.test_y.numpy(),
        fed_cfg.num_clients,
        numpy_generator(config.seed, "partition"),
        classes_per_client=data_cfg.classes_per_client,
        alpha=data_cfg.dirichlet_alpha,
        min_train_samples=data_cfg.min_train_samples,
    )
    if data_cfg.validation_fraction > 0:
        partition = carve_validation(
            partition, data_cfg.validation_fraction, numpy_generator(config.seed, "validation")
        )
    augment = data_cfg.augment == "on" or (data_cfg.augment == "auto" and dataset.name.startswith("cifar"))
    return build_client_data(dataset.to(device), partition, augment=augment)


def create_client_state(
    algorithm: Algorithm, client_id: int, device: torch.device, arch: str | None = None
) -> nn.Module:
    """Client ``client_id``'s fresh private state, seeded by the client id (``arch`` defaults to the
    config's architecture for it)."""
    config = algorithm.config
    arch = arch or config.architecture_of(client_id)
    return algorithm.create_client(arch, torch_generator(config.seed, "client-init", client_id)).to(device)


def initial_global_state(algorithm: Algorithm, device: torch.device) -> State:
    """The global state before round 1, after checking that every architecture shares the same tensors.

    Raises AdapterMismatchError, before any training, where the shared tensors differ between architectures.
    """
    config = algorithm.config
    archs = config.federation.architectures
    first_of_arch = {
        config.architecture_of(cid): cid for cid in reversed(range(config.federation.num_clients))
    }
    check_homogeneous(
        {
            arch: algorithm.shared_state(create_client_state(algorithm, cid, device))
            for arch, cid in first_of_arch.items()
        }
    )
    template = algorithm.create_client(archs[0], torch_generator(config.seed, "server-init"))
    return algorithm.initial_server_state(template.to(device))


def build_federation(config: ExperimentConfig, dataset: Dataset | None = None) -> Federation:
    """Load and partition the data, create every client's private state and the initial global state.

    Refuses (AdapterMismatchError) a federation whose shared tensors differ between architectures
    before any training happens.
    """
    data_cfg = config.data
    if dataset is None:
        dataset = load_dataset(data_cfg.dataset, data_cfg.data_dir or None, download=data_cfg.download)
    device = resolve_device(config.device)
    clients = build_clients(config, dataset, device)
    algorithm = create_algorithm(config, dataset.input_shape, dataset.num_classes)
    server_state = initial_global_state(algorithm, device)
    client_states = {
        client_id: create_client_state(algorithm, client_id, device)
        for client_id in range(config.federation.num_clients)
    }
    return Federation(config, algorithm, clients, client_states, server_state)


def client_accuracy(algorithm: Algorithm, state: nn.Module, data: ClientData, split: str) -> tuple[int, int]:
    """(correct, total) of one client's personalized predictor on its ``split``."""
    state.eval()
    hits = count = 0
    with torch.inference_mode():
        for x, y in data.eval_batches(split, EVAL_BATCH_SIZE):
            hits += int((algorithm.predict(state, x).argmax(dim=1) == y).sum())
            count += len(y)
    return hits, count


@dataclass(frozen=True)
class ClientResult:
    """What one client's training in one round produced: its upload and what the training cost."""

    upload: Upload
    train_flops: float
    train_samples: int


class ServerSide(Protocol):
    """What the round loop needs of the server: the configuration, the algorithm and the global state."""

    config: ExperimentConfig
    algorithm: Algorithm
    server_state: State


class ClientPool(Protocol):
    """Where a run's clients live and train: in this process (simulator) or on Flower nodes."""

    def declared_examples(self) -> Mapping[int, int]:
        """Each client's number of training samples, as the client declared it."""

    def train(
        self, server_round: int, messages: Mapping[int, State], dropping: Set[int]
    ) -> dict[int, ClientResult]:
        """Deliver each client its message; clients in ``dropping`` (and any that fail) do not reply."""

    def evaluate(self, server_round: int) -> AccuracyReport:
        """Every client's personalized predictor on its own evaluation split."""


class LocalClients:
    """The simulator's client pool: every client's data and private state in this process."""

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


def evaluate(federation: Federation) -> AccuracyReport:
    """Every client's personalized predictor on its own evaluation split."""
    results = [
        client_accuracy(federation.algorithm, federation.client_states[cid], data, federation.eval_split)
        for cid, data in enumerate(federation.clients)
    ]
    return AccuracyReport(tuple(h for h, _ in results), tuple(n for _, n in results))


def run_round(server: ServerSide, clients: ClientPool, server_round: int, channel: Channel) -> dict[str, Any]:
    """One round of training and aggregation, in either runtime; returns the round's cost record.

    A client that drops out (``federation.drop_rate``) receives the server's message but never replies;
    invalid uploads are refused (see :mod:`pfedlora.rounds`).
    """
    config, algorithm = server.config, server.algorithm
    sampled = sample_clients(
        config.federation.num_clients, config.federation.sample_fraction, config.seed, server_round
    )
    channel.reset()
    messages = {
        client_id: channel.download(
            client_id, algorithm.broadcast(server.server_state, client_id, server_round)
        )
        for client_id in sampled
    }
    dropping = {client_id for client_id in sampled if drops_out(config, client_id, server_round)}
    results = clients.train(server_round, messages, dropping)
    replies, per_client = [], []
    for client_id in sampled:
        if client_id not in results:
            continue
        result = results[client_id]
        received = channel.upload(client_id, result.upload.tensors)
        replies.append(Reply(client_id, Upload(received, result.upload.num_examples)))
        per_client.append(
            {
                "client_id": client_id,
                "num_examples": result.upload.num_examples,
                "bytes_down": channel.bytes_down[client_id],
                "bytes_up": channel.bytes_up[client_id],
                "train_flops": result.train_flops,
            }
        )
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
    }


RoundCallback = Callable[[dict[str, Any]], None]
AfterRound = Callable[[int, list[dict[str, Any]]], None]


def run_rounds(
    server: ServerSide,
    clients: ClientPool,
    on_round: RoundCallback | None = None,
    done: Sequence[dict[str, Any]] = (),
    after_round: AfterRound | None = None,
) -> list[dict[str, Any]]:
    """The rounds after those in ``done`` (records of rounds 1..k of this run, when resuming), in either
    runtime; each finished round's record goes to ``on_round``, then ``after_round(round, records)`` runs.
    Returns the records of all rounds."""
    fed_cfg = server.config.federation
    channel = Channel()
    records: list[dict[str, Any]] = list(done)
    cumulative = {
        "bytes": records[-1]["cumulative_bytes"] if records else 0,
        "train_flops": records[-1]["cumulative_train_flops"] if records else 0.0,
    }
    for server_round in range(len(records) + 1, fed_cfg.rounds + 1):
        started = time.perf_counter()
        record = run_round(server, clients, server_round, channel)
        seconds = time.perf_counter() - started
        cumulative["bytes"] += record["bytes_down"] + record["bytes_up"]
        cumulative["train_flops"] += record["train_flops"]
        record.update(
            cumulative_bytes=cumulative["bytes"],
            cumulative_train_flops=cumulative["train_flops"],
            round_seconds=seconds,
            train_samples_per_second=record["train_samples"] / seconds if seconds > 0 else 0.0,
        )
        if server_round % fed_cfg.eval_every == 0 or server_round == fed_cfg.rounds:
            report = clients.evaluate(server_round)
            record.update(
                mean_accuracy=report.mean,
                weighted_accuracy=report.weighted,
                std_accuracy=report.std,
                client_accuracies=list(report.per_client),
            )
            logger.info("round %d: mean accuracy %.4f", server_round, report.mean)
        records.append(record)
        if on_round is not None:
            on_round(record)
        if after_round is not None:
            after_round(server_round, records)
    return records


def run_federation(
    federation: Federation,
    on_round: RoundCallback | None = None,
    done: Sequence[dict[str, Any]] = (),
    checkpointer: Checkpointer | None = None,
    seconds_before: float = 0.0,
) -> list[dict[str, Any]]:
    """:func:`run_rounds` in this process; with a ``checkpointer``, the run is checkpointed every
    ``federation.checkpoint_every`` rounds (not after the last)."""
    fed_cfg = federation.config.federation
    started = time.perf_counter()

    def checkpoint(server_round: int, records: list[dict[str, Any]]) -> None:
        every = fed_cfg.checkpoint_every
        if checkpointer is not None and every and server_round % every == 0 and server_round < fed_cfg.rounds:
            elapsed = seconds_before + time.perf_counter() - started
            checkpointer.save(federation, server_round, records, elapsed)

    return run_rounds(federation, LocalClients(federation, FlopMeter()), on_round, done, checkpoint)


def summarize(federation: Federation, records: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """The run's headline figures (see README for each key)."""
    shared = federation.algorithm.shared_state(federation.client_states[0])
    shared_parameters = sum(t.numel() for t in shared.values())
    return summarize_records(federation.config, records, wall_seconds, shared_parameters)


def summarize_records(
    config: ExperimentConfig, records: list[dict[str, Any]], wall_seconds: float, shared_parameters: int
) -> dict[str, Any]:
    """:func:`summarize` from the configuration and the records alone (what the Flower server has)."""
    evaluated = [r for r in records if "mean_accuracy" in r]
    curve = summarize_curve([r["round"] for r in evaluated], [r["mean_accuracy"] for r in evaluated])
    last = evaluated[-1]
    train_samples = sum(r["train_samples"] for r in records)
    return {
        "algorithm": config.algorithm,
        "dataset": config.data.dataset,
        "partition": config.data.partition,
        "num_clients": config.federation.num_clients,
        "sample_fraction": config.federation.sample_fraction,
        "rounds": config.federation.rounds,
        "seed": config.seed,
        "eval_split": eval_split(config),
        **curve,
        "weighted_accuracy_last": last["weighted_accuracy"],
        "std_accuracy_last": last["std_accuracy"],
        "shared_parameters": shared_parameters,
        "bytes_down_total": sum(r["bytes_down"] for r in records),
        "bytes_up_total": sum(r["bytes_up"] for r in records),
        "bytes_total": records[-1]["cumulative_bytes"],
        "train_flops_total": records[-1]["cumulative_train_flops"],
        "train_samples_total": train_samples,
        **progress_to_target(records, config.federation.target_accuracy),
        "wall_seconds": wall_seconds,
        "train_samples_per_second": train_samples / wall_seconds if wall_seconds > 0 else 0.0,
    }


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path | None = None,
    on_round: RoundCallback | None = None,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Build the federation, run every round, and (if ``out_dir``) write the run directory.

    The directory is created only once the data and the federation are known to be valid, so bad input
    never leaves a half-written one behind; it is checkpointed as the run goes (see :func:`resume_run`).
    Returns the summary.
    """
    started = time.perf_counter()
    federation = build_federation(config, dataset)
    if out_dir is None:
        records = run_federation(federation, on_round)
        return summarize(federation, records, time.perf_counter() - started)
    return _finish(federation, RunWriter(out_dir, config), on_round, (), started, 0.0)


def resume_run(
    run_dir: str | Path, on_round: RoundCallback | None = None, dataset: Dataset | None = None
) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoint (from round 1 if it has none).

    Rounds logged after that checkpoint are discarded and run again; since every random stream is derived
    from the seed, the finished run's metrics equal those of the same run uninterrupted. ``on_round`` first
    receives the records of the rounds kept, then those of the rounds run. Returns the summary.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if (run_dir / SUMMARY_FILE).is_file():
        raise ConfigError(f"{str(run_dir)!r} holds a finished run (it has {SUMMARY_FILE}); nothing to resume")
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE})")
    config = load_config(run_dir / CONFIG_FILE)
    federation = build_federation(config, dataset)
    manifest = restore(federation, run_dir, resolve_device(config.device))
    last = manifest["round"] if manifest else 0
    done = [record for record in read_records(run_dir) if record["round"] <= last]
    logger.info("resuming %s after round %d", run_dir, last)
    writer = RunWriter.reopen(run_dir, done)
    for record in done if on_round is not None else ():
        on_round(record)
    return _finish(federation, writer, on_round, done, started, manifest["wall_seconds"] if manifest else 0.0)


def _finish(
    federation: Federation,
    writer: RunWriter,
    on_round: RoundCallback | None,
    done: Sequence[dict[str, Any]],
    started: float,
    seconds_before: float,
) -> dict[str, Any]:
    def on_record(record: dict[str, Any]) -> None:
        writer.append_round(record)
        if on_round is not None:
            on_round(record)

    try:
        checkpointer = Checkpointer(writer.path)
        records = run_federation(federation, on_record, done, checkpointer, seconds_before)
        summary = summarize(federation, records, seconds_before + time.perf_counter() - started)
        writer.write_summary(summary)
    finally:
        writer.close()
    return summary
