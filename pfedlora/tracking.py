"""Every round's figures streamed to experiment trackers, beside ``metrics.jsonl`` (off by default).

``pfedlora run --log tensorboard`` (and ``compare --log tensorboard``: one run per variant) writes TensorBoard
event files into ``RUN_DIR/tensorboard``, so ``tensorboard --logdir runs/`` shows every run side by side. A
round's step is its number; the scalars are those of :func:`round_scalars`, and the resolved configuration
goes in as hyperparameters. A resumed run first replays the rounds it keeps: its writer starts with a purge
at step 1, so TensorBoard drops what the interrupted process had written and each curve holds each round
once. ``--log mlflow`` logs the same figures to MLflow (:class:`MLflowTracker`). A tracker joins
:data:`TRACKERS` by registering a factory ``(run_dir, config) -> Tracker``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from pfedlora.config import ExperimentConfig, flat_config
from pfedlora.errors import ConfigError
from pfedlora.registry import Registry
from pfedlora.simulation.records import RoundRecord
from pfedlora.simulation.results import SUMMARY_FILE

TENSORBOARD_DIR = "tensorboard"
"""Where a run directory keeps its TensorBoard event files."""


class Tracker(ABC):
    """Receives every round's record as the run goes; closed when the run ends, however it ends."""

    requires: ClassVar[tuple[str, str]] = ("", "")
    """The module the tracker imports and the extra that installs it (checked before a run starts)."""

    @abstractmethod
    def log_round(self, record: RoundRecord) -> None:
        """Record one round (rounds come in order; a resumed run replays the rounds it keeps first)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release what the tracker holds."""


TrackerFactory = Callable[[Path, ExperimentConfig], Tracker]
TRACKERS: Registry[TrackerFactory] = Registry("--log")  # "--log: unknown value 'x'; allowed: tensorboard"
"""Every tracker, by the name ``--log`` takes."""


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """The figures of one round by tag: evaluation (mean and weighted accuracy, or the task's perplexity),
    costs (bytes, client FLOPs, server FLOPs, cumulative ones), time and refused updates."""
    scalars: dict[str, float] = {
        "cost/megabytes_down": record["bytes_down"] / 1e6,
        "cost/megabytes_up": record["bytes_up"] / 1e6,
        "cost/cumulative_megabytes": record["cumulative_bytes"] / 1e6,
        "cost/client_tflops": record["train_flops"] / 1e12,
        "cost/cumulative_client_tflops": record["cumulative_train_flops"] / 1e12,
        "cost/server_tflops": record.get("server_flops", 0.0) / 1e12,
        "time/round_seconds": record["round_seconds"],
        "clients/aggregated": float(len(record["aggregated"])),
        "clients/refused": float(len(record["refused"])),
        "clients/dropped": float(len(record["dropped"])),
    }
    for key in ("mean_accuracy", "weighted_accuracy", "std_accuracy", "mean_perplexity", "median_perplexity"):
        if key in record:
            scalars[f"eval/{key}"] = float(record[key])
    if record.get("privacy_epsilon") is not None:
        scalars["privacy/epsilon"] = float(record["privacy_epsilon"])  # type: ignore[arg-type]
    return scalars


def hyperparameters(config: ExperimentConfig) -> dict[str, Any]:
    """The resolved configuration as flat hyperparameters (lists written out as text)."""
    return {
        key: value if isinstance(value, bool | int | float | str) else str(list(value))
        for key, value in flat_config(config).items()
    }


class TensorBoardTracker(Tracker):
    """Scalars per round and the configuration as hyperparameters, in ``RUN_DIR/tensorboard``."""

    requires = ("tensorboard", "tensorboard")

    def __init__(self, run_dir: Path, config: ExperimentConfig) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise ConfigError(
                "--log tensorboard needs the tensorboard package: pip install 'pfedlora[tensorboard]'"
            ) from None
        folder = Path(run_dir) / TENSORBOARD_DIR
        resumed = folder.is_dir()
        self.writer = SummaryWriter(str(folder), purge_step=1 if resumed else None)
        if not resumed:
            headline = (
                "eval/mean_perplexity" if config.data.task == "language-modeling" else "eval/mean_accuracy"
            )
            experiment, session_start, _ = hparams(hyperparameters(config), {headline: 0.0})
            file_writer = self.writer.file_writer
            assert file_writer is not None  # made by SummaryWriter's constructor
            for summary in (experiment, session_start):
                file_writer.add_summary(summary)

    def log_round(self, record: RoundRecord) -> None:
        for tag, value in round_scalars(record).items():
            self.writer.add_scalar(tag, value, record["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


TRACKERS.add("tensorboard", TensorBoardTracker)

MLFLOW_RUN_FILE = "mlflow-run-id"
"""The run directory's note of its MLflow run, so that a resume continues that run."""


class MLflowTracker(Tracker):
    """Metrics per round and the configuration as parameters, in one MLflow run per run directory, on the
    tracking server MLflow is configured for (``MLFLOW_TRACKING_URI``; the experiment ``pfedlora`` unless
    ``MLFLOW_EXPERIMENT_NAME`` says otherwise). A resume continues the same run from the round after the
    last it logged."""

    requires = ("mlflow", "mlflow")

    def __init__(self, run_dir: Path, config: ExperimentConfig) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("--log mlflow needs MLflow: pip install 'pfedlora[mlflow]'") from None
        self.client, self.run_dir = MlflowClient(), Path(run_dir)
        note = self.run_dir / MLFLOW_RUN_FILE
        self.logged = 0  # the last round the MLflow run holds
        if note.is_file():
            self.run_id = note.read_text().strip()
            history = self.client.get_metric_history(self.run_id, "cost/cumulative_megabytes")
            self.logged = max((m.step for m in history), default=0)
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "pfedlora")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(
            experiment_id, run_name=self.run_dir.name, tags={"pfedlora.run_dir": str(self.run_dir.resolve())}
        )
        self.run_id = run.info.run_id
        note.write_text(self.run_id + "\n")
        from mlflow.entities import Param

        params = [Param(key, str(value)) for key, value in hyperparameters(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_round(self, record: RoundRecord) -> None:
        if record["round"] <= self.logged:
            return  # a resume replays the rounds it keeps: MLflow holds them already
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(tag, value, stamp, record["round"]) for tag, value in round_scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.logged = record["round"]

    def close(self) -> None:
        finished = (self.run_dir / SUMMARY_FILE).is_file()
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


TRACKERS.add("mlflow", MLflowTracker)


def check_trackers(names: Sequence[str]) -> None:
    """Refuse (ConfigError, one line) a name not in :data:`TRACKERS`, or a tracker whose package is missing,
    before anything runs."""
    for name in names:
        factory = TRACKERS.get(name)
        module, extra = getattr(factory, "requires", ("", ""))
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"--log {name} needs the {module} package: pip install 'pfedlora[{extra}]'")


class Trackers:
    """The trackers ``names`` (each in :data:`TRACKERS`) of the run in ``run_dir``, opened at the first round
    they receive (the run directory exists by then) and closed by :meth:`close`."""

    def __init__(self, names: list[str], run_dir: Path, config: ExperimentConfig) -> None:
        check_trackers(names)
        self.names, self.run_dir, self.config = names, Path(run_dir), config
        self.opened: list[Tracker] | None = None

    def log_round(self, record: RoundRecord) -> None:
        if self.opened is None:
            self.opened = []
            for name in self.names:
                self.opened.append(TRACKERS[name](self.run_dir, self.config))
        for tracker in self.opened:
            tracker.log_round(record)

    def close(self) -> None:
        for tracker in self.opened or ():
            tracker.close()


@contextmanager
def tracking(names: list[str], run_dir: Path, config: ExperimentConfig) -> Iterator[Trackers]:
    """:class:`Trackers` for the run in ``run_dir``, closed at the end of the block however it ends."""
    trackers = Trackers(names, run_dir, config)
    try:
        yield trackers
    finally:
        trackers.close()
