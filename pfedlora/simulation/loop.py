"""The one round loop of the simulator, shared by every algorithm.

Per round: sample clients (seeded); for each, send the server's message through the byte-counting
channel, let the algorithm train the client's private state, and take its upload back through the channel;
then let the algorithm aggregate. Every ``eval_every`` rounds (and after the last), every client evaluates
its personalized predictor on its own split. Costs are measured, not estimated: bytes from the tensors
sent, FLOPs from PyTorch's counter, seconds from the clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfedlora.algorithms import Algorithm, ClientContext, State, Upload, create_algorithm
from pfedlora.config import ExperimentConfig
from pfedlora.data import (
    ClientData,
    Dataset,
    build_client_data,
    carve_validation,
    load_dataset,
    make_partition,
)
from pfedlora.metrics import AccuracyReport, Channel, FlopMeter, summarize_curve
from pfedlora.models import check_homogeneous
from pfedlora.seeding import numpy_generator, torch_generator
from pfedlora.simulation.results import RunWriter
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
        return "validation" if self.config.data.validation_fraction > 0 else "test"


def build_federation(config: ExperimentConfig, dataset: Dataset | None = None) -> Federation:
    """Load and partition the data, create every client's private state and the initial global state.

    Refuses (AdapterMismatchError) a federation whose shared tensors differ between architectures
    before any training happens.
    """
    data_cfg, fed_cfg = config.data, config.federation
    if dataset is None:
        dataset = load_dataset(data_cfg.dataset, data_cfg.data_dir or None, download=data_cfg.download)
    device = resolve_device(config.device)
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
    clients = build_client_data(dataset.to(device), partition, augment=augment)

    algorithm = create_algorithm(config, dataset.input_shape, dataset.num_classes)
    client_states = {
        client_id: algorithm.create_client(
            config.architecture_of(client_id), torch_generator(config.seed, "client-init", client_id)
        ).to(device)
        for client_id in range(fed_cfg.num_clients)
    }
    first_of_arch = {config.architecture_of(cid): cid for cid in reversed(range(fed_cfg.num_clients))}
    check_homogeneous(
        {arch: algorithm.shared_state(client_states[cid]) for arch, cid in first_of_arch.items()}
    )
    template = algorithm.create_client(fed_cfg.architectures[0], torch_generator(config.seed, "server-init"))
    server_state = algorithm.initial_server_state(template.to(device))
    return Federation(config, algorithm, clients, client_states, server_state)


def evaluate(federation: Federation) -> AccuracyReport:
    """Every client's personalized predictor on its own evaluation split."""
    correct, totals = [], []
    for client_id, data in enumerate(federation.clients):
        state = federation.client_states[client_id]
        state.eval()
        hits = count = 0
        with torch.inference_mode():
            for x, y in data.eval_batches(federation.eval_split, EVAL_BATCH_SIZE):
                hits += int((federation.algorithm.predict(state, x).argmax(dim=1) == y).sum())
                count += len(y)
        correct.append(hits)
        totals.append(count)
    return AccuracyReport(tuple(correct), tuple(totals))


def run_round(
    federation: Federation, server_round: int, channel: Channel, meter: FlopMeter
) -> dict[str, Any]:
    """One round of training and aggregation; returns its per-client cost records."""
    config, algorithm = federation.config, federation.algorithm
    sampled = sample_clients(
        config.federation.num_clients, config.federation.sample_fraction, config.seed, server_round
    )
    uploads: list[Upload] = []
    per_client = []
    samples_before = meter.samples
    for client_id in sampled:
        channel.reset()
        meter.reset()
        state = federation.client_states[client_id]
        outgoing = algorithm.broadcast(federation.server_state, client_id, server_round)
        message = channel.download(client_id, outgoing)
        ctx = ClientContext(
            client_id=client_id,
            arch=config.architecture_of(client_id),
            server_round=server_round,
            data=federation.clients[client_id],
            generator=torch_generator(config.seed, "train", client_id, server_round),
            meter=meter,
        )
        state.train()
        upload = algorithm.train(state, message, ctx)
        uploads.append(Upload(channel.upload(client_id, upload.tensors), upload.num_examples))
        per_client.append(
            {
                "client_id": client_id,
                "num_examples": upload.num_examples,
                "bytes_down": channel.total_down,
                "bytes_up": channel.total_up,
                "train_flops": meter.total,
            }
        )
    federation.server_state = algorithm.aggregate(federation.server_state, uploads, server_round)
    return {
        "round": server_round,
        "sampled": sampled,
        "bytes_down": sum(c["bytes_down"] for c in per_client),
        "bytes_up": sum(c["bytes_up"] for c in per_client),
        "train_flops": sum(c["train_flops"] for c in per_client),
        "train_samples": meter.samples - samples_before,
        "clients": per_client,
    }


RoundCallback = Callable[[dict[str, Any]], None]


def run_federation(federation: Federation, on_round: RoundCallback | None = None) -> list[dict[str, Any]]:
    """All rounds; each finished round's record goes to ``on_round`` and into the returned list."""
    fed_cfg = federation.config.federation
    channel, meter = Channel(), FlopMeter()
    records: list[dict[str, Any]] = []
    cumulative = {"bytes": 0, "train_flops": 0.0}
    for server_round in range(1, fed_cfg.rounds + 1):
        started = time.perf_counter()
        record = run_round(federation, server_round, channel, meter)
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
            report = evaluate(federation)
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
    return records


def summarize(federation: Federation, records: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """The run's headline figures (see README for each key)."""
    config = federation.config
    evaluated = [r for r in records if "mean_accuracy" in r]
    curve = summarize_curve([r["round"] for r in evaluated], [r["mean_accuracy"] for r in evaluated])
    target = config.federation.target_accuracy
    reached = next((r for r in evaluated if r["mean_accuracy"] >= target), None)
    last = evaluated[-1]
    train_samples = sum(r["train_samples"] for r in records)
    shared = federation.algorithm.shared_state(federation.client_states[0])
    return {
        "algorithm": config.algorithm,
        "dataset": config.data.dataset,
        "partition": config.data.partition,
        "num_clients": config.federation.num_clients,
        "sample_fraction": config.federation.sample_fraction,
        "rounds": config.federation.rounds,
        "seed": config.seed,
        "eval_split": federation.eval_split,
        **curve,
        "weighted_accuracy_last": last["weighted_accuracy"],
        "std_accuracy_last": last["std_accuracy"],
        "shared_parameters": sum(t.numel() for t in shared.values()),
        "bytes_down_total": sum(r["bytes_down"] for r in records),
        "bytes_up_total": sum(r["bytes_up"] for r in records),
        "bytes_total": records[-1]["cumulative_bytes"],
        "train_flops_total": records[-1]["cumulative_train_flops"],
        "train_samples_total": train_samples,
        "target_accuracy": target,
        "target_round": reached["round"] if reached else None,
        "bytes_to_target": reached["cumulative_bytes"] if reached else None,
        "train_flops_to_target": reached["cumulative_train_flops"] if reached else None,
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
    never leaves a half-written one behind. Returns the summary.
    """
    started = time.perf_counter()
    federation = build_federation(config, dataset)
    writer = RunWriter(out_dir, config) if out_dir is not None else None

    def on_record(record: dict[str, Any]) -> None:
        if writer is not None:
            writer.append_round(record)
        if on_round is not None:
            on_round(record)

    try:
        records = run_federation(federation, on_record)
        summary = summarize(federation, records, time.perf_counter() - started)
        if writer is not None:
            writer.write_summary(summary)
    finally:
        if writer is not None:
            writer.close()
    return summary
