import pytest
import torch
import torch.nn.functional as F

from pfedlora.algorithms.fedmrl import MatryoshkaPair
from pfedlora.errors import ConfigError
from pfedlora.models import build_model
from pfedlora.simulation import build_federation, run_federation

from .helpers import client_context


def test_the_fused_representation_feeds_both_headers_nested():
    generator = torch.Generator().manual_seed(0)
    local = build_model("cnn1", (1, 28, 28), 4, generator)
    shared = build_model("cnn5", (1, 28, 28), 4, generator)
    pair = MatryoshkaPair(local, shared, generator)
    x = torch.randn(3, 1, 28, 28, generator=generator)
    fused = pair.projector(torch.cat([shared.features(x), local.features(x)], dim=1))  # (3, 500)
    shared_logits, local_logits = pair.both_logits(x)
    torch.testing.assert_close(shared_logits, F.linear(fused[:, :500], shared.fc3.weight, shared.fc3.bias))
    torch.testing.assert_close(local_logits, local.head(fused))
    torch.testing.assert_close(pair(x), local_logits)
    assert pair.projector.weight.shape == (500, 1000)


def test_a_shared_model_wider_than_the_private_one_is_refused():
    class Wide(torch.nn.Module):
        feature_dim = 600

    local = build_model("cnn1", (1, 28, 28), 4, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="shared model's 600 features in the private model's 500"):
        MatryoshkaPair(local, Wide(), torch.Generator().manual_seed(0))


def test_a_round_trains_all_three_and_sends_the_small_model(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=fedmrl"), tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[0]
    before = {k: v.clone() for k, v in client.state_dict().items()}
    message = algorithm.broadcast(federation.server_state, 0, 1)
    upload = algorithm.train(client, message, client_context(federation, 0))
    assert set(upload.tensors) == {k for k in before if k.startswith("shared.")}
    for prefix in ("shared.", "local.", "projector."):
        assert any(
            not torch.equal(before[k], v) for k, v in client.state_dict().items() if k.startswith(prefix)
        )
    records = run_federation(build_federation(tiny_config("algorithm=fedmrl"), tiny_dataset))
    assert all(0 <= r["mean_accuracy"] <= 1 for r in records)
