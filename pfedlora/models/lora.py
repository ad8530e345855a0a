"""Adapter tensors: the ``lora_`` naming contract and adapter-only state dicts (in memory and on disk).

LoRA (Hu et al., 2021, arXiv 2106.09685) adds a low-rank update to a layer's weight:
``y = base_layer(x) + (alpha/r) · B A x``. The LoRA layers themselves are PEFT's
(:mod:`pfedlora.models.peft_lora`); pFedLoRA's branch placement is a small network of its own. Either way
the ``lora_`` name prefix is the contract: it decides what the adapter phase trains, what a client uploads
and what the channel charges as communication.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pfedlora.errors import AdapterMismatchError, ConfigError

ADAPTER_PREFIX = "lora_"


def is_adapter_key(key: str) -> bool:
    """True iff some dotted component of a parameter / state-dict key starts with ``lora_``."""
    return any(part.startswith(ADAPTER_PREFIX) for part in key.split("."))


def check_rank_alpha(rank: int, alpha: float) -> None:
    """ConfigError unless ``rank`` is an int >= 1 and ``alpha`` > 0."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be an int >= 1, got {rank!r}")
    if not alpha > 0:
        raise ConfigError(f"LoRA alpha must be > 0, got {alpha!r}")


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
