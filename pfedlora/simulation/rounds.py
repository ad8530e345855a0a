"""The steps of a round that both runtimes (simulator and Flower) share, free of either runtime.

Who drops out, how a sampled client turns the server's message into an upload, and how the server turns
the round's replies into the next global state: refusing invalid uploads, keeping the global state when
fewer than ``federation.min_clients`` valid ones remain, bounding any one client's weight
(``federation.weight_cap``), and applying the privacy option.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from pfedlora.algorithms import AnyAlgorithm, ClientContext, State, Upload
from pfedlora.algorithms.privacy import add_gaussian_noise, clip_update
from pfedlora.config import ExperimentConfig
from pfedlora.metrics import FlopMeter
from pfedlora.seeding import numpy_generator, torch_generator
from pfedlora.simulation.screening import Refusal, Reply, screen_uploads

logger = logging.getLogger(__name__)


def drops_out(config: ExperimentConfig, client_id: int, server_round: int) -> bool:
    """Whether sampled client ``client_id`` fails to reply in ``server_round`` (seeded, ``drop_rate``)."""
    rate = config.federation.drop_rate
    return rate > 0 and numpy_generator(config.seed, "dropout", server_round, client_id).random() < rate


def client_update(algorithm: AnyAlgorithm, client: nn.Module, message: State, ctx: ClientContext) -> Upload:
    """Train ``client`` on the server's ``message``; with privacy on, clip the update before it leaves."""
    client.train()
    upload = algorithm.train(client, message, ctx)
    client.zero_grad(set_to_none=True)  # gradients are no part of the state: idle clients hold half as much
    privacy = algorithm.config.privacy
    if privacy.enabled:
        upload = Upload(clip_update(message, upload.tensors, privacy.clip_norm), upload.num_examples)
    return upload


@dataclass(frozen=True)
class RoundOutcome:
    """The next global state, whose uploads made it, and which were refused and why."""

    server_state: State
    aggregated: list[int]
    refused: list[Refusal]
    server_flops: float = 0.0
    """What training on the server cost (FedGH's header, FedTGP's prototypes; 0 for plain averaging)."""


def cap_weights(uploads: Sequence[Upload], cap: float, server_round: int) -> list[Upload]:
    """The uploads with every sample count bounded by ``cap`` × the median count of the round."""
    bound = max(1, math.floor(cap * statistics.median(u.num_examples for u in uploads)))
    capped = [Upload(u.tensors, min(u.num_examples, bound)) for u in uploads]
    if any(u.num_examples > bound for u in uploads):
        logger.info("round %d: sample counts above %d (federation.weight_cap) capped", server_round, bound)
    return capped


def server_update(
    algorithm: AnyAlgorithm,
    server_state: State,
    replies: Sequence[Reply],
    declared_examples: Mapping[int, int],
    server_round: int,
) -> RoundOutcome:
    """Screen the replies, then aggregate the valid ones (unchanged state below ``min_clients``)."""
    config = algorithm.config
    valid, refused = screen_uploads(algorithm, server_state, replies, declared_examples, server_round)
    if len(valid) < config.federation.min_clients:
        logger.warning(
            "round %d: %d valid upload(s), fewer than federation.min_clients = %d; global state unchanged",
            server_round,
            len(valid),
            config.federation.min_clients,
        )
        return RoundOutcome(server_state, [], refused)
    uploads = [reply.upload for reply in valid]
    if config.federation.weight_cap > 0:
        uploads = cap_weights(uploads, config.federation.weight_cap, server_round)
    privacy = config.privacy
    if privacy.enabled:  # equal weights: each client's influence is bounded by the clipping norm alone
        uploads = [Upload(upload.tensors, 1) for upload in uploads]
    meter = FlopMeter()
    new_state = algorithm.aggregate(server_state, uploads, server_round, meter)
    if privacy.enabled and privacy.noise_multiplier > 0:
        std = privacy.noise_multiplier * privacy.clip_norm / len(uploads)
        new_state = add_gaussian_noise(new_state, std, torch_generator(config.seed, "privacy", server_round))
    return RoundOutcome(new_state, [reply.client_id for reply in valid], refused, meter.total)
