"""Training FLOPs, counted by PyTorch's own FLOP counter on the operations that actually run.

Counting every step under ``FlopCounterMode`` would slow training several-fold, so the first step of each
kind (an architecture in a phase) is counted and divided by its batch size; later steps of that kind are
charged that per-sample figure times their batch size. Convolutions and matrix products are linear in the
batch size, so this equals counting every step. Frozen parameters get no weight gradient, so a step that
trains only an adapter is charged less than one that trains the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


@dataclass
class FlopMeter:
    """Runs training steps, charging each its FLOPs; ``total`` is what was charged since the last reset."""

    per_sample: dict[Hashable, float] = field(default_factory=dict)
    total: float = 0.0
    samples: int = 0
    """Samples processed by all steps ever run (never reset)."""

    def run(self, kind: Hashable, num_samples: int, step: Callable[[], T]) -> T:
        """Run ``step`` (which processes ``num_samples`` samples) and charge its FLOPs."""
        if kind in self.per_sample:
            result = step()
        else:
            with FlopCounterMode(display=False) as counter:
                result = step()
            self.per_sample[kind] = counter.get_total_flops() / max(num_samples, 1)
        self.total += self.per_sample[kind] * num_samples
        self.samples += num_samples
        return result

    def reset(self) -> float:
        """Return the FLOPs charged so far and start again from zero (per-sample figures are kept)."""
        total, self.total = self.total, 0.0
        return total
