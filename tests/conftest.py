"""Shared fixtures: a tiny learnable dataset in memory and a small, fast configuration."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from pfedlora.config import ExperimentConfig, load_config
from pfedlora.data import Dataset
from pfedlora.simulation import federation

# Runs train their clients in this process unless a test asks for worker processes (spawning them costs
# seconds a run, and tests compare runs with in-process references).
os.environ.setdefault("PFEDLORA_WORKERS", "0")

# Under pytest-xdist the cores are divided between the test processes, and the processes they start inherit
# their share (two processes that each take every core slow each other down many times over).
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    _threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def make_tiny_dataset(
    num_train: int = 400, num_test: int = 200, num_classes: int = 4, seed: int = 0
) -> Dataset:
    """1×28×28 images: class c lights a 6×6 square at its own place, plus noise; learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % num_classes
        images = torch.randint(0, 60, (n, 1, 28, 28), generator=generator, dtype=torch.uint8)
        for c in range(num_classes):
            row, col = 4 + 12 * (c // 2), 4 + 12 * (c % 2)
            images[labels == c, :, row : row + 6, col : col + 6] = 220
        return images, labels

    train_x, train_y = split(num_train)
    test_x, test_y = split(num_test)
    return Dataset(
        name="tiny",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=tuple(f"c{i}" for i in range(num_classes)),
        mean=(0.2,),
        std=(0.3,),
    )


@pytest.fixture(scope="session")
def tiny_dataset() -> Dataset:
    return make_tiny_dataset()


TINY_OVERRIDES = (
    "device=cpu",
    "federation.num_clients=5",
    "federation.sample_fraction=0.6",
    "federation.rounds=3",
    "federation.eval_every=1",
    "data.partition=pathological",
    "data.classes_per_client=2",
    "train.batch_size=16",
    "train.lr=0.05",
    "adapter.rank=2",
)


@pytest.fixture
def tiny_config() -> Callable[..., ExperimentConfig]:
    """``tiny_config("adapter.placement=branch", ...)``: a fast config, with extra overrides."""

    def build(*overrides: str) -> ExperimentConfig:
        return load_config(None, [*TINY_OVERRIDES, *overrides])

    return build


@pytest.fixture
def tiny_data(monkeypatch, tiny_dataset):
    """Every run of the CLI (or ``run_experiment``) in this test loads ``tiny_dataset``."""
    monkeypatch.setattr(federation, "load_dataset", lambda *args, **kwargs: tiny_dataset)
