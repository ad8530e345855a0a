import pytest
import torch

from pfedlora.errors import AdapterMismatchError
from pfedlora.metrics import FlopMeter
from pfedlora.models import adapter_state_dict, is_adapter_key
from pfedlora.simulation import build_federation

from .helpers import client_context as _context

PLACEMENTS = [
    pytest.param(("adapter.placement=layers",), id="layers-conv1+fc3"),
    pytest.param(("adapter.placement=layers", 'adapter.targets=["fc3"]'), id="layers-fc3"),
    pytest.param(("adapter.placement=branch",), id="branch"),
]


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("overrides", PLACEMENTS)
def test_local_phase_changes_only_the_local_model(tiny_dataset, tiny_config, overrides):
    federation = build_federation(tiny_config(*overrides), tiny_dataset)
    client = federation.client_states[0]
    before = _snapshot(client)
    federation.algorithm.train_local_phase(client, _context(federation))
    changed = _changed(before, client)
    assert changed, "the local phase must train something"
    assert not any(is_adapter_key(k) for k in changed)
    assert {k for k in before if not is_adapter_key(k) and k.endswith("weight")} <= changed


@pytest.mark.parametrize("overrides", PLACEMENTS)
def test_adapter_phase_changes_only_the_adapter(tiny_dataset, tiny_config, overrides):
    federation = build_federation(tiny_config(*overrides), tiny_dataset)
    client = federation.client_states[0]
    before = _snapshot(client)
    federation.algorithm.train_adapter_phase(client, _context(federation))
    changed = _changed(before, client)
    assert changed, "the adapter phase must train something"
    assert all(is_adapter_key(k) for k in changed)
    assert changed == {k for k in before if is_adapter_key(k)}  # every adapter tensor moved


def test_train_starts_from_the_global_adapter(tiny_dataset, tiny_config):
    # With the adapter phase off, the adapter after training is exactly the one the server sent.
    federation = build_federation(tiny_config("adapter.epochs=0"), tiny_dataset)
    client = federation.client_states[1]
    message = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
        for k, v in federation.server_state.items()
    }
    upload = federation.algorithm.train(client, message, _context(federation, client_id=1))
    assert upload.tensors.keys() == message.keys()
    for key, value in message.items():
        assert torch.equal(adapter_state_dict(client)[key], value)
        assert torch.equal(upload.tensors[key], value)
    assert upload.num_examples == federation.clients[1].num_train


def test_upload_holds_only_adapter_tensors(tiny_dataset, tiny_config):
    federation = build_federation(tiny_config(), tiny_dataset)
    client = federation.client_states[2]
    upload = federation.algorithm.train(client, dict(federation.server_state), _context(federation, 2))
    assert set(upload.tensors) == set(adapter_state_dict(client)) == set(federation.server_state)
    assert all(is_adapter_key(k) for k in upload.tensors)


def test_phase_order_matters(tiny_dataset, tiny_config):
    results = []
    for order in ("local-first", "adapter-first"):
        federation = build_federation(tiny_config(f"adapter.phase_order={order}"), tiny_dataset)
        upload = federation.algorithm.train(
            federation.client_states[0], dict(federation.server_state), _context(federation)
        )
        results.append(upload.tensors)
    assert any(not torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_head_only_adapter_phase_is_a_fraction_of_a_local_pass(tiny_dataset, tiny_config):
    costs = {}
    for label, targets in {"conv1+fc3": "[]", "fc3": '["fc3"]'}.items():
        config = tiny_config("adapter.placement=layers", f"adapter.targets={targets}")
        federation = build_federation(config, tiny_dataset)
        meter = FlopMeter()
        client, ctx = federation.client_states[0], _context(federation, meter=meter)
        federation.algorithm.train_local_phase(client, ctx)
        federation.algorithm.train_adapter_phase(client, ctx)
        arch = ctx.arch
        costs[label] = (meter.per_sample[(arch, "local")], meter.per_sample[(arch, "adapter")])
    local, adapter_conv1 = costs["conv1+fc3"]
    _, adapter_head = costs["fc3"]
    # No weight gradients for the frozen model: cheaper than a local pass even through conv1 ...
    assert adapter_conv1 < local
    # ... and a head-only adapter needs one gradient-free forward plus a 500×r×C head: about a third.
    assert adapter_head < 0.4 * local
    assert adapter_head < adapter_conv1


def test_targets_that_differ_between_architectures_are_refused_before_training(tiny_dataset, tiny_config):
    with pytest.raises(AdapterMismatchError) as info:
        build_federation(tiny_config("adapter.placement=layers", 'adapter.targets=["fc2"]'), tiny_dataset)
    message = str(info.value)
    assert "fc2" in message and "cnn1" in message and "cnn2" in message
