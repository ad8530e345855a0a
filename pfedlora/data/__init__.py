"""Datasets (official formats, verified), client partitions, augmentation and per-client batch iterators."""

from pfedlora.data.augment import random_crop_flip
from pfedlora.data.client_data import ClientData, build_client_data
from pfedlora.data.datasets import (
    DATASET_NAMES,
    Dataset,
    load_dataset,
    read_cifar,
    read_fashion_mnist,
    search_paths,
)
from pfedlora.data.partition import (
    PARTITION_NAMES,
    Partition,
    carve_validation,
    dirichlet,
    iid,
    make_partition,
    pathological,
)

__all__ = [
    "DATASET_NAMES",
    "PARTITION_NAMES",
    "ClientData",
    "Dataset",
    "Partition",
    "build_client_data",
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
