import pytest
import torch

from pfedlora.algorithms import pfedafm
from pfedlora.simulation import build_federation, run_federation

from .helpers import client_context


def test_a_new_client_predicts_with_its_own_features_alone(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config("algorithm=pfedafm"), tiny_dataset)
    client = federation.client_states[0]
    x = next(federation.clients[0].eval_batches("test", 8))[0]
    assert torch.equal(client.mixing, torch.ones(500))
    torch.testing.assert_close(federation.algorithm.predict(client, x), client.local(x))


def test_the_phases_train_what_they_should_and_only_the_extractor_travels(
    tiny_dataset, tiny_config, monkeypatch
):
    federation = build_federation(tiny_config("algorithm=pfedafm"), tiny_dataset)
    algorithm, client = federation.algorithm, federation.client_states[1]
    phases = {}
    original = pfedafm.train_on_client_data

    def recording(model, parameters, ctx, train, *, phase, **kwargs):
        phases[phase] = {id(p) for p in parameters}
        original(model, parameters, ctx, train, phase=phase, **kwargs)

    monkeypatch.setattr(pfedafm, "train_on_client_data", recording)
    message = algorithm.broadcast(federation.server_state, 1, 1)
    upload = algorithm.train(client, message, client_context(federation, 1))
    assert phases["local"] == {id(p) for p in [*client.local.parameters(), client.mixing]}
    shared_extractor = {id(p) for n, p in client.shared.named_parameters() if not n.startswith("fc3.")}
    assert phases["extractor"] == shared_extractor
    assert set(upload.tensors) == set(message) and not any(
        k.startswith("shared.fc3.") for k in upload.tensors
    )
    assert all(k.startswith("shared.") for k in upload.tensors)
    mixing = client.mixing.detach()
    assert float(mixing.min()) >= 0 and float(mixing.max()) <= 1
    assert not torch.equal(mixing, torch.ones(500))  # α learned


def test_three_rounds_run(tiny_dataset, tiny_config):
    records = run_federation(build_federation(tiny_config("algorithm=pfedafm"), tiny_dataset))
    assert all(0 <= r["mean_accuracy"] <= 1 for r in records)


def test_a_shared_model_of_another_width_is_refused(tiny_config):
    from pfedlora.algorithms.pfedafm import MixedFeatures
    from pfedlora.errors import ConfigError
    from pfedlora.models import build_model

    class Narrow(torch.nn.Module):
        feature_dim = 10

    local = build_model("cnn1", (1, 28, 28), 4, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="500-d, the shared model's 10-d"):
        MixedFeatures(local, Narrow())
