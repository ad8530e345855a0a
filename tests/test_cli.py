import re

import pytest
from typer.testing import CliRunner

from pfedlora.cli import app
from pfedlora.data import datasets
from pfedlora.simulation import TIMING_KEYS, read_run

runner = CliRunner()

TINY = [
    "--set", "federation.num_clients=4",
    "--set", "federation.rounds=2",
    "--set", "federation.eval_every=1",
    "--set", "data.classes_per_client=2",
    "--set", "train.batch_size=32",
]  # fmt: skip


def test_run_writes_results_and_prints_the_table(tmp_path, tiny_data):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "best mean acc" in result.output and "results written to" in result.output
    assert {p.name for p in out.iterdir()} == {
        ".pfedlora.lock",
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "accuracy_per_round.png",  # a single run ends with its own plots, as report writes them
        "accuracy_vs_megabytes.png",
        "accuracy_vs_tflops.png",
    }
    assert (out / "accuracy_per_round.png").read_bytes().startswith(b"\x89PNG")


def test_workers_option_trains_in_worker_processes_with_the_same_results(tmp_path, tiny_data):
    for workers in ("1", "2"):
        result = runner.invoke(app, ["run", *TINY, "--workers", workers, "--out", str(tmp_path / workers)])
        assert result.exit_code == 0, result.output
    (one, _), (two, _) = read_run(tmp_path / "1"), read_run(tmp_path / "2")
    assert [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in one] == [
        {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in two
    ]
    refused = runner.invoke(app, ["run", *TINY, "--workers", "-1", "--out", str(tmp_path / "bad")])
    assert refused.exit_code == 2 and not (tmp_path / "bad").exists()


def test_report_prints_and_plots(tmp_path, tiny_data):
    runs = [tmp_path / "run-alpha", tmp_path / "run-beta"]
    for i, out in enumerate(runs):
        assert (
            runner.invoke(app, ["run", "-q", *TINY, "--set", f"seed={i}", "--out", str(out)]).exit_code == 0
        )
    result = runner.invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert "run-alpha" in result.output and "run-beta" in result.output
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["accuracy_per_round.png", "accuracy_vs_megabytes.png", "accuracy_vs_tflops.png"]
    assert all((tmp_path / "plots" / name).read_bytes().startswith(b"\x89PNG") for name in pngs)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "federation.num_clientz=3"], "unknown key 'federation.num_clientz'"),
        (["--set", "train.lr=fast"], "train.lr: expected a number, got 'fast'"),
        (["--set", "federation.sample_fraction=2"], "federation.sample_fraction: 2.0 is out of range"),
        (["--set", "algorithm=fedfoo"], "algorithm: unknown value 'fedfoo'; allowed: pfedlora"),
        (["--set", "data.dataset=mnist"], "data.dataset: unknown value 'mnist'; allowed: fashion-mnist"),
        (["--config", "/nonexistent/exp.toml"], "cannot read config file '/nonexistent/exp.toml'"),
        (
            ["--set", "adapter.placement=layers", "--set", 'adapter.targets=["fc2"]'],
            "adapter target 'fc2' has a different weight shape",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_results_directory(tmp_path, tiny_data, args, fragment):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", *TINY, *args, "--out", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert fragment in " ".join(result.stderr.split())
    assert not out.exists()


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--set", "data.download=false", "--out", str(out)])
    assert result.exit_code == 2
    assert "apt-get install dataset-fashion-mnist" in " ".join(result.stderr.split())
    assert not out.exists()


def test_report_reads_what_is_valid_in_damaged_files(tmp_path, tiny_data, caplog):
    runs = [tmp_path / "good", tmp_path / "bad"]
    for out in runs:
        assert runner.invoke(app, ["run", "-q", *TINY, "--out", str(out)]).exit_code == 0
    metrics = runs[0] / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0][: len(lines[0]) // 2], *lines[1:]]) + "\n")
    summary = runs[1] / "summary.json"
    summary.write_text(summary.read_text()[:40])
    result = runner.invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert "metrics.jsonl line 1 is damaged and skipped" in caplog.text
    assert "skipped:" in result.stderr and "summary.json is damaged" in " ".join(result.stderr.split())
    assert (tmp_path / "plots" / "accuracy_per_round.png").is_file()
    alone = runner.invoke(app, ["report", str(runs[1])])
    assert alone.exit_code == 2 and "summary.json is damaged" in " ".join(alone.stderr.split())
    metrics.write_text("{\n")
    empty = runner.invoke(app, ["report", str(runs[0])])
    assert empty.exit_code == 2 and "holds no readable round record" in " ".join(empty.stderr.split())


def test_a_truncated_data_file_is_one_line_and_exit_2(tmp_path):
    from tests.data.builders import write_fashion_mnist

    gz = write_fashion_mnist(tmp_path / "data", num_train=100).directory / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-30])
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train-images-idx3-ubyte.gz: cannot be read" in lines[0], result.stderr


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a finished run" in result.stderr


def test_list_shows_what_is_available():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    for name in (
        "pfedlora",
        "standalone",
        "cnn1",
        "cnn5",
        "fashion-mnist",
        "cifar100",
        "dirichlet",
        "branch",
        "kjv",
        "by-source",
        "head",
        "minilm-l6",
        "fedproto.lambda",
        "fedkd.energy_start",
    ):
        assert name in result.output
    assert "2.62M" in result.output  # cnn1 on 3×32×32, SPEC §3
    assert re.search(r"fml\.alpha\s+│ 0\.5\s+│ \[0, 1\]", result.output)  # key, default, range
    # an algorithm's summary is its docstring's whole first paragraph, though it wraps in the source
    words = " ".join(re.sub(r"[│┃]", " ", result.output).split())
    assert "epochs a round (a language model: its private adapter)." in words


def test_resume_continues_a_run_and_refuses_other_options(tmp_path, tiny_data):
    out = tmp_path / "run"
    assert (
        runner.invoke(
            app, ["run", "-q", *TINY, "--set", "federation.checkpoint_every=1", "--out", str(out)]
        ).exit_code
        == 0
    )
    (out / "summary.json").unlink()
    result = runner.invoke(app, ["run", "-q", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "summary.json").is_file() and (out / "checkpoint" / "manifest.json").is_file()
    for args, fragment in [
        (["--resume", str(out), "--set", "train.lr=0.1"], "own configuration"),
        (["--resume", str(tmp_path / "nowhere")], "not a run directory"),
        (["--resume", str(out)], "finished run"),
        (["--rounds", "5"], "go with --resume"),
    ]:
        bad = runner.invoke(app, ["run", "-q", *args])
        assert bad.exit_code == 2 and fragment in bad.stderr, bad.output
    rounds = len((out / "metrics.jsonl").read_text().splitlines())
    longer = runner.invoke(app, ["run", "-q", "--resume", str(out), "--rounds", str(rounds + 1)])
    assert longer.exit_code == 0, longer.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == rounds + 1


def test_tune_prints_the_search_and_the_options_for_compare(tmp_path, monkeypatch, tiny_dataset):
    from pfedlora import compare

    monkeypatch.setattr(compare, "load_run_dataset", lambda *args, **kwargs: tiny_dataset)
    args = ["tune", "-q", "-a", "standalone", "-x", "train.local_epochs=1,2", "--out", str(tmp_path)]
    result = runner.invoke(app, [*args, *TINY, "--set", "data.validation_fraction=0.2"])
    assert result.exit_code == 0, result.output
    assert "← chosen" in result.output and "--set standalone:train.local_epochs=" in result.output
    refused = runner.invoke(app, [*args, *TINY])
    assert refused.exit_code == 2 and "validation" in refused.stderr
