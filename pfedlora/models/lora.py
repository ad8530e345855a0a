"""LoRA layers that wrap an existing nn.Linear / nn.Conv2d, and adapter-only state dicts.

LoRA (Hu et al., 2021, arXiv 2106.09685) adds a low-rank update to a layer's weight:
``y = base_layer(x) + (alpha/r) · B A x`` with A: (r, in) and B: (out, r). A starts Kaiming-uniform and B at
zero, so a fresh adapter changes nothing. The ``lora_`` name prefix is the contract: it decides what the
adapter phase trains, what a client uploads and what the channel charges as communication.

Merging the update into the base weight is an explicit call; unlike loralib, ``eval()``/``train()`` never
merge.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pfedlora.errors import AdapterMismatchError, ConfigError
from pfedlora.models._init import kaiming_uniform_

ADAPTER_PREFIX = "lora_"


def is_adapter_key(key: str) -> bool:
    """True iff some dotted component of a parameter / state-dict key starts with ``lora_``."""
    return any(part.startswith(ADAPTER_PREFIX) for part in key.split("."))


def _check_rank_alpha(rank: int, alpha: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be an int >= 1, got {rank!r}")
    if not alpha > 0:
        raise ConfigError(f"LoRA alpha must be > 0, got {alpha!r}")


class LoRALayer(nn.Module):
    """What LoRALinear and LoRAConv2d share: scaling, forward, explicit merge/unmerge.

    While ``merged`` is True the update lives in ``base_layer.weight`` and forward skips the low-rank path,
    so no gradient reaches ``lora_A``/``lora_B``.
    """

    base_layer: nn.Linear | nn.Conv2d
    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, rank: int, alpha: float) -> None:
        super().__init__()
        _check_rank_alpha(rank, alpha)
        self.base_layer = base_layer
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.merged = False

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` without the scaling."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """``(alpha/r) · B A`` in the shape of ``base_layer.weight``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x) + (alpha/r) · B A x`` (just ``base_layer(x)`` while merged)."""
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.scaling * self.low_rank(x)

    def merge(self) -> None:
        """Add the update into ``base_layer.weight``; RuntimeError if already merged."""
        if self.merged:
            raise RuntimeError("LoRA layer is already merged")
        with torch.no_grad():
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the update from ``base_layer.weight``; RuntimeError if not merged."""
        if not self.merged:
            raise RuntimeError("LoRA layer is not merged")
        with torch.no_grad():
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """``base_layer`` (an nn.Linear) plus a rank-``rank`` update; A: (r, in), B: (out, r)."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise ConfigError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer, rank, alpha)
        weight = base_layer.weight  # (out, in)
        lora_a = weight.new_empty(rank, base_layer.in_features)  # (r, in)
        self.lora_A = nn.Parameter(kaiming_uniform_(lora_a, generator))
        self.lora_B = nn.Parameter(weight.new_zeros(base_layer.out_features, rank))

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., in) -> (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, r) @ (r, in) -> (out, in)


class LoRAConv2d(LoRALayer):
    """``base_layer`` (an nn.Conv2d, groups=1) plus a rank-``rank`` update.

    A is a convolution with the base layer's kernel size, stride, padding and dilation from ``in`` to ``r``
    channels (weight (r, in, kh, kw), no bias); B is a 1x1 convolution from ``r`` to ``out`` channels
    (weight (out, r, 1, 1)). Their composition is one convolution with weight ``B A``, which is what
    :meth:`merge` adds.
    """

    base_layer: nn.Conv2d

    def __init__(self, base_layer: nn.Conv2d, rank: int, alpha: float, generator: torch.Generator) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise ConfigError(f"LoRAConv2d wraps an nn.Conv2d, got {type(base_layer).__name__}")
        if base_layer.groups != 1:
            raise ConfigError(f"LoRAConv2d needs a convolution with groups=1, got groups={base_layer.groups}")
        if base_layer.padding_mode != "zeros":
            raise ConfigError(
                f"LoRAConv2d needs padding_mode='zeros', got padding_mode={base_layer.padding_mode!r}"
            )
        super().__init__(base_layer, rank, alpha)
        weight = base_layer.weight  # (out, in, kh, kw)
        out_channels, in_channels, kernel_h, kernel_w = weight.shape
        self.lora_A = nn.Parameter(
            kaiming_uniform_(weight.new_empty(rank, in_channels, kernel_h, kernel_w), generator)
        )
        self.lora_B = nn.Parameter(weight.new_zeros(out_channels, rank, 1, 1))

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        h = F.conv2d(x, self.lora_A, None, base.stride, base.padding, base.dilation)  # (B, r, H', W')
        return F.conv2d(h, self.lora_B)  # (B, out, H', W')

    def delta_weight(self) -> torch.Tensor:
        # A 1x1 convolution after a kxk one is a kxk convolution whose weight mixes A's r channels by B.
        b = self.lora_B[:, :, 0, 0]  # (out, r)
        return self.scaling * torch.einsum("or,rihw->oihw", b, self.lora_A)  # (out, in, kh, kw)


def _lora_layers(module: nn.Module) -> list[LoRALayer]:
    return [m for m in module.modules() if isinstance(m, LoRALayer)]


def merge_adapters(module: nn.Module) -> None:
    """Merge every LoRA layer in ``module`` (a branch placement has none, so nothing happens)."""
    for layer in _lora_layers(module):
        layer.merge()


def unmerge_adapters(module: nn.Module) -> None:
    """Unmerge every LoRA layer in ``module``."""
    for layer in _lora_layers(module):
        layer.unmerge()


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The ``is_adapter_key`` entries of ``module.state_dict()``, as detached copies (safe to keep)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items() if is_adapter_key(key)}


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def load_adapter_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``module``'s adapter tensors in place, strictly.

    Every adapter key of ``module`` must be present with its exact shape and nothing else may be; otherwise
    AdapterMismatchError lists the missing and unexpected keys and the shape mismatches (both shapes).
    Values are cast to each parameter's dtype and device; nothing is copied unless everything matches.
    """
    targets = {key: value for key, value in module.state_dict(keep_vars=True).items() if is_adapter_key(key)}
    missing = [key for key in targets if key not in state]
    unexpected = [key for key in state if key not in targets]
    mismatched = [
        f"{key!r} expected {_shape(targets[key])}, got {_shape(value)}"
        for key, value in state.items()
        if key in targets and _shape(value) != _shape(targets[key])
    ]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(repr(key) for key in missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(repr(key) for key in unexpected))
    if mismatched:
        problems.append("shape mismatches: " + ", ".join(mismatched))
    if problems:
        raise AdapterMismatchError("adapter state does not match the model: " + "; ".join(problems))
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key])


def save_adapter(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``module``'s adapter tensors (only those) to a safetensors file."""
    tensors = {key: value.to("cpu").contiguous() for key, value in adapter_state_dict(module).items()}
    save_file(tensors, os.fspath(path))


def load_adapter(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a file written by :func:`save_adapter` into ``module``, strictly (see load_adapter_state_dict)."""
    load_adapter_state_dict(module, load_file(os.fspath(path), device="cpu"))
