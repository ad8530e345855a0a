"""The heterogeneous CNN family: shapes, parameter counts (SPEC §3), initialisation from a generator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pfedlora.errors import ConfigError
from pfedlora.models import ARCHITECTURES, HeteroCNN, build_model, init_parameters_

from .helpers import ARCHS, INPUT_SHAPES, NUM_CLASSES, batch, build, generator

SPEC_CIFAR10_PARAMS_M = {"cnn1": 2.62, "cnn2": 1.82, "cnn3": 1.32, "cnn4": 1.06, "cnn5": 0.67}


@pytest.mark.parametrize("shape", INPUT_SHAPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_features_are_500_d_and_forward_is_head_of_features(arch: str, shape: tuple[int, int, int]) -> None:
    model = build(arch, shape)
    x = batch(shape)
    features = model.features(x)
    assert features.shape == (x.shape[0], HeteroCNN.FEATURE_DIM)
    assert model.head is model.fc3
    logits = model(x)
    assert logits.shape == (x.shape[0], NUM_CLASSES)
    assert torch.equal(logits, model.fc3(features))


@pytest.mark.parametrize("arch", ARCHS)
def test_cifar10_parameter_counts_match_spec(arch: str) -> None:
    model = build(arch, (3, 32, 32))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - SPEC_CIFAR10_PARAMS_M[arch]) < 0.005


@pytest.mark.parametrize(("shape", "flat"), [((3, 32, 32), 32 * 5 * 5), ((1, 28, 28), 32 * 4 * 4)])
def test_flat_size_follows_input_shape(shape: tuple[int, int, int], flat: int) -> None:
    model = build("cnn1", shape)
    assert model.fc1.in_features == flat
    assert model.conv1.in_channels == shape[0]


def test_layer_shapes_follow_the_architecture_table() -> None:
    model = build("cnn2", (3, 32, 32))
    assert model.conv2.out_channels == ARCHITECTURES["cnn2"][0] == 16
    assert model.fc1.out_features == ARCHITECTURES["cnn2"][1] == 2000
    assert (model.fc2.in_features, model.fc2.out_features) == (2000, 500)


def test_too_small_input_is_refused_and_the_smallest_one_works() -> None:
    with pytest.raises(ConfigError, match="too small"):
        build("cnn1", (1, 15, 15))
    with pytest.raises(ConfigError, match="too small"):
        build("cnn1", (1, 28, 15))
    model = build("cnn1", (1, 16, 16))
    assert model(batch((1, 16, 16))).shape == (3, NUM_CLASSES)


@pytest.mark.parametrize("shape", [(28, 28), (1, 0, 28), (1.0, 28, 28)])
def test_malformed_input_shape_is_refused(shape: tuple) -> None:
    with pytest.raises(ConfigError, match="input_shape"):
        build("cnn1", shape)


def test_unknown_architecture_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"'cnn6'.*cnn1, cnn2, cnn3, cnn4, cnn5"):
        build_model("cnn6", (1, 28, 28), NUM_CLASSES, generator(0))


def test_same_seed_gives_identical_parameters_and_another_seed_does_not() -> None:
    first = build("cnn3", (1, 28, 28), seed=11).state_dict()
    again = build("cnn3", (1, 28, 28), seed=11).state_dict()
    other = build("cnn3", (1, 28, 28), seed=12).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(not torch.equal(first[k], other[k]) for k in first)


def test_construction_never_touches_the_global_rng() -> None:
    state = torch.random.get_rng_state()
    nn.Linear(4, 4)  # PyTorch's own init draws from the global RNG: the check below can see that
    assert not torch.equal(state, torch.random.get_rng_state())

    state = torch.random.get_rng_state()
    build("cnn1", (3, 32, 32))
    HeteroCNN(32, 500, (1, 28, 28), NUM_CLASSES)  # no generator: a fresh one seeded 0
    assert torch.equal(state, torch.random.get_rng_state())


def test_construction_without_generator_is_seed_0() -> None:
    implicit = HeteroCNN(32, 500, (1, 28, 28), NUM_CLASSES).state_dict()
    explicit = build("cnn5", (1, 28, 28), seed=0).state_dict()
    assert all(torch.equal(implicit[k], explicit[k]) for k in implicit)


def test_init_parameters_reproduces_pytorch_default_init_exactly() -> None:
    # Oracle: PyTorch's own reset_parameters, in module order, from the global RNG seeded alike (forked, so
    # the test leaves the global RNG as it found it).
    model = build("cnn4", (3, 32, 32))
    init_parameters_(model, generator(7))
    reference = build("cnn4", (3, 32, 32))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        for layer in reference.modules():
            if isinstance(layer, nn.Linear | nn.Conv2d):
                layer.reset_parameters()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("arch", ARCHS)
def test_init_parameters_stays_within_pytorch_default_bounds(arch: str) -> None:
    model = build(arch, (1, 28, 28))
    init_parameters_(model, generator(5))
    for layer in model.modules():
        if not isinstance(layer, nn.Linear | nn.Conv2d):
            continue
        bound = 1 / math.sqrt(layer.weight[0].numel())  # 1/sqrt(fan_in)
        for tensor in (layer.weight, layer.bias):
            assert tensor.abs().max() <= bound
            # U(-bound, bound): a few hundred draws come close to both ends and average near zero.
            if tensor.numel() >= 500:
                assert tensor.max() > 0.9 * bound and tensor.min() < -0.9 * bound
                assert abs(tensor.mean().item()) < 0.1 * bound


def test_init_parameters_leaves_non_layer_parameters_alone() -> None:
    module = nn.Module()
    module.layer = nn.Linear(3, 2)
    module.extra = nn.Parameter(torch.zeros(4))
    init_parameters_(module, generator(0))
    assert torch.equal(module.extra, torch.zeros(4))
