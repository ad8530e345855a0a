import pytest

from pfedlora import compare
from pfedlora.errors import ConfigError
from pfedlora.tuning import Axis, _coordinate_ascent, best_overrides, coordinate_search, write_search
from tests.conftest import TINY_OVERRIDES

TINY = (*TINY_OVERRIDES, "data.validation_fraction=0.2")


def test_axis_parsing():
    assert Axis.parse("train.lr=0.01, 0.03") == Axis("train.lr", ("0.01", "0.03"))
    assert Axis.parse("fml:baselines.fml_alpha=0.5") == Axis("baselines.fml_alpha", ("0.5",), "fml")
    assert Axis.parse("fedtgp:fedtgp.margin_cap=1,10") == Axis("fedtgp.margin_cap", ("1", "10"), "fedtgp")
    for bad in ("train.lr", "train.lr=", "=1,2"):
        with pytest.raises(ConfigError, match="not of the form"):
            Axis.parse(bad)


def test_coordinate_ascent_moves_one_axis_at_a_time_and_scores_each_setting_once():
    seen = []

    def score(settings):
        seen.append(settings)
        values = dict(settings)
        return -abs(float(values["a"]) - 2) - abs(float(values["b"]) - 30)

    axes = [Axis("a", ("1", "2", "3")), Axis("b", ("10", "30"))]
    assert _coordinate_ascent(axes, score) == {"a": "2", "b": "30"}
    assert len(seen) == len(set(seen)) == 4  # (1,10) (2,10) (3,10) then (2,30): (2,10) is not rerun


def test_ties_keep_the_value_listed_first():
    assert _coordinate_ascent([Axis("a", ("3", "1", "2"))], lambda settings: 0.5) == {"a": "3"}


def test_search_on_validation_data_writes_and_resumes(tmp_path, monkeypatch, tiny_dataset):
    monkeypatch.setattr(compare, "load_run_dataset", lambda *args, **kwargs: tiny_dataset)
    axes = [Axis("train.local_epochs", ("1", "2")), Axis("adapter.rank", ("2", "4"), "pfedlora")]
    trials, best = coordinate_search(["standalone", "pfedlora"], ["branch"], axes, tmp_path, None, TINY)
    assert [t.label for t in trials] == ["standalone"] * 2 + ["pfedlora-branch"] * 3
    for label, chosen in best.items():
        mine = [t for t in trials if t.label == label]
        assert max(t.accuracy for t in mine) == next(t.accuracy for t in mine if dict(t.settings) == chosen)
    assert all((t.run_dir / "summary.json").is_file() for t in trials)
    assert "pfedlora-branch:adapter.rank=" in " ".join(best_overrides(best))
    files = write_search(trials, best, tmp_path)
    assert [f.name for f in files] == ["trials.csv", "best.toml"]
    assert len((tmp_path / "trials.csv").read_text().splitlines()) == 1 + len(trials)

    monkeypatch.setattr(compare, "run_experiment", lambda *a, **k: pytest.fail("a finished trial was rerun"))
    again, best_again = coordinate_search(["standalone", "pfedlora"], ["branch"], axes, tmp_path, None, TINY)
    assert best_again == best and [t.accuracy for t in again] == [t.accuracy for t in trials]


def test_search_refuses_to_tune_on_the_test_split(tmp_path):
    with pytest.raises(ConfigError, match="validation"):
        coordinate_search(["standalone"], ["branch"], [], tmp_path, None, ["data.validation_fraction=0"])


def test_trials_of_an_axis_side_by_side_choose_and_score_as_one_by_one(tmp_path, monkeypatch, tiny_dataset):
    monkeypatch.setattr(compare, "load_run_dataset", lambda *args, **kwargs: tiny_dataset)
    axes = [Axis("train.local_epochs", ("1", "2"))]

    def search(out, jobs):
        return coordinate_search(["standalone"], ["branch"], axes, out, None, TINY, jobs=jobs, workers=1)

    (serial, best_serial), (parallel, best_parallel) = search(tmp_path / "a", 1), search(tmp_path / "b", 2)
    assert best_parallel == best_serial
    assert [(t.settings, t.accuracy) for t in parallel] == [(t.settings, t.accuracy) for t in serial]
