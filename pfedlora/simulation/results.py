"""The run directory: resolved config, per-round metrics (JSON lines) and the summary.

Per-round lines are flushed as they are written, so a crash loses at most the round in flight; the
summary is written atomically (temporary file, then rename) once the run ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import save

from pfedlora.config import ExperimentConfig, config_to_toml, load_run_config
from pfedlora.errors import ConfigError, DiskWriteError
from pfedlora.simulation.lock import LOCK_FILE, directory_lock
from pfedlora.simulation.records import RoundRecord, Summary, is_evaluated, summarize_records

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def default_run_dir(config: ExperimentConfig, root: str | Path = "runs") -> Path:
    """``runs/<timestamp>-<algorithm>-<dataset>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{config.algorithm}-{config.data.dataset}"


@contextmanager
def writing(path: Path, scratch: Path | None = None) -> Iterator[None]:
    """Turn an ``OSError`` of the block (a full disk, a read-only folder) into a
    :class:`~pfedlora.errors.DiskWriteError` naming ``path``, removing ``scratch`` (a half-written
    temporary file) first."""
    try:
        yield
    except OSError as error:
        if scratch is not None:
            with contextlib.suppress(OSError):
                scratch.unlink(missing_ok=True)
        raise DiskWriteError.of(path, error) from None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the whole new file (also when the
    writing fails: :class:`~pfedlora.errors.DiskWriteError`, and the old file is as it was)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def save_atomic(tensors: Mapping[str, torch.Tensor], path: Path) -> str:
    """Write ``tensors`` to a safetensors file so that readers see either the old or the whole new file;
    returns the SHA-256 of the bytes written."""
    data = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, tmp):
        tmp.write_bytes(data)
        tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def _not_empty(path: Path) -> ConfigError | None:
    """The refusal of ``path`` as a new run directory, unless it is absent or empty (but for its lock)."""
    if path.exists() and any(entry.name != LOCK_FILE for entry in path.iterdir()):
        return ConfigError(f"output directory {str(path)!r} already exists and is not empty")
    return None


@contextmanager
def new_run_directory(path: str | Path) -> Iterator[Path]:
    """Hold the lock (:func:`~pfedlora.simulation.lock.directory_lock`) of ``path``, a new run directory
    (created, or an existing empty one), for the block.

    Refused with one line where another process holds it or it is not empty. Where the block ends before
    the run wrote its ``config.toml`` (bad input found while setting up, a stop), a directory it created is
    removed again, so nothing is left behind.
    """
    path = Path(path)
    if not (path / LOCK_FILE).exists() and (refusal := _not_empty(path)) is not None:
        raise refusal  # a folder of something else: not even a lock file is left in it
    created = not path.exists()
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    with directory_lock(path):
        try:
            if (refusal := _not_empty(path)) is not None:  # a run's directory, or another got in first
                raise refusal
            yield path
        except BaseException:
            if created and not (path / CONFIG_FILE).exists():
                shutil.rmtree(path, ignore_errors=True)
            raise


class RunWriter:
    """Creates a run directory and appends to it as the run goes."""

    def __init__(self, path: str | Path, config: ExperimentConfig) -> None:
        """Claim ``path`` (new, or an existing empty directory) for one run: its ``config.toml`` is created
        exclusively, so of two runs started on one directory at once exactly one gets it (the writers of
        pfedlora hold the directory's lock first: :func:`new_run_directory`)."""
        self.path = Path(path)
        taken = ConfigError(f"output directory {str(self.path)!r} already exists and is not empty")
        if _not_empty(self.path) is not None:
            raise taken
        config_file = self.path / CONFIG_FILE
        with writing(config_file):
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                with open(config_file, "x", encoding="utf-8") as handle:
                    handle.write(config_to_toml(config))
                    handle.flush()
                    os.fsync(handle.fileno())
            except FileExistsError:
                raise taken from None
            except OSError:
                config_file.unlink(missing_ok=True)  # a half-written one would claim the directory
                raise
            self._metrics = open(self.path / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (kept open)

    @classmethod
    def reopen(cls, path: str | Path, records: Sequence[RoundRecord]) -> RunWriter:
        """An existing run directory whose metrics log is rewritten (atomically) to hold ``records``."""
        writer = cls.__new__(cls)
        writer.path = Path(path)
        write_atomic(writer.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))
        with writing(writer.path / METRICS_FILE):
            writer._metrics = open(writer.path / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        return writer

    def append_round(self, record: RoundRecord) -> None:
        """Append one round's line, flushed (a line the disk cut short is dropped on reading and resuming)."""
        with writing(self.path / METRICS_FILE):
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def write_summary(self, summary: Summary) -> None:
        write_atomic(self.path / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        """Close the metrics log (every line was flushed as it was written: what a full disk kept from the
        last one is dropped when the log is read)."""
        with contextlib.suppress(OSError):
            self._metrics.close()


def read_records(path: str | Path) -> list[RoundRecord]:
    """The per-round records logged in run directory ``path``, skipping a last line cut off by a crash."""
    metrics_path = Path(path) / METRICS_FILE
    if not metrics_path.is_file():
        return []
    records: list[RoundRecord] = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line the crash cut short: it and anything after it are not trusted
    return records


def read_run(path: str | Path) -> tuple[list[RoundRecord], Summary]:
    """The per-round records and the summary of a finished run directory.

    A metrics line that is not a JSON object is skipped with a warning naming it; ConfigError when the
    summary is unreadable or no record is.
    """
    path = Path(path)
    summary_path, metrics_path = path / SUMMARY_FILE, path / METRICS_FILE
    if not summary_path.is_file() or not metrics_path.is_file():
        raise ConfigError(
            f"{str(path)!r} is not a finished run directory (no {SUMMARY_FILE} or {METRICS_FILE})"
        )
    records: list[RoundRecord] = []
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
        summary: Summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{summary_path} is damaged ({error}); rerun or restore it") from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{summary_path} is damaged (not a JSON object); rerun or restore it")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "round" in record:
            records.append(record)  # type: ignore[arg-type]
        else:
            logger.warning("%s line %d is damaged and skipped: %.60s", metrics_path, number, line)
    if not records:
        raise ConfigError(f"{metrics_path} holds no readable round record")
    return records, summary


def read_unfinished_run(path: str | Path) -> tuple[list[RoundRecord], Summary]:
    """The records so far of a run directory without a summary (a run still going, or stopped), and the
    summary they give (``rounds``: the rounds planned; ``shared_parameters``: None, not known from the files;
    ``wall_seconds``: the rounds' own seconds). Nothing is written. ConfigError when ``path`` is not a run
    directory or no round has been evaluated yet."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"{str(path)!r} is not a run directory (no {CONFIG_FILE})")
    config = load_run_config(path / CONFIG_FILE)
    records = read_records(path)
    if not any(is_evaluated(record) for record in records):
        raise ConfigError(f"{str(path)!r} is a run without an evaluated round yet; nothing to report")
    wall_seconds = sum(record["round_seconds"] for record in records)
    return records, summarize_records(config, records, wall_seconds, None)
