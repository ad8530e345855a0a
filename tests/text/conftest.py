"""Tiny randomly initialised BERT checkpoints and a tiny text dataset, made offline in a temporary folder."""

from pathlib import Path

import pytest

from pfedlora.config import ExperimentConfig, load_config
from pfedlora.data import Dataset
from pfedlora.testing import tiny_bert, tiny_llama, tiny_text_dataset

LM_LENGTH = 8
"""Tokens per sample of the tiny language-model runs."""


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def tiny_text() -> Dataset:
    return tiny_text_dataset()


@pytest.fixture(scope="session")
def causal_llama(tmp_path_factory) -> Path:
    """A tiny random causal Llama (2 layers, hidden 16, with its language-model head)."""
    return tiny_llama(tmp_path_factory.mktemp("causal-llama"), layers=2, hidden=16, causal_lm=True)


def lm_config(checkpoint: Path, *overrides: str) -> ExperimentConfig:
    """A fast language-modeling configuration of 4 clients of ranks 2 and 4 on ``checkpoint``."""
    return load_config(
        None,
        [
            "device=cpu",
            "data.task=language-modeling",
            "data.dataset=kjv",
            "data.partition=by-source",
            f"model.checkpoint={checkpoint}",
            f"model.max_length={LM_LENGTH}",
            "federation.architectures=hf-r2,hf-r4",
            "federation.num_clients=4",
            "federation.rounds=2",
            "federation.eval_every=1",
            "federation.sample_fraction=1.0",
            "adapter.rank=2",
            "train.batch_size=8",
            "train.local_steps=3",
            *overrides,
        ],
    )
