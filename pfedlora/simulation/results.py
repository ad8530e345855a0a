"""The run directory: resolved config, per-round metrics (JSON lines) and the summary.

Per-round lines are flushed as they are written, so a crash loses at most the round in flight; the
summary is written atomically (temporary file, then rename) once the run ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import save

from pfedlora.config import ExperimentConfig, config_to_toml
from pfedlora.errors import ConfigError
from pfedlora.simulation.records import RoundRecord, Summary

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def default_run_dir(config: ExperimentConfig, root: str | Path = "runs") -> Path:
    """``runs/<timestamp>-<algorithm>-<dataset>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{config.algorithm}-{config.data.dataset}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the whole new file."""
    tmp = path.with_name(f".{path.name}.tmp")
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
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


class RunWriter:
    """Creates a run directory and appends to it as the run goes."""

    def __init__(self, path: str | Path, config: ExperimentConfig) -> None:
        """Claim ``path`` (new, or an existing empty directory) for one run: its ``config.toml`` is created
        exclusively, so of two runs started on one directory at once exactly one gets it."""
        self.path = Path(path)
        taken = ConfigError(f"output directory {str(self.path)!r} already exists and is not empty")
        if self.path.exists() and any(self.path.iterdir()):
            raise taken
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path / CONFIG_FILE, "x", encoding="utf-8") as handle:
                handle.write(config_to_toml(config))
                handle.flush()
                os.fsync(handle.fileno())
        except FileExistsError:
            raise taken from None
        self._metrics = open(self.path / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (kept open)

    @classmethod
    def reopen(cls, path: str | Path, records: Sequence[RoundRecord]) -> RunWriter:
        """An existing run directory whose metrics log is rewritten (atomically) to hold ``records``."""
        writer = cls.__new__(cls)
        writer.path = Path(path)
        write_atomic(writer.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))
        writer._metrics = open(writer.path / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        return writer

    def append_round(self, record: RoundRecord) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def write_summary(self, summary: Summary) -> None:
        write_atomic(self.path / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
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
