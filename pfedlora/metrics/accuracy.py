"""Accuracy over a federation: per-client values and the summaries the paper reports."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

from pfedlora.tasks import Counts


@dataclass(frozen=True)
class AccuracyReport:
    """One evaluation of every client's personalized predictor on its own split.

    A client whose split holds no sample has no accuracy (None): the means and the spread are over the
    clients that have one, and :attr:`without_samples` counts the others.
    """

    correct: tuple[int, ...]
    totals: tuple[int, ...]
    answered: tuple[bool, ...] | None = None
    """Per client, whether it answered at all (Flower: a node that did not reply in time, or whose reply
    was refused, has no accuracy either, and is not a client without samples); None: every client did."""
    losses: tuple[float, ...] | None = None
    """Per client, the summed negative log-likelihood of its scored items (language modeling: of its
    tokens, which ``totals`` counts); None where the task reports no perplexity."""

    @classmethod
    def from_counts(
        cls,
        counts: Mapping[int, tuple[int, int] | Counts],
        clients: int | Sequence[int],
        *,
        losses: bool = False,
    ) -> AccuracyReport:
        """The report of ``clients`` (a count n: clients 0..n-1) from their (correct, total[, loss sum])
        counts; with ``losses``, their summed NLL too (for perplexities)."""
        ids = range(clients) if isinstance(clients, int) else clients
        return cls(
            tuple(counts[c][0] for c in ids),
            tuple(counts[c][1] for c in ids),
            losses=tuple(Counts(*counts[c]).loss_sum for c in ids) if losses else None,
        )

    @property
    def per_client(self) -> tuple[float | None, ...]:
        return tuple(c / t if t else None for c, t in zip(self.correct, self.totals, strict=True))

    @property
    def without_samples(self) -> int:
        """Clients whose evaluation split is empty (left out of every mean)."""
        answered = self.answered or (True,) * len(self.totals)
        return sum(1 for t, heard in zip(self.totals, answered, strict=True) if t == 0 and heard)

    @property
    def unanswered(self) -> int:
        """Clients that gave no valid evaluation (left out of every mean)."""
        return sum(1 for heard in self.answered or () if not heard)

    def _scored(self) -> list[float]:
        return [value for value in self.per_client if value is not None]

    @property
    def mean(self) -> float:
        """Unweighted mean over the clients with evaluation samples (the paper's "mean test accuracy");
        NaN when no client has any."""
        values = self._scored()
        return sum(values) / len(values) if values else math.nan

    @property
    def weighted(self) -> float:
        """Sample-weighted mean: all correct predictions over all samples."""
        return sum(self.correct) / max(sum(self.totals), 1)

    @property
    def per_client_perplexity(self) -> tuple[float | None, ...]:
        """exp(summed NLL / tokens) per client (None without tokens); empty without losses."""
        if self.losses is None:
            return ()
        return tuple(
            math.exp(loss / total) if total else None
            for loss, total in zip(self.losses, self.totals, strict=True)
        )

    @property
    def mean_perplexity(self) -> float:
        """Unweighted mean of the clients' perplexities (NaN where none has one)."""
        values = [v for v in self.per_client_perplexity if v is not None]
        return sum(values) / len(values) if values else math.nan

    @property
    def median_perplexity(self) -> float:
        """Median of the clients' perplexities (NaN where none has one)."""
        values = [v for v in self.per_client_perplexity if v is not None]
        return statistics.median(values) if values else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation of the accuracies of the clients with evaluation samples."""
        values, mean = self._scored(), self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if values else math.nan


class CurveSummary(TypedDict):
    """Best (and its round), last, and last-10% mean of a mean-accuracy curve."""

    mean_accuracy_best: float
    best_round: int
    mean_accuracy_last: float
    mean_accuracy_last10pct: float


def summarize_curve(rounds: Sequence[int], means: Sequence[float]) -> CurveSummary:
    """Best, last, and mean of the last 10% of evaluated rounds (at least one) of a mean-accuracy curve."""
    if not means:
        raise ValueError("no evaluated rounds to summarize")
    best = max(range(len(means)), key=lambda i: (means[i], -i))
    tail = max(1, math.ceil(0.1 * len(means)))
    return {
        "mean_accuracy_best": means[best],
        "best_round": rounds[best],
        "mean_accuracy_last": means[-1],
        "mean_accuracy_last10pct": sum(means[-tail:]) / tail,
    }


FLAT_CHANGE = 0.003
"""A curve counts as flat when its mean accuracy changes by less than this (0.3 points) over the last 10% of
the rounds (:func:`change_over_last_tenth`)."""


def change_over_last_tenth(rounds: Sequence[int], means: Sequence[float], total_rounds: int) -> float | None:
    """How much the mean accuracy changed over the last 10% of ``total_rounds``: the last value minus the
    curve at round 0.9·``total_rounds``, linearly interpolated between the evaluated rounds around it.
    None when no evaluated round lies at or before that round (the curve is too sparse to say)."""
    start = 0.9 * total_rounds
    before = [i for i, r in enumerate(rounds) if r <= start]
    if not before or len(rounds) != len(means):
        return None
    i = before[-1]
    if rounds[i] == start or i + 1 == len(rounds):
        reference = means[i]
    else:
        weight = (start - rounds[i]) / (rounds[i + 1] - rounds[i])
        reference = means[i] + weight * (means[i + 1] - means[i])
    return means[-1] - reference
