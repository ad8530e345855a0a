import copy

import pytest
import torch

from pfedlora.algorithms.pfedes import PFedES
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.errors import ConfigError
from pfedlora.simulation import build_federation

from .helpers import client_context


def _states_equal(a, b):
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_with_mu_zero_the_private_model_trains_as_it_would_alone(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=pfedes", "pfedes.mu=0"), tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[0]
    reference = copy.deepcopy(client.local)
    message = algorithm.broadcast(federation.server_state, 0, 1)
    upload = algorithm.train(client, message, client_context(federation, 0))
    ctx = client_context(federation, 0)
    train_on_client_data(reference, list(reference.parameters()), ctx, federation.config.train, phase="local")
    assert _states_equal(client.local, reference)  # phase 2 leaves the private model alone
    assert set(upload.tensors) == {k for k in client.state_dict() if k.startswith("extractor.")}
    assert not torch.equal(upload.tensors["extractor.conv1.weight"], message["extractor.conv1.weight"])


def test_the_second_phase_trains_the_extractor_alone(tiny_dataset, tiny_config):
    config = tiny_config("algorithm=pfedes", "train.local_epochs=0", "pfedes.extractor_epochs=2")
    federation = build_federation(config, tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[1]
    local_before = copy.deepcopy(client.local)
    message = algorithm.broadcast(federation.server_state, 1, 1)
    upload = algorithm.train(client, message, client_context(federation, 1))
    assert _states_equal(client.local, local_before)
    assert all(not torch.equal(upload.tensors[k], message[k]) for k in message if k.endswith("weight"))
    assert sum(v.numel() for v in upload.tensors.values()) == 1 * 8 * 9 + 8 + 8 * 1 * 9 + 1  # 153


def test_non_image_inputs_are_refused_in_one_line(tiny_config):
    algorithm = PFedES(tiny_config("algorithm=pfedes"), (2, 16), num_classes=4)
    with pytest.raises(ConfigError, match=r"image-to-image extractor; architecture 'cnn1' reads inputs of"):
        algorithm.create_client("cnn1", torch.Generator().manual_seed(0))
