"""One writer per directory: a live run, comparison or search in a second process keeps every other writer
out (one line, exit 2, nothing touched), readers in, and its lock dies with it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pfedlora.cli import app
from pfedlora.simulation.lock import LOCK_FILE, DirectoryBusyError, directory_lock, live_writer
from tests.conftest import TINY_OVERRIDES

TARGET = Path(__file__).with_name("crash_target.py")
SLOW = ("federation.rounds=6", "federation.checkpoint_every=2")
runner = CliRunner()


def _sets(*extra: str) -> list[str]:
    return [arg for item in (*TINY_OVERRIDES, *SLOW, *extra) for arg in ("--set", item)]


def _paused(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """The CLI in a second process, paused in the middle of round 3 (after the checkpoint of round 2)."""
    marker = tmp_path / "paused"
    process = subprocess.Popen(
        [sys.executable, str(TARGET), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PAUSE_AT": f"3:{marker}"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the live process ended before round 3: {process.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "round 3 was never reached"
        time.sleep(0.05)
    return process, marker


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file below ``folder``: size, modification time and SHA-256."""
    return {
        str(path.relative_to(folder)): (
            path.stat().st_size,
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _refused(result, directory: Path, pid: int) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.stderr
    text = " ".join(result.stderr.split())
    assert str(directory) in text and f"in use by process {pid} " in text, text


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def test_a_live_run_refuses_a_resume_and_a_new_run_on_its_directory_and_lets_report_read_it(tmp_path):
    run_dir = tmp_path / "live"
    process, _ = _paused(tmp_path, "run", "-q", "--out", str(run_dir), *_sets())
    try:
        before = _snapshot(run_dir)
        assert "checkpoint/manifest.json" in before and "metrics.jsonl" in before
        _refused(runner.invoke(app, ["run", "--resume", str(run_dir)]), run_dir, process.pid)
        _refused(runner.invoke(app, ["run", "-q", "--out", str(run_dir), *_sets()]), run_dir, process.pid)
        _refused(runner.invoke(app, ["run", "--resume", str(run_dir), "--rounds", "9"]), run_dir, process.pid)
        assert _snapshot(run_dir) == before  # nothing touched

        report = runner.invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "plots")])
        assert report.exit_code == 0, report.output
        assert f"in progress, written by process {process.pid} " in " ".join(report.stderr.split())
        assert "round 2 of 6" in report.stderr
        assert (tmp_path / "plots" / "accuracy_per_round.png").is_file()
        assert _snapshot(run_dir) == before
    finally:
        _stop(process)
    # The kernel released the lock with the process: no stale lock, the resume runs.
    assert live_writer(run_dir) is None
    resumed = subprocess.run(
        [sys.executable, str(TARGET), "run", "-q", "--resume", str(run_dir)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "summary.json").is_file()


def test_a_live_comparison_refuses_a_second_comparison_and_a_search_on_its_directory(tmp_path):
    out = tmp_path / "compare"
    process, _ = _paused(tmp_path, "compare", "-q", "-a", "standalone", "--out", str(out), *_sets())
    try:
        before = _snapshot(out)
        second = runner.invoke(app, ["compare", "-q", "-a", "standalone", "--out", str(out), *_sets()])
        _refused(second, out, process.pid)
        search = ["tune", "-q", "-a", "standalone", "-x", "train.lr=0.05,0.1", "--out", str(out)]
        _refused(runner.invoke(app, [*search, *_sets("data.validation_fraction=0.2")]), out, process.pid)
        # and a run started by hand in the directory of the variant that runs
        variant = out / "standalone"
        _refused(runner.invoke(app, ["run", "--resume", str(variant)]), variant, process.pid)
        assert _snapshot(out) == before
    finally:
        _stop(process)


def test_a_live_search_refuses_a_second_search_on_its_directory(tmp_path):
    out = tmp_path / "tune"
    search = ["tune", "-q", "-a", "standalone", "-x", "train.lr=0.05,0.1", "--out", str(out)]
    sets = _sets("data.validation_fraction=0.2")
    process, _ = _paused(tmp_path, *search, *sets)
    try:
        before = _snapshot(out)
        _refused(runner.invoke(app, [*search, *sets]), out, process.pid)
        assert _snapshot(out) == before
    finally:
        _stop(process)


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pfedlora.simulation.lock import directory_lock\n"
            "with directory_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(DirectoryBusyError, match=rf"in use by process {holder.pid} on "),
            directory_lock(tmp_path),
        ):
            pass
        assert live_writer(tmp_path) is not None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with directory_lock(tmp_path), directory_lock(tmp_path):  # re-entrant here
        assert (tmp_path / LOCK_FILE).is_file()
    with directory_lock(tmp_path):  # and released by the outer block
        pass
