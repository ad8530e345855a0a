"""The adapter placements, fed by the (arch x placement x input shape) table of conftest.py."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from pfedlora.errors import AdapterMismatchError, ConfigError
from pfedlora.models import (
    PLACEMENTS,
    adaptable_layers,
    adapter_state_dict,
    check_homogeneous,
    homogeneous_targets,
    is_adapter_key,
    is_lora_layer,
    load_adapter,
    load_adapter_state_dict,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
    validate_targets,
)

from .conftest import Case
from .helpers import (
    ARCHS,
    DEFAULT_TARGETS,
    INPUT_SHAPES,
    NUM_CLASSES,
    RANK,
    attach,
    batch,
    build,
    perturb_zero_started_factors_,
    zero_started_factors,
)


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


# --- the table ---------------------------------------------------------------------------------------------


def test_fresh_adapter_changes_nothing_until_its_zero_factors_move(case: Case) -> None:
    expected = case.base(case.x)  # (B, classes), the unadapted model
    # First prove the equality below can fail: once B (or the branch's fc_B) moves, the output moves.
    perturbed = copy.deepcopy(case.model)
    perturb_zero_started_factors_(perturbed)
    assert (perturbed(case.x) - expected).abs().max() > 1e-3
    assert zero_started_factors(case.model)
    assert all(torch.count_nonzero(p) == 0 for p in zero_started_factors(case.model))
    assert torch.equal(case.model(case.x), expected)


def test_frozen_prefix_reproduces_forward_exactly(case: Case) -> None:
    perturb_zero_started_factors_(case.model)
    prefix = case.model.frozen_prefix(case.x)
    if case.placement == "layers":  # LoRA on conv1: the adapter's gradient needs the whole network
        assert prefix is None
    else:  # the branch needs the local logits, LoRA on the head alone the features
        width = NUM_CLASSES if case.placement == "branch" else case.model.local.feature_dim
        assert prefix is not None and prefix.shape == (case.x.shape[0], width)
        assert not prefix.requires_grad
    assert torch.equal(case.model.forward_from_prefix(prefix, case.x), case.model(case.x))


def test_adapter_state_dict_holds_only_adapter_tensors(case: Case) -> None:
    state = adapter_state_dict(case.model)
    names = {name for name, _ in case.model.named_parameters() if is_adapter_key(name)}
    assert state and set(state) == names
    assert all(is_adapter_key(key) for key in state)
    assert not any(is_adapter_key(key) for key in set(case.model.state_dict()) - set(state))
    key = next(iter(state))
    state[key].add_(1.0)  # detached copies: editing them leaves the model alone
    assert not torch.equal(state[key], case.model.state_dict()[key])


def test_adapter_and_local_parameters_partition_all_parameters(case: Case) -> None:
    adapter = {id(p) for p in case.model.adapter_parameters()}
    local = {id(p) for p in case.model.local_parameters()}
    assert adapter and local and not adapter & local
    assert adapter | local == {id(p) for p in case.model.parameters()}
    assert local == {id(p) for p in case.model.local.parameters()} - adapter
    base_count = sum(p.numel() for p in case.base.parameters())
    assert sum(p.numel() for p in case.model.local_parameters()) == base_count


def test_safetensors_round_trip_is_exact(case: Case, tmp_path) -> None:
    perturb_zero_started_factors_(case.model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(case.model, path)
    with safe_open(str(path), framework="pt") as file:
        assert set(file.keys()) == set(adapter_state_dict(case.model))

    other = attach(build(case.arch, case.shape, seed=5), case.placement, case.shape, seed=6)
    before = adapter_state_dict(other)
    wanted = adapter_state_dict(case.model)
    assert any(not torch.equal(before[k], wanted[k]) for k in wanted)  # the load below has work to do
    load_adapter(other, path)
    loaded = adapter_state_dict(other)
    assert all(torch.equal(loaded[k], wanted[k]) for k in wanted)


def test_strict_loading_names_missing_unexpected_and_misshapen_keys(case: Case) -> None:
    good = adapter_state_dict(case.model)
    key = next(iter(good))
    untouched = adapter_state_dict(case.model)

    missing = {k: v for k, v in good.items() if k != key}
    with pytest.raises(AdapterMismatchError, match=rf"missing keys: '{key}'"):
        load_adapter_state_dict(case.model, missing)

    extra = {**good, "lora_extra.weight": torch.zeros(2), "local.fc1.weight": torch.zeros(2)}
    with pytest.raises(
        AdapterMismatchError, match=r"unexpected keys: 'lora_extra.weight', 'local.fc1.weight'"
    ):
        load_adapter_state_dict(case.model, extra)

    shape = tuple(good[key].shape)
    wrong = (shape[0] + 1, *shape[1:])
    misshapen = {**good, key: torch.zeros(wrong)}
    with pytest.raises(AdapterMismatchError) as error:
        load_adapter_state_dict(case.model, misshapen)
    assert f"'{key}' expected {shape}, got {wrong}" in str(error.value)

    after = adapter_state_dict(case.model)
    assert all(torch.equal(after[k], untouched[k]) for k in after)  # failed loads copy nothing


def test_loading_casts_to_the_parameter_dtype(case: Case) -> None:
    state = {
        k: torch.full_like(v, 0.25, dtype=torch.float64) for k, v in adapter_state_dict(case.model).items()
    }
    load_adapter_state_dict(case.model, state)
    for value in adapter_state_dict(case.model).values():
        assert value.dtype == torch.float32 and torch.all(value == 0.25)


def test_same_seeds_give_identical_models_without_the_global_rng(case: Case) -> None:
    rng_state = torch.random.get_rng_state()
    again = attach(build(case.arch, case.shape), case.placement, case.shape)
    assert torch.equal(rng_state, torch.random.get_rng_state())
    ours, theirs = case.model.state_dict(), again.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    reseeded = adapter_state_dict(attach(build(case.arch, case.shape), case.placement, case.shape, seed=9))
    first_factor = next(k for k in reseeded if k.endswith(("lora_A.default.weight", "conv_A.weight")))
    assert not torch.equal(reseeded[first_factor], ours[first_factor])


def test_merge_then_forward_equals_unmerged_and_unmerge_restores(layer_case: Case) -> None:
    model = layer_case.model
    perturb_zero_started_factors_(model)
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if not is_adapter_key(k)}
    unmerged = model(layer_case.x)
    merge_adapters(model)
    merged_weights = model.state_dict()
    assert any(not torch.equal(merged_weights[k], base_weights[k]) for k in base_weights)
    torch.testing.assert_close(model(layer_case.x), unmerged, rtol=1e-4, atol=1e-5)
    unmerge_adapters(model)
    restored = model.state_dict()
    for k, weight in base_weights.items():
        torch.testing.assert_close(restored[k], weight, rtol=0, atol=1e-6)
    assert torch.allclose(model(layer_case.x), unmerged, atol=1e-5)


def test_lora_only_on_the_head_has_a_feature_prefix(layer_case: Case) -> None:
    model = attach(build(layer_case.arch, layer_case.shape), "layers", layer_case.shape, targets=("fc3",))
    perturb_zero_started_factors_(model)
    prefix = model.frozen_prefix(layer_case.x)
    assert prefix is not None and prefix.shape == (layer_case.x.shape[0], 500) and not prefix.requires_grad
    logits = model.forward_from_prefix(prefix, layer_case.x)
    assert torch.equal(logits, model(layer_case.x))
    logits.sum().backward()
    assert all(p.grad is not None for p in model.adapter_parameters())
    # The prefix cut the graph: nothing below the head gets a gradient.
    head = {id(p) for p in model.local.fc3.parameters()}
    assert all(p.grad is None for p in model.local.parameters() if id(p) not in head)


# --- homogeneity across the family -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", INPUT_SHAPES)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_adapter_names_and_shapes_are_identical_across_the_family(
    placement: str, shape: tuple[int, int, int]
) -> None:
    models = {arch: build(arch, shape) for arch in ARCHS}
    targets = homogeneous_targets(models)
    assert targets == DEFAULT_TARGETS
    assert validate_targets(models, targets) == targets
    states = {arch: adapter_state_dict(attach(m, placement, shape, targets)) for arch, m in models.items()}
    first = _shapes(states["cnn1"])
    assert first and all(_shapes(state) == first for state in states.values())
    check_homogeneous(states)


@pytest.mark.parametrize("shape", INPUT_SHAPES)
def test_a_heterogeneous_target_is_refused_and_caught(shape: tuple[int, int, int]) -> None:
    models = {arch: build(arch, shape) for arch in ARCHS}
    with pytest.raises(AdapterMismatchError) as error:
        validate_targets(models, ["fc2"])
    message = str(error.value)
    assert "'fc2'" in message and "cnn1 (500, 2000)" in message and "cnn3 (500, 1000)" in message

    # Bypassing validation, the uploads themselves do not average: check_homogeneous says which and how.
    states = {arch: adapter_state_dict(attach(m, "layers", shape, ("fc2",))) for arch, m in models.items()}
    with pytest.raises(AdapterMismatchError) as error:
        check_homogeneous(states)
    message = str(error.value)
    assert message.startswith("adapter tensor 'local.fc2.lora_A.default.weight' differs between clients:")
    assert f"cnn1 ({RANK}, 2000)" in message and f"cnn3 ({RANK}, 1000)" in message
    assert f"cnn5 ({RANK}, 500)" in message


def test_check_homogeneous_reports_a_missing_tensor() -> None:
    states = {
        "client0": {"lora_x": torch.zeros(2, 3), "lora_y": torch.zeros(1)},
        "client1": {"lora_x": torch.zeros(2, 3)},
    }
    with pytest.raises(
        AdapterMismatchError, match=r"'lora_y' differs between clients: client0 \(1,\), client1 missing"
    ):
        check_homogeneous(states)
    check_homogeneous({"client0": states["client1"], "client1": dict(states["client1"])})


def test_validate_targets_refuses_unknown_empty_and_conv2() -> None:
    models = {arch: build(arch, (1, 28, 28)) for arch in ARCHS}
    with pytest.raises(ConfigError, match=r"'conv3'.*adaptable layers: conv1, conv2, fc1, fc2, fc3"):
        validate_targets(models, ["conv3"])
    with pytest.raises(ConfigError, match="at least one layer"):
        validate_targets(models, [])
    with pytest.raises(ConfigError, match="string"):
        validate_targets(models, "fc3")
    with pytest.raises(ConfigError, match="repeat 'fc3'"):
        validate_targets(models, ["fc3", "fc3"])
    with pytest.raises(AdapterMismatchError, match=r"'conv2'.*cnn1 \(32, 16, 5, 5\), cnn2 \(16, 16, 5, 5\)"):
        validate_targets(models, ["conv2"])


def test_adaptable_layers_see_through_lora_wrappers() -> None:
    model = build("cnn1", (1, 28, 28))
    before = adaptable_layers(model)
    assert list(before) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    attached = attach(model, "layers", (1, 28, 28))
    assert adaptable_layers(attached.local) == before


# --- construction -------------------------------------------------------------------------------------------


def test_layers_placement_wraps_in_place_and_names_keys_as_documented() -> None:
    model = build("cnn2", (3, 32, 32))
    conv1 = model.conv1
    personalized = attach(model, "layers", (3, 32, 32), targets=("fc3", "conv1"))
    assert personalized.local is model and model.conv1.base_layer is conv1
    assert is_lora_layer(model.head)
    keys = set(personalized.state_dict())
    lora_keys = {"local.conv1.lora_A.default.weight", "local.fc3.lora_B.default.weight"}
    assert {"local.conv1.base_layer.weight", *lora_keys} <= keys
    assert personalized.targets == ("fc3", "conv1")


def test_branch_placement_leaves_the_local_model_alone_and_starts_g_at_zero() -> None:
    model = build("cnn1", (1, 28, 28))
    personalized = attach(model, "branch", (1, 28, 28), targets=())
    assert personalized.local is model
    assert not any(is_lora_layer(m) for m in model.modules())
    branch = personalized.lora_branch
    assert branch is not None
    assert torch.count_nonzero(branch.fc_B.weight) == 0 and torch.count_nonzero(branch.fc_B.bias) == 0
    for tensor in (branch.conv_A.weight, branch.conv_B.weight, branch.conv_B.bias, branch.fc_A.weight):
        assert torch.count_nonzero(tensor) == tensor.numel()
    assert torch.equal(branch(batch((1, 28, 28))), torch.zeros(3, NUM_CLASSES))
    assert all(key.startswith("lora_branch.") for key in adapter_state_dict(personalized))


def test_attach_adapter_refuses_bad_arguments() -> None:
    shape = (1, 28, 28)
    with pytest.raises(ConfigError, match=r"'side'.*layers, branch"):
        attach(build("cnn1", shape), "side", shape)
    with pytest.raises(ConfigError, match="input_shape"):
        attach(build("cnn1", shape), "branch", (3, 32, 32))
    with pytest.raises(ConfigError, match="'nope'"):
        attach(build("cnn1", shape), "layers", shape, targets=("nope",))
    model = build("cnn1", shape)
    attach(model, "layers", shape)
    with pytest.raises(ConfigError, match="already carries LoRA"):
        attach(model, "layers", shape)
