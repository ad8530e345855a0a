import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from safetensors.torch import load_file, save_file

from pfedlora.config import load_run_config
from pfedlora.errors import ConfigError
from pfedlora.simulation import TIMING_KEYS, read_run, resume_run, run_experiment
from pfedlora.simulation.checkpoint import CHECKPOINT_DIR, DamagedCheckpointError, file_digest, read_manifest
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


def test_checkpoints_keep_only_what_the_last_two_manifests_name(tmp_path, tiny_dataset, tiny_config):
    run_experiment(tiny_config(*CRASH), tmp_path, dataset=tiny_dataset)
    manifest, previous = read_manifest(tmp_path), read_manifest(tmp_path, previous=True)
    assert (manifest["round"], previous["round"]) == (6, 4)  # the last two checkpoints before the final round
    files = {p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir()}
    named = {name for m in (manifest, previous) for name in (m["server"], *m["clients"].values())}
    assert files == {"manifest.json", "manifest.previous.json", *named}
    assert "server-r2.safetensors" not in files
    assert set(manifest["sha256"]) == {manifest["server"], *manifest["clients"].values()}
    rounds = {name.rsplit("-r", 1)[1] for name in manifest["clients"].values()}
    assert rounds <= {"2.safetensors", "4.safetensors", "6.safetensors"} and len(manifest["clients"]) == 6


def test_resume_refuses_finished_and_foreign_directories(tmp_path, tiny_dataset, tiny_config):
    run_experiment(tiny_config("federation.rounds=1"), tmp_path / "done", dataset=tiny_dataset)
    with pytest.raises(ConfigError, match="finished run of 1 rounds"):
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
    manifest_path = tmp_path / CHECKPOINT_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    server_file = tmp_path / CHECKPOINT_DIR / manifest["server"]
    save_file(tamper(load_file(str(server_file))), str(server_file))
    manifest["sha256"][manifest["server"]] = file_digest(server_file)  # a consistent forgery
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=f"cannot be loaded: .*{reason}"):
        resume_run(tmp_path, dataset=tiny_dataset)


def _interrupted(tmp_path, tiny_dataset, config):
    """A run of ``config`` that stopped after its last checkpoint (round 6): the summary removed."""
    run_experiment(config, tmp_path / "run", dataset=tiny_dataset)
    (tmp_path / "run" / "summary.json").unlink()
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda folder, m: _truncate(folder / m["server"]), "server-r6.safetensors is damaged"),
        (lambda folder, m: _overwrite(folder / m["clients"]["0"]), "is damaged"),
        (lambda folder, m: (folder / m["server"]).unlink(), "server-r6.safetensors is missing"),
        (lambda folder, m: _truncate(folder / "manifest.json"), "manifest.json is unreadable"),
        (lambda folder, m: _point_outside(folder / "manifest.json", m), "names files outside its folder"),
    ],
    ids=["truncated", "overwritten", "missing", "manifest", "outside"],
)
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_offered(
    tmp_path, tiny_dataset, tiny_config, damage, reason
):
    config = tiny_config(*CRASH)
    run_dir = _interrupted(tmp_path, tiny_dataset, config)
    folder = run_dir / CHECKPOINT_DIR
    damage(folder, json.loads((folder / "manifest.json").read_text()))
    with pytest.raises(DamagedCheckpointError, match=rf"{reason}.*round 4 is intact.*--previous-checkpoint"):
        resume_run(run_dir, dataset=tiny_dataset)
    resume_run(run_dir, dataset=tiny_dataset, previous_checkpoint=True)
    run_experiment(config, tmp_path / "reference", dataset=tiny_dataset)
    assert _strip(read_run(run_dir)[0]) == _strip(read_run(tmp_path / "reference")[0])


def test_without_an_intact_older_checkpoint_the_refusal_says_start_again(tmp_path, tiny_dataset, tiny_config):
    run_dir = _interrupted(tmp_path, tiny_dataset, tiny_config(*CRASH, "federation.rounds=3"))
    _truncate(run_dir / CHECKPOINT_DIR / "server-r2.safetensors")
    with pytest.raises(DamagedCheckpointError, match="no older intact checkpoint exists: start the run"):
        resume_run(run_dir, dataset=tiny_dataset)


def _point_outside(path, manifest):
    path.write_text(json.dumps({**manifest, "server": "../../config.toml"}))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _overwrite(path):
    state = load_file(str(path))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, str(path))


def test_resume_refuses_an_edited_config_naming_the_keys(tmp_path, tiny_dataset, tiny_config):
    run_dir = _interrupted(tmp_path, tiny_dataset, tiny_config(*CRASH))
    text = (run_dir / "config.toml").read_text()
    edited = text.replace("lr = 0.05", "lr = 0.07").replace("momentum = 0.9", "momentum = 0.5")
    assert edited != text
    (run_dir / "config.toml").write_text(edited)
    changes = r"train\.lr 0\.05 -> 0\.07; train\.momentum 0\.9 -> 0\.5"
    with pytest.raises(ConfigError, match=rf"differs .*{changes}"):
        resume_run(run_dir, dataset=tiny_dataset)
    assert read_records(run_dir)[-1]["round"] == 7  # nothing was touched


def test_a_run_extended_to_more_rounds_equals_the_longer_run(tmp_path, tiny_dataset, tiny_config):
    base = (*CRASH[:4], *CRASH[5:])  # without federation.rounds
    run_experiment(tiny_config(*base, "federation.rounds=5"), tmp_path / "short", dataset=tiny_dataset)
    with pytest.raises(ConfigError, match=r"finished run of 5 rounds .*give rounds > 5"):
        resume_run(tmp_path / "short", dataset=tiny_dataset, rounds=5)
    resume_run(tmp_path / "short", dataset=tiny_dataset, rounds=8)
    run_experiment(tiny_config(*base, "federation.rounds=8"), tmp_path / "long", dataset=tiny_dataset)
    (short, short_summary), (long, long_summary) = read_run(tmp_path / "short"), read_run(tmp_path / "long")
    assert _strip(short) == _strip(long) and [r["round"] for r in short] == list(range(1, 9))
    assert short_summary["rounds"] == 8
    assert short_summary["mean_accuracy_last"] == long_summary["mean_accuracy_last"]
    assert "rounds = 8" in (tmp_path / "short" / "config.toml").read_text()
    (tmp_path / "short" / "summary.json").unlink()  # an unfinished run: its last checkpoint is of round 6
    with pytest.raises(ConfigError, match=r"the checkpoint holds round 6, so allowed: 7 or more"):
        resume_run(tmp_path / "short", dataset=tiny_dataset, rounds=6)


def test_fedkd_cannot_be_extended(tmp_path, tiny_dataset, tiny_config):
    run_experiment(tiny_config("algorithm=fedkd", "federation.rounds=2"), tmp_path, dataset=tiny_dataset)
    with pytest.raises(ConfigError, match=r"fedkd's schedule spans federation\.rounds"):
        resume_run(tmp_path, dataset=tiny_dataset, rounds=4)


def _as_written_before_options(tree):
    """A configuration tree as versions before per-algorithm options wrote it: one ``[baselines]`` section."""
    old = {key: value for key, value in tree.items() if key not in ("fml", "fedkd", "fedgh", "fedproto")}
    fedapen = old.pop("fedapen")
    old["baselines"] = {
        "shared_arch": fedapen["shared_arch"],
        "kl_reduction": fedapen["kl_reduction"],
        "fedapen_holdout_fraction": fedapen["holdout_fraction"],
        "fedapen_lambda_epochs": fedapen["lambda_epochs"],
        "fedapen_lambda_lr": fedapen["lambda_lr"],
        "fml_alpha": 0.5,
        "fedproto_lambda": 10.0,
    }
    return old


def test_a_run_written_with_a_baselines_section_resumes_to_the_uninterrupted_metrics(
    tmp_path, tiny_dataset, tiny_config
):
    config = tiny_config(*CRASH, "fedapen.lambda_lr=0.05", "fedapen.lambda_epochs=2")
    run_dir = _interrupted(tmp_path, tiny_dataset, config)
    tree = tomllib.loads((run_dir / "config.toml").read_text())
    assert "[baselines]" not in (run_dir / "config.toml").read_text() and "fedapen" in tree
    (run_dir / "config.toml").write_text(tomli_w.dumps(_as_written_before_options(tree)))
    manifest_path = run_dir / CHECKPOINT_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"] = _as_written_before_options(manifest["config"])
    manifest_path.write_text(json.dumps(manifest))
    resume_run(run_dir, dataset=tiny_dataset)
    run_experiment(config, tmp_path / "reference", dataset=tiny_dataset)
    assert _strip(read_run(run_dir)[0]) == _strip(read_run(tmp_path / "reference")[0])
    assert load_run_config(run_dir / "config.toml").options == config.options
