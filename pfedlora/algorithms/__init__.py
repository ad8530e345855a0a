"""Federated algorithms on one shared protocol (:class:`Algorithm`), looked up by name."""

from __future__ import annotations

import importlib

from pfedlora.algorithms.aggregate import weighted_average
from pfedlora.algorithms.base import Algorithm, ClientContext, State, Upload
from pfedlora.config import ExperimentConfig
from pfedlora.errors import ConfigError

IMPLEMENTATIONS: dict[str, str] = {
    "pfedlora": "pfedlora.algorithms.pfedlora:PFedLoRA",
    "standalone": "pfedlora.algorithms.standalone:Standalone",
    "lg-fedavg": "pfedlora.algorithms.lg_fedavg:LGFedAvg",
    "fml": "pfedlora.algorithms.fml:FML",
    "fedkd": "pfedlora.algorithms.fedkd:FedKD",
    "fedgh": "pfedlora.algorithms.fedgh:FedGH",
    "fedapen": "pfedlora.algorithms.fedapen:FedAPEN",
    "fedproto": "pfedlora.algorithms.fedproto:FedProto",
    "fedavg": "pfedlora.algorithms.fedavg:FedAvg",
}
"""Algorithm name -> "module:class", imported on first use."""


def algorithm_class(name: str) -> type[Algorithm]:
    """The class implementing algorithm ``name``."""
    if name not in IMPLEMENTATIONS:
        raise ConfigError(f"algorithm: unknown value {name!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
    module, _, cls = IMPLEMENTATIONS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def create_algorithm(
    config: ExperimentConfig, input_shape: tuple[int, int, int], num_classes: int
) -> Algorithm:
    """The algorithm named by ``config.algorithm``, set up for this data.

    Refuses the privacy option for an algorithm whose uploads are not averaged copies of the global state.
    """
    cls = algorithm_class(config.algorithm)
    if config.privacy.enabled and not cls.uploads_global_state:
        supported = [name for name in IMPLEMENTATIONS if algorithm_class(name).uploads_global_state]
        raise ConfigError(
            f"privacy.clip_norm: {config.algorithm!r} does not upload averaged copies of the global state, "
            f"so clipping and noise do not apply; algorithms that support it: {', '.join(supported)}"
        )
    return cls(config, input_shape, num_classes)


__all__ = [
    "IMPLEMENTATIONS",
    "Algorithm",
    "ClientContext",
    "State",
    "Upload",
    "algorithm_class",
    "create_algorithm",
    "weighted_average",
]
