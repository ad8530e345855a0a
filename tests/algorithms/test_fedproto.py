import math

import pytest
import torch
from torch import nn

from pfedlora.algorithms import Upload
from pfedlora.algorithms.fedproto import FedProto, PrototypeClient, prototype_loss
from pfedlora.algorithms.prototypes import class_feature_means
from pfedlora.data import ClientData
from pfedlora.metrics import FlopMeter
from pfedlora.simulation import build_federation, run_federation
from pfedlora.simulation.federation import to_layout

from .helpers import client_context as _context


def _train_labels(federation, client_id):
    data = federation.clients[client_id]
    return data.dataset.train_y[data.train_indices]


def _prototypes(seed, classes):
    generator = torch.Generator().manual_seed(seed)
    return {f"prototype.{c}": torch.rand(500, generator=generator) for c in classes}


def test_two_rounds_give_finite_accuracies(tiny_dataset, tiny_config):
    config = tiny_config("algorithm=fedproto", "federation.rounds=2", "federation.sample_fraction=1.0")
    federation = build_federation(config, tiny_dataset)
    records = run_federation(federation)
    for record in records:
        assert math.isfinite(record["mean_accuracy"])
        assert all(0 <= a <= 1 for a in record["client_accuracies"])
    # After round 2 every client holds global prototypes, so it predicts by the nearest one.
    assert all(bool(state.prototype_mask.any()) for state in federation.client_states.values())


def test_prototypes_go_down_and_class_means_with_counts_come_up(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedproto"), tiny_dataset)
    assert federation.algorithm.broadcast(federation.server_state, 0, 1) == {}
    present_after = {0: 0}  # round -> number of classes with a global prototype after it

    def count_present(record):
        present_after[record["round"]] = int(federation.server_state["present"].sum())

    for record in run_federation(federation, on_round=count_present):
        for client in record["clients"]:
            held = len(set(_train_labels(federation, client["client_id"]).tolist()))
            assert client["bytes_up"] == held * (500 + 1) * 4
            assert client["bytes_down"] == present_after[record["round"] - 1] * 500 * 4
    assert present_after[1] > 0


def test_upload_keys_values_and_counts(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedproto"), tiny_dataset)
    client, data = federation.client_states[1], federation.clients[1]
    private = set(client.state_dict())
    upload = federation.algorithm.train(client, _prototypes(0, [0, 1, 2, 3]), _context(federation, 1))
    labels = _train_labels(federation, 1)
    classes = sorted(set(labels.tolist()))
    assert len(classes) == 2
    assert set(upload.tensors) == {f"{kind}.{c}" for c in classes for kind in ("prototype", "count")}
    assert not set(upload.tensors) & private  # the model never leaves the client
    x = data.dataset.normalize(data.dataset.train_x[data.train_indices])
    with torch.no_grad():
        features = client.model.features(x)  # (n, 500)
    for c in classes:
        assert upload.tensors[f"prototype.{c}"].shape == (500,)
        torch.testing.assert_close(upload.tensors[f"prototype.{c}"], features[labels == c].mean(0))
        assert upload.tensors[f"count.{c}"].shape == ()
        assert float(upload.tensors[f"count.{c}"]) == int((labels == c).sum())


def test_client_keeps_the_received_prototypes_in_its_state(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedproto", "train.local_epochs=0"), tiny_dataset)
    client = federation.client_states[0]
    message = _prototypes(1, [1, 3])
    federation.algorithm.train(client, message, _context(federation))
    state = client.state_dict()
    assert state["prototype_mask"].tolist() == [False, True, False, True]
    assert torch.equal(state["global_prototypes"][1], message["prototype.1"])
    assert torch.equal(state["global_prototypes"][0], torch.zeros(500))
    fresh = to_layout(
        federation.algorithm.create_client("cnn1", torch.Generator().manual_seed(9)), federation.config
    )
    fresh.load_state_dict(state)
    x = next(federation.clients[0].eval_batches("test", 8))[0]
    assert torch.equal(federation.algorithm.predict(fresh, x), federation.algorithm.predict(client, x))
    # A new message replaces the old prototypes entirely.
    federation.algorithm.train(client, _prototypes(2, [2]), _context(federation))
    assert client.prototype_mask.tolist() == [False, False, True, False]


def test_loss_is_plain_ce_where_no_label_has_a_prototype(tiny_dataset, tiny_config):
    def train(lam, message):
        federation = build_federation(
            tiny_config("algorithm=fedproto", f"fedproto.lambda={lam}"), tiny_dataset
        )
        client = federation.client_states[0]
        federation.algorithm.train(client, message, _context(federation))
        return client.model.state_dict()

    federation = build_federation(tiny_config("algorithm=fedproto"), tiny_dataset)
    held = set(_train_labels(federation, 0).tolist())
    lacking = [c for c in range(4) if c not in held]
    plain = train(0, _prototypes(3, range(4)))
    for message in ({}, _prototypes(3, lacking)):  # none at all; only for classes the client lacks
        for key, value in train(10, message).items():
            assert torch.equal(plain[key], value)
    pulled = train(10, _prototypes(3, range(4)))
    assert any(not torch.equal(pulled[k], v) for k, v in plain.items())


def test_prototype_loss_on_a_hand_made_batch():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (B=2, C=3)
    features = torch.zeros(2, 500)
    features[0, :2] = torch.tensor([3.0, 4.0])
    features[1, 0] = 100.0  # its label has no prototype: no pull
    prototypes = torch.zeros(3, 500)
    prototypes[2, 0] = 1.0  # class 2's prototype
    prototypes[1, 0] = 50.0  # stale row of class 1, masked out
    mask = torch.tensor([False, False, True])
    labels = torch.tensor([2, 1])
    ce = (-torch.log_softmax(logits, 1)[[0, 1], [2, 1]]).mean()
    squared_error = (3 - 1) ** 2 + 4**2  # sample 0 only
    expected = ce + 10 * squared_error / (2 * 500)  # mean over samples and dimensions
    loss = prototype_loss(logits, features, labels, prototypes, mask, lam=10.0)
    torch.testing.assert_close(loss, expected)


def test_server_averages_prototypes_per_class_weighted_by_counts(tiny_config):
    algorithm = FedProto(tiny_config("algorithm=fedproto"), (1, 28, 28), num_classes=5)
    ramp = torch.arange(500, dtype=torch.float32)
    state = algorithm.initial_server_state(algorithm.create_client("cnn5", torch.Generator().manual_seed(0)))
    state["prototypes"][3] = 7.0  # class 3 has a prototype from an earlier round, nobody uploads it now
    state["present"][3] = 1.0
    uploads = [
        Upload({"prototype.0": torch.full((500,), 1.0), "count.0": torch.tensor(2.0)}, 2),
        Upload(
            {
                "prototype.0": torch.full((500,), 4.0),
                "count.0": torch.tensor(1.0),
                "prototype.1": ramp,
                "count.1": torch.tensor(3.0),
            },
            4,
        ),
        Upload({"prototype.1": 2 * ramp + 1, "count.1": torch.tensor(1.0)}, 1),
    ]
    new = algorithm.aggregate(state, uploads, server_round=2)
    assert torch.equal(new["prototypes"][0], torch.full((500,), 2.0))  # (2·1 + 1·4) / 3
    torch.testing.assert_close(new["prototypes"][1], (3 * ramp + 2 * ramp + 1) / 4)  # (3·r + 1·(2r+1)) / 4
    assert torch.equal(new["prototypes"][3], torch.full((500,), 7.0))  # kept
    assert torch.equal(new["prototypes"][[2, 4]], torch.zeros(2, 500))  # still absent
    assert new["present"].tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert set(algorithm.broadcast(new, 0, 3)) == {"prototype.0", "prototype.1", "prototype.3"}
    with pytest.raises(ValueError, match="different classes"):
        algorithm.aggregate(state, [Upload({"prototype.0": ramp}, 1)], server_round=2)


class _IdentityFeatures(nn.Module):
    """A stand-in model whose 500-d feature is its input, so distances are set by hand."""

    feature_dim = 500

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(500, 4, device="meta").to_empty(device="cpu")
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))

    def features(self, x):
        return x

    def forward(self, x):
        return self.head(self.features(x))


def test_prediction_is_the_nearest_global_prototype(tiny_config):
    algorithm = FedProto(tiny_config("algorithm=fedproto"), (1, 28, 28), num_classes=4)
    client = PrototypeClient(_IdentityFeatures(), num_classes=4)
    e0, e1 = torch.eye(500)[0], torch.eye(500)[1]
    x = torch.stack([0.9 * e0, 1.1 * e0, 3 * e1])  # (3, 500)
    assert algorithm.predict(client, x).argmax(1).tolist() == [3, 3, 3]  # no prototypes yet: logits
    # class 0 at the origin, class 1 at 2·e0, class 2 absent (its stale row sits on 3·e1), class 3 at 10·e1
    client.load_prototypes({0: torch.zeros(500), 1: 2 * e0, 3: 10 * e1})
    client.global_prototypes[2] = 3 * e1
    scores = algorithm.predict(client, x)
    inf = float("inf")
    expected = -torch.tensor(
        [
            [0.81, 1.21, inf, 0.81 + 100],
            [1.21, 0.81, inf, 1.21 + 100],
            [9.0, 4 + 9, inf, 49.0],
        ]
    )
    torch.testing.assert_close(scores, expected)
    assert scores.argmax(1).tolist() == [0, 1, 0]


class _ModeProbe(nn.Module):
    """Its feature is 1 in training mode and 2 in eval mode, whatever the input."""

    feature_dim = 500

    def features(self, x):
        return torch.full((len(x), 500), 1.0 if self.training else 2.0)


def test_class_means_run_in_eval_mode_over_each_training_sample_once(tiny_dataset):
    indices = torch.tensor([0, 1, 2, 5, 6, 9, 13])  # labels are index mod 4: classes 0,1,2,1,2,1,1
    data = ClientData(tiny_dataset, indices, torch.tensor([0]), torch.tensor([], dtype=torch.int64), True)
    model, meter = _ModeProbe().train(), FlopMeter()
    means, counts = class_feature_means(model, data, 4, batch_size=3, meter=meter, kind="probe")
    assert counts.tolist() == [1, 4, 2, 0]
    assert torch.equal(means[:3], torch.full((3, 500), 2.0))  # eval mode, not augmented
    assert torch.equal(means[3], torch.zeros(500))
    assert model.training  # mode restored
    assert meter.samples == 7
