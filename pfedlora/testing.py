"""Helpers for tests and benchmark smoke runs: a tiny randomly initialised transformer checkpoint and a tiny
text dataset, made offline (no download, no real weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pfedlora.data import ClientData, Dataset, build_client_data, make_partition
from pfedlora.data.corpora import TextCorpus
from pfedlora.models.transformer import require_transformers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = ("in", "the", "beginning", "god", "created", "heaven", "and", "earth", "light", "was", "good")


def _save_tokenizer(folder: Path, extra_tokens: int = 0) -> list[str]:
    """A word-level tokenizer over the tiny vocabulary (plus ``extra_tokens`` unknown to any tiny model)."""
    words = [*SPECIAL_TOKENS, *WORDS, *(f"extra{i}" for i in range(extra_tokens))]
    transformers = require_transformers()
    transformers.BertTokenizer(vocab={word: i for i, word in enumerate(words)}).save_pretrained(folder)
    return words


def tiny_bert(folder: Path, layers: int = 3, hidden: int = 16, extra_tokens: int = 0) -> Path:
    """A BERT of ``layers`` layers with random weights and a word-level tokenizer, saved like a hub folder.

    ``extra_tokens`` > 0 gives the tokenizer more tokens than the model embeds (a mismatched pair).
    """
    transformers = require_transformers()
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


OWN_SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>")
OWN_WORDS = (*reversed(WORDS), "firmament", "waters", "darkness", "deep")


def _save_own_tokenizer(folder: Path) -> list[str]:
    """A word-level fast tokenizer of another vocabulary than the tiny BERT's (other ids, other size, other
    special tokens), as a decoder family of its own would have."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    transformers = require_transformers()
    words = [*OWN_SPECIAL_TOKENS, *OWN_WORDS]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    return words


def tiny_llama(
    folder: Path, layers: int = 3, hidden: int = 16, own_tokenizer: bool = False, causal_lm: bool = False
) -> Path:
    """A Llama-style decoder of ``layers`` layers with random weights, with the tiny BERT's word-level
    tokenizer or (``own_tokenizer``) one of its own vocabulary; with ``causal_lm`` a whole causal LM (with its
    language-model head), else the bare decoder stack."""
    transformers = require_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    words = _save_own_tokenizer(folder) if own_tokenizer else _save_tokenizer(folder)
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
    model = transformers.LlamaForCausalLM(config) if causal_lm else transformers.LlamaModel(config)
    model.save_pretrained(folder)
    return folder


def tiny_corpus(per_split: int = 60, groups: int = 6, seed: int = 0) -> TextCorpus:
    """Short sentences of the tiny words, labelled by source (3 classes over ``groups`` sources), so that
    different tokenizers make different token ids of the same texts."""
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor]:
        lengths = torch.randint(2, 7, (n,), generator=generator).tolist()
        texts = tuple(
            " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=generator))
            for k in lengths
        )
        sources = torch.arange(n) % groups
        return texts, sources % 3, sources

    train_texts, train_y, train_groups = split(per_split)
    test_texts, test_y, test_groups = split(per_split // 2)
    return TextCorpus(
        "tiny-corpus",
        train_texts,
        train_y,
        train_groups,
        test_texts,
        test_y,
        test_groups,
        ("a", "b", "c"),
        tuple(f"book{i}" for i in range(groups)),
    )


def whole_client_data(dataset: Dataset) -> ClientData:
    """All of ``dataset`` (its training and test samples) as the data of one client, unaugmented."""
    partition = make_partition(
        "iid",
        dataset.train_y.numpy(),
        dataset.test_y.numpy(),
        1,
        np.random.default_rng(0),
        classes_per_client=1,
        alpha=1.0,
        min_train_samples=1,
    )
    return build_client_data(dataset, partition, augment=False)[0]
