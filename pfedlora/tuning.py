"""Hyperparameter search on a validation split: one coordinate search per comparison variant.

Every variant starts from the base configuration with each axis at its first value; each axis in turn
tries its values with the other axes at their best so far, and keeps the value with the highest mean
validation accuracy at the last round (for language modeling the lowest validation perplexity; ties go to
the value listed first, so list the cheapest first).
Every trial is an ordinary run directory, so an interrupted search resumes. The test split is never read:
a search refuses a configuration without a validation split.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import tomli_w

from pfedlora.compare import Variant, VariantRound, plan_variants, run_comparison, split_scoped
from pfedlora.config import load_config
from pfedlora.errors import ConfigError
from pfedlora.simulation.lock import directory_lock
from pfedlora.simulation.results import write_atomic

SELECTION_METRIC: Final = "mean_accuracy_last"
LM_SELECTION_METRIC: Final = "mean_perplexity_last"
"""What a language-modeling search selects by instead (the lowest)."""
Settings = tuple[tuple[str, str], ...]
"""Axis values of one trial, as (key, value) pairs in axis order."""


@dataclass(frozen=True)
class Axis:
    """One hyperparameter and the values the search tries for it; ``scope`` limits it to one variant."""

    key: str
    values: tuple[str, ...]
    scope: str | None = None

    @classmethod
    def parse(cls, text: str) -> Axis:
        """``[label:]key=v1,v2,...``, for example ``train.local_epochs=1,2,3`` or
        ``fedproto:fedproto.lambda=1,10``."""
        shared, scoped = split_scoped([text])
        scope, (assignment,) = next(iter(scoped.items())) if scoped else (None, shared)
        key, sep, listed = assignment.partition("=")
        values = tuple(v.strip() for v in listed.split(",") if v.strip())
        if not sep or not key.strip() or not values:
            raise ConfigError(f"search axis {text!r} is not of the form [label:]key=v1,v2,...")
        return cls(key.strip(), values, scope)

    def applies_to(self, variant: Variant) -> bool:
        return self.scope is None or self.scope in (variant.label, variant.config.algorithm)


@dataclass(frozen=True)
class Trial:
    """One run of the search: the variant, the axis values it used and its validation accuracy (for
    language modeling: its validation perplexity)."""

    label: str
    settings: tuple[tuple[str, str], ...]
    accuracy: float
    run_dir: Path
    perplexity: float | None = None

    @property
    def score(self) -> float:
        """Higher is better: the accuracy, or the negated perplexity."""
        return self.accuracy if self.perplexity is None else -self.perplexity


def _trial_name(settings: Sequence[tuple[str, str]]) -> str:
    text = "_".join(f"{key.split('.')[-1]}={value}" for key, value in settings) or "defaults"
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", text)


def coordinate_search(
    algorithms: Sequence[str],
    placements: Sequence[str],
    axes: Sequence[Axis],
    out_dir: str | Path,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    on_start: Callable[[Variant, bool], None] | None = None,
    on_round: VariantRound | None = None,
    jobs: int = 1,
    workers: int | None = None,
) -> tuple[list[Trial], dict[str, dict[str, str]]]:
    """Search every variant's axes on validation data; returns all trials and each variant's best settings.

    Trials run into ``out_dir/<label>/<axis values>``; finished ones are reused. The trials of one axis are
    independent, so ``jobs`` > 1 runs them side by side (see :func:`~pfedlora.compare.run_comparison`).
    ``out_dir`` is locked for this process while the search runs (a second search there is refused).
    """
    base = plan_variants(algorithms, placements, config_file, overrides)
    for variant in base:
        if variant.config.data.validation_fraction <= 0:
            raise ConfigError(
                "a search needs a validation split, never the test split: "
                "set data.validation_fraction (for example 0.1)"
            )
    known = {v.label for v in base} | {v.config.algorithm for v in base}
    for axis in axes:
        if axis.scope is not None and axis.scope not in known:
            raise ConfigError(f"search axis scoped to {axis.scope!r}, which is not among: {', '.join(known)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with directory_lock(out):
        return _search(base, axes, out, config_file, on_start, on_round, jobs, workers)


def _search(
    base: Sequence[Variant],
    axes: Sequence[Axis],
    out: Path,
    config_file: str | Path | None,
    on_start: Callable[[Variant, bool], None] | None,
    on_round: VariantRound | None,
    jobs: int,
    workers: int | None,
) -> tuple[list[Trial], dict[str, dict[str, str]]]:
    """:func:`coordinate_search` once this process holds the lock of ``out``."""
    trials: list[Trial] = []
    best: dict[str, dict[str, str]] = {}
    for variant in base:

        def trial_of(settings: Settings, variant: Variant = variant) -> Variant:
            assignments = (*variant.overrides, *(f"{key}={value}" for key, value in settings))
            label = f"{variant.label}/{_trial_name(settings)}"
            return Variant(label, load_config(config_file, assignments), assignments)

        def prepare(candidates: Sequence[Settings]) -> None:
            run_comparison([trial_of(s) for s in candidates], out, on_start, on_round, jobs, workers)

        def score(settings: Settings, variant: Variant = variant) -> float:
            trial = trial_of(settings)
            [(_, _, summary)] = run_comparison([trial], out, on_start, on_round, workers=workers)
            perplexity = summary.get(LM_SELECTION_METRIC)
            done = Trial(variant.label, settings, summary[SELECTION_METRIC], out / trial.label, perplexity)
            trials.append(done)
            return done.score

        best[variant.label] = _coordinate_ascent([a for a in axes if a.applies_to(variant)], score, prepare)
    return trials, best


def _coordinate_ascent(
    axes: Sequence[Axis],
    score: Callable[[Settings], float],
    prepare: Callable[[Sequence[Settings]], None] | None = None,
) -> dict[str, str]:
    """Each axis in turn, the value that scores best with the others fixed; each setting scored once.

    ``prepare``, if given, is first handed the settings of an axis not scored yet, all together (so that
    their runs can go side by side; :func:`score` then reads them).
    """
    current = {axis.key: axis.values[0] for axis in axes}
    scores: dict[Settings, float] = {}

    def cached(settings: dict[str, str]) -> float:
        key = tuple(settings.items())
        if key not in scores:
            scores[key] = score(key)
        return scores[key]

    if not axes:
        cached(current)
    for axis in axes:
        candidates = [{**current, axis.key: value} for value in axis.values]
        fresh = [tuple(c.items()) for c in candidates if tuple(c.items()) not in scores]
        if prepare is not None and len(fresh) > 1:
            prepare(fresh)
        results = [cached(c) for c in candidates]
        current[axis.key] = axis.values[results.index(max(results))]  # first of equals wins
    return current


def write_search(trials: Sequence[Trial], best: dict[str, dict[str, str]], out_dir: str | Path) -> list[Path]:
    """``trials.csv`` (every trial, in the order run) and ``best.toml`` (each variant's chosen values)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    perplexities = any(trial.perplexity is not None for trial in trials)
    writer.writerow(["variant", "settings", "validation ppl" if perplexities else "validation acc %", "run"])
    for trial in trials:
        settings = " ".join(f"{k}={v}" for k, v in trial.settings)
        figure = f"{trial.perplexity:.3f}" if trial.perplexity is not None else f"{100 * trial.accuracy:.2f}"
        writer.writerow([trial.label, settings, figure, trial.run_dir.as_posix()])
    write_atomic(out / "trials.csv", buffer.getvalue())
    write_atomic(out / "best.toml", tomli_w.dumps(best))
    return [out / "trials.csv", out / "best.toml"]


def best_overrides(best: dict[str, dict[str, str]]) -> list[str]:
    """The chosen values as ``label:key=value`` overrides for ``pfedlora compare --set``."""
    return [f"{label}:{key}={value}" for label, settings in best.items() for key, value in settings.items()]
