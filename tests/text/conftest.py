"""Tiny randomly initialised BERT checkpoints and a tiny text dataset, made offline in a temporary folder."""

from pathlib import Path

import pytest
import torch
import transformers

from pfedlora.data import Dataset

WORDS = [
    "in",
    "the",
    "beginning",
    "god",
    "created",
    "heaven",
    "and",
    "earth",
    "light",
    "was",
    "good",
    "blessed",
    "are",
    "they",
    "law",
    "of",
    "lord",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_checkpoint(folder: Path, layers: int = 3, hidden: int = 16, extra_tokens: int = 0) -> Path:
    """A BERT of ``layers`` layers with random weights and a word-level tokenizer, saved like a hub folder."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [*SPECIAL, *WORDS]
    words = vocab + [f"extra{i}" for i in range(extra_tokens)]  # extras: a tokenizer larger than the model
    tokenizer = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(words)})
    tokenizer.save_pretrained(folder)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)  # only for the checkpoint's own weights, made once here
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-bert"))


def tiny_text_dataset(length: int = 8, per_split: int = 48, groups: int = 6) -> Dataset:
    """Random token ids (real words) with masks: 3 classes, ``groups`` sources."""
    generator = torch.Generator().manual_seed(1)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.randint(len(SPECIAL), len(SPECIAL) + len(WORDS), (n, length), generator=generator)
        lengths = torch.randint(2, length + 1, (n,), generator=generator)
        mask = (torch.arange(length) < lengths[:, None]).to(torch.int64)
        ids = ids * mask  # [PAD] = 0 after the text
        source = torch.arange(n) % groups
        return torch.stack([ids, mask], 1).to(torch.int32), source % 3, source

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


@pytest.fixture
def tiny_text() -> Dataset:
    return tiny_text_dataset()
