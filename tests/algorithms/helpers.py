"""Helpers shared by the algorithm tests."""

import torch

from pfedlora.algorithms import ClientContext
from pfedlora.metrics import FlopMeter


def client_context(federation, client_id=0, server_round=1, meter=None):
    """The context the round loop would give ``client_id``, with a fixed batch-order generator."""
    return ClientContext(
        client_id=client_id,
        arch=federation.config.architecture_of(client_id),
        server_round=server_round,
        data=federation.clients[client_id],
        generator=torch.Generator().manual_seed(1),
        meter=meter or FlopMeter(),
    )
