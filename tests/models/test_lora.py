"""LoRALinear / LoRAConv2d against independent formulas; merge/unmerge; the lora_ naming contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.errors import ConfigError
from pfedlora.models import LoRAConv2d, LoRALinear, is_adapter_key, merge_adapters, unmerge_adapters

from .helpers import generator


def _linear(in_features: int = 6, out_features: int = 5) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator(20)))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator(21)))
    return layer


def _conv(**kwargs: object) -> nn.Conv2d:
    layer = nn.Conv2d(3, 6, 3, device="meta", **kwargs).to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator(22)))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator(23)))
    return layer


def _perturb_b_(layer: LoRALinear | LoRAConv2d) -> None:
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator(24)))


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("conv1.lora_A", True),
        ("local.fc3.lora_B", True),
        ("lora_branch.conv_A.weight", True),
        ("local.conv1.base_layer.weight", False),
        ("local.fc3.weight", False),
        ("conv1.flora_A", False),  # the prefix must start a component
        ("conv1.lora", False),  # "lora" without the underscore is not the prefix
    ],
)
def test_is_adapter_key(key: str, expected: bool) -> None:
    assert is_adapter_key(key) is expected


def test_linear_wraps_the_base_layer_and_starts_as_the_identity_update() -> None:
    base = _linear()
    layer = LoRALinear(base, rank=2, alpha=4.0, generator=generator(0))
    assert layer.base_layer is base
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (5, 2)
    assert torch.equal(layer.lora_B, torch.zeros(5, 2))
    bound = 1 / 6**0.5  # Kaiming-uniform a=sqrt(5): U(±1/sqrt(fan_in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0
    assert [name for name, _ in layer.named_parameters()] == [
        "lora_A",
        "lora_B",
        "base_layer.weight",
        "base_layer.bias",
    ]


def test_linear_matches_the_lora_formula() -> None:
    layer = LoRALinear(_linear(), rank=2, alpha=4.0, generator=generator(0))
    x = torch.randn(4, 6, generator=generator(1))
    _perturb_b_(layer)
    a, b, base = layer.lora_A, layer.lora_B, layer.base_layer
    expected = x @ base.weight.T + base.bias + (4.0 / 2) * (x @ a.T @ b.T)  # (4, 5)
    out = layer(x)
    assert not torch.allclose(out, base(x), atol=1e-3)  # the update is really there
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "conv_kwargs",
    [{}, {"stride": 2}, {"padding": 1}, {"stride": 2, "padding": 2, "dilation": 2}, {"padding": "same"}],
    ids=["plain", "stride", "padding", "stride-padding-dilation", "same"],
)
def test_conv_equals_one_convolution_with_weight_w_plus_scaled_ba(conv_kwargs: dict) -> None:
    base = _conv(**conv_kwargs)
    layer = LoRAConv2d(base, rank=2, alpha=3.0, generator=generator(0))
    assert layer.lora_A.shape == (2, 3, 3, 3) and layer.lora_B.shape == (6, 2, 1, 1)
    _perturb_b_(layer)
    x = torch.randn(2, 3, 9, 11, generator=generator(1))
    # Independent oracle: the flattened product B A reshaped to the kernel.
    delta = (layer.lora_B.reshape(6, 2) @ layer.lora_A.reshape(2, -1)).reshape(base.weight.shape)
    expected = F.conv2d(
        x, base.weight + 1.5 * delta, base.bias, base.stride, base.padding, base.dilation
    )  # (2, 6, H', W')
    out = layer(x)
    assert out.shape == base(x).shape
    assert not torch.allclose(out, base(x), atol=1e-3)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    weight_before = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(base.weight, weight_before + 1.5 * delta)
    torch.testing.assert_close(layer(x), out, rtol=1e-4, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, weight_before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_merge_is_explicit_and_checked(make) -> None:
    base = make()
    wrapper = LoRALinear if isinstance(base, nn.Linear) else LoRAConv2d
    layer = wrapper(base, rank=2, alpha=2.0, generator=generator(0))
    _perturb_b_(layer)
    weight = base.weight.detach().clone()
    layer.eval()
    layer.train()
    assert not layer.merged and torch.equal(base.weight, weight)  # eval()/train() never merge
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    merge_adapters(layer)
    assert layer.merged and not torch.equal(base.weight, weight)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    unmerge_adapters(layer)
    assert not layer.merged


def test_merged_forward_skips_the_low_rank_path() -> None:
    layer = LoRALinear(_linear(), rank=2, alpha=2.0, generator=generator(0))
    _perturb_b_(layer)
    layer.merge()
    x = torch.randn(3, 6, generator=generator(1))
    out = layer(x)
    assert torch.equal(out, layer.base_layer(x))
    out.sum().backward()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None


def test_factors_follow_the_base_dtype() -> None:
    layer = LoRALinear(_linear().double(), rank=2, alpha=2.0, generator=generator(0))
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_bad_rank_is_refused(rank: object) -> None:
    with pytest.raises(ConfigError, match="rank"):
        LoRALinear(_linear(), rank=rank, alpha=2.0, generator=generator(0))  # type: ignore[arg-type]


def test_non_positive_alpha_is_refused() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        LoRALinear(_linear(), rank=2, alpha=0.0, generator=generator(0))


def test_grouped_or_non_zero_padded_convolutions_are_refused() -> None:
    grouped = nn.Conv2d(4, 6, 3, groups=2, device="meta").to_empty(device="cpu")
    with pytest.raises(ConfigError, match="groups=1"):
        LoRAConv2d(grouped, rank=2, alpha=2.0, generator=generator(0))
    reflect = _conv(padding=1, padding_mode="reflect")
    with pytest.raises(ConfigError, match="padding_mode"):
        LoRAConv2d(reflect, rank=2, alpha=2.0, generator=generator(0))


def test_wrong_base_layer_type_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"nn\.Linear"):
        LoRALinear(_conv(), rank=2, alpha=2.0, generator=generator(0))  # type: ignore[arg-type]
