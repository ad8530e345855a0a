"""Ctrl-C in a real terminal and SIGTERM from a scheduler stop a run, a comparison or a search within seconds:
one line (where it stood, how to continue), no traceback from any process, no worker left behind, exit
130 / 143; the resumed run's metrics are an uninterrupted run's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pfedlora.simulation import TIMING_KEYS, read_run, run_experiment
from pfedlora.simulation.checkpoint import checkpoint_round
from tests.conftest import TINY_OVERRIDES
from tests.terminal import Terminal

TARGET = Path(__file__).with_name("crash_target.py")
LONG = ("federation.rounds=30", "federation.checkpoint_every=2", "federation.eval_every=5")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PFEDLORA_WORKERS": "2", "COLUMNS": "200"}


def _sets(*extra: str) -> list[str]:
    return [arg for item in (*TINY_OVERRIDES, *LONG, *extra) for arg in ("--set", item)]


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _when_checkpointed(terminal: Terminal, *run_dirs: Path, at_least: int = 4) -> None:
    deadline = time.monotonic() + 120
    while not all(checkpoint_round(d) >= at_least for d in run_dirs):
        if terminal.status is not None or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint of round {at_least} came:\n{terminal.output[-3000:]}")
        try:
            os.waitpid(terminal.pid, os.WNOHANG)
        except ChildProcessError:
            pytest.fail(f"the command ended early:\n{terminal.output[-3000:]}")
        time.sleep(0.02)


def _stopped_cleanly(terminal: Terminal, stop: str, status: int) -> str:
    """Stop the command (``ctrl-c``, or SIGTERM to its whole process group); its one line."""
    pressed = time.monotonic()
    if stop == "ctrl-c":
        terminal.press_ctrl_c()
    else:
        terminal.signal_group(signal.SIGTERM)
    assert terminal.wait(timeout=30) == status, terminal.output[-3000:]
    assert time.monotonic() - pressed < 6, "the stop took more than a few seconds"
    assert terminal.group_is_gone(), "a worker process outlived the stop"
    output = terminal.output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-6000:].replace("━", "")
    lines = [line for line in output.splitlines() if "stopped by" in line]
    assert len(lines) == 1, output[-3000:]
    return lines[0].strip()


def _resume(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(TARGET), *args], env=ENV, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(
    ("stop", "status", "name"), [("ctrl-c", 130, r"SIGINT \(Ctrl-C\)"), ("sigterm", 143, "SIGTERM")]
)
def test_a_stopped_run_says_where_it_stood_and_resumes_to_the_uninterrupted_metrics(
    tmp_path, tiny_dataset, tiny_config, stop, status, name
):
    run_dir = tmp_path / "run"
    terminal = Terminal(TARGET, "run", "--out", str(run_dir), *_sets(), env=ENV)
    try:
        _when_checkpointed(terminal, run_dir)
        line = _stopped_cleanly(terminal, stop, status)
    finally:
        terminal.kill()
    match = re.fullmatch(
        rf"stopped by {name} in round (\d+) of 30 \(last checkpoint: round (\d+)\); "
        rf"continue with `pfedlora run --resume {re.escape(str(run_dir))}`",
        line,
    )
    assert match, line
    in_round, checkpointed = int(match[1]), int(match[2])
    assert checkpointed == checkpoint_round(run_dir) and checkpointed < in_round <= checkpointed + 2
    assert not (run_dir / "summary.json").exists()

    _resume("run", "-q", "--resume", str(run_dir))
    reference = tmp_path / "reference"
    run_experiment(tiny_config(*LONG), reference, dataset=tiny_dataset, workers=1)
    (records, summary), (expected, expected_summary) = read_run(run_dir), read_run(reference)
    assert _strip(records) == _strip(expected)
    assert summary["mean_accuracy_last"] == expected_summary["mean_accuracy_last"]


def test_ctrl_c_stops_a_comparison_with_parallel_jobs_and_the_same_command_finishes_it(
    tmp_path, tiny_dataset, tiny_config
):
    out = tmp_path / "compare"
    command = ["compare", "-a", "standalone,lg-fedavg", "--jobs", "2", "--workers", "1", "--out", str(out)]
    terminal = Terminal(TARGET, *command, *_sets(), env=ENV)
    try:
        _when_checkpointed(terminal, out / "standalone", out / "lg-fedavg", at_least=2)
        line = _stopped_cleanly(terminal, "ctrl-c", 130)
    finally:
        terminal.kill()
    progress = r"in round \d+ of 30 \(last checkpoint: round \d+\)"
    assert re.fullmatch(
        rf"stopped by SIGINT \(Ctrl-C\): (standalone {progress}, lg-fedavg|lg-fedavg {progress}, standalone) "
        rf"{progress}; 0 of 2 variants in {re.escape(str(out))} are finished and kept; continue with the "
        r"same command: `pfedlora compare -a standalone,lg-fedavg --jobs 2 .*`",
        line,
    ), line

    _resume(*command, "-q", *_sets())
    reference = tmp_path / "reference"
    run_experiment(tiny_config(*LONG, "algorithm=lg-fedavg"), reference, dataset=tiny_dataset, workers=1)
    assert _strip(read_run(out / "lg-fedavg")[0]) == _strip(read_run(reference)[0])


def test_ctrl_c_stops_a_search_in_one_line(tmp_path):
    out = tmp_path / "tune"
    command = ["tune", "-a", "standalone", "-x", "train.lr=0.05,0.1", "--workers", "1", "--out", str(out)]
    terminal = Terminal(TARGET, *command, *_sets("data.validation_fraction=0.2"), env=ENV)
    try:
        _when_checkpointed(terminal, out / "standalone" / "lr=0.05")
        line = _stopped_cleanly(terminal, "ctrl-c", 130)
    finally:
        terminal.kill()
    assert re.fullmatch(
        r"stopped by SIGINT \(Ctrl-C\): standalone/lr=0.05 in round \d+ of 30 "
        r"\(last checkpoint: round \d+\); 0 of 2 variants in .* are finished and kept; "
        r"continue with the same command: `pfedlora tune .*`",
        line,
    ), line
