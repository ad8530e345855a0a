"""Partitioners: validity, determinism, class structure and minimum sizes (property tests on small inputs)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pfedlora.data.partition import (
    PARTITIONS,
    Partition,
    by_source,
    carve_validation,
    dirichlet,
    iid,
    make_partition,
    pathological,
)
from pfedlora.errors import ConfigError

SETTINGS = settings(max_examples=40, deadline=None)


def labels(seed: int, num_classes: int, low: int, high: int) -> np.ndarray:
    """Shuffled labels with between ``low`` and ``high`` samples of every class."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(low, high + 1, num_classes)
    return rng.permutation(np.repeat(np.arange(num_classes), counts))


def assert_valid(partition: Partition, num_train: int, num_test: int) -> None:
    """Sorted int64 arrays, within range, no index given twice; train and validation share no index."""
    for arrays, bound in (
        (partition.train, num_train),
        (partition.test, num_test),
        (partition.validation, num_train),
    ):
        assert len(arrays) == partition.num_clients
        for a in arrays:
            assert a.dtype == np.int64
            assert np.all(np.diff(a) > 0), "sorted, no repeats"
            assert a.size == 0 or (a.min() >= 0 and a.max() < bound)
    train_side = np.concatenate([*partition.train, *partition.validation])
    assert len(np.unique(train_side)) == len(train_side), "train/validation indices overlap"
    test_side = np.concatenate(partition.test)
    assert len(np.unique(test_side)) == len(test_side), "test indices overlap"


def assert_same(a: Partition, b: Partition) -> None:
    for x, y in zip((a.train, a.test, a.validation), (b.train, b.test, b.validation), strict=True):
        assert len(x) == len(y)
        for p, q in zip(x, y, strict=True):
            np.testing.assert_array_equal(p, q)


def differs(a: Partition, b: Partition) -> bool:
    return any(not np.array_equal(p, q) for p, q in zip(a.train, b.train, strict=True))


# --- pathological ------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    num_classes=st.integers(2, 8),
    num_clients=st.integers(1, 12),
    k_fraction=st.floats(0, 1),
)
def test_pathological_properties(seed: int, num_classes: int, num_clients: int, k_fraction: float) -> None:
    k = 1 + round(k_fraction * (num_classes - 1))
    # Every class has at least as many samples as it has holders, so every holder gets some.
    train_labels = labels(seed, num_classes, num_clients, 40)
    test_labels = labels(seed + 1, num_classes, num_clients, 15)

    part = pathological(train_labels, test_labels, num_clients, np.random.default_rng(seed), k)

    assert_valid(part, len(train_labels), len(test_labels))
    holders = np.zeros(num_classes, dtype=int)
    for train, test in zip(part.train, part.test, strict=True):
        train_classes = set(train_labels[train].tolist())
        assert len(train_classes) == k
        assert set(test_labels[test].tolist()) <= train_classes
        holders[list(train_classes)] += 1
    # Classes are dealt evenly: holder counts differ by at most one.
    assert holders.max() - holders.min() <= 1
    assert holders.sum() == num_clients * k
    if num_clients * k >= num_classes:  # every class is held, so every sample is given out
        assert sum(len(t) for t in part.train) == len(train_labels)
        assert sum(len(t) for t in part.test) == len(test_labels)


def test_pathological_class_sets_are_balanced_and_varied() -> None:
    labels = np.repeat(np.arange(10), 100)
    part = pathological(labels, np.repeat(np.arange(10), 20), 100, np.random.default_rng(0), 5)
    class_sets = [tuple(np.unique(labels[idx])) for idx in part.train]
    holders = np.bincount(np.concatenate(class_sets), minlength=10)
    assert holders.max() - holders.min() <= 1  # every class held by 50 clients
    assert len(set(class_sets)) > 50  # not a handful of repeated sets (a round-robin deal gives 2)


def test_pathological_shares_follow_u04_06_and_match_between_train_and_test() -> None:
    num_classes, per_class_train, per_class_test = 10, 1000, 500
    train_labels = np.repeat(np.arange(num_classes), per_class_train)
    test_labels = np.repeat(np.arange(num_classes), per_class_test)

    # 10 clients x 2 classes over 10 classes: every class has exactly 2 holders.
    part = pathological(train_labels, test_labels, 10, np.random.default_rng(3), classes_per_client=2)

    shares = []
    for train, test in zip(part.train, part.test, strict=True):
        for label in np.unique(train_labels[train]):
            train_share = np.sum(train_labels[train] == label) / per_class_train
            test_share = np.sum(test_labels[test] == label) / per_class_test
            assert 0.4 - 1e-3 <= train_share <= 0.6 + 1e-3  # u1 / (u1 + u2) with u ~ U(0.4, 0.6)
            assert abs(train_share - test_share) <= 1 / per_class_test + 1 / per_class_train
            shares.append(train_share)
    assert np.std(shares) > 0.01, "shares are drawn, not all equal"


def test_pathological_is_deterministic_per_seed() -> None:
    train_labels, test_labels = labels(0, 10, 50, 80), labels(1, 10, 20, 30)
    run = lambda seed: pathological(train_labels, test_labels, 20, np.random.default_rng(seed), 2)  # noqa: E731
    assert_same(run(5), run(5))
    assert differs(run(5), run(6))


@pytest.mark.parametrize(
    ("num_clients", "k", "bad"),
    [(5, 0, "classes_per_client=0"), (5, 11, "classes_per_client=11"), (0, 2, "num_clients=0")],
)
def test_pathological_rejects_invalid_arguments(num_clients: int, k: int, bad: str) -> None:
    train_labels = np.repeat(np.arange(10), 5)
    with pytest.raises(ConfigError, match=bad):
        pathological(train_labels, train_labels, num_clients, np.random.default_rng(0), k)


def test_pathological_error_names_the_allowed_range() -> None:
    train_labels = np.repeat(np.arange(10), 5)
    with pytest.raises(ConfigError, match=r"1\.\.10"):
        pathological(train_labels, train_labels, 5, np.random.default_rng(0), 11)


# --- dirichlet ---------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    num_classes=st.integers(1, 6),
    num_clients=st.integers(1, 15),
    alpha=st.sampled_from([0.01, 0.1, 0.5, 1.0, 100.0]),
    min_train=st.integers(0, 5),
)
def test_dirichlet_properties(
    seed: int, num_classes: int, num_clients: int, alpha: float, min_train: int
) -> None:
    train_labels = labels(seed, num_classes, 10, 40)
    test_labels = labels(seed + 1, num_classes, 3, 10)
    if num_clients * min_train > len(train_labels) or num_clients > len(test_labels):
        return  # infeasible; refused (tested below)

    part = dirichlet(train_labels, test_labels, num_clients, np.random.default_rng(seed), alpha, min_train)

    assert_valid(part, len(train_labels), len(test_labels))
    assert all(len(t) >= min_train for t in part.train)
    assert all(len(t) >= 1 for t in part.test)
    assert sum(len(t) for t in part.train) == len(train_labels)
    assert sum(len(t) for t in part.test) == len(test_labels)


def test_dirichlet_500_clients_small_alpha_terminates_fast_and_meets_minimum() -> None:
    rng = np.random.default_rng(0)
    train_labels, test_labels = rng.integers(0, 10, 60000), rng.integers(0, 10, 10000)

    start = time.perf_counter()
    part = dirichlet(
        train_labels, test_labels, 500, np.random.default_rng(1), alpha=0.05, min_train_samples=10
    )
    elapsed = time.perf_counter() - start

    assert elapsed < 5.0  # about 0.05 s; the bound only catches a runaway top-up
    assert_valid(part, 60000, 10000)
    sizes = np.array([len(t) for t in part.train])
    assert sizes.min() >= 10 and sizes.sum() == 60000
    assert min(len(t) for t in part.test) >= 1
    # alpha = 0.05 stays strongly skewed after the top-up (an IID split would give about 0.15 here).
    dominant = [np.bincount(train_labels[t]).max() / len(t) for t in part.train]
    assert np.median(dominant) > 0.5


def test_dirichlet_large_alpha_is_nearly_balanced() -> None:
    train_labels = np.repeat(np.arange(4), 2500)
    test_labels = np.repeat(np.arange(4), 500)
    part = dirichlet(train_labels, test_labels, 4, np.random.default_rng(0), alpha=1e4)
    for train, test in zip(part.train, part.test, strict=True):
        np.testing.assert_allclose(np.bincount(train_labels[train], minlength=4), 625, rtol=0.1)
        np.testing.assert_allclose(np.bincount(test_labels[test], minlength=4), 125, rtol=0.2)


def test_dirichlet_is_deterministic_per_seed() -> None:
    train_labels, test_labels = labels(0, 10, 50, 80), labels(1, 10, 20, 30)
    run = lambda seed: dirichlet(train_labels, test_labels, 20, np.random.default_rng(seed), 0.3)  # noqa: E731
    assert_same(run(5), run(5))
    assert differs(run(5), run(6))


def test_dirichlet_refuses_an_unreachable_minimum() -> None:
    train_labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ConfigError, match="min_train_samples"):
        dirichlet(train_labels, train_labels, 11, np.random.default_rng(0), 0.5, min_train_samples=10)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_refuses_non_positive_alpha(alpha: float) -> None:
    train_labels = np.repeat(np.arange(2), 50)
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet(train_labels, train_labels, 2, np.random.default_rng(0), alpha)


# --- iid ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    num_train=st.integers(1, 200),
    num_test=st.integers(1, 50),
    num_clients=st.integers(1, 20),
)
def test_iid_properties(seed: int, num_train: int, num_test: int, num_clients: int) -> None:
    if num_clients > min(num_train, num_test):
        with pytest.raises(ConfigError):
            iid(np.zeros(num_train, int), np.zeros(num_test, int), num_clients, np.random.default_rng(seed))
        return
    part = iid(np.zeros(num_train, int), np.zeros(num_test, int), num_clients, np.random.default_rng(seed))

    assert_valid(part, num_train, num_test)
    for arrays, total in ((part.train, num_train), (part.test, num_test)):
        sizes = [len(a) for a in arrays]
        assert sum(sizes) == total and max(sizes) - min(sizes) <= 1


def test_iid_is_deterministic_per_seed() -> None:
    train_labels, test_labels = np.zeros(100, int), np.zeros(30, int)
    run = lambda seed: iid(train_labels, test_labels, 7, np.random.default_rng(seed))  # noqa: E731
    assert_same(run(1), run(1))
    assert differs(run(1), run(2))


# --- carve_validation --------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), fraction=st.floats(0, 0.9), num_clients=st.integers(1, 10))
def test_carve_validation_properties(seed: int, fraction: float, num_clients: int) -> None:
    train_labels = labels(seed, 5, 0, 12)
    test_labels = labels(seed, 5, 2, 4)
    part = dirichlet(
        train_labels, test_labels, num_clients, np.random.default_rng(seed), 0.5, min_train_samples=0
    )

    carved = carve_validation(part, fraction, np.random.default_rng(seed))

    assert_valid(carved, len(train_labels), len(test_labels))
    for before, train, validation in zip(part.train, carved.train, carved.validation, strict=True):
        np.testing.assert_array_equal(np.sort(np.concatenate([train, validation])), before)
        n = len(before)
        if fraction == 0 or n < 2:
            assert len(validation) == 0
        else:
            assert 1 <= len(validation) <= n - 1
            assert abs(len(validation) - fraction * n) <= 1
    for a, b in zip(part.test, carved.test, strict=True):
        np.testing.assert_array_equal(a, b)


def test_carve_validation_is_deterministic_and_refuses_bad_fractions() -> None:
    part = iid(np.zeros(100, int), np.zeros(10, int), 2, np.random.default_rng(0))
    first = carve_validation(part, 0.2, np.random.default_rng(4))
    assert_same(first, carve_validation(part, 0.2, np.random.default_rng(4)))
    assert [len(v) for v in first.validation] == [10, 10]
    for fraction in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="fraction"):
            carve_validation(part, fraction, np.random.default_rng(0))


# --- make_partition ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PARTITIONS))
def test_make_partition_dispatches(name: str) -> None:
    train_labels, test_labels = labels(0, 10, 30, 40), labels(1, 10, 10, 12)
    train_groups, test_groups = np.arange(len(train_labels)) % 9, np.arange(len(test_labels)) % 9
    settings_ = {
        "classes_per_client": 2,
        "alpha": 0.5,
        "min_train_samples": 5,
        "train_groups": train_groups,
        "test_groups": test_groups,
    }
    direct = {
        "pathological": lambda rng: pathological(train_labels, test_labels, 8, rng, 2),
        "dirichlet": lambda rng: dirichlet(train_labels, test_labels, 8, rng, 0.5, 5),
        "iid": lambda rng: iid(train_labels, test_labels, 8, rng),
        "by-source": lambda rng: by_source(train_groups, test_groups, 8, rng, 5),
    }[name]

    made = make_partition(name, train_labels, test_labels, 8, np.random.default_rng(9), **settings_)

    assert_same(made, direct(np.random.default_rng(9)))


def test_make_partition_unknown_name_lists_allowed() -> None:
    with pytest.raises(ConfigError, match=r"'shards'.*pathological, dirichlet, iid"):
        make_partition(
            "shards",
            np.zeros(4, int),
            np.zeros(4, int),
            2,
            np.random.default_rng(0),
            classes_per_client=1,
            alpha=1.0,
            min_train_samples=0,
        )


@pytest.mark.parametrize("name", ["pathological", "dirichlet", "iid"])
def test_an_impossible_federation_is_refused_before_anything_is_drawn(name):
    train, test = np.arange(60_000) % 10, np.arange(10_000) % 10
    settings = {"classes_per_client": 5, "alpha": 0.5, "min_train_samples": 10}
    with pytest.raises(
        ConfigError, match=r"100000 clients .* need 1,000,000; the dataset has 60,000: use at most 6,000"
    ):
        make_partition(name, train, test, 100_000, np.random.default_rng(0), **settings)
    with pytest.raises(ConfigError, match=r"exceeds the 10,000 test samples"):
        make_partition(
            name, train, test, 12_000, np.random.default_rng(0), **{**settings, "min_train_samples": 1}
        )
