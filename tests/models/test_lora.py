"""LoRA layers (PEFT's, injected by pfedlora) against independent formulas; merge/unmerge; the lora_ naming
contract; what is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.errors import ConfigError
from pfedlora.models import inject_lora, is_adapter_key, is_lora_layer, merge_adapters, unmerge_adapters

from .helpers import generator


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


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


def _wrapped(base: nn.Module, rank: int = 2, alpha: float = 4.0) -> Holder:
    holder = Holder(base)
    inject_lora(holder, ["layer"], rank, alpha, generator(0))
    return holder


def _factors(holder: Holder) -> tuple[torch.Tensor, torch.Tensor]:
    layer = holder.layer
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _perturb_b_(holder: Holder) -> None:
    _, b = _factors(holder)
    with torch.no_grad():
        b.copy_(torch.randn(b.shape, generator=generator(24)))


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("conv1.lora_A.default.weight", True),
        ("local.fc3.lora_B.default.weight", True),
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
    holder = _wrapped(base)
    assert is_lora_layer(holder.layer) and holder.layer.get_base_layer() is base
    a, b = _factors(holder)
    assert a.shape == (2, 6) and b.shape == (5, 2)
    assert torch.equal(b, torch.zeros(5, 2))
    bound = 1 / 6**0.5  # Kaiming-uniform a=sqrt(5): U(±1/sqrt(fan_in))
    assert a.abs().max() <= bound and a.abs().max() > 0
    again = _wrapped(_linear())
    assert torch.equal(_factors(again)[0], a)  # drawn from the generator, not the global RNG
    names = {name for name, _ in holder.named_parameters()}
    assert names == {
        "layer.base_layer.weight",
        "layer.base_layer.bias",
        "layer.lora_A.default.weight",
        "layer.lora_B.default.weight",
    }
    assert all(p.requires_grad for p in holder.parameters())  # what trains is each phase's business


def test_linear_matches_the_lora_formula() -> None:
    holder = _wrapped(_linear())
    x = torch.randn(4, 6, generator=generator(1))
    _perturb_b_(holder)
    (a, b), base = _factors(holder), holder.layer.get_base_layer()
    expected = x @ base.weight.T + base.bias + (4.0 / 2) * (x @ a.T @ b.T)  # (4, 5)
    out = holder(x)
    assert not torch.allclose(out, base(x), atol=1e-3)  # the update is really there
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "conv_kwargs",
    [{}, {"stride": 2}, {"padding": 1}, {"stride": 2, "padding": 2}],
    ids=["plain", "stride", "padding", "stride-padding"],
)
def test_conv_equals_one_convolution_with_weight_w_plus_scaled_ba(conv_kwargs: dict) -> None:
    base = _conv(**conv_kwargs)
    holder = _wrapped(base, alpha=3.0)
    a, b = _factors(holder)
    assert a.shape == (2, 3, 3, 3) and b.shape == (6, 2, 1, 1)
    _perturb_b_(holder)
    x = torch.randn(2, 3, 9, 11, generator=generator(1))
    # Independent oracle: the flattened product B A reshaped to the kernel.
    delta = (b.reshape(6, 2) @ a.reshape(2, -1)).reshape(base.weight.shape)
    expected = F.conv2d(
        x, base.weight + 1.5 * delta, base.bias, base.stride, base.padding, base.dilation
    )  # (2, 6, H', W')
    out = holder(x)
    assert out.shape == base(x).shape
    assert not torch.allclose(out, base(x), atol=1e-3)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    weight_before = base.weight.detach().clone()
    merge_adapters(holder)
    torch.testing.assert_close(base.weight, weight_before + 1.5 * delta)
    torch.testing.assert_close(holder(x), out, rtol=1e-4, atol=1e-5)
    unmerge_adapters(holder)
    torch.testing.assert_close(base.weight, weight_before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_merge_is_explicit_and_checked(make) -> None:
    base = make()
    holder = _wrapped(base, alpha=2.0)
    _perturb_b_(holder)
    weight = base.weight.detach().clone()
    holder.eval()
    holder.train()
    assert not holder.layer.merged and torch.equal(base.weight, weight)  # eval()/train() never merge
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_adapters(holder)
    merge_adapters(holder)
    assert holder.layer.merged and not torch.equal(base.weight, weight)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_adapters(holder)
    unmerge_adapters(holder)
    assert not holder.layer.merged


def test_merged_forward_skips_the_low_rank_path() -> None:
    holder = _wrapped(_linear(), alpha=2.0)
    _perturb_b_(holder)
    merge_adapters(holder)
    x = torch.randn(3, 6, generator=generator(1))
    out = holder(x)
    torch.testing.assert_close(out, holder.layer.get_base_layer()(x))
    out.sum().backward()
    a, b = _factors(holder)
    assert a.grad is None and b.grad is None


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_bad_rank_is_refused(rank: object) -> None:
    with pytest.raises(ConfigError, match="rank"):
        _wrapped(_linear(), rank=rank)  # type: ignore[arg-type]


def test_non_positive_alpha_is_refused() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        _wrapped(_linear(), alpha=0.0)


def test_grouped_dilated_or_non_zero_padded_convolutions_are_refused() -> None:
    grouped = nn.Conv2d(4, 6, 3, groups=2, device="meta").to_empty(device="cpu")
    with pytest.raises(ConfigError, match="groups=1"):
        _wrapped(grouped)
    with pytest.raises(ConfigError, match="padding_mode='reflect'"):
        _wrapped(_conv(padding=1, padding_mode="reflect"))
    with pytest.raises(ConfigError, match=r"dilation=\(2, 2\)"):
        _wrapped(_conv(dilation=2))


def test_a_layer_that_is_neither_linear_nor_conv_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"neither an nn\.Linear nor an nn\.Conv2d"):
        _wrapped(nn.ReLU())
