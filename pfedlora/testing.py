"""Helpers for tests and benchmark smoke runs: a tiny randomly initialised transformer checkpoint and a tiny
text dataset, made offline (no download, no real weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from pfedlora.data import Dataset
from pfedlora.models.transformer import _require_transformers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = ("in", "the", "beginning", "god", "created", "heaven", "and", "earth", "light", "was", "good")


def _save_tokenizer(folder: Path, extra_tokens: int = 0) -> list[str]:
    """A word-level tokenizer over the tiny vocabulary (plus ``extra_tokens`` unknown to any tiny model)."""
    words = [*SPECIAL_TOKENS, *WORDS, *(f"extra{i}" for i in range(extra_tokens))]
    transformers = _require_transformers()
    transformers.BertTokenizer(vocab={word: i for i, word in enumerate(words)}).save_pretrained(folder)
    return words


def tiny_bert(folder: Path, layers: int = 3, hidden: int = 16, extra_tokens: int = 0) -> Path:
    """A BERT of ``layers`` layers with random weights and a word-level tokenizer, saved like a hub folder.

    ``extra_tokens`` > 0 gives the tokenizer more tokens than the model embeds (a mismatched pair).
    """
    transformers = _require_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(folder, extra_tokens)
    config = transformers.BertConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(WORDS),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)  # only the checkpoint's own random weights, made once here
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def tiny_text_dataset(length: int = 8, per_split: int = 48, groups: int = 6, vocabulary: int = 0) -> Dataset:
    """Random token ids (``vocabulary`` ids, default the tiny BERT's words) with masks: 3 classes, ``groups``
    sources."""
    generator = torch.Generator().manual_seed(1)
    low = len(SPECIAL_TOKENS)
    high = vocabulary or low + len(WORDS)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.randint(low, high, (n, length), generator=generator)
        lengths = torch.randint(2, length + 1, (n,), generator=generator)
        mask = (torch.arange(length) < lengths[:, None]).to(torch.int64)
        source = torch.arange(n) % groups
        return torch.stack([ids * mask, mask], 1).to(torch.int32), source % 3, source

    train_x, train_y, train_groups = split(per_split)
    test_x, test_y, test_groups = split(per_split // 2)
    return Dataset(
        name="tiny-text",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=("a", "b", "c"),
        mean=(),
        std=(),
        kind="text",
        train_groups=train_groups,
        test_groups=test_groups,
        group_names=tuple(f"book{i}" for i in range(groups)),
    )


def tiny_llama(folder: Path, layers: int = 3, hidden: int = 16) -> Path:
    """A Llama-style decoder of ``layers`` layers with random weights (and the word-level tokenizer)."""
    transformers = _require_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    words = _save_tokenizer(folder)
    config = transformers.LlamaConfig(
        vocab_size=len(words),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)  # only the checkpoint's own random weights, made once here
    transformers.LlamaModel(config).save_pretrained(folder)
    return folder
