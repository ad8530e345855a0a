"""Sampled evaluation (``federation.eval_sample``): a seeded sample of clients at the intermediate
evaluations, every client at the end; training is unchanged."""

import pytest

from pfedlora.errors import ConfigError
from pfedlora.simulation import TIMING_KEYS, build_federation, read_run, run_experiment, run_federation
from pfedlora.simulation.sampling import evaluation_sample


def test_the_evaluation_sample_is_seeded_per_round():
    first = evaluation_sample(100, 10, seed=0, server_round=3)
    assert first == evaluation_sample(100, 10, seed=0, server_round=3) and len(set(first)) == 10
    assert first == sorted(first) and first != evaluation_sample(100, 10, seed=0, server_round=4)
    assert evaluation_sample(100, 0, 0, 3) is None and evaluation_sample(100, 100, 0, 3) is None


def test_intermediate_evaluations_score_a_sample_and_the_last_everyone(tiny_dataset, tiny_config):
    sampled = run_federation(build_federation(tiny_config("federation.eval_sample=2"), tiny_dataset))
    everyone = run_federation(build_federation(tiny_config(), tiny_dataset))
    for part, full in zip(sampled[:-1], everyone[:-1], strict=True):
        ids = part["evaluated_clients"]
        assert len(ids) == 2 and ids == evaluation_sample(5, 2, 0, part["round"])
        assert part["client_accuracies"] == [full["client_accuracies"][i] for i in ids]  # training unchanged
        assert part["mean_accuracy"] == pytest.approx(sum(part["client_accuracies"]) / 2)
    assert "evaluated_clients" not in sampled[-1] and len(sampled[-1]["client_accuracies"]) == 5
    assert sampled[-1]["mean_accuracy"] == everyone[-1]["mean_accuracy"]
    with pytest.raises(ConfigError, match="eval_sample: 6 exceeds the 5 clients"):
        tiny_config("federation.eval_sample=6")


def test_the_sample_is_the_same_with_worker_processes(tmp_path, tiny_dataset, tiny_config):
    config = tiny_config("federation.eval_sample=3")
    run_experiment(config, tmp_path / "local", dataset=tiny_dataset, workers=0)
    run_experiment(config, tmp_path / "pool", dataset=tiny_dataset, workers=2)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]  # noqa: E731
    (local, summary), (pool, _) = read_run(tmp_path / "local"), read_run(tmp_path / "pool")
    assert strip(local) == strip(pool) and summary["eval_sample"] == 3


def test_titles_and_tables_name_the_sample(tmp_path, tiny_dataset, tiny_config):
    from pfedlora.plots import evaluation_note

    run_experiment(tiny_config("federation.eval_sample=3"), tmp_path / "sampled", dataset=tiny_dataset)
    run_experiment(tiny_config(), tmp_path / "everyone", dataset=tiny_dataset)
    sampled, everyone = read_run(tmp_path / "sampled")[1], read_run(tmp_path / "everyone")[1]
    assert evaluation_note([everyone]) == "clients scored after-training"
    assert evaluation_note([sampled, everyone]) == (
        "clients scored after-training; before the last round a sample of 3 clients"
    )
