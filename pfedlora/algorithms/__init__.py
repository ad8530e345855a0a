"""Federated algorithms on one shared protocol (:class:`Algorithm`), looked up by name."""

from pfedlora.algorithms.aggregate import weighted_average
from pfedlora.algorithms.base import Algorithm, ClientContext, State, Upload
from pfedlora.algorithms.pfedlora import PFedLoRA
from pfedlora.algorithms.standalone import Standalone
from pfedlora.config import ExperimentConfig
from pfedlora.errors import ConfigError

REGISTRY: dict[str, type[Algorithm]] = {cls.name: cls for cls in (PFedLoRA, Standalone)}


def create_algorithm(
    config: ExperimentConfig, input_shape: tuple[int, int, int], num_classes: int
) -> Algorithm:
    """The algorithm named by ``config.algorithm``, set up for this data."""
    try:
        cls = REGISTRY[config.algorithm]
    except KeyError:
        raise ConfigError(
            f"algorithm: unknown value {config.algorithm!r}; allowed: {', '.join(REGISTRY)}"
        ) from None
    return cls(config, input_shape, num_classes)


__all__ = [
    "REGISTRY",
    "Algorithm",
    "ClientContext",
    "PFedLoRA",
    "Standalone",
    "State",
    "Upload",
    "create_algorithm",
    "weighted_average",
]
