"""Datasets (official formats, verified; registry ``DATASETS``), client partitions (registry ``PARTITIONS``),
augmentation and per-client batch iterators."""

from pfedlora.data.augment import random_crop_flip
from pfedlora.data.client_data import ClientData, Split, build_client_data
from pfedlora.data.datasets import (
    DATASETS,
    Dataset,
    DatasetSource,
    load_dataset,
    read_cifar,
    read_fashion_mnist,
    search_paths,
)
from pfedlora.data.partition import (
    PARTITIONS,
    Partition,
    cap_evaluation,
    carve_validation,
    dirichlet,
    iid,
    make_partition,
    pathological,
)

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "ClientData",
    "Dataset",
    "DatasetSource",
    "Partition",
    "Split",
    "build_client_data",
    "cap_evaluation",
    "carve_validation",
    "dirichlet",
    "iid",
    "load_dataset",
    "make_partition",
    "pathological",
    "random_crop_flip",
    "read_cifar",
    "read_fashion_mnist",
    "search_paths",
]
