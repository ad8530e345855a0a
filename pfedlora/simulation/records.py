"""What a run records, typed: one record per round (``metrics.jsonl``) and the run summary
(``summary.json``). This module is the one place that defines their keys; both runtimes write them, and
``report``, ``compare`` and ``tune`` read them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NotRequired, TypedDict

from pfedlora.algorithms.privacy import PrivacySpent, privacy_spent
from pfedlora.config import ExperimentConfig
from pfedlora.metrics import summarize_curve
from pfedlora.simulation.sampling import clients_per_round

TIMING_KEYS = frozenset({"wall_seconds", "train_samples_per_second", "round_seconds"})
"""Record and summary keys that measure the clock; everything else is identical for identical seeds."""


class ClientCost(TypedDict):
    """One client's share of a round: what it trained on and what it cost."""

    client_id: int
    num_examples: int
    bytes_down: int
    bytes_up: int
    train_flops: float


class RefusalRecord(TypedDict):
    """An upload the server refused, and why."""

    client_id: int
    reason: str


class RoundResult(TypedDict):
    """What one round of training and aggregation did and cost (:func:`~pfedlora.simulation.run_round`)."""

    round: int
    sampled: list[int]
    dropped: list[int]
    refused: list[RefusalRecord]
    aggregated: list[int]
    bytes_down: int
    bytes_up: int
    train_flops: float
    train_samples: int
    clients: list[ClientCost]
    server_flops: NotRequired[float]
    """Training on the server in this round (absent in runs written before it was counted)."""


class RoundRecord(RoundResult):
    """One line of ``metrics.jsonl``: the round's result, running totals, its clock time and, on evaluated
    rounds, the accuracies."""

    cumulative_bytes: int
    cumulative_train_flops: float
    round_seconds: float
    train_samples_per_second: float
    mean_accuracy: NotRequired[float]
    """Unweighted mean over the clients with evaluation samples (the paper's "mean test accuracy"); present
    on evaluated rounds."""
    weighted_accuracy: NotRequired[float]
    std_accuracy: NotRequired[float]
    client_accuracies: NotRequired[list[float | None]]
    """Per client; None where its evaluation split is empty (or, on Flower, it gave no valid evaluation)."""
    mean_perplexity: NotRequired[float]
    """Language modeling: the unweighted mean of the clients' perplexities on their own text (the accuracies
    are then next-token top-1 accuracies, padding excluded)."""
    median_perplexity: NotRequired[float]
    client_perplexities: NotRequired[list[float | None]]
    clients_without_eval_samples: NotRequired[int]
    """Clients left out of the means because their evaluation split is empty."""
    clients_unanswered: NotRequired[int]
    """Clients that gave no valid evaluation (Flower: no reply in time, or a refused one); absent if none."""
    evaluated_clients: NotRequired[list[int]]
    """Where only a sample was scored (``federation.eval_sample``): their ids, in the order of
    ``client_accuracies``."""
    privacy_epsilon: NotRequired[float | None]
    """With privacy on: ε spent by the end of this round (None without noise); see ``Summary.privacy``."""


class TargetProgress(TypedDict):
    """The first evaluated round whose mean accuracy reaches the target, and what it took (None: never)."""

    target_accuracy: float
    target_round: int | None
    bytes_to_target: int | None
    train_flops_to_target: float | None


class Summary(TypedDict):
    """``summary.json``: a finished run's headline figures."""

    algorithm: str
    dataset: str
    partition: str
    num_clients: int
    sample_fraction: float
    rounds: int
    seed: int
    eval_split: str
    evaluation: str
    """When clients were scored (``federation.evaluate``): "after-training" or "after-download"."""
    eval_sample: int
    """Clients scored at the evaluations before the last (0: every client); the last scores every one."""
    mean_accuracy_best: float
    best_round: int
    mean_accuracy_last: float
    mean_accuracy_last10pct: float
    weighted_accuracy_last: float
    std_accuracy_last: float
    mean_accuracy_last_by_architecture: dict[str, float | None]
    """At the last evaluation: the mean accuracy of each architecture's clients (None where none of them
    has evaluation samples), so that a small model's gain from a large one shows, and the reverse."""
    clients_without_eval_samples: int
    """Clients whose evaluation split is empty, left out of every mean (last evaluation)."""
    shared_parameters: int | None
    """Client-state parameters that travel as they are (None in the summary of an unfinished run)."""
    bytes_down_total: int
    bytes_up_total: int
    bytes_total: int
    train_flops_total: float
    server_flops_total: float
    """Training on the server (FedGH's header, FedTGP's prototypes), apart from the clients' FLOPs."""
    train_samples_total: int
    target_accuracy: float
    target_round: int | None
    bytes_to_target: int | None
    train_flops_to_target: float | None
    wall_seconds: float
    train_samples_per_second: float
    privacy: PrivacySpent | None
    """With privacy on: the (ε, δ) spent in all and per round, and the assumptions of the accounting."""
    task: NotRequired[str]
    """Language modeling only (absent for classification, as in runs written before tasks existed)."""
    mean_perplexity_best: NotRequired[float]
    """Language modeling: the lowest mean perplexity of any evaluation, and its round."""
    best_perplexity_round: NotRequired[int]
    mean_perplexity_last: NotRequired[float]
    median_perplexity_last: NotRequired[float]
    mean_perplexity_last_by_architecture: NotRequired[dict[str, float | None]]
    target_perplexity: NotRequired[float]
    """Language modeling: the mean perplexity whose first reaching (at or below) ``target_round``,
    ``bytes_to_target`` and ``train_flops_to_target`` then report."""


def privacy_budget(config: ExperimentConfig, rounds: int) -> PrivacySpent | None:
    """What ``rounds`` rounds of ``config`` spend of the privacy budget (None with privacy off)."""
    privacy, federation = config.privacy, config.federation
    if not privacy.enabled:
        return None
    sampled = clients_per_round(federation.num_clients, federation.sample_fraction)
    rate = sampled / federation.num_clients
    return privacy_spent(privacy.noise_multiplier, rate, rounds, privacy.delta)


@dataclass(frozen=True)
class Headline:
    """The figure a run is judged by, per client and as the mean over clients: its task's (accuracy for
    classification, perplexity for language modeling), with which way is better and how it is shown."""

    name: str
    mean_key: str
    """The record key of the mean over clients."""
    clients_key: str
    """The record key of the per-client values."""
    higher_is_better: bool
    scale: float
    """Shown as value × scale (percent for accuracies)."""
    short: str
    """A column heading's name, e.g. "acc %"."""
    flat_change: float
    """A curve counts as flat when its mean changes by less than this over the last 10% of the rounds
    (absolute; for perplexities relative to the last value)."""

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def reaches(self, value: float, target: float) -> bool:
        """Whether ``value`` meets ``target``."""
        return value >= target if self.higher_is_better else value <= target

    def is_flat(self, change: float, last: float) -> bool:
        bound = self.flat_change if self.higher_is_better else self.flat_change * abs(last)
        return abs(change) < bound


ACCURACY = Headline("accuracy", "mean_accuracy", "client_accuracies", True, 100.0, "acc %", 0.003)
PERPLEXITY = Headline("perplexity", "mean_perplexity", "client_perplexities", False, 1.0, "ppl", 0.003)


def headline_of(records: Sequence[RoundRecord]) -> Headline:
    """The headline figure of a run's records: perplexity where they hold one (language modeling)."""
    return PERPLEXITY if any("mean_perplexity" in r for r in records) else ACCURACY


def is_evaluated(record: RoundRecord) -> bool:
    """Whether every client was evaluated after this round."""
    return "mean_accuracy" in record


def progress_to_target(
    records: Sequence[RoundRecord], target: float, headline: Headline = ACCURACY
) -> TargetProgress:
    """The first evaluated round whose mean accuracy (or ``headline``'s figure) reaches ``target``, with the
    bytes and client training FLOPs spent by then (``None`` each if no round reaches it)."""
    reached = next(
        (
            r
            for r in records
            if is_evaluated(r) and headline.mean_key in r and headline.reaches(r[headline.mean_key], target)  # type: ignore[literal-required]
        ),
        None,
    )
    return {
        "target_accuracy": target,
        "target_round": reached["round"] if reached else None,
        "bytes_to_target": reached["cumulative_bytes"] if reached else None,
        "train_flops_to_target": reached["cumulative_train_flops"] if reached else None,
    }


def accuracy_by_architecture(
    config: ExperimentConfig, record: RoundRecord, key: str = "client_accuracies"
) -> dict[str, float | None]:
    """The mean accuracy (or, ``key`` "client_perplexities", perplexity) of each architecture's clients in
    an evaluated ``record``, in the order of ``federation.architectures`` (None where none of its clients
    has one)."""
    values_of: list[float | None] = record[key]  # type: ignore[literal-required]
    ids = record.get("evaluated_clients", range(len(values_of)))
    by_arch: dict[str, list[float]] = {arch: [] for arch in config.federation.architectures}
    for client_id, accuracy in zip(ids, values_of, strict=True):
        if accuracy is not None:
            by_arch[config.architecture_of(client_id)].append(accuracy)
    return {arch: sum(values) / len(values) if values else None for arch, values in by_arch.items()}


def summarize_records(
    config: ExperimentConfig,
    records: Sequence[RoundRecord],
    wall_seconds: float,
    shared_parameters: int | None,
) -> Summary:
    """The run's headline figures from its configuration and records (see the README for each key)."""
    evaluated = [r for r in records if is_evaluated(r)]
    curve = summarize_curve([r["round"] for r in evaluated], [r["mean_accuracy"] for r in evaluated])
    last = evaluated[-1]
    train_samples = sum(r["train_samples"] for r in records)
    target = progress_to_target(records, config.federation.target_accuracy)
    summary: Summary = {
        "algorithm": config.algorithm,
        "dataset": config.data.dataset,
        "partition": config.data.partition,
        "num_clients": config.federation.num_clients,
        "sample_fraction": config.federation.sample_fraction,
        "rounds": config.federation.rounds,
        "seed": config.seed,
        "eval_split": config.eval_split,
        "evaluation": config.federation.evaluate,
        "eval_sample": config.federation.eval_sample,
        "mean_accuracy_best": curve["mean_accuracy_best"],
        "best_round": curve["best_round"],
        "mean_accuracy_last": curve["mean_accuracy_last"],
        "mean_accuracy_last10pct": curve["mean_accuracy_last10pct"],
        "weighted_accuracy_last": last["weighted_accuracy"],
        "std_accuracy_last": last["std_accuracy"],
        "mean_accuracy_last_by_architecture": accuracy_by_architecture(config, last),
        "clients_without_eval_samples": last.get("clients_without_eval_samples", 0),
        "shared_parameters": shared_parameters,
        "bytes_down_total": sum(r["bytes_down"] for r in records),
        "bytes_up_total": sum(r["bytes_up"] for r in records),
        "bytes_total": records[-1]["cumulative_bytes"],
        "train_flops_total": records[-1]["cumulative_train_flops"],
        "server_flops_total": sum(r.get("server_flops", 0.0) for r in records),
        "train_samples_total": train_samples,
        "target_accuracy": target["target_accuracy"],
        "target_round": target["target_round"],
        "bytes_to_target": target["bytes_to_target"],
        "train_flops_to_target": target["train_flops_to_target"],
        "wall_seconds": wall_seconds,
        "train_samples_per_second": train_samples / wall_seconds if wall_seconds > 0 else 0.0,
        "privacy": privacy_budget(config, len(records)),
    }
    if "mean_perplexity" in last:
        best = min(evaluated, key=lambda r: (r["mean_perplexity"], r["round"]))
        reached = progress_to_target(records, config.federation.target_perplexity, PERPLEXITY)
        summary["target_round"] = reached["target_round"]
        summary["bytes_to_target"] = reached["bytes_to_target"]
        summary["train_flops_to_target"] = reached["train_flops_to_target"]
        summary["target_perplexity"] = config.federation.target_perplexity
        summary["task"] = config.data.task
        summary["mean_perplexity_best"] = best["mean_perplexity"]
        summary["best_perplexity_round"] = best["round"]
        summary["mean_perplexity_last"] = last["mean_perplexity"]
        summary["median_perplexity_last"] = last["median_perplexity"]
        summary["mean_perplexity_last_by_architecture"] = accuracy_by_architecture(
            config, last, "client_perplexities"
        )
    return summary
