import pytest
import torch

from pfedlora.algorithms.pfedmoe import PFedMoE
from pfedlora.errors import ConfigError
from pfedlora.simulation import build_federation, run_federation

from .helpers import client_context


def test_the_gate_mixes_the_two_experts_per_sample(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=pfedmoe"), tiny_dataset)
    client = federation.client_states[0]
    x = next(federation.clients[0].eval_batches("test", 4))[0]
    assert torch.equal(client.gates(x), torch.full((len(x), 2), 0.5))  # both experts at 1/2 at first
    expected = client.local.head(0.5 * client.local.features(x) + 0.5 * client.shared.features(x))
    torch.testing.assert_close(client(x), expected)
    with torch.no_grad():
        client.gate.bias.copy_(torch.tensor([30.0, -30.0]))  # all on the private expert
    torch.testing.assert_close(client(x), client.local(x), atol=1e-5, rtol=1e-5)


def test_a_round_trains_the_gate_and_sends_the_extractor_alone(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=pfedmoe"), tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[1]
    message = algorithm.broadcast(federation.server_state, 1, 1)
    upload = algorithm.train(client, message, client_context(federation, 1))
    assert set(upload.tensors) == set(message) and all(k.startswith("shared.") for k in upload.tensors)
    assert not any(k.startswith(("shared.fc3.", "gate.")) for k in upload.tensors)
    assert not torch.equal(client.gate.weight.detach(), torch.zeros_like(client.gate.weight))
    records = run_federation(build_federation(tiny_config("algorithm=pfedmoe"), tiny_dataset))
    assert all(0 <= r["mean_accuracy"] <= 1 for r in records)


def test_non_image_inputs_are_refused_in_one_line(tiny_config):
    with pytest.raises(ConfigError, match="gates on the sample itself"):
        PFedMoE(tiny_config("algorithm=pfedmoe"), (2, 16), 4).create_client("cnn1", torch.Generator())
