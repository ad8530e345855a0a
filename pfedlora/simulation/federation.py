"""Building a federation from a configuration: data and partition, every client's private state, and the
global state before round 1 (after checking that what is shared has one shape on every architecture).

Both runtimes build from these functions: the simulator for every client at once, a Flower node for its
own client, the Flower server for the global state.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pfedlora.algorithms import AnyAlgorithm, State, create_algorithm
from pfedlora.config import ExperimentConfig
from pfedlora.data import (
    ClientData,
    Dataset,
    Partition,
    build_client_data,
    cap_evaluation,
    carve_validation,
    load_dataset,
    make_partition,
)
from pfedlora.data.corpora import TextCorpus
from pfedlora.data.text import tokenize_corpus
from pfedlora.hardware import resolve_device
from pfedlora.seeding import numpy_generator, torch_generator
from pfedlora.simulation.store import ClientStore


@dataclass
class Federation:
    """Everything a run works on: the algorithm, each client's data and private state, the global state.

    ``client_states`` may hold only some clients (a worker process holds its share); each is created when
    first needed (see :class:`~pfedlora.simulation.store.ClientStore`).
    """

    config: ExperimentConfig
    algorithm: AnyAlgorithm
    clients: list[ClientData]
    client_states: ClientStore
    server_state: State


def load_run_dataset(
    config: ExperimentConfig, data_dir: str | None = None, families: Collection[str] | None = None
) -> Dataset:
    """The dataset ``config`` names, from the first lookup location that holds it (``data_dir`` first, else
    ``data.data_dir``; or downloaded); a text dataset tokenized once by the tokenizer of each model family
    the run uses (:func:`~pfedlora.models.text_views`), or only of ``families`` (the views of the others
    all zeros: a Flower node tokenizes what its own client reads)."""
    data = config.data

    def tokenize(corpus: TextCorpus) -> Dataset:
        from pfedlora.models.transformer import family_tokenizer, text_views, tokenizer_for

        views = text_views(config)
        if not views:  # no transformer architecture: tokenizer_for names the image architectures
            tokenizer_for(config.federation.architectures, config.model)
        tokenizers = [
            family_tokenizer(family, config.model) if families is None or family in families else None
            for family in views
        ]
        return tokenize_corpus(corpus, tokenizers, config.model.max_length)

    folder = data_dir or data.data_dir or None
    return load_dataset(data.dataset, folder, download=data.download, tokenize=tokenize)


def partition_clients(config: ExperimentConfig, dataset: Dataset) -> Partition:
    """Every client's train/test/validation indices, from the seed."""
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
        train_groups=None if dataset.train_groups is None else dataset.train_groups.numpy(),
        test_groups=None if dataset.test_groups is None else dataset.test_groups.numpy(),
    )
    if data_cfg.validation_fraction > 0:
        partition = carve_validation(
            partition, data_cfg.validation_fraction, numpy_generator(config.seed, "validation")
        )
    return cap_evaluation(partition, data_cfg.max_eval_samples, numpy_generator(config.seed, "eval-cap"))


def client_counts(config: ExperimentConfig, dataset: Dataset) -> dict[int, int]:
    """Each client's number of training samples (what it declares to the server)."""
    return {cid: len(indices) for cid, indices in enumerate(partition_clients(config, dataset).train)}


def build_clients(config: ExperimentConfig, dataset: Dataset, device: torch.device) -> list[ClientData]:
    """Every client's data (index views of ``dataset`` on ``device``), partitioned from the seed."""
    data_cfg = config.data
    augment = dataset.kind == "image" and (
        data_cfg.augment == "on" or (data_cfg.augment == "auto" and dataset.augment_by_default)
    )
    return build_client_data(
        dataset.to(device),
        partition_clients(config, dataset),
        augment=augment,
        channels_last=config.train.channels_last,
    )


def create_client_state(
    algorithm: AnyAlgorithm, client_id: int, device: torch.device, arch: str | None = None
) -> nn.Module:
    """Client ``client_id``'s fresh private state, seeded by the client id (``arch`` defaults to the
    config's architecture for it)."""
    config = algorithm.config
    arch = arch or config.architecture_of(client_id)
    state: nn.Module = algorithm.create_client(arch, torch_generator(config.seed, "client-init", client_id))
    return to_layout(state.to(device), config)


def to_layout(module: nn.Module, config: ExperimentConfig) -> nn.Module:
    """``module`` with its 4-d weights in the memory format ``train.channels_last`` asks for."""
    if config.train.channels_last:
        # documented (nn.Module.to), though absent from torch's type stubs
        return module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module


def initial_global_state(algorithm: AnyAlgorithm, device: torch.device) -> State:
    """The global state before round 1, after checking that every architecture shares the same tensors.

    Raises AdapterMismatchError, before any training, where the shared tensors differ between architectures
    (:meth:`~pfedlora.algorithms.Algorithm.check_shared_shapes`).
    """
    config = algorithm.config
    archs = config.federation.architectures
    first_of_arch = {
        config.architecture_of(cid): cid for cid in reversed(range(config.federation.num_clients))
    }
    algorithm.check_shared_shapes(
        {
            arch: algorithm.shared_state(create_client_state(algorithm, cid, device))
            for arch, cid in first_of_arch.items()
        }
    )
    template = algorithm.create_client(archs[0], torch_generator(config.seed, "server-init"))
    return algorithm.initial_server_state(template.to(device))


def client_store(
    algorithm: AnyAlgorithm,
    device: torch.device,
    client_ids: Iterable[int],
    share: float = 1.0,
    folder: Path | None = None,
) -> ClientStore:
    """The store of the private states of ``client_ids``, with ``share`` of the run's memory budget
    (``federation.client_memory_mb``), spilling to ``folder`` (a temporary one when None)."""
    config = algorithm.config
    budget = int(config.federation.client_memory_mb * share * 2**20)
    return ClientStore(
        lambda client_id: create_client_state(algorithm, client_id, device),
        config.architecture_of,
        client_ids,
        memory_bytes=budget,
        folder=folder,
    )


def build_federation(
    config: ExperimentConfig,
    dataset: Dataset | None = None,
    client_ids: Iterable[int] | None = None,
    *,
    memory_share: float = 1.0,
    store_folder: Path | None = None,
) -> Federation:
    """Load and partition the data, set up the store of the private states of every client (or of
    ``client_ids``; created when first needed, see :func:`client_store` for the other arguments) and the
    initial global state.

    Refuses (AdapterMismatchError) a federation whose shared tensors differ between architectures
    before any training happens.
    """
    if dataset is None:
        dataset = load_run_dataset(config)
    device = resolve_device(config.device)
    clients = build_clients(config, dataset, device)
    algorithm = create_algorithm(config, dataset.input_shape, dataset.num_classes)
    server_state = initial_global_state(algorithm, device)
    owned = range(config.federation.num_clients) if client_ids is None else client_ids
    store = client_store(algorithm, device, owned, memory_share, store_folder)
    return Federation(config, algorithm, clients, store, server_state)
