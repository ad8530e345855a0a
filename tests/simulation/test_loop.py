import json

import pytest

from pfedlora.metrics import payload_bytes
from pfedlora.models import adapter_state_dict
from pfedlora.simulation import TIMING_KEYS, build_federation, run_experiment, run_federation

SUMMARY_KEYS = {
    "algorithm",
    "dataset",
    "num_clients",
    "rounds",
    "mean_accuracy_best",
    "mean_accuracy_last",
    "bytes_total",
    "train_flops_total",
    "wall_seconds",
}


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_identical_seeds_give_identical_metrics(tiny_dataset, tiny_config):
    runs = [run_federation(build_federation(tiny_config(), tiny_dataset)) for _ in range(2)]
    assert _without_timing(runs[0]) == _without_timing(runs[1])
    other = run_federation(build_federation(tiny_config("seed=1"), tiny_dataset))
    assert _without_timing(other) != _without_timing(runs[0])


@pytest.mark.parametrize("placement", ["layers", "branch"])
def test_only_adapter_tensors_travel(tiny_dataset, tiny_config, placement):
    federation = build_federation(tiny_config(f"adapter.placement={placement}"), tiny_dataset)
    adapter_bytes = payload_bytes(adapter_state_dict(federation.client_states[0]))
    records = run_federation(federation)
    for record in records:
        assert len(record["clients"]) == 3  # 60% of 5 clients
        for client in record["clients"]:
            assert client["bytes_down"] == client["bytes_up"] == adapter_bytes
    model_bytes = payload_bytes(federation.client_states[0].state_dict())
    assert adapter_bytes < 0.05 * model_bytes


def test_standalone_sends_nothing(tiny_dataset, tiny_config):
    records = run_federation(build_federation(tiny_config("algorithm=standalone"), tiny_dataset))
    assert all(r["bytes_down"] == r["bytes_up"] == 0 for r in records)
    assert all(r["train_flops"] > 0 for r in records)


def test_training_learns_the_tiny_task(tiny_dataset, tiny_config):
    config = tiny_config("federation.rounds=4", "federation.sample_fraction=1.0")
    records = run_federation(build_federation(config, tiny_dataset))
    assert records[-1]["mean_accuracy"] > 0.9  # chance is 0.5 for two classes per client


def test_run_directory(tmp_path, tiny_dataset, tiny_config):
    config = tiny_config("federation.eval_every=2")
    summary = run_experiment(config, tmp_path / "run", dataset=tiny_dataset)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert files == {".pfedlora.lock", "config.toml", "metrics.jsonl", "summary.json"}
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert ["mean_accuracy" in r for r in records] == [False, True, True]  # every 2nd round and the last
    assert summary.keys() >= SUMMARY_KEYS
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert summary["bytes_total"] == sum(r["bytes_down"] + r["bytes_up"] for r in records)
    assert summary["train_flops_total"] == pytest.approx(sum(r["train_flops"] for r in records))
    with pytest.raises(Exception, match="already exists"):
        run_experiment(config, tmp_path / "run", dataset=tiny_dataset)


def test_clients_without_validation_samples_are_excluded_counted_and_warned(
    tiny_dataset, tiny_config, caplog
):
    config = tiny_config(
        "algorithm=standalone",
        "data.partition=dirichlet",
        "data.dirichlet_alpha=0.05",
        "data.min_train_samples=1",  # a client with one training sample carves no validation sample
        "data.validation_fraction=0.1",
        "federation.num_clients=40",
        "federation.sample_fraction=0.1",
        "federation.rounds=1",
    )
    with caplog.at_level("WARNING", logger="pfedlora.simulation.loop"):
        (record,) = run_federation(build_federation(config, tiny_dataset))
    empty = [i for i, value in enumerate(record["client_accuracies"]) if value is None]
    assert record["clients_without_eval_samples"] == len(empty) > 0
    scored = [value for value in record["client_accuracies"] if value is not None]
    assert record["mean_accuracy"] == pytest.approx(sum(scored) / len(scored))
    assert f"{len(empty)} of 40 clients have no validation samples" in caplog.text
