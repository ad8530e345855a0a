"""Checks on what a client uploads, so that one bad update cannot corrupt the global state.

The server runs :func:`screen_uploads` on every round's replies in both runtimes (simulator and Flower):
an upload with missing or extra tensors, wrong shapes or dtypes, NaN or Inf values, or a sample count that
is not positive or exceeds what the client declared is refused, with the client id and the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pfedlora.algorithms.base import Algorithm, State, Upload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """One client's answer to a round: who sent it, and the upload."""

    client_id: int
    upload: Upload


@dataclass(frozen=True)
class Refusal:
    client_id: int
    reason: str


def check_schema(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError unless ``tensors`` has exactly the keys, shapes and dtypes of ``expected``."""
    missing = [key for key in expected if key not in tensors]
    extra = [key for key in tensors if key not in expected]
    if missing:
        raise ValueError(f"missing tensors: {', '.join(missing)}")
    if extra:
        raise ValueError(f"unexpected tensors: {', '.join(extra)}")
    for key, reference in expected.items():
        value = tensors[key]
        if value.shape != reference.shape:
            raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}")
        if value.dtype != reference.dtype:
            raise ValueError(f"{key} has dtype {value.dtype}, expected {reference.dtype}")


def check_dtypes(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Raise ValueError unless every tensor has ``dtype``."""
    for key, value in tensors.items():
        if value.dtype != dtype:
            raise ValueError(f"{key} has dtype {value.dtype}, expected {dtype}")


def upload_problem(
    algorithm: Algorithm, server_state: State, upload: Upload, declared_examples: int
) -> str | None:
    """Why ``upload`` must be refused, or None when it is valid."""
    count = upload.num_examples
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        return f"sample count {count!r} is not a positive integer"
    if count > declared_examples:
        return f"sample count {count} exceeds the {declared_examples} training samples the client declared"
    try:
        algorithm.check_upload(server_state, upload.tensors)
    except ValueError as error:
        return str(error)
    for key, value in upload.tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{key} holds NaN or Inf values"
    return None


def screen_uploads(
    algorithm: Algorithm,
    server_state: State,
    replies: Sequence[Reply],
    declared_examples: Mapping[int, int],
    server_round: int,
) -> tuple[list[Reply], list[Refusal]]:
    """Split ``replies`` into the valid ones and the refused ones; every refusal is logged."""
    valid, refused = [], []
    for reply in replies:
        reason = upload_problem(algorithm, server_state, reply.upload, declared_examples[reply.client_id])
        if reason is None:
            valid.append(reply)
        else:
            logger.warning(
                "round %d: refused the update of client %d: %s", server_round, reply.client_id, reason
            )
            refused.append(Refusal(reply.client_id, reason))
    return valid, refused
