"""Building a federation from a configuration: data and partition, every client's private state, and the
global state before round 1 (after checking that what is shared has one shape on every architecture).

Both runtimes build from these functions: the simulator for every client at once, a Flower node for its
own client, the Flower server for the global state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pfedlora.algorithms import AnyAlgorithm, State, create_algorithm
from pfedlora.config import ExperimentConfig
from pfedlora.data import (
    ClientData,
    Dataset,
    build_client_data,
    carve_validation,
    load_dataset,
    make_partition,
)
from pfedlora.models import check_homogeneous
from pfedlora.seeding import numpy_generator, torch_generator


def resolve_device(name: str) -> torch.device:
    """ "auto" picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Federation:
    """Everything a run works on: the algorithm, each client's data and private state, the global state."""

    config: ExperimentConfig
    algorithm: AnyAlgorithm
    clients: list[ClientData]
    client_states: dict[int, nn.Module]
    server_state: State


def build_clients(config: ExperimentConfig, dataset: Dataset, device: torch.device) -> list[ClientData]:
    """Every client's data (index views of ``dataset`` on ``device``), partitioned from the seed."""
    data_cfg, fed_cfg = config.data, config.federation
    partition = make_partition(
        data_cfg.partition,
        dataset.train_y.numpy(),
        dataset.test_y.numpy(),
        fed_cfg.num_clients,
        numpy_generator(config.seed, "partition"),
        classes_per_client=data_cfg.classes_per_client,
        alpha=data_cfg.dirichlet_alpha,
        min_train_samples=data_cfg.min_train_samples,
    )
    if data_cfg.validation_fraction > 0:
        partition = carve_validation(
            partition, data_cfg.validation_fraction, numpy_generator(config.seed, "validation")
        )
    augment = data_cfg.augment == "on" or (data_cfg.augment == "auto" and dataset.augment_by_default)
    return build_client_data(dataset.to(device), partition, augment=augment)


def create_client_state(
    algorithm: AnyAlgorithm, client_id: int, device: torch.device, arch: str | None = None
) -> nn.Module:
    """Client ``client_id``'s fresh private state, seeded by the client id (``arch`` defaults to the
    config's architecture for it)."""
    config = algorithm.config
    arch = arch or config.architecture_of(client_id)
    state: nn.Module = algorithm.create_client(arch, torch_generator(config.seed, "client-init", client_id))
    return state.to(device)


def initial_global_state(algorithm: AnyAlgorithm, device: torch.device) -> State:
    """The global state before round 1, after checking that every architecture shares the same tensors.

    Raises AdapterMismatchError, before any training, where the shared tensors differ between architectures.
    """
    config = algorithm.config
    archs = config.federation.architectures
    first_of_arch = {
        config.architecture_of(cid): cid for cid in reversed(range(config.federation.num_clients))
    }
    check_homogeneous(
        {
            arch: algorithm.shared_state(create_client_state(algorithm, cid, device))
            for arch, cid in first_of_arch.items()
        }
    )
    template = algorithm.create_client(archs[0], torch_generator(config.seed, "server-init"))
    return algorithm.initial_server_state(template.to(device))


def build_federation(config: ExperimentConfig, dataset: Dataset | None = None) -> Federation:
    """Load and partition the data, create every client's private state and the initial global state.

    Refuses (AdapterMismatchError) a federation whose shared tensors differ between architectures
    before any training happens.
    """
    data_cfg = config.data
    if dataset is None:
        dataset = load_dataset(data_cfg.dataset, data_cfg.data_dir or None, download=data_cfg.download)
    device = resolve_device(config.device)
    clients = build_clients(config, dataset, device)
    algorithm = create_algorithm(config, dataset.input_shape, dataset.num_classes)
    server_state = initial_global_state(algorithm, device)
    client_states = {
        client_id: create_client_state(algorithm, client_id, device)
        for client_id in range(config.federation.num_clients)
    }
    return Federation(config, algorithm, clients, client_states, server_state)
