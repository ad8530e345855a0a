"""The real Fashion-MNIST from Debian's dataset-fashion-mnist; CI installs it, so a missing copy fails."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from pfedlora.data import datasets
from pfedlora.data.datasets import load_dataset

logger = logging.getLogger(__name__)


def test_real_fashion_mnist_from_the_system_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", Path("/usr/share/datasets"))

    start = time.perf_counter()
    ds = load_dataset("fashion-mnist", download=False)  # verified against the official SHA-256 table
    logger.info("loaded the real Fashion-MNIST in %.2f s", time.perf_counter() - start)

    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.test_y), torch.full((10,), 1000))
    normalized = ds.normalize(ds.train_x[:10000])
    assert abs(normalized.mean().item()) < 0.02 and abs(normalized.std().item() - 1) < 0.02
