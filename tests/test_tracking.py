import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from pfedlora import tracking
from pfedlora.cli import app
from pfedlora.simulation import read_run
from pfedlora.tracking import TENSORBOARD_DIR, round_scalars

runner = CliRunner()
TINY = [
    "--set", "federation.num_clients=4",
    "--set", "federation.rounds=2",
    "--set", "federation.eval_every=1",
    "--set", "federation.checkpoint_every=1",
    "--set", "data.classes_per_client=2",
    "--set", "train.batch_size=32",
]  # fmt: skip


def _events(run_dir):
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    return events


def _curve(events, tag):
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_a_run_streams_every_round_and_its_configuration_to_tensorboard(tmp_path, tiny_data):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "-q", *TINY, "--log", "tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records, _ = read_run(out)
    events = _events(out)
    for tag in round_scalars(records[0]):
        expected = [(r["round"], pytest.approx(round_scalars(r)[tag], rel=1e-6)) for r in records]
        assert _curve(events, tag) == expected, tag
    assert "eval/mean_accuracy" in events.Tags()["scalars"]
    hparams = events.PluginTagToContent("hparams")
    assert b"train.lr" in hparams["_hparams_/experiment"]  # the resolved configuration
    assert b"pfedlora" in hparams["_hparams_/session_start_info"]


def test_a_resumed_run_continues_its_curves_without_duplicate_steps(tmp_path, tiny_data):
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", "-q", *TINY, "--log", "tensorboard", "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["run", "-q", "--resume", str(out), "--rounds", "4", "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    records, _ = read_run(out)
    curve = _curve(_events(out), "cost/cumulative_megabytes")
    assert [step for step, _ in curve] == [1, 2, 3, 4]
    assert [value for _, value in curve] == pytest.approx([r["cumulative_bytes"] / 1e6 for r in records])


def test_an_unknown_tracker_is_one_line_exit_2_and_no_run(tmp_path, tiny_data):
    result = runner.invoke(app, ["run", *TINY, "--log", "wandb", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "--log: unknown value 'wandb'; allowed: tensorboard, mlflow" in result.output
    assert not (tmp_path / "run").exists()


def test_a_tracker_whose_package_is_missing_is_refused_before_the_run(tmp_path, tiny_data, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name)
    )
    result = runner.invoke(app, ["run", *TINY, "--log", "mlflow", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "--log mlflow needs the mlflow package: pip install 'pfedlora[mlflow]'" in result.output
    assert not (tmp_path / "run").exists()


def test_compare_streams_each_variant_into_its_own_run(tmp_path, tiny_data):
    out = tmp_path / "cmp"
    args = ["compare", "-q", "-a", "pfedlora,standalone", *TINY, "--log", "tensorboard", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for variant in ("pfedlora-branch", "standalone"):
        assert [s for s, _ in _curve(_events(out / variant), "eval/mean_accuracy")] == [1, 2]


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A local MLflow tracking store (MLflow's file store, allowed for the test) and a client reading it."""
    import mlflow  # the test extra installs MLflow's client

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return mlflow.tracking.MlflowClient(tracking_uri=uri)


def test_a_run_and_its_resume_make_one_mlflow_run_with_each_round_once(tmp_path, tiny_data, mlflow_store):
    out = tmp_path / "run"
    assert runner.invoke(app, ["run", "-q", *TINY, "--log", "mlflow", "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["run", "-q", "--resume", str(out), "--rounds", "3", "--log", "mlflow"])
    assert result.exit_code == 0, result.output
    (experiment,) = [e for e in mlflow_store.search_experiments() if e.name == "pfedlora"]
    (run,) = mlflow_store.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["algorithm"] == "pfedlora"
    records, _ = read_run(out)
    history = mlflow_store.get_metric_history(run.info.run_id, "cost/cumulative_megabytes")
    assert [(m.step, m.value) for m in history] == [
        (r["round"], pytest.approx(r["cumulative_bytes"] / 1e6)) for r in records
    ]
    accuracy = mlflow_store.get_metric_history(run.info.run_id, "eval/mean_accuracy")
    assert [m.step for m in accuracy] == [1, 2, 3]
