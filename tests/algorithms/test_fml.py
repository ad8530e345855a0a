import copy
import math

import torch
import torch.nn.functional as F

from pfedlora.metrics import payload_bytes
from pfedlora.models import build_model
from pfedlora.simulation import build_federation, run_federation

from .helpers import client_context as _context


def _random_like(state, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in state.items()}


def test_one_round_runs_and_gives_finite_accuracies(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fml", "federation.rounds=1"), tiny_dataset)
    (record,) = run_federation(federation)
    assert math.isfinite(record["mean_accuracy"])
    assert all(0.0 <= a <= 1.0 for a in record["client_accuracies"])
    shared_bytes = payload_bytes(federation.server_state)
    for client in record["clients"]:
        assert client["bytes_down"] == client["bytes_up"] == shared_bytes
        assert client["train_flops"] > 0


def test_upload_is_the_shared_cnn5_and_nothing_private(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fml"), tiny_dataset)
    client = federation.client_states[0]  # cnn1: its own model differs from the shared cnn5
    upload = federation.algorithm.train(client, dict(federation.server_state), _context(federation))
    cnn5 = build_model("cnn5", (1, 28, 28), 4, torch.Generator().manual_seed(0)).state_dict()
    expected = {f"shared.{k}": v.shape for k, v in cnn5.items()}
    assert {k: v.shape for k, v in upload.tensors.items()} == expected
    assert {k: v.shape for k, v in federation.server_state.items()} == expected
    assert not any(k.startswith("local.") for k in upload.tensors)
    assert upload.num_examples == federation.clients[0].num_train


def test_clients_start_from_the_global_shared_model(tiny_dataset, tiny_config):
    # No training: what goes up is exactly what came down, and the private model is untouched.
    federation = build_federation(tiny_config("algorithm=fml", "train.local_epochs=0"), tiny_dataset)
    client = federation.client_states[1]
    local_before = copy.deepcopy(client.local.state_dict())
    message = _random_like(federation.server_state, seed=3)
    upload = federation.algorithm.train(client, message, _context(federation, client_id=1))
    for key, value in message.items():
        assert torch.equal(upload.tensors[key], value)
    for key, value in client.local.state_dict().items():
        assert torch.equal(local_before[key], value)


def test_one_step_equals_two_separate_optimizers_on_the_two_losses(tiny_dataset, tiny_config):
    # Oracle: loss_local and loss_G written out by hand, each stepped by its own SGD optimizer.
    alpha, beta = 0.3, 0.8
    config = tiny_config(
        "algorithm=fml",
        "train.batch_size=1000",  # one batch holds the client's whole training set
        "train.grad_clip=1e9",  # clipping over the union is the one documented difference
        f"fml.alpha={alpha}",
        f"fml.beta={beta}",
    )
    federation = build_federation(config, tiny_dataset)
    client, message = federation.client_states[0], dict(federation.server_state)
    local = copy.deepcopy(client.local)
    shared = build_model("cnn5", (1, 28, 28), 4, torch.Generator().manual_seed(0))
    shared.load_state_dict({k.removeprefix("shared."): v for k, v in message.items()})
    ((x, y),) = federation.clients[0].train_batches(1000, torch.Generator().manual_seed(1))

    def kl(student, teacher):  # KL(teacher ‖ student), per-sample mean
        p_t = torch.softmax(teacher, 1)
        return (p_t * (torch.log_softmax(teacher, 1) - torch.log_softmax(student, 1))).sum() / len(y)

    z_local, z_shared = local(x), shared(x)
    loss_local = alpha * F.cross_entropy(z_local, y) + (1 - alpha) * kl(z_local, z_shared.detach())
    loss_shared = beta * F.cross_entropy(z_shared, y) + (1 - beta) * kl(z_shared, z_local.detach())
    train = config.train
    for model, loss in ((local, loss_local), (shared, loss_shared)):
        optimizer = torch.optim.SGD(
            model.parameters(), lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
        loss.backward()
        optimizer.step()

    federation.algorithm.train(client, message, _context(federation))
    for key, value in local.state_dict().items():
        torch.testing.assert_close(client.local.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    for key, value in shared.state_dict().items():
        torch.testing.assert_close(client.shared.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_the_kl_term_couples_the_local_model_to_the_shared_one(tiny_dataset, tiny_config):
    # With α = 1 the local model learns from CE alone, so the global model it sees does not matter;
    # with α = 0.5 it does. (No clipping: a clip over both models' joint norm would couple them too.)
    for alpha, coupled in ((1.0, False), (0.5, True)):
        locals_after = []
        for seed in (3, 4):
            config = tiny_config("algorithm=fml", f"fml.alpha={alpha}", "train.grad_clip=1e9")
            federation = build_federation(config, tiny_dataset)
            client = federation.client_states[0]
            message = _random_like(federation.server_state, seed)
            federation.algorithm.train(client, message, _context(federation))
            locals_after.append(client.local.state_dict())
        same = all(torch.equal(locals_after[0][k], locals_after[1][k]) for k in locals_after[0])
        assert same is not coupled


def test_prediction_is_the_local_model(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fml"), tiny_dataset)
    client = federation.client_states[2]
    x, _ = next(federation.clients[2].eval_batches("test", 8))
    torch.testing.assert_close(federation.algorithm.predict(client, x), client.local(x))
