"""One client's view of an in-memory dataset: index tensors and batch iterators over index slices."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pfedlora.data.augment import random_crop_flip
from pfedlora.data.datasets import Dataset
from pfedlora.data.partition import Partition
from pfedlora.errors import ConfigError

Split = Literal["train", "test", "validation"]
"""A client's data splits: train and validation index the train set, test the test set."""

AUGMENT_PADDING = 4  # CIFAR: random crop with 4-pixel padding and horizontal flip (SPEC §5)


@dataclass
class ClientData:
    """A client's train/test/validation indices into ``dataset`` (all on the dataset's device)."""

    dataset: Dataset
    train_indices: torch.Tensor
    test_indices: torch.Tensor
    validation_indices: torch.Tensor
    augment: bool
    channels_last: bool = False
    """Whether batches come in the channels-last memory format (same values, other strides)."""

    @property
    def num_train(self) -> int:
        return int(self.train_indices.numel())

    @property
    def num_test(self) -> int:
        return int(self.test_indices.numel())

    @property
    def num_validation(self) -> int:
        return int(self.validation_indices.numel())

    def train_batches(
        self, batch_size: int, generator: torch.Generator, shuffle: bool = True, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (normalised float32 x, int64 y) batches, shuffled (else in index order, as a
        DataLoader without shuffling); the last may be smaller, unless ``drop_last`` drops it (never a
        client's only batch).

        ``generator`` (on the CPU) orders the batches and draws the augmentation when ``augment`` is set.
        """
        _check_batch_size(batch_size)
        if generator.device.type != "cpu":
            raise ConfigError(f"train_batches needs a CPU generator, got one on {generator.device}")
        shuffled = self.train_indices
        if shuffle:
            shuffled = shuffled[torch.randperm(self.num_train, generator=generator).to(shuffled.device)]
        end = self.num_train
        if drop_last and end > batch_size:
            end -= end % batch_size
        for start in range(0, end, batch_size):
            index = shuffled[start : start + batch_size]
            x = self.dataset.train_x[index]  # (B, C, H, W) uint8
            if self.augment:
                x = random_crop_flip(x, AUGMENT_PADDING, generator)
            yield self._layout(self.dataset.normalize(x)), self.dataset.train_y[index]

    def eval_batches(self, split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised float32 x, int64 y) batches of ``split`` in index order, never augmented."""
        _check_batch_size(batch_size)
        if split == "train":
            indices, images, labels = self.train_indices, self.dataset.train_x, self.dataset.train_y
        elif split == "test":
            indices, images, labels = self.test_indices, self.dataset.test_x, self.dataset.test_y
        elif split == "validation":
            indices, images, labels = self.validation_indices, self.dataset.train_x, self.dataset.train_y
        else:
            raise ConfigError(f"split {split!r} is unknown; allowed: train, test, validation")
        for start in range(0, indices.numel(), batch_size):
            index = indices[start : start + batch_size]
            yield self._layout(self.dataset.normalize(images[index])), labels[index]

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} is invalid; it must be at least 1")


def build_client_data(
    dataset: Dataset, partition: Partition, augment: bool, channels_last: bool = False
) -> list[ClientData]:
    """One ``ClientData`` per client of ``partition``, with index tensors on ``dataset``'s device."""
    device = dataset.train_x.device
    num_train, num_test = dataset.train_y.numel(), dataset.test_y.numel()

    def tensor(indices: np.ndarray, bound: int, what: str) -> torch.Tensor:
        if len(indices) and (indices.min() < 0 or indices.max() >= bound):
            raise ConfigError(f"partition {what} indices fall outside 0..{bound - 1} of {dataset.name}")
        return torch.as_tensor(indices, dtype=torch.int64).to(device)

    return [
        ClientData(
            dataset=dataset,
            train_indices=tensor(train, num_train, "train"),
            test_indices=tensor(test, num_test, "test"),
            validation_indices=tensor(validation, num_train, "validation"),
            augment=augment,
            channels_last=channels_last,
        )
        for train, test, validation in zip(partition.train, partition.test, partition.validation, strict=True)
    ]
