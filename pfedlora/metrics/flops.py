"""Training FLOPs, counted by PyTorch's own FLOP counter on the operations that actually run.

Counting every step under ``FlopCounterMode`` would slow training several-fold, so the first step of each
kind (an architecture in a phase) is counted and divided by its batch size; later steps of that kind are
charged that per-sample figure times their batch size. Convolutions and matrix products are linear in the
batch size, so this equals counting every step. Frozen parameters get no weight gradient, so a step that
trains only an adapter is charged less than one that trains the whole model.

A language model's step is not linear in its samples: the model runs on the padded batch, its head on the
real tokens alone. For the same batch shape its FLOPs are ``fixed + per_item · items`` (items: the real
tokens), so steps with two distinct counts are counted, a third checks that the line through them holds
exactly, and every later step is charged from the line (:meth:`FlopMeter.run` with ``items``). Where the
check fails, every distinct count is counted once, as before.

The counter's dispatch can change the rounding of a backward pass (in bf16 by up to 3e-3 in a gradient of
SmolLM2's), so a step whose result must not depend on whether it was counted gives a ``probe``: the same
forward and backward without the update, run under the counter in its place before the step itself runs
uncounted. Then which steps a process happens to count (its first of each kind) changes no result.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TypeVar

from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


@dataclass
class _AffineCost:
    """The FLOPs counted for one kind of step at distinct item counts, and whether they lie on one line."""

    counted: dict[int, int] = field(default_factory=dict)
    affine: bool | None = None
    """None until three distinct counts are measured; then whether the third lay on the first two's line."""

    def line(self, items: int) -> Fraction:
        """The FLOPs at ``items`` on the line through the first two counts."""
        (n1, f1), (n2, f2) = list(self.counted.items())[:2]
        return f1 + Fraction(f2 - f1, n2 - n1) * (items - n1)

    def known(self, items: int) -> Fraction | None:
        """The FLOPs of a step with ``items`` if no count is needed, else None."""
        if items in self.counted:
            return Fraction(self.counted[items])
        return self.line(items) if self.affine else None

    def add(self, items: int, flops: int) -> None:
        if len(self.counted) == 2 and self.affine is None:
            self.affine = self.line(items) == flops
        self.counted[items] = flops


@dataclass
class FlopMeter:
    """Runs training steps, charging each its FLOPs; ``total`` is what was charged since the last reset."""

    per_sample: dict[Hashable, float] = field(default_factory=dict)
    affine: dict[Hashable, _AffineCost] = field(default_factory=dict)
    total: float = 0.0
    samples: int = 0
    """Samples processed by all steps ever run (never reset)."""
    counted_steps: int = 0
    """Steps run under the FLOP counter (never reset)."""

    def run(
        self,
        kind: Hashable,
        num_samples: int,
        step: Callable[[], T],
        items: int | None = None,
        probe: Callable[[], object] | None = None,
    ) -> T:
        """Run ``step`` (which processes ``num_samples`` samples) and charge its FLOPs. With ``items``, the
        step's FLOPs are taken to be affine in ``items`` for this ``kind`` (see the module docstring); a
        kind then names one batch shape. With ``probe``, a step is never run under the counter: the probe is
        counted in its place."""
        if items is None:
            if kind in self.per_sample:
                result = step()
            else:
                result, flops = self._counted(step, probe)
                self.per_sample[kind] = flops / max(num_samples, 1)
            charge = self.per_sample[kind] * num_samples
        else:
            cost = self.affine.setdefault(kind, _AffineCost())
            known = cost.known(items)
            if known is None:
                result, flops = self._counted(step, probe)
                cost.add(items, flops)
                charge = float(flops)
            else:
                result, charge = step(), float(known)
        self.total += charge
        self.samples += num_samples
        return result

    def _counted(self, step: Callable[[], T], probe: Callable[[], object] | None = None) -> tuple[T, int]:
        """``step``'s result and its FLOPs: counted on the step itself, or on ``probe`` before the step."""
        with FlopCounterMode(display=False) as counter:
            result = step() if probe is None else probe()
        self.counted_steps += 1
        if probe is not None:
            result = step()
        return result, int(counter.get_total_flops())  # type: ignore[return-value]

    def reset(self) -> float:
        """Return the FLOPs charged so far and start again from zero (per-sample figures are kept)."""
        total, self.total = self.total, 0.0
        return total
