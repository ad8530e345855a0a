"""A full disk (or any OSError) while writing the metrics, a checkpoint or the client store ends the run with
one line naming the path and the cause, leaves the previous checkpoint intact, and ``--resume`` continues to
the uninterrupted metrics once there is space: on a real small file system (a tmpfs, where the test may
mount one) and by injecting the error."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pfedlora.cli import app
from pfedlora.errors import DiskWriteError
from pfedlora.simulation import TIMING_KEYS, federation, read_run, results, resume_run, run_experiment
from pfedlora.simulation.checkpoint import CHECKPOINT_DIR, read_manifest
from tests.conftest import TINY_OVERRIDES

SETTING = ("federation.rounds=8", "federation.checkpoint_every=2", "federation.eval_every=2")


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture
def small_disk(tmp_path):
    """A 96 MB tmpfs of its own (as root), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}); the injected-error tests cover it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Write one file until the file system is full; returns it."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(chunk)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "two-workers-spilling"])
def test_a_real_full_disk_stops_the_run_in_one_error_and_resume_ends_as_uninterrupted(
    tmp_path, small_disk, tiny_dataset, tiny_config, workers
):
    spill = ("federation.client_memory_mb=0.001",) if workers else ()  # the store writes run_dir/clients
    config = tiny_config(*SETTING, *spill)
    run_experiment(config, tmp_path / "reference", dataset=tiny_dataset, workers=max(workers, 1))
    run_dir = small_disk / "run"
    filled: list[Path] = []

    def on_round(record):
        if record["round"] == 5:
            filled.append(_fill(small_disk))

    with pytest.raises(DiskWriteError) as caught:
        run_experiment(config, run_dir, on_round=on_round, dataset=tiny_dataset, workers=workers)
    message = str(caught.value)
    assert caught.value.path.startswith(str(run_dir)) and "No space left on device" in message, message
    assert "the run stopped in round " in message and "(last checkpoint: round 4)" in message, message
    assert read_manifest(run_dir)["round"] == 4  # every file of the previous checkpoint matches its digest
    assert not list((run_dir / CHECKPOINT_DIR).glob(".*.tmp"))  # no half-written file left
    assert not list((run_dir / CHECKPOINT_DIR).glob("*-r6.safetensors"))  # nor a part of a checkpoint

    filled[0].unlink()
    resume_run(run_dir, dataset=tiny_dataset, workers=max(workers, 1))
    assert _strip(read_run(run_dir)[0]) == _strip(read_run(tmp_path / "reference")[0])


class _FullDisk:
    """Open files whose writes fail with ENOSPC once ``after`` writes have gone through."""

    def __init__(self, name: str, after: int) -> None:
        self.name, self.after, self.writes = name, after, 0

    def open(self, path, *args, **kwargs):
        handle = open(path, *args, **kwargs)  # noqa: SIM115 (handed to the caller)
        if Path(path).name != self.name:
            return handle
        failing = self

        class Failing:
            def __getattr__(self, attribute):
                return getattr(handle, attribute)

            def write(self, text):
                failing.writes += 1
                if failing.writes > failing.after:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return handle.write(text)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

        return Failing()


@pytest.mark.parametrize(
    ("name", "after", "stopped"),
    [
        ("metrics.jsonl", 4, "in round 5 of 8 (last checkpoint: round 4)"),
        (".manifest.json.tmp", 1, "in round 4 of 8 (last checkpoint: round 2)"),
        (
            ".summary.json.tmp",
            0,
            "after the last round (8), before the summary was written (last checkpoint: round 6)",
        ),
    ],
    ids=["metrics", "checkpoint-manifest", "summary"],
)
def test_an_injected_write_error_names_the_path_and_resume_ends_as_uninterrupted(
    tmp_path, monkeypatch, tiny_dataset, tiny_config, name, after, stopped
):
    config = tiny_config(*SETTING)
    run_experiment(config, tmp_path / "reference", dataset=tiny_dataset)
    disk = _FullDisk(name, after)
    monkeypatch.setattr(results, "open", disk.open, raising=False)
    run_dir = tmp_path / "run"
    with pytest.raises(DiskWriteError) as caught:
        run_experiment(config, run_dir, dataset=tiny_dataset)
    target = name.removeprefix(".").removesuffix(".tmp")
    assert caught.value.path.endswith(target), caught.value.path
    assert str(caught.value).endswith(f"No space left on device; the run stopped {stopped}"), caught.value
    monkeypatch.undo()
    resume_run(run_dir, dataset=tiny_dataset)
    assert _strip(read_run(run_dir)[0]) == _strip(read_run(tmp_path / "reference")[0])


def test_a_checkpoint_file_that_cannot_be_written_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, tiny_dataset, tiny_config
):
    config = tiny_config(*SETTING)
    original = Path.write_bytes

    def write_bytes(self, data):
        if self.name == ".server-r4.safetensors.tmp":
            original(self, data[: len(data) // 2])  # half of it reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(DiskWriteError, match=r"server-r4\.safetensors: No space left on device"):
        run_experiment(config, tmp_path / "run", dataset=tiny_dataset)
    assert read_manifest(tmp_path / "run")["round"] == 2
    assert not (tmp_path / "run" / CHECKPOINT_DIR / ".server-r4.safetensors.tmp").exists()


def test_the_command_line_says_it_in_one_line_with_how_to_continue(tmp_path, monkeypatch, tiny_dataset):
    monkeypatch.setattr(federation, "load_dataset", lambda *args, **kwargs: tiny_dataset)
    monkeypatch.setattr(results, "open", _FullDisk("metrics.jsonl", 2).open, raising=False)
    out = tmp_path / "run"
    sets = [arg for item in (*TINY_OVERRIDES, *SETTING) for arg in ("--set", item)]
    result = CliRunner().invoke(app, ["run", "-q", "--out", str(out), *sets])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert " ".join(result.stderr.split()) == (
        f"error: cannot write {out / 'metrics.jsonl'}: No space left on device; the run stopped in round 3 "
        "of 8 (last checkpoint: round 2); once there is space, continue with "
        f"`pfedlora run --resume {out}`"
    )
