"""What the benchmarks share: the small synthetic dataset of their --smoke modes."""

from __future__ import annotations

import torch

from pfedlora.data import Dataset
from pfedlora.seeding import torch_generator


def synthetic_dataset(num_train: int = 1000, num_test: int = 200) -> Dataset:
    """Random Fashion-MNIST-shaped images and labels (no files needed): for --smoke runs, not for figures."""
    generator = torch_generator(0, "smoke")
    total = num_train + num_test
    images = torch.randint(0, 256, (total, 1, 28, 28), generator=generator, dtype=torch.uint8)
    labels = torch.arange(total) % 10
    classes = tuple(str(c) for c in range(10))
    return Dataset(
        "smoke",
        images[:num_train],
        labels[:num_train],
        images[num_train:],
        labels[num_train:],
        classes,
        (0.5,),
        (0.3,),
    )
