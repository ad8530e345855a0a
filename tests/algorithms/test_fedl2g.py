import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.algorithms import Upload
from pfedlora.algorithms.fedl2g import FedL2GFeat, FedL2GLogit, guided_loss, lookahead_gradient
from pfedlora.metrics import FlopMeter
from pfedlora.simulation import build_federation, run_federation

from .helpers import client_context


class TinyNet(nn.Module):
    """features: a 3 -> 4 linear layer and tanh; head: 4 -> 2 (float64)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, 4).double()
        self.head = nn.Linear(4, 2).double()

    def features(self, x):
        return torch.tanh(self.body(x))

    def forward(self, x):
        return self.head(self.features(x))


def test_the_guided_loss_on_a_hand_made_batch():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    features = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1])
    guide = torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 1.0]])
    mse = (0 + 4 + 0 + 0 + 4 + 0) / 6  # (features - guide[labels])² over the 6 entries
    expected = F.cross_entropy(logits, labels) + 0.5 * mse
    torch.testing.assert_close(guided_loss(logits, features, labels, guide, 0.5), expected)
    assert guided_loss(logits, features, labels, guide, 0) == F.cross_entropy(logits, labels)


def test_the_lookahead_gradient_matches_finite_differences():
    """∂ quiz loss / ∂V through one SGD step, against central differences of the same step taken by hand."""
    model = TinyNet()
    generator = torch.Generator().manual_seed(3)
    study = [(torch.randn(5, 3, generator=generator, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))]
    quiz = [(torch.randn(4, 3, generator=generator, dtype=torch.float64), torch.tensor([1, 0, 1, 1]))]
    guide = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    lr, lam = 0.5, 2.0

    def guided(x):
        features = model.features(x)
        return model.head(features), features

    before = copy.deepcopy(model.state_dict())
    gradient = lookahead_gradient(model, guided, guide, study, quiz, lr, lam)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched

    def quiz_loss_after_a_step(vectors):
        stepped = copy.deepcopy(model)
        (x, y), (xq, yq) = study[0], quiz[0]
        features = stepped.features(x)
        loss = guided_loss(stepped.head(features), features, y, vectors, lam)
        grads = torch.autograd.grad(loss, list(stepped.parameters()))
        with torch.no_grad():
            for p, g in zip(stepped.parameters(), grads, strict=True):
                p -= lr * g
            return float(F.cross_entropy(stepped(xq), yq))

    eps = 1e-6
    numeric = torch.zeros_like(guide)
    for index in torch.cartesian_prod(torch.arange(2), torch.arange(4)).tolist():
        up, down = guide.clone(), guide.clone()
        up[tuple(index)] += eps
        down[tuple(index)] -= eps
        numeric[tuple(index)] = (quiz_loss_after_a_step(up) - quiz_loss_after_a_step(down)) / (2 * eps)
    torch.testing.assert_close(gradient, numeric, atol=1e-8, rtol=1e-5)
    assert float(gradient.abs().sum()) > 0
    assert torch.equal(
        lookahead_gradient(model, guided, guide, study, quiz, lr, 0.0), torch.zeros_like(guide)
    )


def test_the_server_steps_on_the_mean_row_of_each_class_clipped(tiny_config):
    algorithm = FedL2GLogit(
        tiny_config("algorithm=fedl2g-logit", "fedl2g-logit.server_lr=0.5"), (1, 28, 28), 3
    )
    state = {"guide": torch.zeros(3, 3)}
    uploads = [
        Upload(
            {"guide_grad.0": torch.tensor([2.0, 0.0, 0.0]), "guide_grad.2": torch.tensor([0.0, 0.0, 4.0])}, 7
        ),
        Upload({"guide_grad.0": torch.tensor([0.0, 2.0, 0.0])}, 100),  # unweighted: samples do not count
    ]
    new = algorithm.aggregate(state, uploads, server_round=1)["guide"]
    assert new.tolist() == [[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -2.0]]
    huge = [Upload({"guide_grad.1": torch.tensor([300.0, 0.0, 400.0])}, 1)]  # norm 500 -> clipped to 100
    clipped = algorithm.aggregate(state, huge, server_round=1)["guide"][1]
    torch.testing.assert_close(clipped, torch.tensor([-30.0, 0.0, -40.0]), rtol=1e-5, atol=0)
    assert algorithm.aggregate(state, [Upload({}, 3)], server_round=1) is state
    with pytest.raises(ValueError, match="names no class"):
        algorithm.check_upload(state, {"guide_grad.3": torch.zeros(3)})
    with pytest.raises(ValueError, match="has shape"):
        algorithm.check_upload(state, {"guide_grad.0": torch.zeros(4)})


def test_a_client_trains_on_its_study_split_and_uploads_the_gradient_of_its_classes(
    tiny_dataset, tiny_config
):
    config = tiny_config("algorithm=fedl2g-feat", "train.batch_size=4")
    federation = build_federation(config, tiny_dataset)
    algorithm, data = federation.algorithm, federation.clients[1]
    study, quiz = algorithm.quiz_split(data, client_id=1)
    assert quiz.num_train == min(4, data.num_train // 2)  # one batch
    assert set(study.train_indices.tolist()) | set(quiz.train_indices.tolist()) == set(
        data.train_indices.tolist()
    )
    assert not set(study.train_indices.tolist()) & set(quiz.train_indices.tolist())
    again, _ = algorithm.quiz_split(data, client_id=1)
    assert torch.equal(again.train_indices, study.train_indices)  # fixed across rounds

    message = algorithm.broadcast(federation.server_state, 1, 1)
    assert set(message) == {"guide"}
    assert message["guide"].shape == (algorithm.num_classes, algorithm.feature_dim)
    meter = FlopMeter()
    upload = algorithm.train(federation.client_states[1], message, client_context(federation, 1, meter=meter))
    assert upload.num_examples == study.num_train
    held = set(tiny_dataset.train_y[study.train_indices].tolist())
    assert upload.tensors and {int(k.split(".")[1]) for k in upload.tensors} <= held
    assert all(
        v.shape == (algorithm.feature_dim,) and v.dtype == torch.float32 for v in upload.tensors.values()
    )
    assert meter.total > 0


def test_warm_up_rounds_only_learn_to_guide(tiny_dataset, tiny_config):
    config = tiny_config("algorithm=fedl2g-logit", "fedl2g-logit.warm_up_rounds=1")
    federation = build_federation(config, tiny_dataset)
    client = federation.client_states[0]
    before = copy.deepcopy(client.state_dict())
    message = federation.algorithm.broadcast(federation.server_state, 0, 1)
    upload = federation.algorithm.train(client, message, client_context(federation, 0, server_round=1))
    assert all(torch.equal(before[k], v) for k, v in client.state_dict().items())
    assert upload.tensors  # the meta-gradient went up all the same
    federation.algorithm.train(client, message, client_context(federation, 0, server_round=2))
    assert not all(torch.equal(before[k], v) for k, v in client.state_dict().items())


@pytest.mark.parametrize("cls", [FedL2GFeat, FedL2GLogit])
def test_rounds_move_the_guiding_vectors_and_predict_with_the_local_model(tiny_dataset, tiny_config, cls):
    name = cls.name
    config = tiny_config(f"algorithm={name}", "federation.rounds=2", f"{name}.server_lr=10")
    federation = build_federation(config, tiny_dataset)
    start = federation.server_state["guide"].clone()
    records = run_federation(federation)
    assert all(math.isfinite(r["mean_accuracy"]) for r in records)
    assert not torch.equal(federation.server_state["guide"], start)
    width = federation.algorithm.guide_dim
    classes = federation.algorithm.num_classes
    assert width == (federation.algorithm.feature_dim if cls is FedL2GFeat else classes)
    for client in records[1]["clients"]:
        assert client["bytes_down"] == classes * width * 4
        assert client["bytes_up"] > 0 and client["bytes_up"] % (width * 4) == 0
    client = federation.client_states[0]
    x = tiny_dataset.test_x[:4].float()
    assert torch.equal(federation.algorithm.predict(client, x), client(x))
