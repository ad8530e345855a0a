"""Side-by-side comparison: several algorithms (and adapter placements) on the same data, partition and seed.

Each variant runs into its own subdirectory of the comparison directory; a variant whose ``summary.json``
already exists is read instead of rerun, and an unfinished one continues from its last checkpoint, so an
interrupted comparison resumes where it stopped. The table
(Markdown and CSV) and the plots are then written from the run directories alone.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import queue
import shutil
import signal
import statistics
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch.multiprocessing as torch_mp

from pfedlora.algorithms import algorithm_class
from pfedlora.config import ExperimentConfig, differences, load_config, load_run_config, replace
from pfedlora.data import Dataset
from pfedlora.errors import ConfigError, PfedloraError
from pfedlora.metrics.accuracy import change_over_last_tenth
from pfedlora.models import PLACEMENTS, is_transformer
from pfedlora.plots import evaluation_note, plot_groups
from pfedlora.simulation import read_run, resume_run, run_experiment
from pfedlora.simulation.checkpoint import checkpoint_round
from pfedlora.simulation.federation import load_run_dataset
from pfedlora.simulation.lock import directory_lock
from pfedlora.simulation.loop import RoundCallback
from pfedlora.simulation.records import (
    ACCURACY,
    PERPLEXITY,
    Headline,
    RoundRecord,
    Summary,
    headline_of,
    is_evaluated,
    progress_to_target,
)
from pfedlora.simulation.results import CONFIG_FILE, SUMMARY_FILE, write_atomic
from pfedlora.simulation.workers import usable_cores
from pfedlora.stopping import (
    RunStopped,
    Stopped,
    leave_stops_to_parent,
    signal_name,
    signal_of,
    stop_on_signals,
)
from pfedlora.tracking import tracking

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One line of the comparison: a label, the configuration it runs and the overrides that made it."""

    label: str
    config: ExperimentConfig
    overrides: tuple[str, ...] = ()


Result = tuple[str, list[RoundRecord], Summary]
"""One variant's label, per-round records and summary."""


def split_scoped(overrides: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split overrides into shared ones and ``label:key=value`` ones that apply to one variant only.

    ``label`` is a variant label (``standalone``, ``pfedlora-branch``) or an algorithm name (``pfedlora``
    scopes every pFedLoRA placement).
    """
    shared: list[str] = []
    scoped: dict[str, list[str]] = {}
    for assignment in overrides:
        head = assignment.split("=", 1)[0]
        if ":" in head:
            label, rest = assignment.split(":", 1)
            scoped.setdefault(label.strip(), []).append(rest)
        else:
            shared.append(assignment)
    return shared, scoped


def plan_variants(
    algorithms: Sequence[str],
    placements: Sequence[str],
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> list[Variant]:
    """One variant per algorithm, and per adapter placement for pFedLoRA (for classification), all on the
    same base config.

    Overrides written ``label:key=value`` apply to that variant (or algorithm) only, after the shared ones,
    so each method can run with its own tuned hyperparameters.
    """
    if not algorithms:
        raise ConfigError("compare needs at least one algorithm")
    for placement in placements:
        PLACEMENTS.get(placement, "placement")
    shared, scoped = split_scoped(overrides)
    # A language model's adapters sit on its layers whatever the placement: one variant per algorithm.
    placed = load_config(config_file, shared).data.task == "classification"
    planned: list[tuple[str, str, list[str]]] = []
    for name in dict.fromkeys(algorithms):
        if algorithm_class(name).adapter_placements and placed:  # unknown names fail here, before any run
            for placement in dict.fromkeys(placements):
                planned.append((name, f"{name}-{placement}", [f"adapter.placement={placement}"]))
        else:
            planned.append((name, name, []))
    labels = {label for _, label, _ in planned} | {name for name, _, _ in planned}
    unknown = sorted(set(scoped) - labels)
    if unknown:
        raise ConfigError(
            f"override scoped to {unknown[0]!r}, which is not in this comparison; "
            f"variants: {', '.join(label for _, label, _ in planned)}"
        )
    variants = []
    for name, label, extra in planned:
        own = [*scoped.get(name, ()), *(scoped.get(label, ()) if label != name else ())]
        resolved = (*shared, f"algorithm={name}", *extra, *own)
        variants.append(Variant(label, load_config(config_file, resolved), resolved))
    return variants


VariantRound = Callable[[str, RoundRecord], None]
"""Told every finished round of a variant: its label and the round's record."""


def run_comparison(
    variants: Sequence[Variant],
    out_dir: str | Path,
    on_start: Callable[[Variant, bool], None] | None = None,
    on_round: VariantRound | None = None,
    jobs: int = 1,
    workers: int | None = None,
    dataset: Dataset | None = None,
    log: Sequence[str] = (),
) -> list[Result]:
    """Run (or resume) every variant into ``out_dir/<label>``; returns (label, records, summary) per variant.

    ``on_start(variant, reused)`` is told before each variant starts whether its finished run is being
    reused. ``jobs`` > 1 runs that many variants at a time, each in its own process with ``workers`` worker
    processes (default: the usable cores divided among the jobs, at least one), so the cores are shared out,
    not oversubscribed; since results do not depend on the number of workers, they are those of one run
    after another with workers. ``dataset``, if given, serves every variant instead of the one it names.
    ``out_dir`` is locked for this process while the comparison runs (a second one there is refused), and
    each variant's run directory for the process that runs it. ``log`` names trackers
    (:data:`~pfedlora.tracking.TRACKERS`) that every variant's rounds also go to.
    """
    if jobs < 1:
        raise ConfigError(f"jobs: {jobs} is out of range; allowed: 1 or more")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with directory_lock(out):
        return _compare(variants, out, on_start, on_round, jobs, workers, dataset, tuple(log))


def _compare(
    variants: Sequence[Variant],
    out: Path,
    on_start: Callable[[Variant, bool], None] | None,
    on_round: VariantRound | None,
    jobs: int,
    workers: int | None,
    dataset: Dataset | None,
    log: tuple[str, ...],
) -> list[Result]:
    """:func:`run_comparison` once this process holds the lock of ``out``."""
    datasets: dict[DatasetKey, Dataset] = {}
    if dataset is not None:
        datasets.update({_dataset_key(v): dataset for v in variants})
    for variant in variants:  # every configuration must be valid for its algorithm before anything runs
        shape = _dataset_of(variant, datasets)
        algorithm_class(variant.config.algorithm)(variant.config, shape.input_shape, shape.num_classes)
    for variant in variants:
        run_dir = out / variant.label
        if not (run_dir / CONFIG_FILE).is_file():
            continue
        details = differences(load_run_config(run_dir / CONFIG_FILE), variant.config)
        if details:
            raise ConfigError(
                f"{run_dir} holds a run of another configuration than {variant.label!r} now has "
                f"({details}); give those values with --set, choose another comparison directory or "
                "delete that run"
            )

    pending = []
    for variant in variants:
        finished = (out / variant.label / SUMMARY_FILE).is_file()
        if finished and on_start is not None:
            on_start(variant, True)
        if not finished:
            pending.append(variant)
    if jobs == 1 or len(pending) < 2:
        for variant in pending:
            if on_start is not None:
                on_start(variant, False)
            tell = partial(on_round, variant.label) if on_round is not None else None
            try:
                _run_variant(variant, out / variant.label, _dataset_of(variant, datasets), workers, tell, log)
            except RunStopped as stop:
                raise ComparisonStopped(stop.signum, [(variant.label, stop)], out, len(variants)) from None
    else:
        per_job = workers if workers is not None else max(1, usable_cores() // jobs)
        _run_in_parallel(pending, out, datasets, jobs, per_job, on_start, on_round, len(variants), log)
    results = []
    for variant in variants:
        records, summary = read_run(out / variant.label)
        results.append((variant.label, records, summary))
    return results


DatasetKey = tuple[str, str, bool, str, int, tuple[str, ...]]


def _dataset_of(variant: Variant, datasets: dict[DatasetKey, Dataset]) -> Dataset:
    """The variant's dataset, loaded (and, for text, tokenized) once per key for the whole comparison."""
    key = _dataset_key(variant)
    if key not in datasets:
        datasets[key] = load_run_dataset(variant.config)
    return datasets[key]


def _dataset_key(variant: Variant) -> DatasetKey:
    """What the loaded tensors depend on: the dataset and where it comes from, and for text the tokenizer
    (the model family's checkpoint) and the length."""
    config = variant.config
    data, model = config.data, config.model
    archs = config.federation.architectures
    families = tuple(sorted({arch.rpartition("-l")[0] for arch in archs if is_transformer(arch)}))
    return (data.dataset, data.data_dir, data.download, model.checkpoint, model.max_length, families)


def _run_variant(
    variant: Variant,
    run_dir: Path,
    dataset: Dataset,
    workers: int | None,
    on_round: RoundCallback | None,
    log: tuple[str, ...] = (),
) -> None:
    """Run the variant into ``run_dir``, or resume it there from its last checkpoint; its rounds also go to
    the trackers ``log``."""
    with tracking(list(log), run_dir, variant.config) as trackers:

        def tell(record: RoundRecord) -> None:
            trackers.log_round(record)
            if on_round is not None:
                on_round(record)

        if (run_dir / CONFIG_FILE).is_file():
            logger.warning(
                "%s: resuming the unfinished run in %s from its last checkpoint", variant.label, run_dir
            )
            resume_run(run_dir, on_round=tell, dataset=dataset, workers=workers)
            return
        if run_dir.exists():
            with directory_lock(run_dir):
                shutil.rmtree(run_dir)  # created but never configured: nothing in it is worth keeping
        run_experiment(variant.config, run_dir, on_round=tell, dataset=dataset, workers=workers)


def _run_in_parallel(
    variants: Sequence[Variant],
    out: Path,
    datasets: dict[DatasetKey, Dataset],
    jobs: int,
    workers: int,
    on_start: Callable[[Variant, bool], None] | None,
    on_round: VariantRound | None,
    total: int,
    log: tuple[str, ...] = (),
) -> None:
    """Run ``variants`` ``jobs`` at a time, each in a process of its own; the first failure stops them all,
    and so does a stop of this process (:class:`ComparisonStopped`, naming where each running job stood;
    ``total``: the variants of the whole comparison)."""
    context = torch_mp.get_context("forkserver")
    # Jobs fork from a server that has imported torch and pfedlora once: each starts in milliseconds, not
    # the seconds of importing them again (the preload is ignored if this process's server already runs).
    # torch._dynamo too: PyTorch's FLOP counter imports it on first use, a second or more per process.
    context.set_forkserver_preload([__name__, "torch._dynamo"])
    events = context.Queue()
    waiting = list(variants)
    running: dict[str, BaseProcess] = {}
    logged: dict[str, int] = {}  # the last round each variant reported
    failure: str | None = None
    stopped: int | None = None
    try:
        while (waiting or running) and failure is None:
            while waiting and len(running) < jobs:
                variant = waiting.pop(0)
                if on_start is not None:
                    on_start(variant, False)
                dataset = _dataset_of(variant, datasets).share_memory()
                process = context.Process(
                    target=_job,
                    args=(variant, out / variant.label, dataset, workers, events, log),
                    name=f"pfedlora-job-{variant.label}",
                )
                process.start()
                running[variant.label] = process
            try:
                kind, label, payload = events.get(timeout=1.0)
            except queue.Empty:
                for label, job in list(running.items()):
                    if not job.is_alive():  # died without a word (killed)
                        failure = f"{label}: its process exited with code {job.exitcode}"
                continue
            if kind == "round":
                logged[label] = payload["round"]
                if on_round is not None:
                    on_round(label, payload)
            elif kind in ("done", "error"):
                running.pop(label).join()
                if kind == "error":
                    failure = f"{label}: {payload}"
    except KeyboardInterrupt as stop:
        stopped = signal_of(stop)
    finally:
        for job in running.values():
            job.terminate()  # a job stops its run, and its workers, on SIGTERM
        for job in running.values():
            job.join(timeout=10)
            if job.is_alive():
                job.kill()
                job.join()
    if stopped is not None:
        where = [
            (label, _stopped_run(stopped, out / label, logged.get(label, 0) + 1, variant.config))
            for label, variant in ((v.label, v) for v in variants)
            if label in running
        ]
        raise ComparisonStopped(stopped, where, out, total)
    if failure is not None:
        raise ConfigError(f"the comparison stopped: {failure}")


def _stopped_run(signum: int, run_dir: Path, in_round: int, config: ExperimentConfig) -> RunStopped:
    """Where a job's run stood when it was stopped, as its directory tells."""
    resumable = (run_dir / CONFIG_FILE).is_file()
    rounds = config.federation.rounds
    return RunStopped(signum, str(run_dir), in_round, rounds, checkpoint_round(run_dir), resumable)


class ComparisonStopped(Stopped):
    """A comparison (or a search) stopped by a signal: where each variant that was running stood, and how
    many of the comparison's variants had finished (their runs are kept and reused)."""

    def __init__(
        self, signum: int, running: Sequence[tuple[str, RunStopped]], out_dir: Path, total: int
    ) -> None:
        finished = sum((out_dir / label / SUMMARY_FILE).is_file() for label in _variant_dirs(out_dir))
        states = ", ".join(f"{label} {stop.state()}" for label, stop in running)
        message = (
            f"stopped by {signal_name(signum)}: {states or 'no variant was running'}; "
            f"{finished} of {total} variants in {out_dir} are finished and kept"
        )
        super().__init__(signum, message)


def _variant_dirs(out_dir: Path) -> list[str]:
    """The labels of the run directories under a comparison directory (``method`` or ``method/seed-s``)."""
    return [str(config.parent.relative_to(out_dir)) for config in sorted(out_dir.rglob(CONFIG_FILE))]


def _job(
    variant: Variant, run_dir: Path, dataset: Dataset, workers: int, events: Any, log: tuple[str, ...] = ()
) -> None:
    """One variant in a process of its own; reports its rounds and its end on ``events``. The comparison
    stops it with SIGTERM (Ctrl-C is the comparison's to handle), which stops its run, quietly."""
    leave_stops_to_parent((signal.SIGINT,))
    try:
        with stop_on_signals((signal.SIGTERM,)):
            _run_variant(
                variant,
                run_dir,
                dataset,
                workers,
                lambda record: events.put(("round", variant.label, record)),
                log,
            )
        events.put(("done", variant.label, None))
    except KeyboardInterrupt:
        return  # stopped by the comparison, which says where every job stood
    except PfedloraError as error:
        events.put(("error", variant.label, str(error)))
    except BaseException:
        events.put(("error", variant.label, traceback.format_exc()))


def check_target(target: float, generative: bool = False) -> None:
    """Refuse a target accuracy that is not a fraction in (0, 1], or (``generative``: language modeling) a
    target perplexity below 1."""
    if generative and not target >= 1:
        raise ConfigError(f"target perplexity: {target} is below 1, which no model reaches; e.g. 20")
    if not generative and not 0 < target <= 1:
        raise ConfigError(f"target accuracy: {target} is not a fraction in (0, 1]; e.g. 0.8 for 80%")


def retarget(results: Sequence[Result], target: float) -> list[Result]:
    """The results with rounds, bytes and FLOPs to ``target`` read from the records again.

    The target is a way of reading the curves, not part of the runs, so a comparison can be tabulated
    against another target without rerunning anything.
    """
    headline = _headline(results)
    check_target(target, headline is PERPLEXITY)
    retargeted = []
    for label, records, summary in results:
        progress = dict(progress_to_target(records, target, headline))
        if headline is PERPLEXITY:
            progress["target_perplexity"] = progress.pop("target_accuracy")
        retargeted.append((label, records, {**summary, **progress}))
    return retargeted  # type: ignore[return-value]


def _headline(results: Sequence[Result]) -> Headline:
    """The figure the results are judged by (that of the first run: every variant has one task)."""
    return headline_of(results[0][1]) if results else ACCURACY


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value / scale:.{digits}f}"


COLUMNS = (
    "method",
    "best acc %",
    "last acc %",
    "last-10% acc %",
    "Δ over last 10% of rounds (pp)",
    "acc @ equal FLOPs %",
    "std (pp)",
    "rounds to target",
    "MB to target",
    "TFLOPs to target",
    "MB total",
    "TFLOPs total",
    "wall s",
)


PERPLEXITY_COLUMNS = (
    "method",
    "best ppl",
    "last ppl",
    "last-10% ppl",
    "Δ over last 10% of rounds (ppl)",
    "ppl @ equal FLOPs",
    "std (ppl)",
    *COLUMNS[7:],
)
"""The columns where the runs are judged by perplexity (language modeling): mean over clients."""


def columns(headline: Headline) -> tuple[str, ...]:
    """The comparison table's columns for runs judged by ``headline``."""
    return PERPLEXITY_COLUMNS if headline is PERPLEXITY else COLUMNS


def accuracy_within_flops(
    records: Sequence[RoundRecord], budget: float, headline: Headline = ACCURACY
) -> float | None:
    """Mean accuracy (or ``headline``'s figure) at the last evaluated round whose cumulative client FLOPs
    stay within ``budget``."""
    within = [r for r in records if is_evaluated(r) and r["cumulative_train_flops"] <= budget * (1 + 1e-9)]
    return within[-1][headline.mean_key] if within else None  # type: ignore[literal-required]


FORMATS: tuple[tuple[float, int], ...] = (
    *[(0.01, 2)] * 6,  # accuracies, their change and their spread over clients, in percent
    (1.0, 0),  # rounds to target
    (1e6, 2),
    (1e12, 3),
    (1e6, 2),
    (1e12, 3),
    (1.0, 1),
)
"""(divisor, digits) of each numeric column of :data:`COLUMNS` (all but the method)."""
PERPLEXITY_FORMATS: tuple[tuple[float, int], ...] = ((1.0, 3),) * 6 + FORMATS[6:]


def formats(headline: Headline) -> tuple[tuple[float, int], ...]:
    """(divisor, digits) of each numeric column of :func:`columns`."""
    return PERPLEXITY_FORMATS if headline is PERPLEXITY else FORMATS


def _curve_values(records: Sequence[RoundRecord], s: Summary, headline: Headline) -> list[float]:
    """Best, last, last-10% mean and spread over clients (last evaluation) of ``headline``'s curve."""
    if headline is ACCURACY:
        return [
            s["mean_accuracy_best"],
            s["mean_accuracy_last"],
            s["mean_accuracy_last10pct"],
            s["std_accuracy_last"],
        ]
    evaluated = [r for r in records if is_evaluated(r)]
    means = [r[headline.mean_key] for r in evaluated]  # type: ignore[literal-required]
    tail = max(1, math.ceil(0.1 * len(means)))
    clients = [v for v in evaluated[-1][headline.clients_key] if v is not None]  # type: ignore[literal-required]
    best = max(means) if headline.higher_is_better else min(means)
    return [best, means[-1], sum(means[-tail:]) / tail, statistics.pstdev(clients) if clients else math.nan]


def _last(records: Sequence[RoundRecord], s: Summary, headline: Headline) -> float:
    """The last mean accuracy (from the summary) or perplexity (from the last evaluated record)."""
    if headline is ACCURACY:
        return s["mean_accuracy_last"]
    return [r for r in records if is_evaluated(r)][-1][headline.mean_key]  # type: ignore[literal-required]


def _values(
    records: Sequence[RoundRecord], s: Summary, budget: float, headline: Headline = ACCURACY
) -> list[float | None]:
    """One run's numeric columns (:func:`columns` after the method), unscaled; None where not reached."""
    best, last, last10, spread = _curve_values(records, s, headline)
    return [
        best,
        last,
        last10,
        _change_over_last_tenth(records, headline),
        accuracy_within_flops(records, budget, headline),
        spread,
        s["target_round"],
        s["bytes_to_target"],
        s["train_flops_to_target"],
        s["bytes_total"],
        s["train_flops_total"],
        s["wall_seconds"],
    ]


def _change_over_last_tenth(records: Sequence[RoundRecord], headline: Headline = ACCURACY) -> float | None:
    evaluated = [r for r in records if is_evaluated(r)]
    rounds = [r["round"] for r in evaluated]
    means = [r[headline.mean_key] for r in evaluated]  # type: ignore[literal-required]
    return change_over_last_tenth(rounds, means, records[-1]["round"]) if records else None


def _flops_budget(results: Sequence[Result]) -> float:
    """The smallest total client FLOPs any run that trained spent: where "acc @ equal FLOPs" reads every
    curve (a run that trains nothing, the zero-shot base, would make it zero)."""
    return min((s["train_flops_total"] for _, _, s in results if s["train_flops_total"] > 0), default=0.0)


def comparison_rows(results: Sequence[Result]) -> list[list[str]]:
    """The comparison table's rows, one per variant, formatted.

    "acc @ equal FLOPs" reads every curve at the smallest total client FLOPs any variant spent, so a
    method that trains more per round is not flattered by a comparison at equal rounds.
    """
    budget, headline = _flops_budget(results), _headline(results)
    return [
        [
            label,
            *(
                _fmt(value, scale, digits)
                for value, (scale, digits) in zip(
                    _values(records, s, budget, headline), formats(headline), strict=True
                )
            ),
        ]
        for label, records, s in results
    ]


SEED_SEPARATOR = "/seed-"
"""A seeded variant's label is ``<method>/seed-<seed>`` (and so is its run directory under the comparison)."""


def with_seeds(variants: Sequence[Variant], seeds: Sequence[int]) -> list[Variant]:
    """Every variant once per seed, labelled ``<label>/seed-<seed>``, seed by seed (so that an interrupted
    comparison has every method at the first seeds)."""
    if not seeds or len(set(seeds)) != len(seeds) or any(seed < 0 for seed in seeds):
        raise ConfigError(f"seeds: {list(seeds)} must be distinct whole numbers >= 0, e.g. 0,1,2")
    return [
        Variant(
            f"{v.label}{SEED_SEPARATOR}{seed}", replace(v.config, seed=seed), (*v.overrides, f"seed={seed}")
        )
        for seed in seeds
        for v in variants
    ]


def group_by_method(results: Sequence[Result]) -> list[tuple[str, list[Result]]]:
    """The results grouped by method (the label before ``/seed-``), in first-seen order."""
    groups: dict[str, list[Result]] = {}
    for result in results:
        groups.setdefault(result[0].split(SEED_SEPARATOR)[0], []).append(result)
    return list(groups.items())


def seed_rows(results: Sequence[Result]) -> tuple[list[list[str]], list[list[float | None]]]:
    """One row per method: each column's mean ± standard deviation across seeds (n − 1; the value alone for a
    method of one seed), with "(k/n)" where only k of n seeds reached a value; and the numbers behind them
    (mean, std per column)."""
    budget, headline = _flops_budget(results), _headline(results)
    rows: list[list[str]] = []
    numbers: list[list[float | None]] = []
    for method, runs in group_by_method(results):
        cells: list[str] = [method]
        values: list[float | None] = []
        per_column = zip(*(_values(records, s, budget, headline) for _, records, s in runs), strict=True)
        for column, (scale, digits) in zip(per_column, formats(headline), strict=True):
            present = [float(v) for v in column if v is not None]
            if not present:
                cells.append("–")
                values += [None, None]
                continue
            mean = statistics.fmean(present)
            spread = statistics.stdev(present) if len(present) > 1 else 0.0
            reached = f" ({len(present)}/{len(runs)})" if len(present) < len(runs) else ""
            spread_text = f" ± {spread / scale:.{digits}f}" if len(runs) > 1 else ""
            cells.append(f"{mean / scale:.{digits}f}{spread_text}{reached}")
            values += [mean, spread]
        rows.append(cells)
        numbers.append(values)
    return rows, numbers


def _first_two(
    methods: Sequence[str], numbers: Sequence[Sequence[float | None]], headline: Headline = ACCURACY
) -> list[tuple[float, float | None, str]]:
    """The two best methods by last mean accuracy (or ``headline``'s figure; mean, std, method), best
    first; fewer when fewer ran."""
    last = [
        (row[2], row[3], method) for method, row in zip(methods, numbers, strict=True) if row[2] is not None
    ]
    return sorted(last, key=lambda item: item[0], reverse=headline.higher_is_better)[:2]


def _units(headline: Headline) -> str:
    return "points" if headline is ACCURACY else headline.short


def lead_verdict(
    methods: Sequence[str], numbers: Sequence[Sequence[float | None]], headline: Headline = ACCURACY
) -> str:
    """Whether the best method by last mean accuracy (or ``headline``'s figure) leads the runner-up by more
    than the spread across seeds (the gap must exceed the sum of their standard deviations)."""
    first_two = _first_two(methods, numbers, headline)
    if len(first_two) < 2:
        return ""
    (best, best_sd, first), (second, second_sd, runner_up) = first_two
    scale, units = headline.scale, _units(headline)
    gap, spread = scale * abs(best - second), scale * ((best_sd or 0.0) + (second_sd or 0.0))
    verdict = "a lead" if gap > spread else "no lead: within the spread across seeds"
    return (
        f"Last mean {headline.name}: {first} is ahead of {runner_up} by {gap:.2f} {units}; their standard "
        f"deviations across seeds add up to {spread:.2f} {units}: {verdict}."
    )


def seed_by_seed_note(
    groups: Sequence[tuple[str, Sequence[Result]]],
    numbers: Sequence[Sequence[float | None]],
    headline: Headline = ACCURACY,
) -> str:
    """The gap in last mean accuracy (or ``headline``'s figure) between the best method and the runner-up
    at each seed both ran (the same seed: the same data partition), and at how many of them the best is
    ahead."""
    first_two = _first_two([method for method, _ in groups], numbers, headline)
    if len(first_two) < 2:
        return ""
    (_, _, first), (_, _, runner_up) = first_two
    last = {
        method: {s["seed"]: _last(records, s, headline) for _, records, s in runs} for method, runs in groups
    }
    seeds = sorted(last[first].keys() & last[runner_up].keys())
    if len(seeds) < 2:
        return ""
    gaps = [headline.scale * (last[first][seed] - last[runner_up][seed]) for seed in seeds]
    ahead = sum(headline.better(gap, 0.0) for gap in gaps)
    return (
        f"Seed by seed ({', '.join(map(str, seeds))}), {first} minus {runner_up}: "
        f"{', '.join(f'{gap:+.2f}' for gap in gaps)} {_units(headline)}; ahead at {ahead} of {len(seeds)} "
        "seeds."
    )


def flatness_note(groups: Sequence[tuple[str, Sequence[Result]]], headline: Headline = ACCURACY) -> str:
    """Which methods' curves are flat (their mean accuracy changed by less than 0.3 points over the last 10%
    of the rounds, a mean perplexity by less than 0.3% of its value; averaged over seeds) and which are
    still moving, with the change of each."""
    flat: list[str] = []
    moving: list[str] = []
    for method, runs in groups:
        changes = [
            c for _, records, _ in runs if (c := _change_over_last_tenth(records, headline)) is not None
        ]
        if changes:
            change = statistics.fmean(changes)
            last = (
                statistics.fmean(_last(records, s, headline) for _, records, s in runs)
                if headline is PERPLEXITY
                else 0.0
            )
            is_flat = headline.is_flat(change, last)
            (flat if is_flat else moving).append(f"{method} {headline.scale * change:+.2f}")
    named = (("flat", flat), ("still moving", moving))
    kept = "; ".join(f"{name}: {', '.join(items)}" for name, items in named if items)
    threshold = (
        f"points; flat below {100 * headline.flat_change:g}"
        if headline is ACCURACY
        else f"{headline.short}; flat below {100 * headline.flat_change:g}% of the value"
    )
    heading = f"Change of mean {headline.name} over the last 10% of the rounds ({threshold})"
    return f"{heading}: {kept}." if kept else ""


ALONE = "standalone"


def versus_alone_note(results: Sequence[Result]) -> str:
    """Language modeling: for each method, how many clients end with a lower (better) and a higher
    perplexity on their own text than under training alone at the same seed (its last evaluation, client by
    client), summed over the seeds both ran; empty without a training-alone run or for classification."""
    headline = _headline(results)
    if headline is not PERPLEXITY:
        return ""
    groups = dict(group_by_method(results))
    if ALONE not in groups:
        return ""

    def last_values(records: Sequence[RoundRecord]) -> list[float | None]:
        final = [r for r in records if is_evaluated(r)][-1]
        return list(final[headline.clients_key])  # type: ignore[literal-required]

    alone = {s["seed"]: last_values(records) for _, records, s in groups[ALONE]}
    parts = []
    for method, runs in groups.items():
        if method == ALONE:
            continue
        better = worse = total = 0
        for _, records, s in runs:
            if s["seed"] not in alone:
                continue
            for mine, theirs in zip(last_values(records), alone[s["seed"]], strict=True):
                if mine is None or theirs is None:
                    continue
                total += 1
                better += mine < theirs
                worse += mine > theirs
        if total:
            parts.append(f"{method} {better} better / {worse} worse of {total}")
    if not parts:
        return ""
    return (
        "Clients whose last perplexity on their own text is lower (better) or higher (worse) than under "
        f"training alone at the same seed: {'; '.join(parts)}."
    )


def per_client_rows(results: Sequence[Result]) -> tuple[list[str], list[list[str]]]:
    """Language modeling: the methods, and one row per client (its id) with its last perplexity on its own
    text under each method (the mean over seeds); empty for classification."""
    headline = _headline(results)
    if headline is not PERPLEXITY:
        return [], []
    groups = group_by_method(results)
    columns: list[list[float | None]] = []
    for _, runs in groups:
        finals = [[r for r in records if is_evaluated(r)][-1] for _, records, _ in runs]
        per_seed = [list(final[headline.clients_key]) for final in finals]  # type: ignore[literal-required]
        columns.append(
            [
                None
                if any(v is None for v in values)
                else statistics.fmean(v for v in values if v is not None)
                for values in zip(*per_seed, strict=True)
            ]
        )
    rows = [
        [str(client), *(_fmt(column[client], 1.0, 3) for column in columns)]
        for client in range(len(columns[0]))
    ]
    return [method for method, _ in groups], rows


def architecture_rows(results: Sequence[Result]) -> tuple[list[str], list[list[str]]]:
    """The architectures of the runs, and one row per method: its last mean accuracy (percent) or perplexity
    on each architecture's clients (mean ± std across seeds where there are several)."""
    headline = _headline(results)
    key = f"mean_{headline.name}_last_by_architecture"
    archs = list(dict.fromkeys(a for _, _, s in results for a in s.get(key) or {}))  # type: ignore[attr-defined]
    rows = []
    for method, runs in group_by_method(results):
        row = [method]
        for arch in archs:
            values = [
                headline.scale * value
                for _, _, s in runs
                if (value := (s.get(key) or {}).get(arch)) is not None  # type: ignore[attr-defined]
            ]
            if not values:
                row.append("–")
            elif len(values) == 1:
                row.append(f"{values[0]:.2f}")
            else:
                row.append(f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}")
        rows.append(row)
    return archs, rows


def write_comparison(results: Sequence[Result], out_dir: str | Path) -> list[Path]:
    """Write ``comparison.md``, ``comparison.csv`` (with several architectures also
    ``comparison-by-architecture.csv``, for language models ``comparison-per-client.csv``, and their tables
    in the Markdown) and the plots of :func:`plot_runs` (all variants).

    With several seeds (labels ``<method>/seed-<seed>``), every cell is the mean ± standard deviation
    across seeds, the CSV has a mean and a std column for each, the plots show bands, and the Markdown
    says whether the leader's margin exceeds the spread.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    headline = _headline(results)
    note = evaluation_note([summary for _, _, summary in results])
    seeded = any(SEED_SEPARATOR in label for label, _, _ in results)
    if headline is PERPLEXITY:
        target = results[0][2].get("target_perplexity", 0.0)
        header = (
            f"Target perplexity: {target:g} (mean over clients, each on its own test text; lower is better); "
            f'{note}. FLOPs are client training FLOPs; "ppl @ equal FLOPs" is each curve read at the '
            "smallest total any method spent."
        )
    else:
        target = results[0][2]["target_accuracy"] if results else 0.0
        header = (
            f"Target accuracy: {100 * target:g}% (mean over clients); {note}. FLOPs are client training "
            'FLOPs; "acc @ equal FLOPs" is each curve read at the smallest total any method spent.'
        )
    table_columns = columns(headline)
    groups = group_by_method(results)
    if seeded:
        rows, numbers = seed_rows(results)
        seeds = sorted({s["seed"] for _, _, s in results})
        if len(seeds) > 1:
            header += f" Mean ± standard deviation across seeds {', '.join(map(str, seeds))}."
        else:
            header += f" Seed {seeds[0]}."
        if min(len(runs) for _, runs in groups) > 1:
            verdict = lead_verdict([method for method, _ in groups], numbers, headline)
            if paired := seed_by_seed_note(groups, numbers, headline):
                verdict += " " + paired
        else:  # a standard deviation of one run is no spread: nothing to weigh a gap against
            verdict = "One seed for some method: no spread across seeds to call a lead by."
        csv_header = ["method", *(f"{c} {stat}" for c in table_columns[1:] for stat in ("mean", "std"))]
        csv_rows: list[list[Any]] = [[row[0], *number] for row, number in zip(rows, numbers, strict=True)]
    else:
        rows, verdict = comparison_rows(results), ""
        csv_header, csv_rows = list(table_columns), [list(row) for row in rows]
    markdown = [
        header,
        "",
        "| " + " | ".join(table_columns) + " |",
        "|" + "---|" * len(table_columns),
        *("| " + " | ".join(row) + " |" for row in rows),
        *(["", verdict] if verdict else []),
        *(["", flatness] if (flatness := flatness_note(groups, headline)) else []),
        *(["", versus] if (versus := versus_alone_note(results)) else []),
    ]
    methods, client_rows = per_client_rows(results)
    if client_rows:
        markdown += [
            "",
            "Last perplexity of each client on its own test text"
            + (" (mean over seeds)" if max(len(runs) for _, runs in groups) > 1 else "")
            + ":",
            "",
            "| client | " + " | ".join(methods) + " |",
            "|" + "---|" * (len(methods) + 1),
            *("| " + " | ".join(row) + " |" for row in client_rows),
        ]
    archs, arch_rows = architecture_rows(results)
    if len(archs) > 1:
        markdown += [
            "",
            f"Last mean {headline.name}{' (%)' * (headline is ACCURACY)} of each architecture's clients:",
            "",
            "| method | " + " | ".join(archs) + " |",
            "|" + "---|" * (len(archs) + 1),
            *("| " + " | ".join(row) + " |" for row in arch_rows),
        ]
    write_atomic(out / "comparison.md", "\n".join(markdown) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(csv_header)
    writer.writerows(csv_rows)
    write_atomic(out / "comparison.csv", buffer.getvalue())
    written = [out / "comparison.md", out / "comparison.csv"]
    if len(archs) > 1:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([["method", *archs], *arch_rows])
        write_atomic(out / "comparison-by-architecture.csv", buffer.getvalue())
        written.append(out / "comparison-by-architecture.csv")
    if client_rows:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([["client", *methods], *client_rows])
        write_atomic(out / "comparison-per-client.csv", buffer.getvalue())
        written.append(out / "comparison-per-client.csv")
    plot_input = [(method, [records for _, records, _ in runs]) for method, runs in groups]
    plots = plot_groups(plot_input, out, note, headline)
    return [*written, *plots]
