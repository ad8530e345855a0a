"""Text corpora as tensors: tokenizing a :class:`~pfedlora.data.corpora.TextCorpus` into a text
:class:`~pfedlora.data.datasets.Dataset`, once per run, by the tokenizer of each model family the run uses:
token ids and attention mask, padded or truncated to ``max_length``, as int32 (N, 2·V, max_length) tensors
in memory; batches are index slices, as for images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pfedlora.data.corpora import TextCorpus
from pfedlora.data.datasets import Dataset

Tokenizer = Any
"""A Hugging Face tokenizer (callable on a list of texts)."""


def tokenize_corpus(
    corpus: TextCorpus, tokenizer: Tokenizer | Sequence[Tokenizer | None], max_length: int
) -> Dataset:
    """``corpus`` as a text :class:`~pfedlora.data.datasets.Dataset`: int32 (N, 2·V, max_length), for each of
    the V tokenizers in turn (one, or a sequence: one per model family of the run) the token ids and the
    attention mask, padded and truncated to ``max_length`` (all zeros for a None: a view no model of this
    process reads). The samples, labels and sources are the same for every tokenizer, so a partition over
    samples gives every family the same split."""
    tokenizers: list[Tokenizer | None] = (
        list(tokenizer) if isinstance(tokenizer, list | tuple) else [tokenizer]
    )

    def encode(texts: Sequence[str]) -> torch.Tensor:
        views = []
        for each in tokenizers:
            if each is None:
                views += [torch.zeros(len(texts), max_length, dtype=torch.int64)] * 2
                continue
            batch = each(
                list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
            )
            views += [batch["input_ids"], batch["attention_mask"]]
        return torch.stack(views, dim=1).to(torch.int32)  # (N, 2·V, L)

    return Dataset(
        name=corpus.name,
        train_x=encode(corpus.train_texts),
        train_y=corpus.train_y,
        test_x=encode(corpus.test_texts),
        test_y=corpus.test_y,
        classes=corpus.classes,
        mean=(),
        std=(),
        kind="text",
        train_groups=corpus.train_groups,
        test_groups=corpus.test_groups,
        group_names=corpus.group_names,
    )
