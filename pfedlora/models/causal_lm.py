"""Language-model clients: one frozen pretrained causal LM per process, a client's state its LoRA adapters.

An architecture ``<family>-r<k>`` (registry ``LANGUAGE_MODELS``) is the whole causal LM of a transformer
family (``smollm2``, or ``hf`` with a decoder checkpoint) with a **private** LoRA adapter of rank k on the
adapted modules (``q_proj`` and ``v_proj`` of every layer by default): the device's budget, and where the
clients' models differ. A client may also hold a **shared** adapter (of ``adapter.rank``, the same on every
client), the one that travels. Every LoRA update is ``(alpha/r) · B A x`` added to the adapted layer's
output, A Kaiming-uniform from the client's generator and B zero, so a fresh adapter changes nothing.

The pretrained weights are loaded once per process and device (:func:`frozen_causal_lm`) and never trained:
a client holds its adapters alone (a few MB), so memory stays flat in the number of clients. While a client
runs, its adapters are put on the frozen model through forward hooks (:func:`adapters_on`). The shared
adapter's state-dict keys are PEFT's own (``adapter.<module>.lora_A.default.weight``), the private one's are
``private.<module>.A`` / ``.B``; both save in PEFT's format for ``PeftModel.from_pretrained`` onto the base
(:meth:`LanguageModelClient.save_peft`).
"""

from __future__ import annotations

import copy
import functools
import re
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.errors import ConfigError
from pfedlora.models._init import kaiming_uniform_
from pfedlora.models.lora import check_rank_alpha
from pfedlora.models.peft_lora import save_peft_state
from pfedlora.models.registry import ModelSettings
from pfedlora.models.transformer import FAMILIES, require_transformers
from pfedlora.registry import Registry
from pfedlora.tasks import IGNORE

_LM_ARCH = re.compile(r"^(?P<family>[a-z0-9]+)-r(?P<rank>\d+)$")
LM_RANKS = (1, 2, 4, 8, 16, 32, 64)
"""The private ranks an architecture name may take."""
DEFAULT_TARGETS = ("q_proj", "v_proj")
"""The modules LoRA adapts by default (by the last part of their name), in every layer."""
SHARED_PREFIX = "adapter."
PRIVATE_PREFIX = "private."


@dataclass(frozen=True)
class LanguageModelArch:
    """A language-model architecture: a family's whole causal LM and the rank of the private adapter."""

    family: str
    private_rank: int


LANGUAGE_MODELS: Registry[LanguageModelArch] = Registry("federation.architectures")
"""Every language-model architecture (``data.task = "language-modeling"``), by name."""


def register_language_models(family: str) -> None:
    """Make ``<family>-r<k>`` an architecture for every k of ``LM_RANKS``."""
    for rank in LM_RANKS:
        LANGUAGE_MODELS.add(f"{family}-r{rank}", LanguageModelArch(family, rank))


def language_model_arch(arch: str) -> LanguageModelArch:
    """The language-model architecture named ``arch`` (ConfigError listing the allowed names)."""
    return LANGUAGE_MODELS.get(arch)


def _dropout_off(config: Any) -> None:
    # Dropout would draw from the process-global RNG: off, for seeded, worker-independent runs.
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and name.endswith(("dropout", "dropout_prob", "pdrop")):
            setattr(config, name, 0.0)


def causal_lm_config(checkpoint: str) -> Any:
    """The Hugging Face config of ``checkpoint``, a copy, where it is a causal language model (ConfigError
    otherwise, e.g. for an encoder)."""
    transformers = require_transformers()
    try:
        config = copy.deepcopy(transformers.AutoConfig.from_pretrained(checkpoint))
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.checkpoint {checkpoint!r} is not a Hugging Face model: {error}") from None
    # Encoders (BERT, RoBERTa, ...) carry is_decoder = False; decoders have no such attribute.
    if (
        type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING
        or getattr(config, "is_decoder", True) is False
    ):
        raise ConfigError(
            f"data.task 'language-modeling' needs a causal language model; {checkpoint!r} is a "
            f"{config.model_type} model without one (an encoder); use the smollm2 family or a decoder "
            "checkpoint"
        )
    return config


def frozen_causal_lm(
    checkpoint: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The causal LM of ``checkpoint`` on ``device`` with weights in ``dtype``, frozen and in eval mode: one
    per process, device and dtype, shared by every client (ConfigError where the checkpoint holds no causal
    LM, e.g. an encoder). Frozen weights may be kept in bfloat16 for bf16 training: autocast would cast them
    so for every matmul anyway, and they never receive an update."""
    return _frozen_causal_lm(checkpoint, str(torch.device(device)), dtype)


@functools.lru_cache(maxsize=4)
def _frozen_causal_lm(checkpoint: str, device: str, dtype: torch.dtype) -> nn.Module:
    transformers = require_transformers()
    config = causal_lm_config(checkpoint)
    _dropout_off(config)
    try:
        # Eager attention: its matmuls are what PyTorch's FLOP counter sees (the cost ledger counts them).
        model = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, config=config, attn_implementation="eager"
        )
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.checkpoint {checkpoint!r} holds no loadable weights: {error}") from None
    model.requires_grad_(False)
    model = model.to(device=device, dtype=dtype).eval()
    _install_hooks(model)
    return model


# --- adapters on the frozen model ------------------------------------------------------------------------


Factors = tuple[torch.Tensor | None, torch.Tensor, float]
"""A, B and the scaling alpha/r of one LoRA update (A None: B is a dense update of the weight)."""


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[list[dict[str, Factors]]]] = weakref.WeakKeyDictionary()
"""Per frozen model, a one-item list holding the adapters its forward adds (set by :func:`adapters_on`)."""


def _install_hooks(model: nn.Module) -> None:
    """A forward hook on every ``nn.Linear`` of ``model`` that adds the active adapters' updates."""
    active: list[list[dict[str, Factors]]] = [[]]
    _ACTIVE[model] = active
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(functools.partial(_add_updates, active, name))


def _add_updates(
    active: list[list[dict[str, Factors]]],
    name: str,
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    output: torch.Tensor,
) -> torch.Tensor:
    for adapter in active[0]:
        factors = adapter.get(name)
        if factors is not None:
            a, b, scaling = factors
            x = args[0] if a is None else F.linear(args[0], a.to(output.dtype))
            output = output + scaling * F.linear(x, b.to(output.dtype))
    return output


@contextmanager
def adapters_on(model: nn.Module, adapters: Sequence[dict[str, Factors]]) -> Iterator[nn.Module]:
    """Within the block ``model``'s forward adds the updates of ``adapters`` (module name -> factors)."""
    active = _ACTIVE[model]
    previous, active[0] = active[0], list(adapters)
    try:
        yield model
    finally:
        active[0] = previous


def adapted_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` whose name is, or ends with, one of ``targets``."""
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    }
    if not found:
        raise ConfigError(
            f"adapter.targets {list(targets)} name no linear layer of {type(model).__name__} (e.g. q_proj, "
            "v_proj, k_proj, o_proj, gate_proj, up_proj, down_proj)"
        )
    return found


def _add_at(root: nn.Module, name: str, module: nn.Module) -> None:
    """Add ``module`` under the dotted ``name`` below ``root``, making empty containers on the way, so that
    state-dict keys mirror the frozen model's module names."""
    parent = root
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(leaf, module)


class LowRankFactors(nn.Module):
    """A and B of one adapted layer: named ``lora_A.default.weight`` / ``lora_B.default.weight`` as PEFT
    names them (``peft_names``), else ``A`` / ``B``."""

    def __init__(self, layer: nn.Linear, rank: int, generator: torch.Generator, *, peft_names: bool) -> None:
        super().__init__()
        if rank > min(layer.in_features, layer.out_features):
            raise ConfigError(
                f"LoRA rank {rank} is above the width of a layer it adapts ({layer.in_features} -> "
                f"{layer.out_features}); allowed: at most {min(layer.in_features, layer.out_features)}"
            )
        a = kaiming_uniform_(torch.empty(rank, layer.in_features), generator)
        b = torch.zeros(layer.out_features, rank)
        self.peft_names = peft_names
        if peft_names:
            self.lora_A = nn.ModuleDict({"default": nn.Linear(layer.in_features, rank, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, layer.out_features, bias=False)})
            with torch.no_grad():
                for factor, value in zip(self.weights(), (a, b), strict=True):
                    factor.copy_(value)
        else:
            self.A = nn.Parameter(a)
            self.B = nn.Parameter(b)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A (rank, in) and B (out, rank)."""
        if self.peft_names:
            a, b = self.lora_A["default"], self.lora_B["default"]
            assert isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
            return a.weight, b.weight
        return self.A, self.B


class LoRAAdapter(nn.Module):
    """LoRA factors for modules of a frozen model, as a module tree mirroring their names (so that state-dict
    keys read ``<module>.lora_A.default.weight`` or ``<module>.A``)."""

    def __init__(
        self,
        layers: dict[str, nn.Linear],
        rank: int,
        alpha: float,
        generator: torch.Generator,
        *,
        peft_names: bool,
    ) -> None:
        super().__init__()
        check_rank_alpha(rank, alpha)
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.modules_adapted = tuple(layers)
        for name, layer in layers.items():  # module order: the draws of A follow it
            _add_at(self, name, LowRankFactors(layer, rank, generator, peft_names=peft_names))

    def factors(self) -> dict[str, Factors]:
        """Module name -> (A, B, alpha/r)."""
        return {name: (*self.leaf(name).weights(), self.scaling) for name in self.modules_adapted}

    def leaf(self, name: str) -> LowRankFactors:
        """The factors of module ``name``."""
        leaf = self.get_submodule(name)
        assert isinstance(leaf, LowRankFactors)
        return leaf

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The factors under PEFT's keys (``<module>.lora_A.default.weight``)."""
        state = {}
        for name in self.modules_adapted:
            a, b = self.leaf(name).weights()
            state[f"{name}.lora_A.default.weight"] = a.detach()
            state[f"{name}.lora_B.default.weight"] = b.detach()
        return state


class MergedUpdates(nn.Module):
    """Dense updates of the frozen model's weights (out × in per adapted module, zero at first), as buffers
    named ``<module>.delta``: what a method that merges the global update into the base keeps (FLoRA)."""

    def __init__(self, layers: dict[str, nn.Linear]) -> None:
        super().__init__()
        self.modules_adapted = tuple(layers)
        for name, layer in layers.items():
            holder = nn.Module()
            holder.register_buffer("delta", torch.zeros(layer.out_features, layer.in_features))
            _add_at(self, name, holder)

    def factors(self) -> dict[str, Factors]:
        """Module name -> (None, ΔW, 1)."""
        return {name: (None, self.delta(name), 1.0) for name in self.modules_adapted}

    def delta(self, name: str) -> torch.Tensor:
        delta = self.get_submodule(name).delta
        assert isinstance(delta, torch.Tensor)
        return delta


PACKED_TOKENS = 512
"""By default, the most real tokens a batch may hold to run packed in one row; a larger batch runs padded.
Eager attention is quadratic in a row's length: on SmolLM2 a row of 512 tokens spends 17% of its linear
layers' FLOPs on attention, one of 1,500 (an evaluation batch of 48 KJV verses) 49%, which the padding it
saves no longer pays for."""

_PACKS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def packs_sequences(model: nn.Module) -> bool:
    """Whether ``model`` keeps sequences packed into one row apart (no token attends across a restart of
    ``position_ids``, as transformers' causal masks do when given no attention mask): checked once per
    model on two short samples against the same samples padded."""
    if model not in _PACKS:
        decoder = getattr(model, str(model.base_model_prefix))
        device = next(model.parameters()).device
        ids = torch.arange(3, 11, device=device).reshape(2, 4)  # two samples of 4 tokens
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], device=ids.device)
        real = mask.bool()
        with torch.no_grad(), adapters_on(model, []):
            padded = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[real]
            packed = decoder(
                input_ids=ids[real][None], position_ids=(mask.cumsum(1) - 1)[real][None], use_cache=False
            ).last_hidden_state[0]
        tolerance = 1e-3 if padded.dtype == torch.float32 else 5e-2
        _PACKS[model] = bool(torch.allclose(packed.float(), padded.float(), rtol=tolerance, atol=tolerance))
    return _PACKS[model]


class LanguageModelClient(nn.Module):
    """A client's causal LM: the process's frozen model with the client's private adapter (ω) and, where the
    algorithm shares one, the shared adapter (θ). ``forward(x)`` gives next-token logits (B, L, V) of a text
    batch x (B, 2, L) of token ids and mask. It has the interface pFedLoRA's phases use: ``local_parameters``
    (ω), ``adapter_parameters`` (θ), ``frozen_prefix`` (None: every forward runs the whole model)."""

    HEAD_NAME = "lm_head"
    device_marker: torch.Tensor

    def __init__(
        self,
        checkpoint: str,
        *,
        private_rank: int,
        private_alpha: float,
        shared_rank: int,
        shared_alpha: float,
        targets: Sequence[str],
        generator: torch.Generator,
        merged: bool = False,
        base_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.checkpoint, self.base_dtype = checkpoint, base_dtype
        # Where the client lives (it moves with .to()), also when it holds no adapter at all.
        self.register_buffer("device_marker", torch.empty(0), persistent=False)
        layers = adapted_modules(frozen_causal_lm(checkpoint, "cpu", base_dtype), targets)
        self.private = (
            LoRAAdapter(layers, private_rank, private_alpha, generator, peft_names=False)
            if private_rank
            else None
        )
        self.adapter = (
            LoRAAdapter(layers, shared_rank, shared_alpha, generator, peft_names=True)
            if shared_rank
            else None
        )
        self.merged = MergedUpdates(layers) if merged else None
        self.packed_tokens = PACKED_TOKENS
        """The most real tokens a batch may hold to run packed (0: every batch runs padded)."""

    def base(self) -> nn.Module:
        """The frozen model (the process's one, on this client's device)."""
        return frozen_causal_lm(self.checkpoint, self.device_marker.device, self.base_dtype)

    def adapters(self) -> list[dict[str, Factors]]:
        """The updates the forward adds: merged ones, the private adapter's, the shared one's."""
        return [a.factors() for a in (self.merged, self.private, self.adapter) if a is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, L, V)."""
        ids, mask = x[:, 0].long(), x[:, 1].long()
        with adapters_on(self.base(), self.adapters()) as model:
            logits: torch.Tensor = model(input_ids=ids, attention_mask=mask).logits
        return logits

    def next_token_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of the positions whose next token is real (T, V) and those tokens (T,): the language
        model head runs on these alone, not on padding (the mean of their cross-entropy is the task's loss,
        :func:`~pfedlora.tasks.next_token_targets`).

        Where the batch is right-padded, holds at most ``packed_tokens`` real tokens and the model attends
        within packed sequences (:func:`packs_sequences`), the decoder runs on the real tokens alone, packed
        into one row with each sample's positions starting at 0, so that no padding is computed: the same
        logits as the padded batch (up to rounding) for the real tokens' share of the decoder's work.
        """
        ids, mask = x[:, 0].long(), x[:, 1].long()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)  # (B, L-1)
        keep = targets != IGNORE
        base = self.base()
        with adapters_on(base, self.adapters()) as model:
            if getattr(model.config, "final_logit_softcapping", None):  # a head with more than a matmul
                return self(x)[:, :-1][keep], targets[keep]
            decoder = getattr(model, str(model.base_model_prefix))
            head: nn.Module = getattr(model, "get_output_embeddings")()  # noqa: B009 (untyped in torch)
            real = mask.bool()
            if self.runs_packed(x):
                positions = mask.cumsum(dim=1) - 1  # each sample's own positions, from 0
                hidden = decoder(
                    input_ids=ids[real][None], position_ids=positions[real][None], use_cache=False
                ).last_hidden_state[0]  # (N, H): the real tokens, sample after sample
                # The real tokens followed by a real one (all but each sample's last), as targets[keep] orders
                before_real = torch.zeros_like(real)
                before_real[:, :-1] = keep
                logits: torch.Tensor = head(hidden[before_real[real]])  # (T, V)
            else:
                hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
                logits = head(hidden[:, :-1][keep])  # (T, V)
        return logits, targets[keep]

    def runs_packed(self, x: torch.Tensor) -> bool:
        """Whether :meth:`next_token_logits` runs the batch ``x`` packed into one row."""
        mask = x[:, 1]
        right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
        return right_padded and int(mask.sum()) <= self.packed_tokens and packs_sequences(self.base())

    def cost_group(self, x: torch.Tensor) -> tuple[bool, int]:
        """What, besides its shape and real tokens, sets the FLOPs of a step on ``x``: whether it runs packed,
        and how many of its samples hold a token."""
        return self.runs_packed(x), int((x[:, 1].sum(dim=1) > 0).sum())

    def frozen_prefix(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def forward_from_prefix(self, prefix: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return self(x)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The shared adapter's parameters (θ)."""
        return [] if self.adapter is None else list(self.adapter.parameters())

    def local_parameters(self) -> list[nn.Parameter]:
        """The private adapter's parameters (ω)."""
        return [] if self.private is None else list(self.private.parameters())

    def save_peft(self, directory: str | Path) -> dict[str, Path]:
        """Each adapter in PEFT's format under ``directory`` (``private/``, ``adapter/``), loadable with
        ``PeftModel.from_pretrained`` onto the frozen model; returns the folders written."""
        written = {}
        for name, adapter in (("private", self.private), ("adapter", self.adapter)):
            if adapter is not None:
                written[name] = save_peft_state(
                    adapter.peft_state(),
                    Path(directory) / name,
                    adapter.modules_adapted,
                    adapter.rank,
                    adapter.alpha,
                )
        return written


def build_language_model(
    arch: str,
    settings: ModelSettings,
    generator: torch.Generator,
    *,
    shared_rank: int = 0,
    shared_alpha: float = 1.0,
    private: bool = True,
    targets: Sequence[str] = (),
    merged: bool = False,
    base_dtype: torch.dtype = torch.float32,
) -> LanguageModelClient:
    """A fresh client of language-model architecture ``arch``: its private adapter (unless ``private`` is
    False), a shared one of ``shared_rank`` (0: none) and, with ``merged``, dense merged updates; LoRA on
    ``targets`` (default ``q_proj``, ``v_proj``), alpha = 2·rank for the private adapter; the frozen base in
    ``base_dtype``."""
    spec = language_model_arch(arch)
    family = FAMILIES[spec.family]
    rank = spec.private_rank if private else 0
    return LanguageModelClient(
        family.locate(settings),
        private_rank=rank,
        private_alpha=2.0 * spec.private_rank,
        shared_rank=shared_rank,
        shared_alpha=shared_alpha,
        targets=tuple(targets) or DEFAULT_TARGETS,
        generator=generator,
        merged=merged,
        base_dtype=base_dtype,
    )


for _family in ("smollm2", "hf"):
    register_language_models(_family)
