"""LoRA through PEFT for transformer clients, and adapters in PEFT's own on-disk format.

:func:`inject_lora` puts PEFT's LoRA layers on named ``nn.Linear`` layers in place. PEFT draws the A
factors from the global RNG; they are redrawn here from the run's generator (Kaiming-uniform, as PEFT and
:mod:`pfedlora.models.lora` do), so a seed fixes them. PEFT freezes everything but the adapters when it
injects; which parameters train is this library's business (each phase says so), so the previous
``requires_grad`` flags are restored.

:func:`save_peft_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained`` loads onto the client's base model (its local model without adapter).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pfedlora.errors import ConfigError
from pfedlora.models._init import kaiming_uniform_
from pfedlora.models.lora import is_adapter_key

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
    for target in targets:
        if not isinstance(model.get_submodule(target), nn.Linear):
            raise ConfigError(
                f"adapter target {target!r} is not an nn.Linear; PEFT LoRA here adapts linear layers"
            )
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    _peft().inject_adapter_in_model(lora_config(targets, rank, alpha), model, adapter_name=ADAPTER_NAME)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(flags.get(name.replace(".base_layer", ""), True))
    lora_layers: list[Any] = [m for m in model.modules() if isinstance(m, _peft().tuners.lora.LoraLayer)]
    for layer in lora_layers:  # module order
        kaiming_uniform_(layer.lora_A[ADAPTER_NAME].weight, generator)
        nn.init.zeros_(layer.lora_B[ADAPTER_NAME].weight)


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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora_config(targets, rank, alpha).save_pretrained(os.fspath(directory))
    tensors = {
        to_peft_key(key, prefix): value.detach().to("cpu").contiguous()
        for key, value in model.state_dict().items()
        if is_adapter_key(key) and key.startswith(prefix)
    }
    save_file(tensors, os.fspath(directory / "adapter_model.safetensors"))
    return directory
