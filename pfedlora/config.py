"""Experiment configuration: frozen dataclasses, loaded from TOML and ``key=value`` overrides.

A configuration is a tree of sections (``[data]``, ``[federation]``, ``[train]``, ``[model]``,
``[adapter]``, ``[privacy]``, and one section of each algorithm's own options, e.g. ``[fedkd]``) under a
few top-level keys (``algorithm``, ``seed``, ``device``). Every value is validated once, here, and an error
names the bad key, the bad value and what is allowed; names of algorithms, datasets, partitions, models and
adapter placements are checked against their registries (:mod:`pfedlora.registry`). Nothing downstream
re-checks or copies these values onto objects."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import tomllib
import typing
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import tomli_w

from pfedlora.errors import ConfigError

if TYPE_CHECKING:
    from pfedlora.registry import Registry

logger = logging.getLogger(__name__)

PHASE_ORDERS: tuple[str, ...] = ("local-first", "adapter-first")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")
AGGREGATORS: tuple[str, ...] = ("mean", "median", "trimmed-mean")
"""``federation.aggregator`` values (:func:`pfedlora.algorithms.state.combine` implements them)."""
EVALUATION_PROTOCOLS: tuple[str, ...] = ("after-training", "after-download")
BATCH_ORDERS: tuple[str, ...] = ("reshuffle", "fixed")
SGD_KERNELS: tuple[str, ...] = ("fused", "foreach")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and how it is split among clients."""

    dataset: str = "fashion-mnist"
    """The dataset (``pfedlora list``): images (Fashion-MNIST, CIFAR) or text (the KJV, Debian's fortunes)."""
    task: str = "classification"
    """What the clients learn (``pfedlora.tasks.TASKS``): "classification", or "language-modeling" (each
    client's own text, scored by its perplexity; text datasets and ``<family>-r<k>`` architectures)."""
    data_dir: str = ""
    """Extra directory searched first (also ``--data-dir``); empty means the default lookup."""
    download: bool = True
    """Download the official archive (checksum-verified) when the data is nowhere local."""
    partition: str = "pathological"
    """How the data is split among clients: "pathological" (k classes each, the paper's), "dirichlet",
    "iid", or "by-source" (each client a seeded set of whole sources, e.g. books; text)."""
    classes_per_client: int = 5
    """k of the pathological partition."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet partition (smaller: more skewed)."""
    min_train_samples: int = 10
    """The fewest training samples a client may get (Dirichlet and by-source partitions)."""
    validation_fraction: float = 0.0
    """Share of each client's training data held out; when > 0 clients are evaluated on it, not on test."""
    max_eval_samples: int = 0
    """The most samples a client is scored on (a seeded subset of its test or validation split; 0: all)."""
    augment: str = "auto"
    """"auto" (random crop + flip for CIFAR, none for Fashion-MNIST), "on" or "off"."""


@dataclass(frozen=True)
class FederationConfig:
    """Clients, their architectures, the sampling and the schedule."""

    num_clients: int = 100
    """N, the clients in the federation."""
    sample_fraction: float = 0.1
    """C, the fraction of clients sampled each round."""
    rounds: int = 80
    """T, the communication rounds."""
    eval_every: int = 10
    """Clients are evaluated every this many rounds, and after the last."""
    architectures: tuple[str, ...] = ("cnn1", "cnn2", "cnn3", "cnn4", "cnn5")
    """Client i gets architectures[i mod len(architectures)] (the paper: cnn{(i mod 5)+1})."""
    target_accuracy: float = 0.8
    """Mean accuracy whose first crossing is reported with the rounds, bytes and FLOPs it took."""
    target_perplexity: float = 20.0
    """Language modeling: the mean perplexity whose first reaching (at or below) is reported so instead."""
    min_clients: int = 1
    """Fewest valid uploads a round aggregates; with fewer the global state stays unchanged."""
    drop_rate: float = 0.0
    """Probability that a sampled client drops out of a round (seeded): it receives but never replies."""
    checkpoint_every: int = 10
    """Rounds between crash-safe checkpoints of the whole run (0: none); ``pfedlora run --resume``."""
    client_memory_mb: float = 2048.0
    """Memory for the private states of clients between their rounds, per run (divided among worker
    processes; 0: no bound). Beyond it the least recently used go to the run directory's ``clients/``
    store and are read back when needed. Clients are created when first needed either way; the value
    changes where states live, never the results."""
    eval_sample: int = 0
    """Clients scored at the evaluations before the last round: a seeded sample of this many, drawn anew
    each time (0: every client). Every client is scored after the last round. For large federations."""
    evaluate: str = "after-training"
    """When a client is scored on evaluation rounds: "after-training" (what it holds at the end of its own
    last round; the protocol of the paper's authors) or "after-download" (every client first takes in the
    current global state, without training, as HtFLlib scores; training is unaffected)."""
    aggregator: str = "mean"
    """How uploads are combined tensor-wise: "mean" (sample-weighted, FedAvg), or the robust "median"
    (coordinate-wise) or "trimmed-mean" (``trim_fraction`` of the values dropped at each end), which
    ignore sample counts. Used by every algorithm that averages tensors (all but FedProto and FedGH)."""
    trim_fraction: float = 0.1
    """Share of the values dropped at each end per coordinate by the "trimmed-mean" aggregator."""
    weight_cap: float = 0.0
    """When >= 1, no upload weighs more than this multiple of the round's median sample count in the
    mean (0: off): a client that declares a huge count cannot dominate the average."""


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation (SGD), shared by every algorithm."""

    batch_size: int = 64
    """Samples per minibatch."""
    lr: float = 0.01
    """SGD learning rate of the local phase (and of the adapter phase unless ``adapter.lr``)."""
    momentum: float = 0.9
    """SGD momentum (a fresh optimizer each phase: momentum never carries across rounds or phases)."""
    weight_decay: float = 1e-3
    """SGD weight decay."""
    grad_clip: float = 50.0
    """The most the gradients' total norm may be at a step (clipped beyond)."""
    local_epochs: int = 1
    """Epochs of the local phase (of all of a round's training where an algorithm has one phase)."""
    local_steps: int = 0
    """When > 0, every private training phase runs exactly this many minibatch steps instead of
    ``local_epochs`` passes (passes repeat as needed): the cost of a round no longer grows with a client's
    data, as federated fine-tuning of large models usually runs."""
    batch_order: str = "reshuffle"
    """"reshuffle": a new seeded order of the client's samples every epoch; "fixed": index order every
    epoch (a DataLoader without shuffling), to compare with peers that train so."""
    drop_last: bool = False
    """Drop each epoch's last, smaller batch (never a client's only one)."""
    precision: str = "fp32"
    """"fp32"; "bf16": forward passes and losses under bfloat16 autocast (weights, updates stay fp32; a
    frozen pretrained language model is kept in bf16); "auto": bf16 where it is faster than fp32 (a CUDA GPU
    with bf16, a CPU with AMX tiles), else fp32, decided by each process on its own device."""
    channels_last: bool = True
    """Images and convolution weights in the channels-last memory format (faster pooling and convolutions on
    CPU); false keeps PyTorch's default (NCHW) layout."""
    sgd_kernel: str = "fused"
    """"fused": one pass over each tensor per step (PyTorch's fused SGD; the same update up to rounding in
    the last bit); "foreach": the multi-tensor update bit for bit equal to the per-parameter loop of
    earlier versions."""


@dataclass(frozen=True)
class ModelConfig:
    """Settings of the model families beyond the CNNs (transformer clients, SPEC §7)."""

    checkpoint: str = ""
    """Hugging Face model directory (or hub id, when online) that the ``hf-l<k>`` architectures are cut
    from; the ``minilm-l<k>`` architectures use the bundled all-MiniLM-L6-v2."""
    max_length: int = 64
    """Tokens per text sample (longer ones are truncated, shorter ones padded)."""
    trainable_layers: int = -1
    """What private training may change in a transformer client: -1 everything, k >= 0 the top k layers
    and the head (0: the head alone); the rest stays as pretrained."""
    pooling: str = "auto"
    """How a transformer client pools its last hidden states into one feature: "mean" over the real
    tokens, "last" (the last real token, as transformers' ``*ForSequenceClassification`` heads of decoders
    do), or "auto" (each family's default: see ``pfedlora list``)."""
    feature_dim: int = 256
    """Width of the common feature space where a federation mixes transformer families of different widths:
    every client then projects its pooled feature to it with a private linear layer (single-width
    federations keep their own width, no projection)."""


@dataclass(frozen=True)
class AdapterConfig:
    """pFedLoRA's homogeneous low-rank adapter (SPEC §2.1)."""

    placement: str = "branch"
    """Where the adapter sits: "branch" (a low-rank side network whose logits are added), "layers" (LoRA
    on layers of the local model) or "head" (LoRA on the head alone)."""
    rank: int = 8
    """r, the adapter's rank."""
    alpha: float = 0.0
    """LoRA alpha; 0 means the default 2·rank."""
    lr: float = 0.0
    """Adapter-phase learning rate; 0 means train.lr."""
    targets: tuple[str, ...] = ()
    """Layers to adapt (placement "layers"); empty means every layer homogeneous across the federation."""
    epochs: int = 1
    """Epochs of the adapter phase."""
    phase_order: str = "local-first"
    """Which phase of a round comes first: "local-first" (the paper's) or "adapter-first"."""
    branch_family: str = ""
    """Text clients, placement "branch": the model family whose tokenizer and frozen token embeddings the
    shared branch reads ("" : the family of the first transformer architecture)."""

    @property
    def effective_alpha(self) -> float:
        return self.alpha if self.alpha > 0 else 2.0 * self.rank


def option(
    default: Any,
    *,
    low: float | None = None,
    high: float = math.inf,
    low_inclusive: bool = True,
    choices: tuple[str, ...] = (),
    models: bool = False,
) -> Any:
    """A field of an algorithm's options, with what :func:`validate` allows: a range ``low`` to ``high``
    (``high`` included; ``low`` where ``low_inclusive``), a tuple of ``choices``, or any registered model
    name (``models``)."""
    metadata: dict[str, Any] = {"choices": choices, "models": models}
    if low is not None:
        metadata["range"] = (low, high, low_inclusive)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class AlgorithmOptions:
    """Base of an algorithm's own options (a frozen dataclass registered with the algorithm as its
    ``options_type``): the fields of the ``[<algorithm>]`` section, declared with :func:`option`. A field
    named ``lambda_`` is the key ``lambda``."""

    def check(self) -> None:
        """Refuse (ConfigError) values that are each allowed but not together; by default nothing."""


@dataclass(frozen=True)
class SharedModelOptions(AlgorithmOptions):
    """Options of an algorithm whose clients share a small homogeneous model beside their private one."""

    shared_arch: str = option("cnn5", models=True)
    """The architecture of the shared model (its tokenizer is read where it is a transformer)."""


def option_key(name: str) -> str:
    """The configuration key of the options field ``name`` (``lambda_`` -> ``lambda``)."""
    return name.rstrip("_")


class OptionSections(Mapping[str, AlgorithmOptions]):
    """Every registered algorithm's options, by algorithm name (read-only, comparable, hashable)."""

    def __init__(self, sections: Mapping[str, AlgorithmOptions]) -> None:
        self._sections = dict(sections)

    def __getitem__(self, name: str) -> AlgorithmOptions:
        return self._sections[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sections)

    def __len__(self) -> int:
        return len(self._sections)

    def __hash__(self) -> int:
        return hash(tuple(self._sections.items()))

    def __repr__(self) -> str:
        return f"OptionSections({self._sections!r})"

    def replaced(self, name: str, options: AlgorithmOptions) -> OptionSections:
        """A copy with ``name``'s options replaced."""
        return OptionSections({**self._sections, name: options})


def option_classes() -> dict[str, type[AlgorithmOptions]]:
    """The options class of every registered algorithm that has options, by algorithm name."""
    from pfedlora.algorithms import ALGORITHMS

    return {
        name: cls.options_type for name, cls in ALGORITHMS.items() if dataclasses.fields(cls.options_type)
    }


def default_options() -> OptionSections:
    """Every registered algorithm's options at their defaults."""
    return OptionSections({name: cls() for name, cls in option_classes().items()})


@dataclass(frozen=True)
class PrivacyConfig:
    """Central differential privacy with client-side clipping (off while ``clip_norm`` is 0)."""

    clip_norm: float = 0.0
    """Each client's update (upload minus what it received) is scaled to L2 norm at most this."""
    noise_multiplier: float = 0.0
    """The server adds N(0, (noise_multiplier · clip_norm / m)²) to the mean of m clipped updates."""
    delta: float = 1e-5
    """δ of the (ε, δ) reported by the accountant (keep it well below 1 / num_clients)."""

    @property
    def enabled(self) -> bool:
        return self.clip_norm > 0


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: the algorithm, its seed and every section."""

    algorithm: str = "pfedlora"
    """pFedLoRA or another algorithm (``pfedlora list``)."""
    seed: int = 0
    """Seeds the partition, model initialisation, client sampling and batch order (never the global RNG)."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    options: OptionSections = field(default_factory=default_options)
    """Each algorithm's own options (the ``[<algorithm>]`` sections, e.g. ``[fedkd] energy_start``)."""

    def architecture_of(self, client_id: int) -> str:
        """The architecture name of client ``client_id``."""
        archs = self.federation.architectures
        return archs[client_id % len(archs)]

    @property
    def algorithm_options(self) -> AlgorithmOptions:
        """The options of the run's own algorithm (an empty :class:`AlgorithmOptions` where it has none)."""
        return self.options.get(self.algorithm, AlgorithmOptions())

    @property
    def adapter_lr(self) -> float:
        return self.adapter.lr if self.adapter.lr > 0 else self.train.lr

    @property
    def eval_split(self) -> Literal["validation", "test"]:
        """The split clients are evaluated on: validation when one is carved, else test."""
        return "validation" if self.data.validation_fraction > 0 else "test"


# Allowed values and ranges, checked after parsing. Ranges are (low, high, low_inclusive).
_CHOICES: dict[str, tuple[str, ...]] = {
    "device": DEVICES,
    "data.augment": ("auto", "on", "off"),
    "adapter.phase_order": PHASE_ORDERS,
    "train.precision": PRECISIONS,
    "train.batch_order": BATCH_ORDERS,
    "train.sgd_kernel": SGD_KERNELS,
    "federation.aggregator": AGGREGATORS,
    "federation.evaluate": EVALUATION_PROTOCOLS,
    "model.pooling": ("auto", "mean", "last"),
}


def _registries(task: str = "classification") -> dict[str, Registry[Any]]:
    """Config key -> the registry its value (or, for a list, each member) must be in (the architectures:
    those of ``task``, e.g. ``<family>-r<k>`` for language modeling)."""
    # Imported here, not at the top: the registered modules themselves import this one.
    from pfedlora.algorithms import ALGORITHMS
    from pfedlora.data import DATASETS, PARTITIONS
    from pfedlora.models import MODELS, PLACEMENTS
    from pfedlora.models.causal_lm import LANGUAGE_MODELS
    from pfedlora.tasks import TASKS

    return {
        "data.task": TASKS,
        "algorithm": ALGORITHMS,
        "data.dataset": DATASETS,
        "data.partition": PARTITIONS,
        "federation.architectures": LANGUAGE_MODELS if TASKS[task].generative else MODELS,
        "adapter.placement": PLACEMENTS,
    }


_INF = float("inf")
_RANGES: dict[str, tuple[float, float, bool]] = {
    "seed": (0, 2**63 - 1, True),
    "data.classes_per_client": (1, _INF, True),
    "data.dirichlet_alpha": (0, _INF, False),
    "data.min_train_samples": (1, _INF, True),
    "data.validation_fraction": (0, 0.5, True),
    "data.max_eval_samples": (0, _INF, True),
    "federation.num_clients": (1, _INF, True),
    "federation.sample_fraction": (0, 1, False),
    "federation.rounds": (1, _INF, True),
    "federation.eval_every": (1, _INF, True),
    "federation.eval_sample": (0, _INF, True),
    "federation.client_memory_mb": (0, _INF, True),
    "federation.target_accuracy": (0, 1, True),
    "federation.target_perplexity": (1, _INF, True),
    "federation.min_clients": (1, _INF, True),
    "federation.drop_rate": (0, 1, True),
    "federation.checkpoint_every": (0, _INF, True),
    "federation.trim_fraction": (0, 0.5, True),
    "federation.weight_cap": (0, _INF, True),
    "train.batch_size": (1, _INF, True),
    "train.lr": (0, _INF, False),
    "train.momentum": (0, 1, True),
    "train.weight_decay": (0, _INF, True),
    "train.grad_clip": (0, _INF, False),
    "train.local_epochs": (0, _INF, True),
    "train.local_steps": (0, _INF, True),
    "model.max_length": (2, _INF, True),
    "model.trainable_layers": (-1, _INF, True),
    "model.feature_dim": (1, _INF, True),
    "adapter.rank": (1, _INF, True),
    "adapter.alpha": (0, _INF, True),
    "adapter.lr": (0, _INF, True),
    "adapter.epochs": (0, _INF, True),
    "privacy.clip_norm": (0, _INF, True),
    "privacy.noise_multiplier": (0, _INF, True),
    "privacy.delta": (0, 1, False),
}


def _describe_type(tp: Any) -> str:
    if get_origin(tp) is tuple:
        member = get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(member, str(member))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _bound(value: float) -> str:
    """A range's end in words: ``inf``, an integer, ``2^63 - 1`` (the largest seed) or a number."""
    if value == _INF:
        return "inf"
    if value == 2**63 - 1:
        return "2^63 - 1"
    return f"{value:g}"


def _describe_range(low: float, high: float, low_inclusive: bool) -> str:
    """``[low, high]``, with ``(`` where ``low`` is excluded and ``inf)`` where there is no upper end."""
    return f"{'[' if low_inclusive else '('}{_bound(low)}, {_bound(high)}{')' if high == _INF else ']'}"


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted where floats are expected."""
    if get_origin(tp) is tuple:
        (item_type,) = {a for a in get_args(tp) if a is not Ellipsis}
        if isinstance(value, str):  # "cnn1,cnn2" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected {_describe_type(tp)}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: {value!r} is not a finite number; nan and inf are never allowed")
            return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_describe_type(tp)}, got {value!r}")


def _section_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {option_key(name): f for name, f in _section_fields(cls).items()}
    sections = option_classes() if cls is ExperimentConfig else {}
    options: dict[str, AlgorithmOptions] = {}
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name in sections:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a section (table) of {name}'s options, got {value!r}")
            options[name] = _build(sections[name], value, f"{key}.")
            continue
        if name not in fields or (sections and fields[name].name == "options"):
            allowed = ", ".join(f"{prefix}{f}" for f in fields if not (sections and f == "options"))
            if sections:
                allowed += f"; sections of an algorithm's options: {', '.join(sections)}"
            raise ConfigError(f"unknown key {key!r}; allowed keys here: {allowed}")
        field_name = fields[name].name
        tp = hints[field_name]
        if _is_section(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a section (table) of keys, got {value!r}")
            kwargs[field_name] = _build(tp, value, f"{key}.")
        else:
            kwargs[field_name] = _coerce(key, value, tp)
    if sections:
        given = {name: options[name] if name in options else kind() for name, kind in sections.items()}
        kwargs["options"] = OptionSections(given)
    return cls(**kwargs)


def flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every value of ``config`` (or of one section) by its dotted key, e.g. ``{"train.lr": 0.01, ...}``; an
    algorithm's options under its name (``"fedkd.energy_start"``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, OptionSections):
            for name, options in value.items():
                out.update(flat_config(options, f"{prefix}{name}."))
        elif dataclasses.is_dataclass(value):
            out.update(flat_config(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{option_key(f.name)}"] = value
    return out


def allowed_values(declared: dataclasses.Field) -> str:
    """What an options field allows, in words (for ``pfedlora list``): its range, choices or "a model"."""
    meta = declared.metadata
    if meta.get("choices"):
        return ", ".join(meta["choices"])
    if meta.get("models"):
        return "a model name (see models)"
    if "range" in meta:
        return _describe_range(*meta["range"])
    return "any"


def _compact_names(names: Sequence[str]) -> str:
    """``names`` joined by commas, each run of three or more numbered names written as its ends
    (``cnn1 … cnn5``, ``smollm2-l1 … smollm2-l30``)."""
    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for name in names:
        match = re.fullmatch(r"(.*?)(\d+)", name)
        prefix = match.group(1) if match else name
        if prefix not in groups:
            groups[prefix] = []
            order.append(prefix)
        if match:
            groups[prefix].append(int(match.group(2)))
    parts: list[str] = []
    for prefix in order:
        numbers = groups[prefix]
        if not numbers:
            parts.append(prefix)
        elif len(numbers) >= 3 and numbers == list(range(numbers[0], numbers[-1] + 1)):
            parts.append(f"{prefix}{numbers[0]} … {prefix}{numbers[-1]}")
        else:
            parts.extend(f"{prefix}{n}" for n in numbers)
    return ", ".join(parts)


def key_allowed_values(key: str) -> str:
    """What the configuration key ``key`` of a section (``train.lr``, ``data.partition``) allows, in words:
    its choices, the names registered for it, its range, or its type (for the configuration reference)."""
    registry = _registries().get(key)
    if registry is not None:
        return _compact_names(list(registry))
    if key in _CHOICES:
        return ", ".join(_CHOICES[key])
    section, _, name = key.rpartition(".")
    cls = typing.get_type_hints(ExperimentConfig)[section] if section else ExperimentConfig
    kind = _describe_type(typing.get_type_hints(cls)[name])
    if key in _RANGES:
        return f"{kind} in {_describe_range(*_RANGES[key])}"
    return kind


def _option_fields(config: ExperimentConfig) -> Iterator[tuple[str, Any, dataclasses.Field]]:
    """Every algorithm's options field: its key, its value and its declaration."""
    for name, options in config.options.items():
        for f in dataclasses.fields(options):
            yield f"{name}.{option_key(f.name)}", getattr(options, f.name), f


def differences(before: ExperimentConfig, now: ExperimentConfig, ignore: Collection[str] = ()) -> str:
    """The keys (but those in ``ignore``) whose values differ, as ``"train.lr 0.05 -> 0.07; ..."``."""
    old, new = flat_config(before), flat_config(now)
    changed = [key for key in new if key not in ignore and old[key] != new[key]]
    return "; ".join(f"{key} {old[key]!r} -> {new[key]!r}" for key in changed)


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Check choices, ranges and combinations; return ``config`` unchanged or raise ConfigError."""
    flat = flat_config(config)
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"{key}: unknown value {flat[key]!r}; allowed: {', '.join(allowed)}")
    from pfedlora.tasks import TASKS

    registries = _registries(TASKS.get(config.data.task).name)
    for key, registry in registries.items():
        value = flat[key]
        if isinstance(value, tuple):
            if not value:
                raise ConfigError(f"{key}: must not be empty; allowed members: {', '.join(registry)}")
            for item in value:
                registry.get(item, key)
        else:
            registry.get(value, key)
    for key, (low, high, low_inclusive) in _RANGES.items():
        _check_range(key, flat[key], low, high, low_inclusive)
    source = registries["data.dataset"][config.data.dataset]
    if TASKS[config.data.task].generative and source.kind != "text":
        text = ", ".join(name for name, each in registries["data.dataset"].items() if each.kind == "text")
        raise ConfigError(
            f"data.task {config.data.task!r} needs a text dataset ({text}); {config.data.dataset!r} holds "
            f"{source.kind}s"
        )
    algorithms = registries["algorithm"]
    if config.data.task not in algorithms[config.algorithm].tasks:
        serving = [name for name, cls in algorithms.items() if config.data.task in cls.tasks]
        raise ConfigError(
            f"algorithm {config.algorithm!r} does not serve data.task {config.data.task!r}; algorithms that "
            f"do: {', '.join(serving)}"
        )
    placements = registries["adapter.placement"]
    generative = TASKS[config.data.task].generative  # a language model's adapters take targets anyway
    if config.adapter.targets and not generative and not placements[config.adapter.placement].takes_targets:
        with_targets = " or ".join(repr(name) for name, p in placements.items() if p.takes_targets)
        raise ConfigError(
            f"adapter.targets applies only to adapter.placement = {with_targets} (placement "
            f"{config.adapter.placement!r} adapts no layer); got targets {list(config.adapter.targets)} "
            f"with placement {config.adapter.placement!r}"
        )
    for key, value, declared in _option_fields(config):
        choices = declared.metadata.get("choices", ())
        if choices and value not in choices:
            raise ConfigError(f"{key}: unknown value {value!r}; allowed: {', '.join(choices)}")
        if declared.metadata.get("models"):
            _models().get(value, key)
        if "range" in declared.metadata:
            _check_range(key, value, *declared.metadata["range"])
    for options in config.options.values():
        options.check()
    if config.privacy.noise_multiplier > 0 and not config.privacy.enabled:
        raise ConfigError(
            f"privacy.noise_multiplier = {config.privacy.noise_multiplier} needs privacy.clip_norm > 0: "
            "the noise is scaled to the clipping bound"
        )
    if config.privacy.enabled and config.federation.aggregator != "mean":
        raise ConfigError(
            f"federation.aggregator = {config.federation.aggregator!r} with privacy: the noise is calibrated "
            "to the mean of clipped updates; use aggregator = 'mean' with privacy.clip_norm > 0"
        )
    if config.train.local_epochs + config.adapter.epochs == 0:
        raise ConfigError("train.local_epochs and adapter.epochs are both 0: nothing would be trained")
    _check_federation(config.federation)
    return config


def _check_range(key: str, value: float, low: float, high: float, low_inclusive: bool) -> None:
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high:
        allowed = _describe_range(low, high, low_inclusive)
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: {allowed}")


def _models() -> Registry[Any]:
    from pfedlora.models import MODELS

    return MODELS


def clients_per_round(num_clients: int, fraction: float) -> int:
    """max(1, round(C · N)) clients take part in a round."""
    return max(1, min(num_clients, round(fraction * num_clients)))


def _check_federation(fed: FederationConfig) -> None:
    """Refuse a schedule under which no round could ever aggregate; warn where few would."""
    sampled = clients_per_round(fed.num_clients, fed.sample_fraction)
    if fed.min_clients > sampled:
        raise ConfigError(
            f"federation.min_clients = {fed.min_clients} exceeds the {sampled} client(s) sampled per round "
            f"(num_clients {fed.num_clients} × sample_fraction {fed.sample_fraction:g}): no round could "
            f"aggregate; allowed: 1 to {sampled}"
        )
    if 0 < fed.weight_cap < 1:
        raise ConfigError(
            f"federation.weight_cap: {fed.weight_cap:g} would cap even the median client; allowed: 0 (off) "
            "or a multiple of the median sample count >= 1"
        )
    if fed.trim_fraction == 0.5:
        raise ConfigError("federation.trim_fraction: 0.5 would drop every value; allowed: [0, 0.5)")
    if fed.eval_sample > fed.num_clients:
        raise ConfigError(
            f"federation.eval_sample: {fed.eval_sample} exceeds the {fed.num_clients} clients; allowed: 0 "
            f"(every client) to {fed.num_clients}"
        )
    if fed.drop_rate == 1:
        raise ConfigError("federation.drop_rate = 1: every sampled client would drop out; allowed: [0, 1)")
    expected = sampled * (1 - fed.drop_rate)
    if fed.drop_rate > 0 and expected < fed.min_clients:
        logger.warning(
            "federation.drop_rate = %g leaves %.1f of %d sampled clients per round on average, fewer than "
            "federation.min_clients = %d: most rounds will leave the global state unchanged",
            fed.drop_rate,
            expected,
            sampled,
            fed.min_clients,
        )


def config_from_dict(values: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate a configuration from nested mappings (as TOML gives); a ``[baselines]`` section of
    earlier versions is read as the algorithms' options it held (:data:`BASELINES_KEYS`)."""
    return validate(_build(ExperimentConfig, _without_baselines(values), ""))


BASELINES_KEYS: dict[str, tuple[str, ...]] = {
    "shared_arch": ("fml.shared_arch", "fedkd.shared_arch", "fedapen.shared_arch"),
    "kl_reduction": ("fml.kl_reduction", "fedkd.kl_reduction", "fedapen.kl_reduction"),
    "fml_alpha": ("fml.alpha",),
    "fml_beta": ("fml.beta",),
    "fedkd_energy_start": ("fedkd.energy_start",),
    "fedkd_energy_end": ("fedkd.energy_end",),
    "fedgh_server_lr": ("fedgh.server_lr",),
    "fedgh_server_epochs": ("fedgh.server_epochs",),
    "fedproto_lambda": ("fedproto.lambda",),
    "fedapen_holdout_fraction": ("fedapen.holdout_fraction",),
    "fedapen_lambda_epochs": ("fedapen.lambda_epochs",),
    "fedapen_lambda_lr": ("fedapen.lambda_lr",),
}
"""The keys of the ``[baselines]`` section that earlier versions had (their run directories, commands and
search axes still say ``baselines.fml_alpha``), each with the algorithms' option keys it now is."""


def _without_baselines(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """``values`` with a ``[baselines]`` section moved into the algorithms' sections it now belongs to (a
    key given in both places must agree)."""
    legacy = values.get("baselines")
    if legacy is None:
        return values
    if not isinstance(legacy, Mapping):
        raise ConfigError(f"baselines: expected a section (table) of keys, got {legacy!r}")
    tree = copy.deepcopy({k: v for k, v in values.items() if k != "baselines"})
    for name, value in legacy.items():
        if name not in BASELINES_KEYS:
            raise ConfigError(
                f"unknown key 'baselines.{name}'; the [baselines] section of earlier versions held "
                f"{', '.join(BASELINES_KEYS)} (today each algorithm's own section: `pfedlora list`)"
            )
        for target in BASELINES_KEYS[name]:
            section, key = target.split(".")
            node = tree.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{section}: expected a section (table) of {section}'s options")
            if key in node and node[key] != value:
                raise ConfigError(
                    f"baselines.{name} = {value!r} and {target} = {node[key]!r} disagree; {target} is "
                    "today's key: give it alone"
                )
            node[key] = value
    return tree


EARLIER_BEHAVIOUR: dict[str, Any] = {"train.sgd_kernel": "foreach"}
"""Keys added after runs had been written, each with the value that does what those runs did (the default
of a new key may differ from it): a run's stored configuration that lacks such a key gets this value."""


def run_config_from_dict(values: Mapping[str, Any]) -> ExperimentConfig:
    """The configuration a run was written under (its ``config.toml`` or a checkpoint's copy), read as
    :func:`config_from_dict` does, except that a key the run's version did not have yet takes the value
    that reproduces that run (:data:`EARLIER_BEHAVIOUR`), not today's default."""
    tree = copy.deepcopy(dict(values))
    for key, value in EARLIER_BEHAVIOUR.items():
        *sections, name = key.split(".")
        node: Any = tree
        for section in sections:
            node = node.setdefault(section, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):  # else malformed: config_from_dict names what is wrong
            node.setdefault(name, value)
    return config_from_dict(tree)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """Split ``"train.lr=0.05"`` into its key path and a TOML-typed value (bare words are strings)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} is not of the form key=value (e.g. train.lr=0.05)")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def _read_toml(path: str | Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from err


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a TOML file (optional), apply ``key=value`` overrides, validate, and return the config."""
    tree: dict[str, Any] = {} if path is None else _read_toml(path)
    for assignment in overrides:
        key_path, value = parse_override(assignment)
        _set_path(tree, key_path, value)
    return config_from_dict(tree)


def load_run_config(path: str | Path) -> ExperimentConfig:
    """A run directory's ``config.toml`` (see :func:`run_config_from_dict`)."""
    return run_config_from_dict(_read_toml(path))


def config_to_dict(config: Any) -> dict[str, Any]:
    """Nested plain-data form of ``config`` (an ExperimentConfig or one of its sections; tuples as lists),
    the inverse of :func:`config_from_dict`. Of the algorithms' options, the run's own algorithm's section
    and any other that differs from its defaults."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        return value

    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, OptionSections):
            for name, options in value.items():
                if name == config.algorithm or options != type(options)():
                    out[name] = config_to_dict(options)
        elif dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        else:
            out[option_key(f.name)] = plain(value)
    return out


def config_to_toml(config: ExperimentConfig) -> str:
    """The resolved configuration as TOML text, loadable by :func:`load_config`."""
    return tomli_w.dumps(config_to_dict(config))


def replace(config: ExperimentConfig, **sections: Any) -> ExperimentConfig:
    """Return a validated copy with top-level fields or whole sections replaced."""
    return validate(dataclasses.replace(config, **sections))


def with_options(config: ExperimentConfig, algorithm: str, **values: Any) -> ExperimentConfig:
    """A validated copy with some of ``algorithm``'s options replaced."""
    options = dataclasses.replace(config.options[algorithm], **values)
    return replace(config, options=config.options.replaced(algorithm, options))


__all__ = [
    "PHASE_ORDERS",
    "AdapterConfig",
    "AlgorithmOptions",
    "DataConfig",
    "ExperimentConfig",
    "FederationConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_toml",
    "differences",
    "flat_config",
    "load_config",
    "load_run_config",
    "option",
    "run_config_from_dict",
    "validate",
    "with_options",
]
