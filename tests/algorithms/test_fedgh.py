import math

import pytest
import torch

from pfedlora.algorithms import Upload
from pfedlora.algorithms.fedgh import FedGH
from pfedlora.metrics import FlopMeter
from pfedlora.simulation import build_federation, run_federation

from .helpers import client_context as _context

HEAD = {"fc3.weight": (4, 500), "fc3.bias": (4,)}  # the tiny dataset has 4 classes


def _train_classes(federation, client_id):
    data = federation.clients[client_id]
    return sorted(set(data.dataset.train_y[data.train_indices].tolist()))


def test_one_round_gives_finite_accuracies(tiny_dataset, tiny_config):
    records = run_federation(
        build_federation(tiny_config("algorithm=fedgh", "federation.rounds=1"), tiny_dataset)
    )
    assert math.isfinite(records[0]["mean_accuracy"])
    assert all(0 <= a <= 1 for a in records[0]["client_accuracies"])


def test_header_goes_down_and_class_means_come_up(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedgh"), tiny_dataset)
    assert {k: tuple(v.shape) for k, v in federation.server_state.items()} == HEAD
    for record in run_federation(federation):
        for client in record["clients"]:
            assert client["bytes_down"] == (4 * 500 + 4) * 4
            assert client["bytes_up"] == len(_train_classes(federation, client["client_id"])) * 500 * 4


def test_upload_is_the_class_means_of_the_trained_model(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedgh"), tiny_dataset)
    client, data = federation.client_states[1], federation.clients[1]
    private = set(client.state_dict())
    meter = FlopMeter()
    upload = federation.algorithm.train(
        client, dict(federation.server_state), _context(federation, 1, meter=meter)
    )
    classes = _train_classes(federation, 1)
    assert len(classes) == 2
    assert set(upload.tensors) == {f"prototype.{c}" for c in classes}
    assert not set(upload.tensors) & private  # the model never leaves the client
    x = data.dataset.normalize(data.dataset.train_x[data.train_indices])
    y = data.dataset.train_y[data.train_indices]
    with torch.no_grad():
        features = client.features(x)  # (n, 500), every training sample once, not augmented
    for c in classes:
        expected = features[y == c].sum(0) / int((y == c).sum())
        torch.testing.assert_close(upload.tensors[f"prototype.{c}"], expected)
    assert upload.num_examples == data.num_train
    assert meter.per_sample[(federation.config.architecture_of(1), "prototypes")] > 0


def test_client_trains_from_the_global_header(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedgh", "train.local_epochs=0"), tiny_dataset)
    client = federation.client_states[2]
    generator = torch.Generator().manual_seed(4)
    header = {k: torch.randn(shape, generator=generator) for k, shape in HEAD.items()}
    federation.algorithm.train(client, header, _context(federation, 2))
    for key, value in header.items():
        assert torch.equal(client.state_dict()[key], value)
    with pytest.raises(ValueError, match="global head"):
        federation.algorithm.train(client, {"fc3.weight": header["fc3.weight"]}, _context(federation, 2))


def _hand_sgd_step(weight, bias, features, labels, lr):
    """One step of SGD on mean cross-entropy, gradients written out: (softmax - onehot)/P."""
    logits = features @ weight.T + bias  # (P, C)
    error = torch.softmax(logits, dim=1) - torch.eye(weight.shape[0])[labels]  # (P, C)
    return weight - lr * error.T @ features / len(labels), bias - lr * error.mean(0)


@pytest.mark.parametrize("epochs", [1, 3])
def test_server_trains_the_header_with_plain_sgd_on_all_pairs(tiny_config, epochs):
    config = tiny_config("algorithm=fedgh", "fedgh.server_lr=0.5", f"fedgh.server_epochs={epochs}")
    algorithm = FedGH(config, (1, 28, 28), num_classes=3)
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(3, 500, generator=generator) * 0.05, torch.tensor([0.1, -0.2, 0.3])
    means = torch.rand(4, 500, generator=generator)  # four class means from two clients
    uploads = [
        Upload({"prototype.0": means[0], "prototype.2": means[1]}, num_examples=10),
        Upload({"prototype.1": means[2], "prototype.2": means[3]}, num_examples=99),  # size is ignored
    ]
    before = weight.clone()
    meter = FlopMeter()
    new = algorithm.aggregate({"fc3.weight": weight, "fc3.bias": bias}, uploads, server_round=1, meter=meter)
    # per epoch the forward (P, 500) @ (500, C) and the weight's gradient, 2·P·500·C FLOPs each
    assert meter.total == epochs * 2 * (2 * 4 * 500 * 3)

    expected_w, expected_b = weight, bias
    for _ in range(epochs):
        expected_w, expected_b = _hand_sgd_step(
            expected_w, expected_b, means, torch.tensor([0, 2, 1, 2]), 0.5
        )
    torch.testing.assert_close(new["fc3.weight"], expected_w)
    torch.testing.assert_close(new["fc3.bias"], expected_b)
    assert not torch.allclose(new["fc3.weight"], weight)  # it did move ...
    assert torch.equal(weight, before)  # ... into a new state, leaving the old one alone


def test_server_keeps_the_header_without_uploads(tiny_config):
    algorithm = FedGH(tiny_config("algorithm=fedgh"), (1, 28, 28), num_classes=3)
    header = {"fc3.weight": torch.ones(3, 500), "fc3.bias": torch.zeros(3)}
    assert algorithm.aggregate(header, [], server_round=1) is header
    assert algorithm.aggregate(header, [Upload({}, 5)], server_round=1) is header
    with pytest.raises(ValueError, match="unexpected tensor"):
        algorithm.aggregate(header, [Upload({"fc3.weight": torch.ones(3, 500)}, 5)], server_round=1)
