import csv
import json
import statistics

import pytest
from typer.testing import CliRunner

from pfedlora import compare
from pfedlora.cli import app
from pfedlora.compare import plan_variants, run_comparison, with_seeds, write_comparison
from pfedlora.errors import ConfigError
from pfedlora.simulation import TIMING_KEYS

TINY = (
    "device=cpu",
    "federation.num_clients=4",
    "federation.rounds=2",
    "federation.eval_every=1",
    "data.classes_per_client=2",
    "train.batch_size=32",
    "adapter.rank=2",
    "federation.checkpoint_every=1",
)


@pytest.fixture
def tiny_data(monkeypatch, tiny_dataset):
    monkeypatch.setattr(compare, "load_run_dataset", lambda *args, **kwargs: tiny_dataset)


def test_plan_one_variant_per_algorithm_and_placement():
    variants = plan_variants(["pfedlora", "standalone", "pfedlora"], ["branch", "layers"], None, ["seed=3"])
    assert [v.label for v in variants] == ["pfedlora-branch", "pfedlora-layers", "standalone"]
    assert [v.config.adapter.placement for v in variants[:2]] == ["branch", "layers"]
    assert {v.config.seed for v in variants} == {3}
    with pytest.raises(ConfigError, match="allowed: pfedlora"):
        plan_variants(["fedfoo"], ["branch"])
    with pytest.raises(ConfigError, match="placement: unknown value 'side'"):
        plan_variants(["pfedlora"], ["side"])


def test_accuracy_within_a_flop_budget():
    records = [
        {"round": 1, "cumulative_train_flops": 10.0},
        {"round": 2, "cumulative_train_flops": 20.0, "mean_accuracy": 0.5},
        {"round": 3, "cumulative_train_flops": 30.0},
        {"round": 4, "cumulative_train_flops": 40.0, "mean_accuracy": 0.7},
    ]
    assert compare.accuracy_within_flops(records, 39.0) == 0.5
    assert compare.accuracy_within_flops(records, 40.0) == 0.7
    assert compare.accuracy_within_flops(records, 15.0) is None


def test_retarget_reads_rounds_bytes_and_flops_to_another_target():
    records = [
        {"round": 1, "cumulative_bytes": 100, "cumulative_train_flops": 10.0},
        {"round": 2, "cumulative_bytes": 200, "cumulative_train_flops": 20.0, "mean_accuracy": 0.85},
        {"round": 4, "cumulative_bytes": 400, "cumulative_train_flops": 40.0, "mean_accuracy": 0.95},
    ]
    summary = {"target_accuracy": 0.8, "target_round": 2, "bytes_to_target": 200, "other": 1}
    [(label, same, at_90)] = compare.retarget([("a", records, summary)], 0.9)
    assert label == "a" and same is records
    assert at_90 == {
        "target_accuracy": 0.9, "target_round": 4, "bytes_to_target": 400, "train_flops_to_target": 40.0,
        "other": 1,
    }  # fmt: skip
    assert summary["target_round"] == 2  # the run's own summary is left alone
    unreached = compare.retarget([("a", records, summary)], 0.99)[0][2]
    assert (
        unreached["target_round"]
        is unreached["bytes_to_target"]
        is unreached["train_flops_to_target"]
        is None
    )
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match=f"target accuracy: {bad} is not a fraction"):
            compare.retarget([], bad)


def test_compare_runs_writes_and_resumes(tmp_path, tiny_data, monkeypatch):
    variants = plan_variants(["pfedlora", "standalone"], ["branch"], None, TINY)
    results = run_comparison(variants, tmp_path)
    paths = write_comparison(results, tmp_path)
    assert {p.name for p in paths} == {
        "comparison.md", "comparison.csv", "comparison-by-architecture.csv", "accuracy_per_round.png",
        "accuracy_vs_megabytes.png", "accuracy_vs_tflops.png",
    }  # fmt: skip
    by_arch = list(csv.reader((tmp_path / "comparison-by-architecture.csv").open()))
    assert by_arch[0] == ["method", "cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]
    summary = results[1][2]
    per_arch = summary["mean_accuracy_last_by_architecture"]
    expected = ["–" if per_arch[a] is None else f"{100 * per_arch[a]:.2f}" for a in by_arch[0][1:]]
    assert by_arch[2] == ["standalone", *expected]
    records = results[1][1]
    accuracies = records[-1]["client_accuracies"]
    cnn1 = [a for i, a in enumerate(accuracies) if i % 5 == 0 and a is not None]
    assert summary["mean_accuracy_last_by_architecture"]["cnn1"] == pytest.approx(sum(cnn1) / len(cnn1))
    rows = list(csv.reader((tmp_path / "comparison.csv").open()))
    assert rows[0][0] == "method" and [r[0] for r in rows[1:]] == ["pfedlora-branch", "standalone"]
    assert rows[2][rows[0].index("MB total")] == "0.00"  # training alone sends nothing
    assert "| pfedlora-branch |" in (tmp_path / "comparison.md").read_text()

    # Resume: finished variants are read back, an unfinished one continues from its checkpoint.
    (tmp_path / "standalone" / "summary.json").unlink()
    calls = []
    original = compare.resume_run
    monkeypatch.setattr(compare, "resume_run", lambda run_dir, *a, **k: calls.append(run_dir.name) or
                        original(run_dir, *a, **k))  # fmt: skip
    again = run_comparison(variants, tmp_path)
    assert calls == ["standalone"]
    assert again[0][2] == results[0][2]  # the reused run is the same run
    strip = lambda s: {k: v for k, v in s.items() if k not in TIMING_KEYS}  # noqa: E731
    assert strip(again[1][2]) == strip(results[1][2])  # the resumed run ends as the first one did

    # A run directory of another configuration is never silently reused.
    changed = plan_variants(["standalone"], ["branch"], None, [*TINY, "train.lr=0.02"])
    with pytest.raises(ConfigError, match=r"another configuration .*\(train\.lr [0-9.]+ -> 0\.02\)"):
        run_comparison(changed, tmp_path)


def test_scoped_overrides_apply_to_their_variant_only():
    variants = plan_variants(
        ["pfedlora", "standalone"],
        ["branch", "layers"],
        None,
        [
            "train.lr=0.02",
            "standalone:train.local_epochs=3",
            "pfedlora-layers:adapter.rank=4",
            "pfedlora:adapter.epochs=2",
        ],
    )
    by_label = {v.label: v.config for v in variants}
    assert {c.train.lr for c in by_label.values()} == {0.02}
    assert by_label["standalone"].train.local_epochs == 3
    assert by_label["pfedlora-branch"].train.local_epochs == 1
    assert by_label["pfedlora-layers"].adapter.rank == 4 and by_label["pfedlora-branch"].adapter.rank == 8
    assert by_label["pfedlora-layers"].adapter.epochs == by_label["pfedlora-branch"].adapter.epochs == 2
    with pytest.raises(ConfigError, match="fml"):
        plan_variants(["standalone"], ["branch"], None, ["fml:train.lr=0.1"])


def _compare_args(*options):
    """``pfedlora compare -q OPTIONS`` on the tiny federation."""
    return ["compare", "-q", *options, *(arg for item in TINY for arg in ("--set", item))]


def test_compare_command(tmp_path, tiny_data):
    args = _compare_args("-a", "pfedlora,standalone", "-p", "layers", "--out", str(tmp_path))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "comparison.md").is_file() and (
        tmp_path / "pfedlora-layers" / "summary.json"
    ).is_file()
    bad = CliRunner().invoke(app, ["compare", "-a", "fedfoo", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "fedfoo" in bad.stderr and not (tmp_path / "x").exists()

    # --target re-reads the finished runs against another target accuracy; a bad one is refused first.
    elsewhere = [arg if arg != str(tmp_path) else str(tmp_path / "y") for arg in args]
    bad = CliRunner().invoke(app, [*elsewhere, "--target", "80"])
    assert bad.exit_code == 2 and "target accuracy: 80.0" in bad.stderr and not (tmp_path / "y").exists()
    summary_file = tmp_path / "standalone" / "summary.json"
    summary = json.loads(summary_file.read_text())
    target = summary["mean_accuracy_best"]  # first reached at the best round
    again = CliRunner().invoke(app, [*args, "--target", repr(target)])
    assert again.exit_code == 0, again.output
    assert json.loads(summary_file.read_text()) == summary  # nothing was rerun or rewritten
    assert f"Target accuracy: {100 * target:g}%" in (tmp_path / "comparison.md").read_text()
    rows = {row[0]: row for row in csv.reader((tmp_path / "comparison.csv").open())}
    assert rows["standalone"][rows["method"].index("rounds to target")] == str(summary["best_round"])


def test_parallel_jobs_give_the_results_of_one_run_after_another(tmp_path, tiny_data):
    variants = plan_variants(["pfedlora", "standalone", "fedapen"], ["branch"], None, TINY)
    rounds = []
    parallel = run_comparison(
        variants, tmp_path / "parallel", on_round=lambda label, r: rounds.append(label), jobs=2, workers=1
    )
    serial = run_comparison(variants, tmp_path / "serial", jobs=1, workers=1)

    def strip(results):
        return [
            (label, [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records])
            for label, records, _ in results
        ]

    assert strip(parallel) == strip(serial)
    assert sorted(rounds) == sorted(label for label in ["pfedlora-branch", "standalone", "fedapen"] * 2)


def test_a_failing_job_stops_the_comparison_with_its_message(tmp_path, tiny_data):
    variants = plan_variants(["pfedlora", "standalone"], ["branch"], None, TINY)
    (tmp_path / "standalone").mkdir()
    (tmp_path / "standalone" / "config.toml").write_text("not toml at all [")  # an unreadable run directory
    with pytest.raises(ConfigError, match="standalone"):
        run_comparison(variants, tmp_path, jobs=2, workers=1)


def test_seeds_give_mean_and_spread_per_method_and_a_lead_only_beyond_the_spread(tmp_path, tiny_data):
    args = _compare_args("-a", "standalone,lg-fedavg", "--seeds", "0,1,2", "--out", str(tmp_path))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summaries = {
        (method, seed): json.loads((tmp_path / method / f"seed-{seed}" / "summary.json").read_text())
        for method in ("standalone", "lg-fedavg")
        for seed in (0, 1, 2)
    }
    assert {s["seed"] for s in summaries.values()} == {0, 1, 2}
    rows = {row[0]: row for row in csv.reader((tmp_path / "comparison.csv").open())}
    assert set(rows) == {"method", "standalone", "lg-fedavg"}
    header = rows["method"]
    for method in ("standalone", "lg-fedavg"):
        last = [summaries[method, seed]["mean_accuracy_last"] for seed in (0, 1, 2)]
        mean = float(rows[method][header.index("last acc % mean")])
        spread = float(rows[method][header.index("last acc % std")])
        assert mean == pytest.approx(sum(last) / 3)
        assert spread == pytest.approx(statistics.stdev(last))
    text = (tmp_path / "comparison.md").read_text()
    assert "Mean ± standard deviation across seeds 0, 1, 2" in text and " ± " in text
    assert "Last mean accuracy:" in text and ("a lead." in text or "no lead" in text)
    assert "Seed by seed (0, 1, 2), " in text and " of 3 seeds." in text
    bad = CliRunner().invoke(
        app, _compare_args("-a", "standalone", "--seeds", "0,x", "--out", str(tmp_path / "x"))
    )
    assert bad.exit_code == 2 and "--seeds '0,x'" in bad.stderr


def test_the_lead_verdict_weighs_the_gap_against_the_spread():
    near = [[None, None, 0.90, 0.02], [None, None, 0.89, 0.01]]
    assert "no lead" in compare.lead_verdict(["a", "b"], near)
    far = [[None, None, 0.90, 0.002], [None, None, 0.85, 0.001]]
    assert "a is ahead of b by 5.00 points" in compare.lead_verdict(["a", "b"], far)
    assert compare.lead_verdict(["a", "b"], far).endswith(": a lead.")


def test_the_seed_by_seed_note_pairs_the_two_best_methods_at_each_seed():
    def run(label: str, seed: int, last: float) -> compare.Result:
        return label, [], {"seed": seed, "mean_accuracy_last": last}

    results = [run("a/seed-0", 0, 0.90), run("b/seed-0", 0, 0.89), run("c/seed-0", 0, 0.5)]
    results += [run("a/seed-1", 1, 0.91), run("b/seed-1", 1, 0.92), run("c/seed-1", 1, 0.5)]
    groups = compare.group_by_method(results)
    numbers = [[None, None, 0.905, 0.007], [None, None, 0.905 - 1e-9, 0.02], [None, None, 0.5, 0.0]]
    note = compare.seed_by_seed_note(groups, numbers)
    assert note == "Seed by seed (0, 1), a minus b: +1.00, -1.00 points; ahead at 1 of 2 seeds."
    assert compare.seed_by_seed_note(groups[:1], numbers[:1]) == ""


def _curve(label: str, points: list[tuple[int, float]]) -> compare.Result:
    records = [{"round": r, "mean_accuracy": a} for r, a in points]
    return label, records, {}


def test_the_flatness_note_reads_each_curve_over_its_last_tenth_of_rounds():
    groups = compare.group_by_method(
        [
            _curve("flat/seed-0", [(50, 0.900), (55, 0.901), (60, 0.902)]),
            _curve("flat/seed-1", [(50, 0.800), (55, 0.800), (60, 0.800)]),
            _curve("rising", [(50, 0.80), (55, 0.81), (60, 0.82)]),
        ]
    )
    note = compare.flatness_note(groups)
    # flat: from round 54 (interpolated 0.9008) to 60 is +0.12 points, averaged with 0 over two seeds.
    assert note.endswith("flat: flat +0.06; still moving: rising +1.20.")
    assert compare.flatness_note(compare.group_by_method([_curve("sparse", [(60, 0.9)])])) == ""


def test_with_one_seed_no_lead_is_called(tmp_path, tiny_data):
    variants = with_seeds(plan_variants(["pfedlora", "standalone"], ["branch"], None, TINY), [0])
    write_comparison(run_comparison(variants, tmp_path), tmp_path)
    text = (tmp_path / "comparison.md").read_text()
    assert "no spread across seeds to call a lead by" in text and ": a lead." not in text
    assert "Seed 0." in text and " ± " not in text  # one run is no spread: its values alone


def test_each_variant_takes_its_own_algorithms_options():
    variants = plan_variants(
        ["fedtgp", "fd"],
        ["branch"],
        None,
        ["fedtgp:fedtgp.margin_cap=3", "fd:fd.regulariser=mse", "fd.lambda=2"],
    )
    fedtgp, fd = (v.config for v in variants)
    assert fedtgp.algorithm_options.margin_cap == 3.0 and fd.algorithm_options.regulariser == "mse"
    assert fd.algorithm_options.lambda_ == 2.0 and fedtgp.options["fd"].lambda_ == 2.0  # shared: both
    assert fd.options["fedtgp"].margin_cap == 100.0  # scoped: fedtgp's variant alone
