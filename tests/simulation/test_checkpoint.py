import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pfedlora.errors import ConfigError
from pfedlora.simulation import TIMING_KEYS, read_run, resume_run, run_experiment
from pfedlora.simulation.checkpoint import CHECKPOINT_DIR, read_manifest
from pfedlora.simulation.results import read_records
from tests.conftest import TINY_OVERRIDES

TARGET = Path(__file__).with_name("crash_target.py")
CRASH = (
    "device=cpu",
    "algorithm=fedapen",  # private model, shared model and λ: every kind of client state
    "federation.num_clients=6",
    "federation.sample_fraction=0.5",
    "federation.rounds=7",
    "federation.eval_every=2",
    "federation.checkpoint_every=2",
    "data.classes_per_client=2",
    "train.batch_size=16",
)


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _cli(*args, env=None, **kwargs):
    command = [sys.executable, str(TARGET), *args]
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def test_sigkill_mid_round_then_resume_gives_the_uninterrupted_metrics(tmp_path, tiny_dataset, tiny_config):
    reference = tmp_path / "reference"
    run_experiment(tiny_config(*CRASH), reference, dataset=tiny_dataset)

    crashed, marker = tmp_path / "crashed", tmp_path / "paused"
    sets = [arg for item in (*TINY_OVERRIDES, *CRASH) for arg in ("--set", item)]
    process = _cli("run", "-q", "--out", str(crashed), *sets, env={"PAUSE_AT": f"6:{marker}"})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, "the run ended before it reached round 6"
            assert time.monotonic() < deadline, "round 6 was never reached"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert read_manifest(crashed)["round"] == 4
    assert [r["round"] for r in read_records(crashed)] == [1, 2, 3, 4, 5]  # round 6 died half-way
    assert not (crashed / "summary.json").exists()

    resumed = _cli("run", "-q", "--resume", str(crashed))
    assert resumed.wait(timeout=120) == 0
    records, summary = read_run(crashed)
    expected_records, expected_summary = read_run(reference)
    assert _strip(records) == _strip(expected_records)
    assert {k: v for k, v in summary.items() if k not in TIMING_KEYS} == {
        k: v for k, v in expected_summary.items() if k not in TIMING_KEYS
    }


def test_checkpoints_keep_only_what_the_manifest_names(tmp_path, tiny_dataset, tiny_config):
    run_experiment(tiny_config(*CRASH), tmp_path, dataset=tiny_dataset)
    manifest = read_manifest(tmp_path)
    assert manifest["round"] == 6  # the last checkpoint before the final round
    files = {p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir()}
    assert files == {"manifest.json", manifest["server"], *manifest["clients"].values()}
    rounds = {name.rsplit("-r", 1)[1] for name in manifest["clients"].values()}
    assert rounds <= {"2.safetensors", "4.safetensors", "6.safetensors"} and len(manifest["clients"]) == 6


def test_resume_refuses_finished_and_foreign_directories(tmp_path, tiny_dataset, tiny_config):
    run_experiment(tiny_config("federation.rounds=1"), tmp_path / "done", dataset=tiny_dataset)
    with pytest.raises(ConfigError, match="finished run"):
        resume_run(tmp_path / "done", dataset=tiny_dataset)
    with pytest.raises(ConfigError, match="not a run directory"):
        resume_run(tmp_path, dataset=tiny_dataset)


def test_resume_without_checkpoint_starts_over(tmp_path, tiny_dataset, tiny_config):
    config = tiny_config(*CRASH, "federation.checkpoint_every=0")
    run_experiment(config, tmp_path / "a", dataset=tiny_dataset)
    (tmp_path / "a" / "summary.json").unlink()
    resume_run(tmp_path / "a", dataset=tiny_dataset)
    run_experiment(config, tmp_path / "b", dataset=tiny_dataset)
    assert _strip(read_run(tmp_path / "a")[0]) == _strip(read_run(tmp_path / "b")[0])


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda state: {**state, next(iter(state)): state[next(iter(state))][..., :1].clone()}, "has shape"),
        (lambda state: {k: v.double() for k, v in state.items()}, "has dtype"),
        (lambda state: {**state, "shared.smuggled": state[next(iter(state))].clone()}, "unexpected tensors"),
        (lambda state: dict(list(state.items())[1:]), "missing tensors"),
    ],
    ids=["shape", "dtype", "extra", "missing"],
)
def test_restore_checks_the_global_state_like_every_other_load(
    tmp_path, tiny_dataset, tiny_config, tamper, reason
):
    config = tiny_config(*CRASH)
    run_experiment(config, tmp_path, dataset=tiny_dataset)
    (tmp_path / "summary.json").unlink()
    server_file = tmp_path / CHECKPOINT_DIR / read_manifest(tmp_path)["server"]
    save_file(tamper(load_file(str(server_file))), str(server_file))
    with pytest.raises(ConfigError, match=f"cannot be loaded: .*{reason}"):
        resume_run(tmp_path, dataset=tiny_dataset)
