"""ClientData: one shuffled epoch covering each train index once, seeded, normalised; ordered evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pfedlora.data.client_data import ClientData, build_client_data
from pfedlora.data.datasets import Dataset
from pfedlora.data.partition import carve_validation, iid
from pfedlora.errors import ConfigError


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _dataset(num_train: int = 50, num_test: int = 20) -> Dataset:
    """Labels equal to the sample's index, so every batch says which samples it holds."""
    g = _generator(0)
    return Dataset(
        name="toy",
        train_x=torch.randint(0, 256, (num_train, 3, 6, 6), dtype=torch.uint8, generator=g),
        train_y=torch.arange(num_train),
        test_x=torch.randint(0, 256, (num_test, 3, 6, 6), dtype=torch.uint8, generator=g),
        test_y=torch.arange(num_test),
        classes=tuple(str(i) for i in range(max(num_train, num_test))),
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
    )


def _clients(augment: bool = False) -> list[ClientData]:
    ds = _dataset()
    partition = iid(ds.train_y.numpy(), ds.test_y.numpy(), 3, np.random.default_rng(0))
    partition = carve_validation(partition, 0.2, np.random.default_rng(1))
    return build_client_data(ds, partition, augment=augment)


@pytest.mark.parametrize("augment", [False, True])
def test_train_batches_cover_each_index_once_per_epoch(augment: bool) -> None:
    client = _clients(augment)[0]

    batches = list(client.train_batches(batch_size=4, generator=_generator(3)))

    assert [len(y) for _, y in batches] == [4, 4, 4, 2]  # 14 train samples; last partial batch kept
    seen = torch.cat([y for _, y in batches])
    assert torch.equal(seen.sort().values, client.train_indices)
    assert not torch.equal(seen, client.train_indices), "shuffled"
    assert all(x.dtype == torch.float32 and x.shape[1:] == (3, 6, 6) for x, _ in batches)
    assert all(y.dtype == torch.int64 for _, y in batches)


def test_a_fixed_batch_order_and_drop_last() -> None:
    client = _clients()[0]  # 14 train samples
    fixed = [y for _, y in client.train_batches(4, _generator(3), shuffle=False)]
    assert torch.equal(torch.cat(fixed), client.train_indices)  # index order, every epoch alike
    assert [len(y) for y in fixed] == [4, 4, 4, 2]
    dropped = [len(y) for _, y in client.train_batches(4, _generator(3), drop_last=True)]
    assert dropped == [4, 4, 4]
    only = [len(y) for _, y in client.train_batches(20, _generator(3), drop_last=True)]
    assert only == [14]  # a client's only batch is never dropped


def test_train_batches_are_normalised_images_of_their_labels() -> None:
    client = _clients(augment=False)[1]
    ds = client.dataset
    for x, y in client.train_batches(5, _generator(0)):
        expected = (ds.train_x[y].float() / 255 - torch.tensor(ds.mean).view(3, 1, 1)) / torch.tensor(
            ds.std
        ).view(3, 1, 1)
        torch.testing.assert_close(x, expected)


def test_augmentation_changes_batches_but_not_labels() -> None:
    plain, augmented = _clients(False)[0], _clients(True)[0]
    (x_plain, y_plain), *_ = plain.train_batches(14, _generator(5))
    (x_aug, y_aug), *_ = augmented.train_batches(14, _generator(5))
    assert torch.equal(y_plain, y_aug)  # the permutation is drawn first from the same stream
    assert not torch.allclose(x_plain, x_aug)


@pytest.mark.parametrize("augment", [False, True])
def test_train_batches_deterministic_per_generator_seed(augment: bool) -> None:
    client = _clients(augment)[2]
    run = lambda seed: list(client.train_batches(4, _generator(seed)))  # noqa: E731
    first, again, other = run(11), run(11), run(12)
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other]))


def test_eval_batches_in_order_never_augmented() -> None:
    client = _clients(augment=True)[0]
    ds = client.dataset

    test = list(client.eval_batches("test", batch_size=3))
    validation = list(client.eval_batches("validation", batch_size=2))

    assert torch.equal(torch.cat([y for _, y in test]), client.test_indices)
    assert torch.equal(torch.cat([y for _, y in validation]), client.validation_indices)
    torch.testing.assert_close(torch.cat([x for x, _ in test]), ds.normalize(ds.test_x[client.test_indices]))
    torch.testing.assert_close(
        torch.cat([x for x, _ in validation]), ds.normalize(ds.train_x[client.validation_indices])
    )


def test_build_client_data_matches_the_partition() -> None:
    clients = _clients()
    assert [c.num_train for c in clients] == [14, 14, 13]
    assert [c.num_validation for c in clients] == [3, 3, 3]
    assert sum(c.num_test for c in clients) == 20
    assert all(c.train_indices.dtype == torch.int64 for c in clients)


def test_train_split_in_order_is_never_augmented() -> None:
    client = _clients()[0]
    client.augment = True
    x = torch.cat([x for x, _ in client.eval_batches("train", 4)])
    torch.testing.assert_close(x, client.dataset.normalize(client.dataset.train_x[client.train_indices]))


def test_invalid_requests_are_config_errors() -> None:
    client = _clients()[0]
    with pytest.raises(ConfigError, match="split"):
        list(client.eval_batches("holdout", 4))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size"):
        list(client.train_batches(0, _generator(0)))
    ds = _dataset(num_train=5)
    partition = iid(np.arange(50), np.arange(20), 2, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="train indices"):
        build_client_data(ds, partition, augment=False)
