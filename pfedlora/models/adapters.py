"""The homogeneous adapter of pFedLoRA (SPEC §2.1) and where it attaches to a heterogeneous local model.

Three placements:

- ``"layers"``: LoRA wrappers on target layers of the local model whose name and weight shape are the same
  on every architecture (for the CNN family: ``conv1`` and ``fc3``; for transformer clients, through PEFT:
  the attention projections of the layers every depth has, and the head);
- ``"head"``: LoRA on the head alone: the adapter phase computes the features once per batch without
  autograd and never backpropagates through the local model;
- ``"branch"``: a small network of low-rank factorised layers beside the local model whose logits are added,
  ``F(x) = f_local(x) + (alpha/r) · g(x)``, with g's last layer starting at zero (for text, g reads one
  family's tokenization whatever the client's own family, so it is homogeneous across families).

Either way every adapter parameter name satisfies ``is_adapter_key`` and has the same shape on every client,
so the server can average adapters across architectures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.errors import AdapterMismatchError, ConfigError
from pfedlora.models.base import FeatureClassifier
from pfedlora.models.cnn import check_input_shape, conv_pool_side, init_parameters_
from pfedlora.models.lora import check_rank_alpha, is_adapter_key
from pfedlora.models.peft_lora import inject_lora, is_lora_layer
from pfedlora.models.registry import ModelSettings
from pfedlora.models.transformer import TransformerClassifier, token_embeddings, view_of, view_slice
from pfedlora.registry import Registry

_BRANCH_CHANNELS = 16
_BRANCH_KERNEL = 5


def _format_shape(shape: Sequence[int]) -> str:
    return str(tuple(shape))


def adaptable_layers(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> weight shape of every nn.Linear / nn.Conv2d in ``model``, in module order.

    A layer already wrapped by LoRA is listed under the wrapper's name with its base weight's shape.
    """
    wrapped = {name for name, module in model.named_modules() if is_lora_layer(module)}
    layers: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if is_lora_layer(module):
            layers[name] = tuple(module.get_base_layer().weight.shape)
        elif isinstance(module, nn.Linear | nn.Conv2d) and not any(name.startswith(f"{w}.") for w in wrapped):
            layers[name] = tuple(module.weight.shape)
    return layers


def _common_layers(layers: Mapping[str, Mapping[str, tuple[int, ...]]]) -> list[str]:
    first, *others = layers.values()
    return [name for name in first if all(name in other for other in others)]


def homogeneous_targets(models: Mapping[str, nn.Module]) -> tuple[str, ...]:
    """The adaptable layers present in every model with the same weight shape, in the first model's order
    (among a model family's ``default_adapter_layers``, where it names some)."""
    if not models:
        raise ConfigError("homogeneous_targets needs at least one model")
    first, *others = (adaptable_layers(model) for model in models.values())
    common = [name for name, shape in first.items() if all(other.get(name) == shape for other in others)]
    defaults = [
        model.default_adapter_layers() for model in models.values() if isinstance(model, FeatureClassifier)
    ]
    for allowed in defaults:
        if allowed is not None:
            common = [name for name in common if name in allowed]
    return tuple(common)


def validate_targets(models: Mapping[str, nn.Module], targets: Sequence[str]) -> tuple[str, ...]:
    """``targets`` as a tuple, once each is known to be an adaptable layer of one shape in every model.

    ``models`` is keyed by architecture name. An empty, duplicated or unknown target raises ConfigError; a
    target whose weight shape differs between architectures raises AdapterMismatchError naming each shape.
    """
    if not models:
        raise ConfigError("validate_targets needs at least one model")
    if isinstance(targets, str):
        raise ConfigError(f"adapter targets must be a sequence of layer names, got the string {targets!r}")
    targets = tuple(targets)
    layers = {arch: adaptable_layers(model) for arch, model in models.items()}
    adaptable = ", ".join(_common_layers(layers))
    if not targets:
        raise ConfigError(f"adapter targets must name at least one layer; adaptable layers: {adaptable}")
    duplicates = sorted({t for t in targets if targets.count(t) > 1})
    if duplicates:
        raise ConfigError(f"adapter targets repeat {', '.join(map(repr, duplicates))}")
    for target in targets:
        absent = [arch for arch, names in layers.items() if target not in names]
        if absent:
            raise ConfigError(
                f"adapter target {target!r} is not an adaptable layer of {', '.join(absent)}; "
                f"adaptable layers: {adaptable}"
            )
        shapes = {arch: names[target] for arch, names in layers.items()}
        if len(set(shapes.values())) > 1:
            per_arch = ", ".join(f"{arch} {_format_shape(shape)}" for arch, shape in shapes.items())
            raise AdapterMismatchError(
                f"adapter target {target!r} has a different weight shape per architecture: {per_arch}; "
                f"homogeneous layers: {', '.join(homogeneous_targets(models))}"
            )
    return targets


class LoRABranch(nn.Module):
    """g(x; θ) of the branch placement: a small CNN whose layers are each a rank-r factorisation.

    conv_A (C_in→r, 5x5, no bias) → conv_B (r→16, 1x1) → ReLU → maxpool2 → flatten → fc_A (→r, no bias)
    → fc_B (r→classes). Its shapes depend only on (input_shape, num_classes, rank), so they are the same on
    every client. fc_B's weight and bias start at zero, so g starts at zero; the rest is initialised like
    PyTorch's default from ``generator``.
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, rank: int, generator: torch.Generator
    ) -> None:
        super().__init__()
        channels, height, width = check_input_shape(input_shape)
        check_rank_alpha(rank, 1.0)
        out_h, out_w = conv_pool_side(height), conv_pool_side(width)
        if out_h < 1 or out_w < 1:
            raise ConfigError(f"input_shape {(channels, height, width)} is too small for the LoRA branch")
        meta = torch.device("meta")
        self.conv_A = nn.Conv2d(channels, rank, _BRANCH_KERNEL, bias=False, device=meta)
        self.conv_B = nn.Conv2d(rank, _BRANCH_CHANNELS, 1, device=meta)
        self.fc_A = nn.Linear(_BRANCH_CHANNELS * out_h * out_w, rank, bias=False, device=meta)
        self.fc_B = nn.Linear(rank, num_classes, device=meta)
        self.to_empty(device="cpu")
        init_parameters_(self, generator)
        with torch.no_grad():
            self.fc_B.weight.zero_()
            self.fc_B.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Branch logits g(x)."""
        x = self.conv_B(self.conv_A(x))  # (B, r, H-4, W-4) -> (B, 16, H-4, W-4)
        x = F.relu(F.max_pool2d(x, 2))  # (B, 16, h, w): = max_pool(relu(x)), on a quarter of the elements
        x = self.fc_A(torch.flatten(x, 1))  # (B, r)
        return self.fc_B(x)  # (B, num_classes)


_TEXT_BRANCH_HIDDEN = 64


class TextLoRABranch(nn.Module):
    """g(x; θ) of the branch placement for text: a small network of rank-r factorised layers on the mean of
    one family's frozen pretrained token embeddings, so that every client, whatever its own family, runs
    the same branch on the same tokenization.

    mean over the real tokens of E[ids] (B, h) → proj_A (h→r, no bias) → proj_B (r→64) → ReLU → fc_A
    (64→r, no bias) → fc_B (r→classes). E (``embedding``: the family's input embeddings, vocabulary × h)
    is a non-persistent buffer, never trained, never sent and held once per process (every client of a
    process references the same tensor); it comes from the pretrained checkpoint every client can load.
    fc_B starts at zero, so g starts at zero; the rest is initialised like PyTorch's default from
    ``generator``.
    """

    embedding: torch.Tensor

    def __init__(
        self, embedding: torch.Tensor, view: int, num_classes: int, rank: int, generator: torch.Generator
    ) -> None:
        super().__init__()
        check_rank_alpha(rank, 1.0)
        self.view = view
        self.register_buffer("embedding", embedding, persistent=False)  # (vocabulary, h)
        width = int(embedding.shape[1])
        meta = torch.device("meta")
        self.proj_A = nn.Linear(width, rank, bias=False, device=meta)
        self.proj_B = nn.Linear(rank, _TEXT_BRANCH_HIDDEN, device=meta)
        self.fc_A = nn.Linear(_TEXT_BRANCH_HIDDEN, rank, bias=False, device=meta)
        self.fc_B = nn.Linear(rank, num_classes, device=meta)
        for layer in (self.proj_A, self.proj_B, self.fc_A, self.fc_B):
            layer.to_empty(device="cpu")
        init_parameters_(self, generator)
        with torch.no_grad():
            self.fc_B.weight.zero_()
            self.fc_B.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Branch logits g(x) for a text batch (B, 2·V, L)."""
        ids, mask = view_slice(x, self.view)  # (B, L) each
        weights = mask.unsqueeze(-1).to(self.embedding.dtype)  # (B, L, 1)
        tokens = F.embedding(ids, self.embedding)  # (B, L, h), no gradient: a buffer
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, h)
        hidden = F.relu(self.proj_B(self.proj_A(pooled)))  # (B, 64)
        return self.fc_B(self.fc_A(hidden))  # (B, num_classes)


class PersonalizedModel(nn.Module):
    """Private local model + homogeneous adapter: F(x; ω, θ). Attribute ``local`` is the (possibly
    LoRA-wrapped) HeteroCNN; each placement (``PLACEMENTS``) is a subclass that says where θ sits.

    Build it with :func:`attach_adapter`.
    """

    placement: str

    def __init__(self, local: FeatureClassifier, *, rank: int, alpha: float) -> None:
        super().__init__()
        self.local = local
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits F(x; ω, θ)."""
        return self.forward_from_prefix(None, x)

    def frozen_prefix(self, x: torch.Tensor) -> torch.Tensor | None:
        """What does not depend on adapter parameters, computed without gradients; None if nothing does."""
        return None

    def forward_from_prefix(self, prefix: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Logits given ``frozen_prefix(x)``; equal to ``forward(x)`` (with prefix None it is forward(x))."""
        raise NotImplementedError

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Parameters whose names satisfy ``is_adapter_key`` (θ)."""
        return [p for name, p in self.named_parameters() if is_adapter_key(name)]

    def local_parameters(self) -> list[nn.Parameter]:
        """All other parameters (ω)."""
        return [p for name, p in self.named_parameters() if not is_adapter_key(name)]


class BranchModel(PersonalizedModel):
    """Placement "branch": ``F(x) = f_local(x) + (alpha/r) · g(x)`` with g the :class:`LoRABranch`."""

    placement = "branch"

    def __init__(
        self, local: FeatureClassifier, lora_branch: LoRABranch | TextLoRABranch, *, rank: int, alpha: float
    ) -> None:
        super().__init__(local, rank=rank, alpha=alpha)
        self.lora_branch = lora_branch

    def frozen_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The local logits: the branch's gradient never needs the local model's."""
        with torch.no_grad():
            logits: torch.Tensor = self.local(x)  # (B, num_classes)
        return logits

    def forward_from_prefix(self, prefix: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        logits = self.local(x) if prefix is None else prefix  # (B, num_classes)
        return logits + self.scaling * self.lora_branch(x)  # (B, num_classes)


class LayersModel(PersonalizedModel):
    """Placement "layers": LoRA wrappers on ``targets`` inside the local model."""

    placement = "layers"

    def __init__(self, local: FeatureClassifier, targets: Sequence[str], *, rank: int, alpha: float) -> None:
        super().__init__(local, rank=rank, alpha=alpha)
        self.targets = tuple(targets)
        head = local.HEAD_NAME
        self._head_only = all(t == head or t.startswith(head + ".") for t in self.targets)

    def frozen_prefix(self, x: torch.Tensor) -> torch.Tensor | None:
        """LoRA only on the head: the features. LoRA elsewhere (e.g. conv1): None, since the adapter's
        gradient needs the whole network."""
        if not self._head_only:
            return None
        with torch.no_grad():
            features: torch.Tensor = self.local.features(x)  # (B, feature_dim)
        return features

    def forward_from_prefix(self, prefix: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if prefix is None:
            logits: torch.Tensor = self.local(x)  # (B, num_classes)
            return logits
        if not self._head_only:
            raise ValueError("this model has no frozen prefix (frozen_prefix returns None); pass prefix=None")
        return self.local.head(prefix)  # (B, num_classes)


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter placement needs to know besides the model: the adapter's rank and alpha, the layers
    it targets, the data's shape, and the run's model settings (for text: the tokenizations of a batch)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    settings: ModelSettings = field(default_factory=ModelSettings)
    branch_family: str = ""
    """The family whose tokenization and token embeddings a text branch reads ("": the model's own)."""


Attach = Callable[[FeatureClassifier, AdapterSpec, torch.Generator], PersonalizedModel]


@dataclass(frozen=True)
class Placement:
    """One way of attaching the adapter: a ``PLACEMENTS`` entry."""

    attach: Attach
    """(model, spec, generator) -> the personalized model."""
    takes_targets: bool
    """Whether ``adapter.targets`` names layers for it (else targets are refused)."""


PLACEMENTS: Registry[Placement] = Registry("adapter.placement")
"""Every adapter placement, by name (the ``adapter.placement`` values)."""


def _attach_layers(model: FeatureClassifier, spec: AdapterSpec, generator: torch.Generator) -> LayersModel:
    """Wrap each of the targets in PEFT's LoRA layer *in place* (A factors drawn in module order)."""
    targets = validate_targets({"the local model": model}, spec.targets)
    inject_lora(model, targets, spec.rank, spec.alpha, generator)
    return LayersModel(model, targets, rank=spec.rank, alpha=spec.alpha)


def _attach_branch(model: FeatureClassifier, spec: AdapterSpec, generator: torch.Generator) -> BranchModel:
    """Leave ``model`` as it is and build a branch beside it: a :class:`LoRABranch` for images, a
    :class:`TextLoRABranch` on the branch family's tokenization for text (targets ignored)."""
    branch: LoRABranch | TextLoRABranch
    if len(spec.input_shape) == 3:
        branch = LoRABranch(spec.input_shape, spec.num_classes, spec.rank, generator)
    elif len(spec.input_shape) == 2 and isinstance(model, TransformerClassifier):
        family = spec.branch_family or model.family
        embedding = token_embeddings(family, spec.settings)
        branch = TextLoRABranch(
            embedding, view_of(family, spec.settings), spec.num_classes, spec.rank, generator
        )
    else:
        raise ConfigError(
            "adapter.placement 'branch' runs a small network beside the local model on images or on text; "
            f"this data has input shape {spec.input_shape}. Use 'layers' or 'head'."
        )
    return BranchModel(model, branch, rank=spec.rank, alpha=spec.alpha)


def _attach_head(model: FeatureClassifier, spec: AdapterSpec, generator: torch.Generator) -> LayersModel:
    """LoRA on the head alone (targets ignored)."""
    return _attach_layers(model, dataclasses.replace(spec, targets=(model.HEAD_NAME,)), generator)


PLACEMENTS.add("layers", Placement(_attach_layers, takes_targets=True))
PLACEMENTS.add("branch", Placement(_attach_branch, takes_targets=False))
PLACEMENTS.add("head", Placement(_attach_head, takes_targets=False))


def attach_adapter(
    model: FeatureClassifier,
    *,
    placement: str,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    input_shape: Sequence[int],
    num_classes: int,
    generator: torch.Generator,
    settings: ModelSettings | None = None,
    branch_family: str = "",
) -> PersonalizedModel:
    """Give ``model`` an adapter at ``placement`` (a ``PLACEMENTS`` name) and return the personalized model.

    "layers" wraps each of ``targets`` in PEFT's LoRA layer *in place* (in module order, drawing the A
    factors from ``generator``); check the targets across the federation's architectures with
    :func:`validate_targets` first. "branch" leaves ``model`` unwrapped, builds a branch for
    (``input_shape``, ``num_classes``, ``rank``; for text, on ``branch_family``'s tokenization, of the
    run's ``settings``) and ignores ``targets``.
    """
    chosen = PLACEMENTS[placement]
    check_rank_alpha(rank, alpha)
    shape = tuple(input_shape)
    if model.input_shape != shape or model.num_classes != num_classes:
        raise ConfigError(
            f"model was built for input_shape {model.input_shape} and {model.num_classes} classes, "
            f"not {shape} and {num_classes}"
        )
    if any(is_lora_layer(module) for module in model.modules()):
        raise ConfigError("model already carries LoRA layers")
    spec = AdapterSpec(
        rank, alpha, tuple(targets), shape, num_classes, settings or ModelSettings(), branch_family
    )
    return chosen.attach(model, spec, generator)


def _shape_or_none(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...] | None:
    return tuple(state[name].shape) if name in state else None


def check_homogeneous(states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Raise AdapterMismatchError unless every state has the same tensor names with the same shapes.

    ``states`` is keyed by architecture or client name. The one message names the first offending tensor
    and its shape (or absence) in each state, e.g. ``adapter tensor 'local.fc2.lora_A.default.weight'
    differs between clients: cnn1 (8, 2000), cnn3 (8, 1000)``, and counts any further offending tensors.
    """
    names: dict[str, None] = {}
    for state in states.values():
        names.update(dict.fromkeys(state))
    offending = []
    for name in names:
        shapes = {owner: _shape_or_none(state, name) for owner, state in states.items()}
        if len(set(shapes.values())) > 1:
            offending.append((name, shapes))
    if not offending:
        return
    name, shapes = offending[0]
    per_owner = ", ".join(
        f"{owner} {'missing' if shape is None else _format_shape(shape)}" for owner, shape in shapes.items()
    )
    more = f" (and {len(offending) - 1} more adapter tensors differ)" if len(offending) > 1 else ""
    raise AdapterMismatchError(f"adapter tensor {name!r} differs between clients: {per_owner}{more}")
