import math

import pytest
import torch
import torch.nn.functional as F

from pfedlora.errors import ConfigError
from pfedlora.metrics import payload_bytes
from pfedlora.models import build_model
from pfedlora.seeding import torch_generator
from pfedlora.simulation import build_federation, run_federation
from pfedlora.simulation.federation import to_layout


def test_one_round_gives_finite_accuracies(tiny_dataset, tiny_config):
    config = tiny_config("algorithm=fedavg", 'federation.architectures=["cnn5"]', "federation.rounds=1")
    records = run_federation(build_federation(config, tiny_dataset))
    assert math.isfinite(records[0]["mean_accuracy"])
    assert all(0 <= a <= 1 for a in records[0]["client_accuracies"])


def test_the_whole_model_travels_both_ways(tiny_dataset, tiny_config):
    config = tiny_config("algorithm=fedavg", 'federation.architectures=["cnn5"]', "federation.rounds=1")
    federation = build_federation(config, tiny_dataset)
    model = federation.client_states[0].state_dict()
    assert {k: v.shape for k, v in federation.server_state.items()} == {k: v.shape for k, v in model.items()}
    record = run_federation(federation)[0]
    for client in record["clients"]:
        assert client["bytes_down"] == client["bytes_up"] == payload_bytes(model)


def test_one_client_with_full_participation_is_plain_sgd(tiny_dataset, tiny_config):
    """The oracle: FedAvg with a single client reduces to SGD on its data, a fresh optimizer per round."""
    config = tiny_config(
        "algorithm=fedavg",
        'federation.architectures=["cnn5"]',
        "federation.num_clients=1",
        "federation.sample_fraction=1.0",
        "federation.rounds=2",
        "train.local_epochs=2",
        "data.partition=iid",
        "train.grad_clip=0.5",  # small enough to clip, so clipping is part of the oracle
    )
    federation = build_federation(config, tiny_dataset)
    run_federation(federation)

    train, data = config.train, federation.clients[0]
    # the run's memory layout (channels-last by default), so that the oracle is the same computation
    model = to_layout(
        build_model("cnn5", (1, 28, 28), 4, torch_generator(config.seed, "server-init")), config
    )
    for server_round in (1, 2):
        generator = torch_generator(config.seed, "train", 0, server_round)
        optimizer = torch.optim.SGD(  # the run's SGD kernel: fused by default
            model.parameters(),
            lr=train.lr,
            momentum=train.momentum,
            weight_decay=train.weight_decay,
            fused=True,
        )
        for _ in range(train.local_epochs):
            for x, y in data.train_batches(train.batch_size, generator):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
                optimizer.step()

    expected = model.state_dict()
    for state in (federation.server_state, federation.client_states[0].state_dict()):
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_mixed_architectures_are_refused_with_a_way_out(tiny_dataset, tiny_config):
    with pytest.raises(ConfigError) as info:
        build_federation(
            tiny_config("algorithm=fedavg", 'federation.architectures=["cnn1", "cnn3"]'), tiny_dataset
        )
    message = str(info.value)
    assert 'federation.architectures=["cnn1", "cnn3"]' in message
    assert 'e.g. federation.architectures=["cnn1"]' in message
    # One architecture listed twice is still one architecture.
    config = tiny_config(
        "algorithm=fedavg", 'federation.architectures=["cnn3", "cnn3"]', "federation.rounds=1"
    )
    assert build_federation(config, tiny_dataset).config.architecture_of(1) == "cnn3"
