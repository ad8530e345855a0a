"""Federated algorithms on one shared protocol (:class:`Algorithm`), looked up by name in ``ALGORITHMS``.

Importing this package registers the built-in algorithms, in the order ``pfedlora list`` shows them.
"""

from __future__ import annotations

# isort: off
# Each module registers its algorithm on import; this order is the registry's (and `pfedlora list`'s).
from pfedlora.algorithms import pfedlora, standalone, lg_fedavg, fml, fedkd, fedgh  # noqa: F401
from pfedlora.algorithms import fedapen, fedproto, fedavg, fedit, zero_shot, federated_lora  # noqa: F401
from pfedlora.algorithms import fd, fedtgp, fedgen, fedssa, pfedes, pfedafm, pfedmoe, fedmrl  # noqa: F401
from pfedlora.algorithms import fedl2g  # noqa: F401

# isort: on
from pfedlora.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    AnyAlgorithm,
    ClientContext,
    Upload,
    UploadBound,
    register_algorithm,
)
from pfedlora.algorithms.state import State, weighted_average
from pfedlora.config import ExperimentConfig
from pfedlora.errors import ConfigError


def algorithm_class(name: str) -> type[AnyAlgorithm]:
    """The class implementing algorithm ``name``."""
    return ALGORITHMS[name]


def create_algorithm(
    config: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int
) -> AnyAlgorithm:
    """The algorithm named by ``config.algorithm``, set up for this data.

    Refuses the privacy option for an algorithm whose uploads are not averaged copies of the global state.
    """
    cls = algorithm_class(config.algorithm)
    if config.privacy.enabled and not cls.uploads_global_state:
        supported = [name for name, other in ALGORITHMS.items() if other.uploads_global_state]
        raise ConfigError(
            f"privacy.clip_norm: {config.algorithm!r} does not upload averaged copies of the global state, "
            f"so clipping and noise do not apply; algorithms that support it: {', '.join(supported)}"
        )
    return cls(config, input_shape, num_classes)


__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "AnyAlgorithm",
    "ClientContext",
    "State",
    "Upload",
    "UploadBound",
    "algorithm_class",
    "create_algorithm",
    "register_algorithm",
    "weighted_average",
]
