"""Checks on what a client uploads, so that one bad update cannot corrupt the global state.

The server runs :func:`screen_uploads` on every round's replies in both runtimes (simulator and Flower):
an upload holding tensors the algorithm does not declare shared, missing or extra tensors, wrong shapes or
dtypes, NaN or Inf values, or a sample count that is not positive or exceeds what the client declared is
refused, with the client id and the reason; so is a reply that cannot be read at all (a Flower reply
lacking its records, or with values of the wrong type).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from pfedlora.algorithms import AnyAlgorithm, State, Upload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """One client's answer to a round: who sent it, and the upload."""

    client_id: int
    upload: Upload
    problem: str | None = None
    """Set where the reply could not even be read (then refused with this reason)."""


@dataclass(frozen=True)
class Refusal:
    """An upload the server refused: whose, and why."""

    client_id: int
    reason: str


def upload_problem(
    algorithm: AnyAlgorithm, server_state: State, upload: Upload, declared_examples: int
) -> str | None:
    """Why ``upload`` must be refused, or None when it is valid."""
    count = upload.num_examples
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        return f"sample count {count!r} is not a positive integer"
    if count > declared_examples:
        return f"sample count {count} exceeds the {declared_examples} training samples the client declared"
    undeclared = [key for key in upload.tensors if not algorithm.is_shared(key)]
    if undeclared:
        return f"unexpected tensors (not shared by {algorithm.name}): {', '.join(undeclared)}"
    try:
        algorithm.check_upload(server_state, upload.tensors)
    except ValueError as error:
        return str(error)
    for key, value in upload.tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{key} holds NaN or Inf values"
    return None


def screen_uploads(
    algorithm: AnyAlgorithm,
    server_state: State,
    replies: Sequence[Reply],
    declared_examples: Mapping[int, int],
    server_round: int,
) -> tuple[list[Reply], list[Refusal]]:
    """Split ``replies`` into the valid ones and the refused ones; every refusal is logged."""
    valid, refused = [], []
    for reply in replies:
        reason = reply.problem or upload_problem(
            algorithm, server_state, reply.upload, declared_examples[reply.client_id]
        )
        if reason is None:
            valid.append(reply)
        else:
            logger.warning(
                "round %d: refused the update of client %d: %s", server_round, reply.client_id, reason
            )
            refused.append(Refusal(reply.client_id, reason))
    return valid, refused
