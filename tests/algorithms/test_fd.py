import math

import pytest
import torch
import torch.nn.functional as F

from pfedlora.algorithms import Upload
from pfedlora.algorithms.fd import FD, distillation_loss
from pfedlora.simulation import build_federation, run_federation

from .helpers import client_context


def test_the_loss_on_a_hand_made_batch():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 1, 2])
    global_logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([True, True, False])  # class 2 has no global logits yet
    ce = F.cross_entropy(logits, labels)

    def kl(teacher, student):  # KL(softmax(teacher) ‖ softmax(student)) of one sample
        p = teacher.softmax(0)
        return float((p * (p.log() - student.log_softmax(0))).sum())

    expected = ce + 0.5 * (kl(global_logits[0], logits[0]) + kl(global_logits[1], logits[1])) / 3
    torch.testing.assert_close(distillation_loss(logits, labels, global_logits, mask, 0.5), expected)
    mse = ((logits[:2] - global_logits[:2]).square().sum()) / 9  # over all 9 elements, the unknown row 0
    torch.testing.assert_close(distillation_loss(logits, labels, global_logits, mask, 2, "mse"), ce + 2 * mse)
    assert distillation_loss(logits, labels, global_logits, torch.zeros(3, dtype=torch.bool), 5) == ce
    with pytest.raises(ValueError, match="allowed: kl, mse"):
        distillation_loss(logits, labels, global_logits, mask, 1, "l1")


def test_clients_upload_their_per_class_mean_logits_with_counts(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fd"), tiny_dataset)
    client, data = federation.client_states[1], federation.clients[1]
    upload = federation.algorithm.train(client, {}, client_context(federation, 1))
    ((x, labels),) = data.eval_batches("train", data.num_train)
    client.model.eval()
    with torch.no_grad():
        logits = client.model(x)  # (n, 5)
    assert set(upload.tensors) == {
        f"{kind}.{c}" for c in labels.unique().tolist() for kind in ("prototype", "count")
    }
    for c in labels.unique().tolist():
        torch.testing.assert_close(
            upload.tensors[f"prototype.{c}"], logits[labels == c].mean(0), atol=1e-4, rtol=1e-4
        )
        assert float(upload.tensors[f"count.{c}"]) == int((labels == c).sum())


def test_the_server_averages_each_class_over_its_samples(tiny_config):
    algorithm = FD(tiny_config("algorithm=fd"), (1, 28, 28), num_classes=3)
    state = algorithm.initial_server_state(algorithm.create_client("cnn5", torch.Generator().manual_seed(0)))
    assert state["prototypes"].shape == (3, 3)  # a logit vector per class
    uploads = [
        Upload({"prototype.0": torch.tensor([3.0, 0.0, 0.0]), "count.0": torch.tensor(3.0)}, 3),
        Upload(
            {
                "prototype.0": torch.tensor([-1.0, 4.0, 0.0]),
                "count.0": torch.tensor(1.0),
                "prototype.2": torch.tensor([0.0, 1.0, 2.0]),
                "count.2": torch.tensor(5.0),
            },
            6,
        ),
    ]
    new = algorithm.aggregate(state, uploads, server_round=1)
    assert new["prototypes"][0].tolist() == [2.0, 1.0, 0.0]  # (3·[3,0,0] + 1·[-1,4,0]) / 4
    assert new["prototypes"][2].tolist() == [0.0, 1.0, 2.0]
    assert new["present"].tolist() == [1.0, 0.0, 1.0]
    assert set(algorithm.broadcast(new, 0, 2)) == {"prototype.0", "prototype.2"}


def test_two_rounds_receive_global_logits_and_predict_with_the_local_model(tiny_dataset, tiny_config):
    config = tiny_config(
        "algorithm=fd", "federation.rounds=2", "federation.sample_fraction=1.0", "fd.lambda=2"
    )
    federation = build_federation(config, tiny_dataset)
    records = run_federation(federation)
    assert all(math.isfinite(r["mean_accuracy"]) for r in records)
    client = federation.client_states[0]
    assert bool(client.prototype_mask.any())
    x = tiny_dataset.test_x[:4].float()
    assert torch.equal(federation.algorithm.predict(client, x), client.model(x))
    bytes_up = records[1]["clients"][0]["bytes_up"]
    held = len(set(tiny_dataset.train_y[federation.clients[0].train_indices].tolist()))
    assert bytes_up == held * (federation.algorithm.num_classes + 1) * 4  # C logits and a count per class
