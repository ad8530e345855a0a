"""Conversions between pfedlora's values and Flower records: the only thing the Flower layer adds.

Tensors travel as an ``ArrayRecord`` (float32 and integer tensors as they are; keys and order kept);
the experiment configuration travels as TOML text in a ``ConfigRecord``, so that every ClientApp runs with
exactly the server's configuration.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecordValues

from pfedlora.algorithms import State
from pfedlora.config import ExperimentConfig, config_from_dict

ConfigValue = ConfigRecordValues

TENSORS = "tensors"
"""RecordDict key of the ArrayRecord carrying a payload (broadcast or upload)."""
SETTINGS = "settings"
"""RecordDict key of the ConfigRecord carrying the configuration and the round's instructions."""
METRICS = "metrics"
"""RecordDict key of a reply's MetricRecord."""


def to_record(state: State) -> ArrayRecord:
    """``state`` as an ArrayRecord (on the CPU, contiguous, detached)."""
    return ArrayRecord({key: value.detach().cpu().contiguous() for key, value in state.items()})


def from_record(record: ArrayRecord, device: torch.device | str = "cpu") -> State:
    """The tensors of ``record``, on ``device``."""
    return {key: value.to(device) for key, value in record.to_torch_state_dict().items()}


def read_int(record: Mapping[str, object], key: str) -> int:
    """``record[key]`` as an int; ValueError unless it is a whole number (bools refused)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"{key} is {value!r}, not a whole number")
    return int(value)


def read_float(record: Mapping[str, object], key: str) -> float:
    """``record[key]`` as a float; ValueError unless it is a number (bools refused)."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} is {value!r}, not a number")
    return float(value)


def config_from_text(text: str) -> ExperimentConfig:
    """The configuration the server sent (``config_to_toml`` text), validated again on the client."""
    return config_from_dict(tomllib.loads(text))
