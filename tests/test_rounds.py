"""Refusing bad updates, min_clients, dropout and the privacy option (the steps both runtimes share)."""

import dataclasses
import logging
import math

import pytest
import torch

from pfedlora.algorithms import Upload, create_algorithm, weighted_average
from pfedlora.algorithms.privacy import add_gaussian_noise, clip_update, epsilon_spent
from pfedlora.algorithms.state import combine
from pfedlora.errors import ConfigError
from pfedlora.simulation import build_federation, read_run, run_experiment, run_federation
from pfedlora.simulation.records import privacy_budget
from pfedlora.simulation.rounds import server_update
from pfedlora.simulation.screening import Reply


def _replies(federation):
    """Two valid pFedLoRA uploads (clients 0 and 1): the global adapter nudged two different ways."""
    state = federation.server_state
    return [
        Reply(cid, Upload({k: v + 0.01 * (cid + 1) for k, v in state.items()}, 5 + cid)) for cid in (0, 1)
    ]


def _corrupt(tensors, kind):
    key = next(iter(tensors))
    tensors = dict(tensors)
    if kind == "missing":
        del tensors[key]
    elif kind == "extra":
        tensors["lora_branch.smuggled"] = torch.zeros(2)
    elif kind == "shape":
        tensors[key] = torch.zeros(tensors[key].numel() + 1)
    elif kind == "dtype":
        tensors[key] = tensors[key].double()
    elif kind in ("nan", "inf"):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float(kind)
    return tensors


BAD_TENSORS = {
    "missing": "missing tensors",
    "extra": "unexpected tensors",
    "shape": "has shape",
    "dtype": "has dtype",
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
}
BAD_COUNTS = {"zero": 0, "negative": -3, "fractional": 2.5, "too many": 10_000}


@pytest.mark.parametrize("kind", [*BAD_TENSORS, *BAD_COUNTS])
def test_each_kind_of_bad_update_is_refused_logged_and_the_rest_aggregated(
    tiny_dataset, tiny_config, caplog, kind
):
    federation = build_federation(tiny_config(), tiny_dataset)
    good, bad = _replies(federation)
    if kind in BAD_TENSORS:
        bad = Reply(bad.client_id, Upload(_corrupt(bad.upload.tensors, kind), bad.upload.num_examples))
    else:
        bad = Reply(bad.client_id, Upload(bad.upload.tensors, BAD_COUNTS[kind]))
    declared = {cid: data.num_train for cid, data in enumerate(federation.clients)}
    with caplog.at_level(logging.WARNING):
        outcome = server_update(federation.algorithm, federation.server_state, [good, bad], declared, 4)
    assert outcome.aggregated == [0] and [r.client_id for r in outcome.refused] == [1]
    reason = outcome.refused[0].reason
    assert BAD_TENSORS.get(kind, "sample count") in reason
    assert f"round 4: refused the update of client 1: {reason}" in caplog.text
    for key, value in outcome.server_state.items():
        assert torch.equal(value, good.upload.tensors[key])  # the valid upload alone


def test_fewer_valid_uploads_than_min_clients_keep_the_global_state(tiny_dataset, tiny_config, caplog):
    federation = build_federation(tiny_config("federation.min_clients=2"), tiny_dataset)
    good, bad = _replies(federation)
    bad = Reply(1, Upload(_corrupt(bad.upload.tensors, "nan"), 5))
    declared = {0: 100, 1: 100}
    with caplog.at_level(logging.WARNING):
        outcome = server_update(federation.algorithm, federation.server_state, [good, bad], declared, 2)
    assert outcome.server_state is federation.server_state and outcome.aggregated == []
    assert "fewer than federation.min_clients = 2" in caplog.text
    both = server_update(
        federation.algorithm, federation.server_state, list(_replies(federation)), declared, 2
    )
    assert both.aggregated == [0, 1]


def test_algorithm_specific_schemas_are_checked(tiny_dataset, tiny_config):
    for name, tensors, reason in [
        ("fedproto", {"prototype.9": torch.zeros(500), "count.9": torch.ones(())}, "names no class"),
        ("fedproto", {"prototype.1": torch.zeros(500)}, "different classes"),
        ("fedgh", {"prototype.1": torch.zeros(7)}, "has shape"),
    ]:
        federation = build_federation(tiny_config(f"algorithm={name}"), tiny_dataset)
        outcome = server_update(
            federation.algorithm, federation.server_state, [Reply(0, Upload(tensors, 3))], {0: 10}, 1
        )
        assert reason in outcome.refused[0].reason, name
    federation = build_federation(tiny_config("algorithm=fedkd"), tiny_dataset)
    key = next(k for k, v in federation.server_state.items() if v.dim() == 2)
    update = {k: torch.zeros_like(v) for k, v in federation.server_state.items() if k != key}
    rows, cols = federation.server_state[key].shape
    update |= {f"{key}.U": torch.zeros(rows, 2), f"{key}.S": torch.zeros(3), f"{key}.V": torch.zeros(cols, 2)}
    outcome = server_update(
        federation.algorithm, federation.server_state, [Reply(0, Upload(update, 3))], {0: 9}, 1
    )
    assert outcome.refused and outcome.refused[0].client_id == 0


def test_dropouts_are_seeded_tolerated_and_never_upload(tiny_dataset, tiny_config):
    config = tiny_config("federation.drop_rate=0.5", "federation.rounds=4")
    records = run_federation(build_federation(config, tiny_dataset))
    again = run_federation(build_federation(config, tiny_dataset))
    assert [r["dropped"] for r in records] == [r["dropped"] for r in again]
    assert any(r["dropped"] for r in records)
    for record in records:
        trained = [c["client_id"] for c in record["clients"]]
        assert sorted(trained + record["dropped"]) == sorted(record["sampled"])
        assert record["aggregated"] == trained
    # A round where every client is lost (the config refuses drop_rate = 1; a deployment can lose every node)
    base = tiny_config()
    federation = dataclasses.replace(base.federation, drop_rate=1.0)
    everyone_leaves = dataclasses.replace(base, federation=federation)
    everyone_gone = build_federation(everyone_leaves, tiny_dataset)
    before = {k: v.clone() for k, v in everyone_gone.server_state.items()}
    records = run_federation(everyone_gone)
    assert all(r["bytes_up"] == 0 and r["aggregated"] == [] for r in records)
    assert all(torch.equal(before[k], v) for k, v in everyone_gone.server_state.items())


def test_clipping_bounds_the_update_norm_and_leaves_small_updates_alone():
    received = {"a": torch.zeros(3), "b": torch.ones(2)}
    uploaded = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([1.0, 5.0])}  # ‖Δ‖ = 5
    clipped = clip_update(received, uploaded, clip_norm=1.0)
    delta = torch.cat([clipped["a"] - received["a"], clipped["b"] - received["b"]])
    assert torch.allclose(delta, torch.tensor([0.6, 0.0, 0.0, 0.0, 0.8]))
    same = clip_update(received, uploaded, clip_norm=10.0)
    assert all(torch.equal(same[k], uploaded[k]) for k in uploaded)


def test_noise_has_the_stated_scale_and_is_seeded():
    state = {"w": torch.zeros(200_000)}
    noisy = add_gaussian_noise(state, 0.25, torch.Generator().manual_seed(3))
    assert abs(float(noisy["w"].std()) - 0.25) < 0.005
    assert torch.equal(noisy["w"], add_gaussian_noise(state, 0.25, torch.Generator().manual_seed(3))["w"])


def test_private_rounds_average_clipped_updates_with_equal_weights_plus_noise(tiny_dataset, tiny_config):
    plain = tiny_config("privacy.clip_norm=1000")
    federation = build_federation(plain, tiny_dataset)
    replies = _replies(federation)  # sample counts 5 and 6, ignored under privacy
    declared = {0: 100, 1: 100}
    outcome = server_update(federation.algorithm, federation.server_state, replies, declared, 1)
    expected = weighted_average([r.upload.tensors for r in replies], [1, 1])
    assert all(torch.allclose(outcome.server_state[k], v) for k, v in expected.items())

    noisy = build_federation(
        tiny_config("privacy.clip_norm=1000", "privacy.noise_multiplier=0.002"), tiny_dataset
    )
    first = server_update(noisy.algorithm, noisy.server_state, replies, declared, 1).server_state
    second = server_update(noisy.algorithm, noisy.server_state, replies, declared, 1).server_state
    residual = torch.cat([(first[k] - expected[k]).flatten() for k in expected])
    assert abs(float(residual.std()) - 0.002 * 1000 / 2) < 0.1  # σ · C / m with m = 2
    assert all(torch.equal(first[k], second[k]) for k in first)  # seeded by (seed, round)


def test_privacy_is_refused_where_it_does_not_apply(tiny_config):
    with pytest.raises(ConfigError, match=r"fedproto.*support it: pfedlora"):
        create_algorithm(tiny_config("algorithm=fedproto", "privacy.clip_norm=1"), (1, 28, 28), 4)
    with pytest.raises(ConfigError, match=r"needs privacy\.clip_norm"):
        tiny_config("privacy.noise_multiplier=1")


def test_median_and_trimmed_mean_are_coordinate_wise_and_ignore_weights():
    states = [
        {"w": torch.tensor([1.0, 10.0])},
        {"w": torch.tensor([2.0, 20.0])},
        {"w": torch.tensor([9.0, 0.0])},
    ]
    weights = [1, 1, 1000]
    assert torch.equal(combine(states, weights, "median")["w"], torch.tensor([2.0, 10.0]))
    assert torch.equal(combine(states[:2], weights[:2], "median")["w"], torch.tensor([1.5, 15.0]))
    five = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert torch.equal(combine(five, [1] * 5, "trimmed-mean", 0.2)["w"], torch.tensor([3.0]))
    assert torch.equal(combine(five, [1] * 5, "trimmed-mean", 0.0)["w"], torch.tensor([22.0]))
    assert torch.allclose(combine(states, weights, "mean")["w"], weighted_average(states, weights)["w"])


def _honest_and_inflated(federation):
    """Clients 0 and 1 honest (5 and 6 samples); client 2 declares 10^9 and uploads a far-off state."""
    state = federation.server_state
    honest = _replies(federation)
    poisoned = Reply(2, Upload({k: v + 50.0 for k, v in state.items()}, 10**9))
    return [*honest, poisoned], {0: 100, 1: 100, 2: 10**9}


@pytest.mark.parametrize(
    ("overrides", "bound"),
    [
        ((), None),  # the plain mean: the inflated client wins
        (("federation.weight_cap=2",), 50.0 * 12 / 23 + 0.02),  # capped to 2 x median (6) = 12 samples
        (("federation.aggregator=median",), 0.02),
        (("federation.aggregator=trimmed-mean", "federation.trim_fraction=0.34"), 0.02),
    ],
    ids=["mean", "weight-cap", "median", "trimmed-mean"],
)
def test_defences_bound_a_client_that_inflates_its_sample_count(tiny_dataset, tiny_config, overrides, bound):
    federation = build_federation(tiny_config(*overrides), tiny_dataset)
    replies, declared = _honest_and_inflated(federation)
    outcome = server_update(federation.algorithm, federation.server_state, replies, declared, 1)
    shift = max(float((outcome.server_state[k] - v).abs().max()) for k, v in federation.server_state.items())
    if bound is None:
        assert shift > 49.9
    else:
        assert shift <= bound + 1e-4


def test_defence_settings_are_checked(tiny_config):
    with pytest.raises(ConfigError, match=r"weight_cap: 0\.5 would cap even the median client"):
        tiny_config("federation.weight_cap=0.5")
    with pytest.raises(ConfigError, match="aggregator: unknown value 'krum'; allowed: mean, median"):
        tiny_config("federation.aggregator=krum")
    with pytest.raises(ConfigError, match="calibrated to the mean"):
        tiny_config("federation.aggregator=median", "privacy.clip_norm=1", "algorithm=lg-fedavg")


def test_the_accountant_gives_a_sound_and_monotone_epsilon():
    delta = 1e-5
    # Without subsampling one round is the Gaussian mechanism: its RDP is α / (2σ²), and the classic
    # conversion min_α [α / (2σ²) + log(1/δ) / (α − 1)] bounds ε from above (Opacus converts more tightly).
    sigma = 2.0
    classic = min(
        a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in (1 + x / 10 for x in range(1, 2000))
    )
    one = epsilon_spent(sigma, 1.0, 1, delta)
    assert 0.5 * classic < one <= classic
    assert epsilon_spent(sigma, 0.1, 1, delta) < one  # subsampling amplifies privacy
    by_rounds = [epsilon_spent(1.0, 0.1, rounds, delta) for rounds in (1, 10, 80)]
    assert by_rounds == sorted(by_rounds) and by_rounds[0] < by_rounds[-1]
    assert epsilon_spent(2.0, 0.1, 80, delta) < by_rounds[-1]  # more noise, less ε
    assert math.isinf(epsilon_spent(0.0, 0.1, 80, delta))


def test_a_private_run_reports_its_epsilon_per_round_and_in_all(tiny_dataset, tiny_config):
    config = tiny_config("algorithm=lg-fedavg", "privacy.clip_norm=1", "privacy.noise_multiplier=1.1")
    records = run_federation(build_federation(config, tiny_dataset))
    spent = [record["privacy_epsilon"] for record in records]
    assert all(eps > 0 for eps in spent) and spent == sorted(spent) and spent[0] < spent[-1]
    budget = privacy_budget(config, len(records))
    assert budget["epsilon"] == spent[-1] and budget["epsilon_one_round"] == spent[0]
    assert budget["sample_rate"] == 3 / 5 and budget["delta"] == 1e-5 and "Poisson" in budget["assumptions"]
    assert privacy_budget(tiny_config(), 3) is None
    clipped_only = privacy_budget(tiny_config("algorithm=lg-fedavg", "privacy.clip_norm=1"), 3)
    assert clipped_only["epsilon"] is None  # no noise: no guarantee


@pytest.mark.parametrize(
    ("algorithm", "trains_on_the_server"), [("fedgh", True), ("fedtgp", True), ("fd", False)]
)
def test_training_on_the_server_is_counted_apart_from_the_clients(
    tmp_path, tiny_dataset, tiny_config, algorithm, trains_on_the_server
):
    config = tiny_config(f"algorithm={algorithm}", "federation.rounds=2", "fedtgp.server_epochs=2")
    run_experiment(config, tmp_path, dataset=tiny_dataset)
    records, summary = read_run(tmp_path)
    assert all((r["server_flops"] > 0) == trains_on_the_server for r in records)
    assert summary["server_flops_total"] == sum(r["server_flops"] for r in records)
    assert summary["train_flops_total"] == sum(r["train_flops"] for r in records)  # the clients' alone
