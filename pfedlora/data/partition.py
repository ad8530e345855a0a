"""Partitions of a labelled train/test set among clients: pure functions of labels, client count and an rng.

Every partitioner splits the official test set with the same class-to-client proportions as the train set,
so a client's test data follows its own label distribution (pFedLoRA, Yi et al., arXiv 2310.13283, §5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pfedlora.errors import ConfigError
from pfedlora.registry import Registry


@dataclass(frozen=True, eq=False)
class Partition:
    """Per-client sorted int64 indices: train and validation index the train set, test the test set."""

    train: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]
    validation: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if not len(self.train) == len(self.test) == len(self.validation):
            raise ValueError(
                f"train, test and validation need one array per client, got "
                f"{len(self.train)}, {len(self.test)}, {len(self.validation)}"
            )

    @property
    def num_clients(self) -> int:
        return len(self.train)


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


def _sorted(parts: list[list[np.ndarray]]) -> tuple[np.ndarray, ...]:
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) if p else _empty() for p in parts)


def _check_common(train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int) -> None:
    if train_labels.ndim != 1 or test_labels.ndim != 1:
        raise ConfigError("train_labels and test_labels must be 1-D arrays")
    if num_clients < 1:
        raise ConfigError(f"num_clients={num_clients} is invalid; it must be at least 1")


def _allocate(total: int, proportions: np.ndarray, minimum: int = 0) -> np.ndarray:
    """Integer counts summing to ``total`` that follow ``proportions`` (largest remainder).

    When ``total`` allows it, every entry gets at least ``minimum``, taken from the largest counts.
    """
    exact = proportions / proportions.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    if remainder:
        counts[np.argsort(counts - exact, kind="stable")[:remainder]] += 1
    if minimum and total >= minimum * len(counts):
        for i in np.flatnonzero(counts < minimum):
            while counts[i] < minimum:
                donor = int(np.argmax(counts))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _split(indices: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(indices, np.cumsum(counts)[:-1])


def pathological(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    classes_per_client: int,
) -> Partition:
    """pFedLoRA's pathological non-IID split: each client holds ``classes_per_client`` classes.

    Each client takes the classes held by the fewest clients so far, ties broken at random, so every class
    is held by as equal a number of clients as possible and class sets vary between clients. A class's
    samples are shared by its holders in proportions drawn from U(0.4, 0.6) and normalised; the same
    proportions split the class's test samples.
    """
    _check_common(train_labels, test_labels, num_clients)
    classes = np.unique(train_labels)
    if not 1 <= classes_per_client <= len(classes):
        raise ConfigError(
            f"classes_per_client={classes_per_client} is invalid; it must be in 1..{len(classes)} "
            "(the number of classes)"
        )
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    held = np.zeros(len(classes))
    for client in range(num_clients):
        # The least-held classes, ties broken at random: holder counts stay within one of each other,
        # while the class sets themselves are random (a round-robin deal would repeat a few sets).
        chosen = np.lexsort((rng.random(len(classes)), held))[:classes_per_client]
        held[chosen] += 1
        for index in chosen:
            holders[int(classes[index])].append(client)

    train: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    test: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label, clients in holders.items():
        if not clients:
            continue
        proportions = rng.uniform(0.4, 0.6, size=len(clients))
        for labels, out in ((train_labels, train), (test_labels, test)):
            members = rng.permutation(np.flatnonzero(labels == label))
            for client, part in zip(
                clients, _split(members, _allocate(len(members), proportions, 1)), strict=True
            ):
                out[client].append(part)
    return Partition(_sorted(train), _sorted(test), tuple(_empty() for _ in range(num_clients)))


def dirichlet(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    alpha: float,
    min_train_samples: int = 10,
) -> Partition:
    """Label-skewed split: per class, proportions over clients ~ Dir(alpha) split its train and test samples.

    Afterwards every client is topped up to ``min_train_samples`` train samples and one test sample by moving
    samples from the currently largest clients (deterministic, always terminates).
    """
    _check_common(train_labels, test_labels, num_clients)
    if not alpha > 0:
        raise ConfigError(f"alpha={alpha} is invalid; it must be > 0")
    if min_train_samples < 0:
        raise ConfigError(f"min_train_samples={min_train_samples} is invalid; it must be >= 0")
    if num_clients * min_train_samples > len(train_labels):
        raise ConfigError(
            f"num_clients * min_train_samples = {num_clients * min_train_samples} exceeds the "
            f"{len(train_labels)} train samples; lower min_train_samples or num_clients"
        )
    if num_clients > len(test_labels):
        raise ConfigError(
            f"num_clients={num_clients} exceeds the {len(test_labels)} test samples; each client needs one"
        )

    train: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    test: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(np.concatenate([train_labels, test_labels])):
        proportions = np.nan_to_num(rng.dirichlet(np.full(num_clients, float(alpha))))
        if proportions.sum() <= 0:  # possible underflow for tiny alpha
            proportions = np.ones(num_clients)
        for labels, out in ((train_labels, train), (test_labels, test)):
            members = rng.permutation(np.flatnonzero(labels == label))
            for client, part in enumerate(_split(members, _allocate(len(members), proportions))):
                out[client].append(part)

    train_sets = [rng.permutation(np.concatenate(p)) for p in train]
    test_sets = [np.concatenate(p) for p in test]
    _top_up(train_sets, min_train_samples)
    _top_up_test(test_sets, test_labels, train_sets, train_labels)
    return Partition(
        tuple(np.sort(s).astype(np.int64) for s in train_sets),
        tuple(np.sort(s).astype(np.int64) for s in test_sets),
        tuple(_empty() for _ in range(num_clients)),
    )


def _top_up(sets: list[np.ndarray], minimum: int) -> None:
    """Give every set at least ``minimum`` entries, moving the tails of the currently largest sets.

    Needs ``sum(len) >= minimum * len(sets)``; then the largest set exceeds ``minimum`` while any set is
    short, and each step either fills a set or brings a donor down to ``minimum``, so this ends.
    """
    sizes = np.array([len(s) for s in sets])
    for client in np.flatnonzero(sizes < minimum):
        while sizes[client] < minimum:
            donor = int(np.argmax(sizes))
            moved = min(minimum - int(sizes[client]), int(sizes[donor]) - minimum)
            sets[client] = np.concatenate([sets[client], sets[donor][-moved:]])
            sets[donor] = sets[donor][:-moved]
            sizes[client] += moved
            sizes[donor] -= moved


def _top_up_test(
    test_sets: list[np.ndarray],
    test_labels: np.ndarray,
    train_sets: list[np.ndarray],
    train_labels: np.ndarray,
) -> None:
    """Give every client one test sample, of its most common train label where another client can spare one.

    Needs ``sum(len) >= len(test_sets)``, so a set with two or more samples exists while one is empty.
    """
    num_labels = int(max(test_labels.max(initial=-1), train_labels.max(initial=-1))) + 1
    label_counts = np.stack([np.bincount(test_labels[s], minlength=num_labels) for s in test_sets])  # (K, L)
    sizes = label_counts.sum(axis=1)
    for client in np.flatnonzero(sizes == 0):
        donor, label = int(np.argmax(sizes)), None
        if len(train_sets[client]):
            wanted = int(np.bincount(train_labels[train_sets[client]]).argmax())
            spare = np.where(sizes >= 2, label_counts[:, wanted], 0)
            if spare.max() > 0:
                donor, label = int(np.argmax(spare)), wanted
        donor_set = test_sets[donor]
        position = -1 if label is None else int(np.flatnonzero(test_labels[donor_set] == label)[-1])
        sample = donor_set[position]
        test_sets[donor] = np.delete(donor_set, position)
        test_sets[client] = np.array([sample], dtype=np.int64)
        moved_label = int(test_labels[sample])
        label_counts[donor, moved_label] -= 1
        label_counts[client, moved_label] += 1
        sizes[donor] -= 1
        sizes[client] = 1


def iid(
    train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int, rng: np.random.Generator
) -> Partition:
    """A uniformly random, equal-as-possible split of the train and of the test set."""
    _check_common(train_labels, test_labels, num_clients)
    if num_clients > min(len(train_labels), len(test_labels)):
        raise ConfigError(
            f"num_clients={num_clients} is invalid; it must be at most the number of train "
            f"({len(train_labels)}) and test ({len(test_labels)}) samples"
        )
    train = np.array_split(rng.permutation(len(train_labels)), num_clients)
    test = np.array_split(rng.permutation(len(test_labels)), num_clients)
    return Partition(
        tuple(np.sort(p).astype(np.int64) for p in train),
        tuple(np.sort(p).astype(np.int64) for p in test),
        tuple(_empty() for _ in range(num_clients)),
    )


def by_source(
    train_groups: np.ndarray,
    test_groups: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    min_train_samples: int,
) -> Partition:
    """Each client gets a seeded set of whole sources (e.g. books): their train and test samples.

    Sources go in a random order, each to the client with the fewest training samples so far (ties to the
    lowest id), so clients get random, roughly equal shares; every client ends with at least
    ``min_train_samples`` training samples, or ConfigError says how far short the smallest falls.
    """
    _check_common(train_groups, test_groups, num_clients)
    sources = np.unique(np.concatenate([train_groups, test_groups]))
    if num_clients > len(sources):
        raise ConfigError(
            f"num_clients={num_clients} is invalid for partition 'by-source': this dataset has "
            f"{len(sources)} sources and each client needs at least one"
        )
    sizes = np.zeros(num_clients, dtype=np.int64)
    owned: list[list[int]] = [[] for _ in range(num_clients)]
    for source in rng.permutation(sources):
        client = int(np.argmin(sizes))
        owned[client].append(int(source))
        sizes[client] += int(np.count_nonzero(train_groups == source))
    if sizes.min() < min_train_samples:
        raise ConfigError(
            f"partition 'by-source' gives client {int(np.argmin(sizes))} only {int(sizes.min())} training "
            f"samples (data.min_train_samples={min_train_samples}); use fewer clients"
        )
    train = tuple(np.flatnonzero(np.isin(train_groups, o)).astype(np.int64) for o in owned)
    test = tuple(np.flatnonzero(np.isin(test_groups, o)).astype(np.int64) for o in owned)
    return Partition(train, test, tuple(_empty() for _ in range(num_clients)))


def carve_validation(partition: Partition, fraction: float, rng: np.random.Generator) -> Partition:
    """Move a uniformly random ``fraction`` of each client's train indices into its validation indices.

    A uniform subset is stratified in expectation. A client with at least 2 train samples gives at least 1
    and keeps at least 1 when ``fraction > 0``.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"validation fraction={fraction} is invalid; it must be in [0, 1)")
    train, validation = [], []
    for indices, held_out in zip(partition.train, partition.validation, strict=True):
        n = len(indices)
        count = 0 if fraction == 0 or n < 2 else min(max(1, round(fraction * n)), n - 1)
        chosen = np.zeros(n, dtype=bool)
        chosen[rng.choice(n, size=count, replace=False)] = True
        train.append(indices[~chosen])
        validation.append(np.sort(np.concatenate([held_out, indices[chosen]])).astype(np.int64))
    return Partition(tuple(train), partition.test, tuple(validation))


def cap_evaluation(partition: Partition, most: int, rng: np.random.Generator) -> Partition:
    """Each client's test and validation indices cut to at most ``most`` (a uniformly random subset, kept
    sorted; 0: all), so that scoring many clients, or language models, costs less; training is unchanged."""
    if most < 0:
        raise ConfigError(f"data.max_eval_samples={most} is invalid; it must be 0 (all) or more")
    if most == 0:
        return partition

    def cut(indices: np.ndarray) -> np.ndarray:
        if len(indices) <= most:
            return indices
        return np.sort(rng.choice(indices, size=most, replace=False)).astype(np.int64)

    return Partition(
        partition.train, tuple(cut(t) for t in partition.test), tuple(cut(v) for v in partition.validation)
    )


@dataclass(frozen=True)
class PartitionSettings:
    """The settings a partition may use (each uses its own and ignores the rest)."""

    classes_per_client: int
    alpha: float
    min_train_samples: int
    train_groups: np.ndarray | None = None
    """Each training sample's source (a dataset's ``train_groups``), for ``by-source``; None: no sources."""
    test_groups: np.ndarray | None = None


def _by_source(
    train: np.ndarray, test: np.ndarray, clients: int, rng: np.random.Generator, settings: PartitionSettings
) -> Partition:
    if settings.train_groups is None or settings.test_groups is None:
        raise ConfigError(
            "data.partition 'by-source' needs a dataset whose samples name their source (e.g. kjv: the "
            "book of each verse); this one does not"
        )
    return by_source(settings.train_groups, settings.test_groups, clients, rng, settings.min_train_samples)


Partitioner = Callable[[np.ndarray, np.ndarray, int, np.random.Generator, PartitionSettings], Partition]
"""(train labels, test labels, number of clients, rng, settings) -> the partition."""

PARTITIONS: Registry[Partitioner] = Registry("data.partition")
"""Every partition, by name (the ``data.partition`` values)."""

PARTITIONS.add(
    "pathological",
    lambda train, test, clients, rng, settings: pathological(
        train, test, clients, rng, settings.classes_per_client
    ),
)
PARTITIONS.add(
    "dirichlet",
    lambda train, test, clients, rng, settings: dirichlet(
        train, test, clients, rng, settings.alpha, settings.min_train_samples
    ),
)
PARTITIONS.add("iid", lambda train, test, clients, rng, settings: iid(train, test, clients, rng))
PARTITIONS.add("by-source", _by_source)


def make_partition(
    name: str,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    classes_per_client: int,
    alpha: float,
    min_train_samples: int,
    train_groups: np.ndarray | None = None,
    test_groups: np.ndarray | None = None,
) -> Partition:
    """Partition by ``name`` (a ``PARTITIONS`` entry); settings a partition does not use are ignored.

    A federation that no partition could serve (fewer training samples than ``num_clients`` ×
    ``min_train_samples``, or fewer test samples than clients: each needs one) is refused first, naming the
    numbers, before anything is drawn or allocated.
    """
    if num_clients * min_train_samples > len(train_labels):
        raise ConfigError(
            f"federation.num_clients = {num_clients} clients of at least data.min_train_samples = "
            f"{min_train_samples} training samples need {num_clients * min_train_samples:,}; the dataset has "
            f"{len(train_labels):,}: use at most {len(train_labels) // min_train_samples:,} clients"
        )
    if num_clients > len(test_labels):
        raise ConfigError(
            f"federation.num_clients = {num_clients} exceeds the {len(test_labels):,} test samples; each "
            "client needs one"
        )
    settings = PartitionSettings(classes_per_client, alpha, min_train_samples, train_groups, test_groups)
    return PARTITIONS[name](train_labels, test_labels, num_clients, rng, settings)
