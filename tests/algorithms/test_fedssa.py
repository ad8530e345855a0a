import math

import pytest
import torch

from pfedlora.algorithms import Upload
from pfedlora.algorithms.fedssa import FedSSA, stabilization_weight
from pfedlora.simulation import build_federation, run_federation

from .helpers import client_context


def test_the_stabilization_weight_decays_by_a_cosine_to_zero():
    assert [stabilization_weight(0.5, 2, t) for t in (1, 2, 3, 4, 9)] == pytest.approx(
        [0.5, 0.5 * math.cos(math.pi / 4), 0.0, 0.0, 0.0], abs=1e-12
    )
    assert stabilization_weight(0.8, 4, 3) == pytest.approx(0.8 * math.cos(2 * math.pi / 8))


def test_the_server_averages_each_class_over_the_rows_uploaded_for_it(tiny_config):
    algorithm = FedSSA(tiny_config("algorithm=fedssa"), (1, 28, 28), num_classes=3)
    state = {"header.weight": torch.full((3, 500), 9.0), "header.bias": torch.tensor([9.0, 9.0, 9.0])}
    row = lambda value, bias: torch.cat([torch.full((500,), value), torch.tensor([bias])])  # noqa: E731
    uploads = [
        Upload({"header.0": row(1.0, 0.5), "header.2": row(2.0, 1.0)}, 100),
        Upload({"header.0": row(3.0, -0.5)}, 1),  # sample counts do not weight the mean
    ]
    new = algorithm.aggregate(state, uploads, server_round=1)
    assert (
        torch.equal(new["header.weight"][0], torch.full((500,), 2.0)) and float(new["header.bias"][0]) == 0.0
    )
    assert (
        torch.equal(new["header.weight"][2], torch.full((500,), 2.0)) and float(new["header.bias"][2]) == 1.0
    )
    assert torch.equal(new["header.weight"][1], torch.full((500,), 9.0))  # nobody held class 1: kept
    with pytest.raises(ValueError, match=r"expected header\.<class>"):
        algorithm.check_upload(state, {"header.3": row(0.0, 0.0)})
    with pytest.raises(ValueError, match=r"shape \(499,\)"):
        algorithm.check_upload(state, {"header.1": torch.zeros(499)})


@pytest.mark.parametrize(("stabilization", "keep"), [("convex", 0.5), ("additive", 1.0)])
def test_a_client_mixes_in_the_global_rows_of_its_classes_then_sends_them(
    tiny_dataset, tiny_config, monkeypatch, stabilization, keep
):
    config = tiny_config("algorithm=fedssa", f"fedssa.stabilization={stabilization}", "fedssa.mu=0.5")
    federation = build_federation(config, tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[1]
    held = algorithm.held_classes(client_context(federation, 1))
    before = client.fc3.weight.detach().clone()
    message = {"header.weight": torch.randn(4, 500), "header.bias": torch.randn(4)}
    mixed = {}
    monkeypatch.setattr(
        "pfedlora.algorithms.fedssa.train_on_client_data",
        lambda client, *a, **k: mixed.update(weight=client.fc3.weight.detach().clone()),
    )
    upload = algorithm.train(client, message, client_context(federation, 1, server_round=1))
    expected = before.clone()
    expected[held] = 0.5 * before[held] + keep * message["header.weight"][held]
    torch.testing.assert_close(mixed["weight"], expected)  # unseen classes keep their own rows
    assert set(upload.tensors) == {f"header.{c}" for c in held.tolist()}
    c = held[0].item()
    assert torch.equal(upload.tensors[f"header.{c}"][:500], client.fc3.weight[c].detach())


def test_three_rounds_run_and_only_rows_of_held_classes_go_up(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedssa"), tiny_dataset)
    records = run_federation(federation)
    assert all(math.isfinite(r["mean_accuracy"]) for r in records)
    for client in records[-1]["clients"]:
        data = federation.clients[client["client_id"]]
        held = len(torch.unique(data.dataset.train_y[data.train_indices]))
        assert client["bytes_up"] == held * 501 * 4 and client["bytes_down"] == 4 * 501 * 4
