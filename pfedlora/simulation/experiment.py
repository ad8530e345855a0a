"""A simulated run from configuration to run directory: set up the server and the clients (in this process,
or in a pool of worker processes), run every round, checkpoint as it goes, write the records and the
summary; and resuming an interrupted run."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pfedlora.algorithms import ALGORITHMS, create_algorithm
from pfedlora.algorithms.training import log_precision
from pfedlora.config import ExperimentConfig, config_to_toml, load_run_config, replace
from pfedlora.data import Dataset
from pfedlora.errors import ConfigError, DiskWriteError
from pfedlora.hardware import intra_op_threads
from pfedlora.metrics import FlopMeter
from pfedlora.models.peft_lora import save_peft_state
from pfedlora.simulation.checkpoint import (
    CHECKPOINT_DIR,
    Checkpointer,
    Manifest,
    check_config,
    checkpoint_round,
    read_manifest,
    restore,
)
from pfedlora.simulation.federation import (
    Federation,
    build_federation,
    create_client_state,
    initial_global_state,
    load_run_dataset,
    resolve_device,
)
from pfedlora.simulation.local import LocalClients
from pfedlora.simulation.lock import directory_lock
from pfedlora.simulation.loop import RoundCallback, Server, ServerSide, StatefulPool, run_rounds
from pfedlora.simulation.records import RoundRecord, Summary, summarize_records
from pfedlora.simulation.results import (
    CONFIG_FILE,
    SUMMARY_FILE,
    RunWriter,
    new_run_directory,
    read_records,
    write_atomic,
    writing,
)
from pfedlora.simulation.workers import WorkerPool, usable_cores
from pfedlora.stopping import RunStopped, run_state, signal_of

logger = logging.getLogger(__name__)


WORKERS_ENV = "PFEDLORA_WORKERS"
STORE_DIR = "clients"
"""The run directory's folder of client states that did not fit the memory budget (while the run runs)."""


def default_workers(config: ExperimentConfig) -> int:
    """Worker processes when none are asked for: ``$PFEDLORA_WORKERS`` if set, else one per usable core on
    the CPU and none (this process) on CUDA."""
    if os.environ.get(WORKERS_ENV):
        try:
            return int(os.environ[WORKERS_ENV])
        except ValueError:
            raise ConfigError(f"${WORKERS_ENV}={os.environ[WORKERS_ENV]!r} is not a whole number") from None
    return 0 if resolve_device(config.device).type == "cuda" else usable_cores()


@contextmanager
def open_run(
    config: ExperimentConfig,
    dataset: Dataset | None = None,
    workers: int | None = None,
    run_dir: Path | None = None,
) -> Iterator[tuple[ServerSide, StatefulPool]]:
    """The server side and the client pool of a run (``workers`` None: :func:`default_workers`).

    - 0: every client lives and trains in this process (a :class:`Federation`), with PyTorch's intra-op
      threads (all cores unless set otherwise);
    - 1: the same with one intra-op thread (set for the block, then restored);
    - N > 1: the clients live in N worker processes of one intra-op thread each, stopped when the block
      ends.

    Every N >= 1 computes the same numbers: each client trains on one thread, wherever it lives. Client
    states beyond the memory budget spill into ``run_dir``'s ``clients/`` folder (a temporary folder when
    None), emptied when the block starts and removed when it ends.
    """
    log_precision(config.train, resolve_device(config.device))
    if dataset is None:
        dataset = load_run_dataset(config)
    workers = default_workers(config) if workers is None else workers
    if workers < 0:
        raise ConfigError(f"workers: {workers} is out of range; allowed: 0 (this process) or more")
    store_folder = None if run_dir is None else Path(run_dir) / STORE_DIR
    if store_folder is not None:
        shutil.rmtree(store_folder, ignore_errors=True)  # what a crashed run left: newer than its checkpoint
    try:
        if workers <= 1:
            federation = build_federation(config, dataset, store_folder=store_folder)
            with intra_op_threads(1 if workers == 1 else torch.get_num_threads()):
                yield federation, LocalClients(federation, FlopMeter())
            return
        algorithm = create_algorithm(config, dataset.input_shape, dataset.num_classes)
        server = Server(config, algorithm, initial_global_state(algorithm, resolve_device(config.device)))
        with WorkerPool(config, dataset, workers, store_folder=store_folder) as pool:
            yield server, pool
    finally:
        if store_folder is not None:
            shutil.rmtree(store_folder, ignore_errors=True)


def run_federation(
    federation: Federation,
    on_round: RoundCallback | None = None,
    done: Sequence[RoundRecord] = (),
) -> list[RoundRecord]:
    """Every round (after those in ``done``) of ``federation``, its clients trained in this process."""
    return run_rounds(federation, LocalClients(federation, FlopMeter()), on_round, done)


def summarize(server: ServerSide, records: Sequence[RoundRecord], wall_seconds: float) -> Summary:
    """The run's headline figures (see the README for each key)."""
    template = create_client_state(server.algorithm, 0, resolve_device(server.config.device))
    shared_parameters = sum(t.numel() for t in server.algorithm.shared_state(template).values())
    return summarize_records(server.config, records, wall_seconds, shared_parameters)


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path | None = None,
    on_round: RoundCallback | None = None,
    dataset: Dataset | None = None,
    workers: int | None = None,
) -> Summary:
    """Set up the run (see :func:`open_run` for ``workers``), run every round, and (if ``out_dir``) write
    the run directory.

    The directory is locked for this process while the run writes it (a second writer is refused, see
    :mod:`~pfedlora.simulation.lock`) and removed again if the data or the federation turn out invalid, so
    bad input never leaves a half-written one behind; it is checkpointed as the run goes (see
    :func:`resume_run`). Returns the summary.
    """
    started = time.perf_counter()
    if out_dir is None:
        with open_run(config, dataset, workers) as (server, clients):
            records = run_rounds(server, clients, on_round)
            return summarize(server, records, time.perf_counter() - started)
    try:
        with (
            new_run_directory(out_dir) as run_dir,
            open_run(config, dataset, workers, run_dir) as (server, clients),
        ):
            return finish_run(server, clients, RunWriter(run_dir, config), on_round, (), started)
    except KeyboardInterrupt as stop:  # while setting up, the directory is gone again (nothing was written)
        raise setup_stopped(stop, Path(out_dir), config.federation.rounds) from None


def resume_run(
    run_dir: str | Path,
    on_round: RoundCallback | None = None,
    dataset: Dataset | None = None,
    workers: int | None = None,
    *,
    rounds: int | None = None,
    previous_checkpoint: bool = False,
) -> Summary:
    """Continue the run in ``run_dir`` from its last checkpoint (from round 1 if it has none).

    Rounds logged after that checkpoint are discarded and run again; since every random stream is derived
    from the seed, the finished run's metrics equal those of the same run uninterrupted. The checkpoint's
    files must match their digests and ``config.toml`` the configuration they were written under (else
    ConfigError naming what differs). ``rounds`` sets a new ``federation.rounds``, also for a finished
    run: the metrics are then those of a run of ``rounds`` rounds from the start (refused for algorithms
    whose schedule spans the rounds, e.g. FedKD). ``previous_checkpoint`` continues from the checkpoint
    before the last (when the last is damaged). ``on_round`` first receives the records of the rounds kept,
    then those of the rounds run. The directory is locked for this process first: while another process
    writes it, the resume is refused before anything is read or written. Returns the summary.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE})")
    try:
        with directory_lock(run_dir):
            return _resume_locked(run_dir, on_round, dataset, workers, rounds, previous_checkpoint)
    except KeyboardInterrupt as stop:  # while setting up the resume, the directory is as it was
        total = rounds or load_run_config(run_dir / CONFIG_FILE).federation.rounds
        raise setup_stopped(stop, run_dir, total) from None


def setup_stopped(stop: KeyboardInterrupt, run_dir: Path, rounds: int) -> RunStopped:
    """``stop`` as a :class:`~pfedlora.stopping.RunStopped` of the run in ``run_dir`` (of ``rounds``
    rounds); one that came before the rounds began says "while setting up"."""
    if isinstance(stop, RunStopped):
        return stop
    resumable = (run_dir / CONFIG_FILE).is_file()
    return RunStopped(signal_of(stop), str(run_dir), None, rounds, checkpoint_round(run_dir), resumable)


def _resume_locked(
    run_dir: Path,
    on_round: RoundCallback | None,
    dataset: Dataset | None,
    workers: int | None,
    rounds: int | None,
    previous_checkpoint: bool,
) -> Summary:
    """:func:`resume_run` once this process holds ``run_dir``'s lock."""
    started = time.perf_counter()
    config = load_run_config(run_dir / CONFIG_FILE)
    finished = (run_dir / SUMMARY_FILE).is_file()
    if finished and (rounds is None or rounds <= config.federation.rounds):
        raise ConfigError(
            f"{str(run_dir)!r} holds a finished run of {config.federation.rounds} rounds (it has "
            f"{SUMMARY_FILE}); nothing to resume (to run more rounds, give rounds > "
            f"{config.federation.rounds})"
        )
    manifest = read_manifest(run_dir, previous_checkpoint)
    last = manifest["round"] if manifest else 0
    if manifest is not None:
        check_config(manifest, config, run_dir / CHECKPOINT_DIR)
    if rounds is not None and rounds != config.federation.rounds:
        config = _with_rounds(config, rounds, last)
        if finished:
            (run_dir / SUMMARY_FILE).unlink()
        write_atomic(run_dir / CONFIG_FILE, config_to_toml(config))
    with open_run(config, dataset, workers, run_dir) as (server, clients):
        writer, done = continue_run(run_dir, server, clients, manifest)
        if on_round is not None:
            for record in done:
                on_round(record)
        return finish_run(server, clients, writer, on_round, done, started, manifest)


def continue_run(
    run_dir: Path, server: ServerSide, clients: StatefulPool, manifest: Manifest | None
) -> tuple[RunWriter, list[RoundRecord]]:
    """Load checkpoint ``manifest`` (None: start over) of ``run_dir`` into ``server`` and ``clients``; the
    run directory's writer, its metrics cut to the rounds the checkpoint holds, and those rounds' records."""
    done = restore_checkpoint(run_dir, server, clients, manifest)
    logger.info("resuming %s after round %d", run_dir, manifest["round"] if manifest else 0)
    return RunWriter.reopen(run_dir, done), done


def restore_checkpoint(
    run_dir: Path, server: ServerSide, clients: StatefulPool, manifest: Manifest | None
) -> list[RoundRecord]:
    """Load checkpoint ``manifest`` (None: none) of ``run_dir`` into ``server`` and ``clients``; the logged
    records of the rounds it holds (the directory is not written)."""
    if manifest is not None:
        restore(run_dir, server, clients, manifest)
    last = manifest["round"] if manifest else 0
    return [record for record in read_records(run_dir) if record["round"] <= last]


@dataclass(frozen=True)
class FinalState:
    """A finished run rebuilt in memory: its configuration, its federation after the last round, the
    records of the rounds replayed to rebuild it, and the mean accuracy the run itself logged last."""

    config: ExperimentConfig
    federation: Federation
    records: list[RoundRecord]
    replayed_from: int
    """The round of the checkpoint the replay started from (0: the start)."""
    logged_accuracy: float | None

    @property
    def matches(self) -> bool:
        """Whether the replay ends at the mean accuracy the run logged (the same clients, bit for bit)."""
        return self.logged_accuracy == self.records[-1].get("mean_accuracy")


def final_state(run_dir: str | Path, dataset: Dataset | None = None) -> FinalState:
    """The federation of the run in ``run_dir`` as it was after its last round: from its last checkpoint
    (or the start), the later rounds run again in this process with one intra-op thread, as worker
    processes train (every random stream derives from the seed, so they are the run's rounds again; a run
    trained with more threads per client can differ in the last bits: :attr:`FinalState.matches` says).
    Nothing is written."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE})")
    config = load_run_config(run_dir / CONFIG_FILE)
    federation = build_federation(config, dataset)
    clients = LocalClients(federation, FlopMeter())
    manifest = read_manifest(run_dir)
    done = restore_checkpoint(run_dir, federation, clients, manifest)
    with intra_op_threads(1):
        records = run_rounds(federation, clients, None, done)
    logged = read_records(run_dir)
    last = logged[-1].get("mean_accuracy") if len(logged) == len(records) else None
    return FinalState(config, federation, records, manifest["round"] if manifest else 0, last)


def _with_rounds(config: ExperimentConfig, rounds: int, checkpoint_round: int) -> ExperimentConfig:
    """``config`` with ``federation.rounds = rounds``, refused where the rounds already checkpointed would
    not be those of a run that long from the start."""
    if ALGORITHMS[config.algorithm].schedule_spans_rounds:
        raise ConfigError(
            f"{config.algorithm}'s schedule spans federation.rounds ({config.federation.rounds}): its rounds "
            f"so far would not be those of a {rounds}-round run; start a new run instead"
        )
    if rounds <= checkpoint_round:
        raise ConfigError(
            f"rounds: {rounds} is out of range; the checkpoint holds round {checkpoint_round}, so allowed: "
            f"{checkpoint_round + 1} or more"
        )
    return replace(config, federation=dataclasses.replace(config.federation, rounds=rounds))


ADAPTER_DIR = "adapter"
"""The run directory's folder of the final global adapter in PEFT's format (where it is one)."""


def write_global_adapter(run_dir: Path, server: ServerSide) -> Path | None:
    """Write the final global adapter into ``run_dir/adapter/`` in PEFT's format, where the algorithm's
    global state is one (:meth:`~pfedlora.algorithms.Algorithm.peft_adapter`); the folder, or None."""
    adapter = server.algorithm.peft_adapter(server.server_state)
    if adapter is None:
        return None
    folder = run_dir / ADAPTER_DIR
    with writing(folder):
        shutil.rmtree(folder, ignore_errors=True)
        return save_peft_state(
            adapter.tensors, folder, adapter.targets, adapter.rank, adapter.alpha, adapter.prefix
        )


def finish_run(
    server: ServerSide,
    clients: StatefulPool,
    writer: RunWriter,
    on_round: RoundCallback | None,
    done: Sequence[RoundRecord],
    started: float,
    restored: Manifest | None = None,
) -> Summary:
    """Run the rounds after ``done`` (those of checkpoint ``restored``) into ``writer``'s directory,
    checkpointing every ``federation.checkpoint_every`` rounds (not after the last), then write the
    summary (the wall time counts the checkpoint's and the time since ``started``). A stop (SIGINT,
    SIGTERM: :mod:`pfedlora.stopping`) ends it with :class:`~pfedlora.stopping.RunStopped`, saying where."""
    seconds_before = restored["wall_seconds"] if restored else 0.0
    fed_cfg = server.config.federation
    checkpointer = Checkpointer(writer.path, restored)
    in_round = len(done) + 1  # the round whose work (training, logging, checkpointing) is under way

    def on_record(record: RoundRecord) -> None:
        writer.append_round(record)
        if on_round is not None:
            on_round(record)

    def checkpoint(server_round: int, records: list[RoundRecord]) -> None:
        nonlocal in_round
        every = fed_cfg.checkpoint_every
        if every and server_round % every == 0 and server_round < fed_cfg.rounds:
            elapsed = seconds_before + time.perf_counter() - started
            checkpointer.save(server, clients, server_round, records, elapsed)
        in_round = server_round + 1

    try:
        records = run_rounds(server, clients, on_record, done, checkpoint)
        summary = summarize(server, records, seconds_before + time.perf_counter() - started)
        write_global_adapter(writer.path, server)
        writer.write_summary(summary)
    except KeyboardInterrupt as stop:  # the files are as a crash would leave them: the checkpoint intact
        signum, where = signal_of(stop), str(writer.path)
        # The directory says which checkpoint a resume starts from: a stop that lands just after one was
        # written, before this process noted it, must name that one.
        saved = checkpoint_round(writer.path)
        raise RunStopped(signum, where, max(in_round, saved + 1), fed_cfg.rounds, saved, True) from None
    except DiskWriteError as error:  # the same, and the message says so
        state = run_state(in_round, fed_cfg.rounds, checkpointer.round)
        raise DiskWriteError(error.path, error.reason, f"the run stopped {state}") from None
    finally:
        writer.close()
    return summary
