"""Tiny randomly initialised BERT checkpoints and a tiny text dataset, made offline in a temporary folder."""

from pathlib import Path

import pytest

from pfedlora.data import Dataset
from pfedlora.testing import tiny_bert, tiny_text_dataset


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def tiny_text() -> Dataset:
    return tiny_text_dataset()
