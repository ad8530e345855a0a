"""LoRA layers through PEFT (for every model family), and adapters in PEFT's own on-disk format.

:func:`inject_lora` puts PEFT's LoRA layers on named ``nn.Linear`` / ``nn.Conv2d`` layers in place:
``y = base_layer(x) + (alpha/r) · B(A(x))``, A Kaiming-uniform and B zero, so a fresh adapter changes
nothing; for a convolution A has the base layer's kernel, stride and padding and B is 1x1. PEFT draws the
A factors from the global RNG; they are redrawn here from the run's generator (Kaiming-uniform, as PEFT
does), so a seed fixes them, and the global RNG is left as it was. PEFT freezes everything but the
adapters when it injects; which parameters train is this library's business (each phase says so), so
the previous ``requires_grad`` flags are restored.

:func:`save_peft_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained`` loads onto the client's base model (its local model without adapter).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pfedlora.errors import ConfigError
from pfedlora.models._init import kaiming_uniform_
from pfedlora.models.lora import check_rank_alpha, is_adapter_key

ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."


def _peft() -> Any:
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(
            "LoRA on transformer clients needs the `peft` package: pip install 'pfedlora[text]'"
        )
    import peft

    return peft


def lora_config(targets: Sequence[str], rank: int, alpha: float) -> Any:
    """PEFT's LoraConfig for ``targets`` (full module names), no dropout, no bias."""
    return _peft().LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none"
    )


def inject_lora(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float, generator: torch.Generator
) -> None:
    """Wrap each of ``targets`` in PEFT's LoRA layer, in place; A from ``generator``, B zero."""
    check_rank_alpha(rank, alpha)
    for target in targets:
        layer = model.get_submodule(target)
        if not isinstance(layer, nn.Linear | nn.Conv2d):
            raise ConfigError(f"adapter target {target!r} is neither an nn.Linear nor an nn.Conv2d")
        if isinstance(layer, nn.Conv2d) and not (
            layer.groups == 1 and layer.padding_mode == "zeros" and layer.dilation == (1, 1)
        ):
            # PEFT's conv LoRA ignores dilation (its A convolution has none); groups and padding modes
            # other than zeros are left out as well.
            raise ConfigError(
                f"adapter target {target!r}: LoRA adapts convolutions with groups=1, padding_mode='zeros' "
                f"and dilation 1, got groups={layer.groups}, padding_mode={layer.padding_mode!r}, "
                f"dilation={layer.dilation}"
            )
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[]):  # PEFT's own init draws from the global RNG: leave it untouched
        _peft().inject_adapter_in_model(lora_config(targets, rank, alpha), model, adapter_name=ADAPTER_NAME)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(flags.get(name.replace(".base_layer", ""), True))
    for layer in lora_layers(model):  # module order
        kaiming_uniform_(layer.lora_A[ADAPTER_NAME].weight, generator)
        nn.init.zeros_(layer.lora_B[ADAPTER_NAME].weight)


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT LoRA layer (wrapping its ``base_layer``)."""
    return "peft" in sys.modules and isinstance(module, _peft().tuners.lora.LoraLayer)


def lora_layers(model: nn.Module) -> list[Any]:
    """The PEFT LoRA layers of ``model``, in module order."""
    return [module for module in model.modules() if is_lora_layer(module)]


def merge_adapters(model: nn.Module) -> None:
    """Add every LoRA update into its base layer's weight (PEFT's merge); forward then skips the low-rank
    path, so no gradient reaches the factors. A branch placement has no LoRA layer: nothing happens."""
    for layer in lora_layers(model):
        if layer.merged:
            raise RuntimeError("LoRA layer is already merged")
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Subtract every merged LoRA update from its base layer's weight again."""
    for layer in lora_layers(model):
        if not layer.merged:
            raise RuntimeError("LoRA layer is not merged")
        layer.unmerge()


def to_peft_key(key: str, prefix: str = "") -> str:
    """``<prefix><module>.lora_A.default.weight`` -> PEFT's file key
    ``base_model.model.<module>.lora_A.weight``."""
    return PEFT_PREFIX + key.removeprefix(prefix).replace(f".{ADAPTER_NAME}.", ".")


def save_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    targets: Sequence[str],
    rank: int,
    alpha: float,
    prefix: str = "",
) -> Path:
    """Write the adapter of ``model`` (keys under ``prefix``, e.g. ``local.``) in PEFT's format."""
    return save_peft_state(model.state_dict(), directory, targets, rank, alpha, prefix)


def save_peft_state(
    state: Mapping[str, torch.Tensor],
    directory: str | os.PathLike[str],
    targets: Sequence[str],
    rank: int,
    alpha: float,
    prefix: str = "",
) -> Path:
    """Write the LoRA tensors of ``state`` under ``prefix`` (``<prefix><module>.lora_A.default.weight``, …)
    in PEFT's format, for ``PeftModel.from_pretrained`` onto a model whose modules are ``targets``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora_config(targets, rank, alpha).save_pretrained(os.fspath(directory))
    tensors = {
        to_peft_key(key, prefix): value.detach().to("cpu").contiguous()
        for key, value in state.items()
        if is_adapter_key(key) and key.startswith(prefix)
    }
    save_file(tensors, os.fspath(directory / "adapter_model.safetensors"))
    return directory


def lora_targets(state: Mapping[str, torch.Tensor], prefix: str = "") -> tuple[str, ...] | None:
    """The modules (under ``prefix``) that the LoRA tensors of ``state`` adapt, in order, where every tensor
    of ``state`` is a PEFT LoRA factor under ``prefix``; else None."""
    modules: dict[str, None] = {}
    for key in state:
        head, sep, tail = key.removeprefix(prefix).partition(".lora_")
        if (
            not key.startswith(prefix)
            or not sep
            or tail not in (f"A.{ADAPTER_NAME}.weight", f"B.{ADAPTER_NAME}.weight")
        ):
            return None
        modules[head] = None
    return tuple(modules) or None
