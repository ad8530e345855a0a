"""PNG plots of finished runs: mean accuracy (for language modeling: mean perplexity) per round, against
cumulative megabytes sent, and against cumulative client training FLOPs (both on log axes: methods' bytes
span orders of magnitude; a method that sends nothing is marked at the axis's left edge). A method run with
several seeds is one line (the mean over seeds) in a band of ± one standard deviation across seeds."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import LogFormatterSciNotation, MaxNLocator, MultipleLocator

from pfedlora.simulation.records import ACCURACY, Headline, RoundRecord, Summary, headline_of, is_evaluated

Run = tuple[str, list[RoundRecord]]
"""A label and the run's per-round records."""
Group = tuple[str, list[list[RoundRecord]]]
"""A label and the per-round records of each of its runs (one per seed)."""
XKey = Literal["round", "cumulative_bytes", "cumulative_train_flops"]


class _PlainLogFormatter(LogFormatterSciNotation):
    """Labels the ticks matplotlib's log formatter would label, as plain numbers (20, 0.5, 2,000): on an axis
    spanning little more than a decade, where the minor ticks carry the labels, 2×10⁰ 3×10⁰ 4×10⁰ collide."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:,.10g}" if super().__call__(x, pos) else ""


def _round_locator(evaluated_rounds: Sequence[int], most_ticks: int = 12) -> MaxNLocator | MultipleLocator:
    """Ticks on evaluated rounds (5, 10, 15 where the runs are evaluated every 5 rounds), every 2nd, 5th,
    10th, 20th, … of them where more than ``most_ticks`` would crowd the axis; never round 3.5."""
    interval = math.gcd(*evaluated_rounds)
    if not interval:
        return MaxNLocator(integer=True)
    factors = (m * 10**k for k in itertools.count() for m in (1, 2, 5))
    return MultipleLocator(
        interval * next(f for f in factors if max(evaluated_rounds) <= most_ticks * interval * f)
    )


def _curve(
    records: list[RoundRecord], x_key: XKey, scale: float = 1.0, headline: Headline = ACCURACY
) -> tuple[list[float], list[float]]:
    evaluated = [r for r in records if is_evaluated(r)]
    ys = [headline.scale * r[headline.mean_key] for r in evaluated]  # type: ignore[literal-required]
    return [r[x_key] / scale for r in evaluated], ys


def _plot(
    groups: Sequence[Group],
    x_key: XKey,
    scale: float,
    xlabel: str,
    title: str,
    path: Path,
    note: str,
    headline: Headline = ACCURACY,
    log_x: bool = False,
) -> Path:
    fig, ax = plt.subplots(figsize=(8.5, 4.5), layout="constrained")
    curves_of = [[_curve(records, x_key, scale, headline) for records in runs] for _, runs in groups]
    positive = [x for curves in curves_of for xs, _ in curves for x in xs if x > 0]
    log_x = log_x and bool(positive)
    floor = min(positive) / 10 if log_x else 0.0  # where a log axis draws x = 0 (nothing sent)
    drawn_at_floor = False
    for (label, runs), curves in zip(groups, curves_of, strict=True):
        length = min(len(xs) for xs, _ in curves)  # the same evaluated rounds for every seed
        xs = np.mean([xs[:length] for xs, _ in curves], axis=0)
        ys = np.array([ys[:length] for _, ys in curves])
        mean = ys.mean(axis=0)
        name = label if len(runs) == 1 else f"{label} (n={len(runs)})"
        at_zero = log_x and bool(length) and bool((xs <= 0).all())
        if log_x:
            drawn_at_floor |= bool((xs <= 0).any())
            xs = np.where(xs > 0, xs, floor)
        line = ax.plot(
            xs,
            mean,
            marker=">" if at_zero else "o",
            markersize=6 if at_zero else 3,
            linestyle="none" if at_zero else "-",
            label=f"{name} (at 0, drawn at the left edge)" if at_zero else name,
        )
        if len(runs) > 1:
            spread = ys.std(axis=0, ddof=1)  # as the tables: the sample standard deviation
            ax.fill_between(
                xs, mean - spread, mean + spread, color=line[0].get_color(), alpha=0.2, linewidth=0
            )
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(_PlainLogFormatter())
        ax.xaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))
        if drawn_at_floor:  # the left edge, where what is at 0 is drawn
            ax.axvline(floor, color="grey", linewidth=0.8, linestyle=":")
    if x_key == "round":
        evaluated = {round(x) for curves in curves_of for xs, _ in curves for x in xs}
        ax.xaxis.set_major_locator(_round_locator(sorted(evaluated)))
    ax.set_xlabel(f"{xlabel}, log scale" if log_x else xlabel)
    ax.set_ylabel(
        "mean accuracy over clients (%)"
        if headline is ACCURACY
        else "mean perplexity over clients (own text; lower is better)"
    )
    ax.set_title(f"{title}\n{note}" if note else title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside, never over, a curve
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluation_note(summaries: Sequence[Summary]) -> str:
    """How the runs' clients were scored, for titles and tables: e.g. "clients scored after-training", and
    where intermediate evaluations scored a sample, "; before the last round a sample of 100 clients"."""
    if not summaries:
        return ""
    protocols = sorted({summary.get("evaluation", "after-training") for summary in summaries})
    note = f"clients scored {' / '.join(protocols)}"
    samples = sorted({summary.get("eval_sample", 0) for summary in summaries} - {0})
    if samples:
        note += f"; before the last round a sample of {' / '.join(map(str, samples))} clients"
    return note


def plot_runs(runs: Sequence[Run], out_dir: str | Path, note: str = "") -> list[Path]:
    """Write ``accuracy_per_round.png``, ``accuracy_vs_megabytes.png`` and ``accuracy_vs_tflops.png``
    (``perplexity_…`` for language modeling) into ``out_dir``, one line per run; ``note`` (e.g.
    :func:`evaluation_note`) is a second title line."""
    headline = headline_of(runs[0][1]) if runs else ACCURACY
    return plot_groups([(label, [records]) for label, records in runs], out_dir, note, headline)


def plot_groups(
    groups: Sequence[Group], out_dir: str | Path, note: str = "", headline: Headline = ACCURACY
) -> list[Path]:
    """The plots of :func:`plot_runs`, one line per group: the mean over its runs (seeds), in a band of ±
    one standard deviation where it has several (x: the mean over seeds of the bytes or FLOPs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name, title = headline.name, f"Mean {headline.name}"
    return [
        _plot(
            groups, "round", 1.0, "round", f"{title} per round", out / f"{name}_per_round.png", note, headline
        ),
        _plot(
            groups,
            "cumulative_bytes",
            1e6,
            "cumulative megabytes sent (down + up, all clients)",
            f"{title} against communication",
            out / f"{name}_vs_megabytes.png",
            note,
            headline,
            log_x=True,
        ),
        _plot(
            groups,
            "cumulative_train_flops",
            1e12,
            "cumulative client training TFLOPs (all clients)",
            f"{title} against computation",
            out / f"{name}_vs_tflops.png",
            note,
            headline,
            log_x=True,
        ),
    ]
