"""A simulated run from configuration to run directory: build the federation, run every round in this
process, checkpoint as it goes, write the records and the summary; and resuming an interrupted run."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from pfedlora.config import ExperimentConfig, load_config
from pfedlora.data import Dataset
from pfedlora.errors import ConfigError
from pfedlora.metrics import FlopMeter
from pfedlora.simulation.checkpoint import Checkpointer, restore
from pfedlora.simulation.federation import Federation, build_federation
from pfedlora.simulation.local import LocalClients
from pfedlora.simulation.loop import RoundCallback, run_rounds
from pfedlora.simulation.records import RoundRecord, Summary, summarize_records
from pfedlora.simulation.results import CONFIG_FILE, SUMMARY_FILE, RunWriter, read_records

logger = logging.getLogger(__name__)


def run_federation(
    federation: Federation,
    on_round: RoundCallback | None = None,
    done: Sequence[RoundRecord] = (),
    checkpointer: Checkpointer | None = None,
    seconds_before: float = 0.0,
) -> list[RoundRecord]:
    """:func:`~pfedlora.simulation.loop.run_rounds` in this process; with a ``checkpointer``, the run is
    checkpointed every ``federation.checkpoint_every`` rounds (not after the last)."""
    fed_cfg = federation.config.federation
    started = time.perf_counter()

    def checkpoint(server_round: int, records: list[RoundRecord]) -> None:
        every = fed_cfg.checkpoint_every
        if checkpointer is not None and every and server_round % every == 0 and server_round < fed_cfg.rounds:
            elapsed = seconds_before + time.perf_counter() - started
            checkpointer.save(federation, server_round, records, elapsed)

    return run_rounds(federation, LocalClients(federation, FlopMeter()), on_round, done, checkpoint)


def summarize(federation: Federation, records: Sequence[RoundRecord], wall_seconds: float) -> Summary:
    """The run's headline figures (see the README for each key)."""
    shared = federation.algorithm.shared_state(federation.client_states[0])
    shared_parameters = sum(t.numel() for t in shared.values())
    return summarize_records(federation.config, records, wall_seconds, shared_parameters)


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path | None = None,
    on_round: RoundCallback | None = None,
    dataset: Dataset | None = None,
) -> Summary:
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
) -> Summary:
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
    manifest = restore(federation, run_dir)
    last = manifest["round"] if manifest else 0
    done = [record for record in read_records(run_dir) if record["round"] <= last]
    logger.info("resuming %s after round %d", run_dir, last)
    writer = RunWriter.reopen(run_dir, done)
    if on_round is not None:
        for record in done:
            on_round(record)
    return _finish(federation, writer, on_round, done, started, manifest["wall_seconds"] if manifest else 0.0)


def _finish(
    federation: Federation,
    writer: RunWriter,
    on_round: RoundCallback | None,
    done: Sequence[RoundRecord],
    started: float,
    seconds_before: float,
) -> Summary:
    def on_record(record: RoundRecord) -> None:
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
