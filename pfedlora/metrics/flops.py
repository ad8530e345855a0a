"""Training FLOPs, counted by PyTorch's own FLOP counter on the operations that actually run.

Counting every step under ``FlopCounterMode`` would slow training several-fold, so the first step of each
kind (an architecture in a phase) is counted and divided by its batch size; later steps of that kind are
charged that per-sample figure times their batch size. Convolutions and matrix products are linear in the
batch size, so this equals counting every step. Frozen parameters get no weight gradient, so a step that
trains only an adapter is charged less than one that trains the whole model.

A language model's step is not linear in its samples: its head runs on the real tokens alone, and its
decoder on the real tokens packed into one row (whose attention is quadratic in the row's length) or on
the padded batch. For one batch shape its FLOPs are a polynomial of degree at most 2 in the real tokens, so
steps with three distinct counts are counted, a fourth checks that the parabola through them holds exactly,
and every later step is charged from it (:meth:`FlopMeter.run` with ``items``). Where the check fails,
every distinct count is counted once. The three counts that give the parabola can come from copies of the
kind's first step cut short (``fit``: each sample's first few tokens, the same kind of step): they cost a
few tokens' work instead of three full steps, and the first full step is the check.

The counter's dispatch can change the rounding of a backward pass (in bf16 by up to 3e-3 in a gradient of
SmolLM2's), so a step whose result must not depend on whether it was counted gives a ``probe``: the same
forward and backward without the update, run under the counter in its place before the step itself runs
uncounted. Then which steps a process happens to count (its first of each kind) changes no result.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TypeVar

from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


@dataclass
class _QuadraticCost:
    """The FLOPs counted for one kind of step at distinct item counts, and whether they lie on one parabola
    (a line is one too)."""

    counted: dict[int, int] = field(default_factory=dict)
    exact: bool | None = None
    """None until four distinct counts are measured; then whether the fourth lay on the first three's
    parabola."""

    def fitted(self, items: int) -> Fraction:
        """The FLOPs at ``items`` on the parabola through the first three counts (Lagrange's form, exact)."""
        points = list(self.counted.items())[:3]
        total = Fraction(0)
        for i, (n_i, f_i) in enumerate(points):
            weight = Fraction(f_i)
            for j, (n_j, _) in enumerate(points):
                if j != i:
                    weight *= Fraction(items - n_j, n_i - n_j)
            total += weight
        return total

    def known(self, items: int) -> Fraction | None:
        """The FLOPs of a step with ``items`` if no count is needed, else None."""
        if items in self.counted:
            return Fraction(self.counted[items])
        return self.fitted(items) if self.exact else None

    def add(self, items: int, flops: int) -> None:
        if len(self.counted) == 3 and self.exact is None:
            self.exact = self.fitted(items) == flops
        self.counted[items] = flops


@dataclass
class FlopMeter:
    """Runs training steps, charging each its FLOPs; ``total`` is what was charged since the last reset."""

    per_sample: dict[Hashable, float] = field(default_factory=dict)
    polynomial: dict[Hashable, _QuadraticCost] = field(default_factory=dict)
    total: float = 0.0
    samples: int = 0
    """Samples processed by all steps ever run (never reset)."""
    counted_steps: int = 0
    """Steps run under the FLOP counter (never reset)."""
    counted_short: int = 0
    """Steps cut short run under the FLOP counter to fit a parabola (``fit``; never reset)."""

    def run(
        self,
        kind: Hashable,
        num_samples: int,
        step: Callable[[], T],
        items: int | None = None,
        probe: Callable[[], object] | None = None,
        fit: Callable[[], Iterable[tuple[int, Callable[[], object]]]] | None = None,
    ) -> T:
        """Run ``step`` (which processes ``num_samples`` samples) and charge its FLOPs. With ``items``, the
        step's FLOPs are taken to be a polynomial of degree at most 2 in ``items`` for this ``kind`` (see
        the module docstring); a kind then names one batch shape. With ``probe``, a step is never run under
        the counter: the probe is counted in its place. With ``fit``, the first step of a kind first counts
        the shorter steps of the same kind that ``fit()`` gives (their ``items`` and a forward and backward
        that changes no result), as the parabola's first three points."""
        if items is None:
            if kind in self.per_sample:
                result = step()
            else:
                result, flops = self._counted(step, probe)
                self.per_sample[kind] = flops / max(num_samples, 1)
            charge = self.per_sample[kind] * num_samples
        else:
            cost = self.polynomial.setdefault(kind, _QuadraticCost())
            if fit is not None and not cost.counted:
                self._fit(cost, fit())
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

    def _fit(self, cost: _QuadraticCost, short_steps: Iterable[tuple[int, Callable[[], object]]]) -> None:
        """Count the short steps of distinct item counts, up to the three that give the parabola."""
        for items, short_step in short_steps:
            if len(cost.counted) == 3:
                return
            if items not in cost.counted:
                with FlopCounterMode(display=False) as counter:
                    short_step()
                cost.add(items, int(counter.get_total_flops()))
                self.counted_short += 1

    def _counted(self, step: Callable[[], T], probe: Callable[[], object] | None = None) -> tuple[T, int]:
        """``step``'s result and its FLOPs: counted on the step itself, or on ``probe`` before the step."""
        if probe is None:
            with FlopCounterMode(display=False) as counter:
                result = step()
        else:
            with FlopCounterMode(display=False) as counter:
                probe()
            result = step()
        self.counted_steps += 1
        return result, int(counter.get_total_flops())

    def reset(self) -> float:
        """Return the FLOPs charged so far and start again from zero (per-sample figures are kept)."""
        total, self.total = self.total, 0.0
        return total
