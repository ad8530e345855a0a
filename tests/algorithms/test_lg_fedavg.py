import math

import torch

from pfedlora.algorithms import Upload
from pfedlora.metrics import payload_bytes
from pfedlora.simulation import build_federation, run_federation

from .helpers import client_context as _context

HEAD = {"fc3.weight": (4, 500), "fc3.bias": (4,)}  # the tiny dataset has 4 classes


def _random_head(seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) for k, shape in HEAD.items()}


def test_one_round_gives_finite_accuracies(tiny_dataset, tiny_config):
    records = run_federation(
        build_federation(tiny_config("algorithm=lg-fedavg", "federation.rounds=1"), tiny_dataset)
    )
    assert math.isfinite(records[0]["mean_accuracy"])
    assert all(0 <= a <= 1 for a in records[0]["client_accuracies"])
    assert records[0]["train_flops"] > 0


def test_only_the_head_travels_both_ways(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=lg-fedavg"), tiny_dataset)
    assert {k: tuple(v.shape) for k, v in federation.server_state.items()} == HEAD
    head_bytes = (4 * 500 + 4) * 4
    for record in run_federation(federation):
        for client in record["clients"]:
            assert client["bytes_down"] == client["bytes_up"] == head_bytes


def test_train_overwrites_the_head_and_uploads_only_it(tiny_dataset, tiny_config):
    # With no local epoch the upload is exactly the head the server sent; the private layers stay put.
    federation = build_federation(tiny_config("algorithm=lg-fedavg", "train.local_epochs=0"), tiny_dataset)
    client = federation.client_states[3]
    private = {k: v.clone() for k, v in client.state_dict().items() if not k.startswith("fc3.")}
    message = _random_head(3)
    upload = federation.algorithm.train(client, message, _context(federation, 3))
    assert upload.tensors.keys() == message.keys()
    for key, value in message.items():
        assert torch.equal(upload.tensors[key], value)
        assert torch.equal(client.state_dict()[key], value)
    assert not set(upload.tensors) & set(private)  # private tensors never leave the client
    for key, value in private.items():
        assert torch.equal(client.state_dict()[key], value)
    assert upload.num_examples == federation.clients[3].num_train


def test_training_starts_from_the_global_head(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=lg-fedavg"), tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[0]
    twin = {k: v.clone() for k, v in client.state_dict().items()}
    uploads = []
    for seed in (5, 6):
        client.load_state_dict(twin)
        upload = algorithm.train(client, _random_head(seed), _context(federation))
        uploads.append({k: v.clone() for k, v in upload.tensors.items()})  # the channel copies, too
        assert {k: tuple(v.shape) for k, v in uploads[-1].items()} == HEAD
    assert not torch.equal(uploads[0]["fc3.weight"], uploads[1]["fc3.weight"])


def test_server_takes_the_sample_weighted_mean_of_the_heads(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=lg-fedavg"), tiny_dataset)
    uploads = [
        Upload({"fc3.weight": torch.full((4, 500), 1.0), "fc3.bias": torch.tensor([1.0, 0, 0, 0])}, 1),
        Upload({"fc3.weight": torch.full((4, 500), 5.0), "fc3.bias": torch.tensor([0.0, 4, 0, 0])}, 3),
    ]
    new = federation.algorithm.aggregate(federation.server_state, uploads, server_round=1)
    assert torch.equal(new["fc3.weight"], torch.full((4, 500), 4.0))  # (1·1 + 3·5) / 4
    assert torch.equal(new["fc3.bias"], torch.tensor([0.25, 3.0, 0.0, 0.0]))
    assert payload_bytes(new) == (4 * 500 + 4) * 4
