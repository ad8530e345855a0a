"""Communication is counted from the tensors actually sent, never estimated (as FLSim's channel does)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

Payload = Mapping[str, torch.Tensor]


def payload_bytes(payload: Payload) -> int:
    """Bytes on the wire for ``payload``: the sum of numel × element size of its tensors."""
    return sum(t.numel() * t.element_size() for t in payload.values())


@dataclass
class Channel:
    """Carries payloads between server and clients and counts their bytes per client, per direction.

    Tensors are handed over as detached copies, so neither side can alias the other's state.
    """

    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)

    def download(self, client_id: int, payload: Payload) -> dict[str, torch.Tensor]:
        """Server → client."""
        self.bytes_down[client_id] = self.bytes_down.get(client_id, 0) + payload_bytes(payload)
        return {k: v.detach().clone() for k, v in payload.items()}

    def upload(self, client_id: int, payload: Payload) -> dict[str, torch.Tensor]:
        """Client → server."""
        self.bytes_up[client_id] = self.bytes_up.get(client_id, 0) + payload_bytes(payload)
        return {k: v.detach().clone() for k, v in payload.items()}

    def reset(self) -> None:
        self.bytes_down.clear()
        self.bytes_up.clear()

    @property
    def total_down(self) -> int:
        return sum(self.bytes_down.values())

    @property
    def total_up(self) -> int:
        return sum(self.bytes_up.values())
