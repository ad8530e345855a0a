"""What the shared adapter adds to each client: pFedLoRA-branch's predictor with and without it.

Runs pFedLoRA with the branch placement (the default federation unless overridden), then scores every
client's evaluation split (test, or validation when one is carved) with (a) pFedLoRA's predictor
F(x) = f_local(x) + (alpha/r) g(x), (b) the private model alone, f_local(x), and (c) the shared branch
alone, g(x). It prints the mean accuracy over clients of each, how many predictions the adapter turns
from wrong to right and from right to wrong, and, per class, the accuracy with and without the adapter
(over all clients' samples); ``--out FILE`` writes the same figures as JSON.

``--from-run DIR`` diagnoses a pFedLoRA-branch run that already ran (a run directory of ``pfedlora run`` or
``compare``) instead of training one from the start: it restores the run's last checkpoint, runs the rounds
after it here, in memory, with one thread (the directory is left as it was), and checks that the mean
accuracy it reaches is the run's own. Runs do not checkpoint their last round, so this costs the rounds
after the last checkpoint (``federation.checkpoint_every``) rather than the whole run.

    python bench/adapter_diagnosis.py [--set key=value ...] [--from-run DIR] [--out FILE.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import synthetic_dataset  # bench/common.py

from pfedlora.algorithms.training import autocast
from pfedlora.config import ExperimentConfig, load_config, load_run_config
from pfedlora.data import Dataset
from pfedlora.models.adapters import BranchModel
from pfedlora.simulation import (
    Federation,
    build_federation,
    run_experiment,
    run_federation,
)
from pfedlora.simulation.experiment import final_state
from pfedlora.simulation.records import RoundRecord
from pfedlora.simulation.results import CONFIG_FILE

PREDICTORS = ("with adapter", "local model alone", "adapter alone")
FIXED = ["algorithm=pfedlora", "adapter.placement=branch"]
"""What this diagnosis needs of a run's configuration."""


def finish_run_in_memory(
    run_dir: Path, dataset: Dataset | None
) -> tuple[ExperimentConfig, Federation, list[RoundRecord]]:
    """The configuration of the run in ``run_dir``, its federation after the last round (from its last
    checkpoint, the later rounds run here with one thread as the run's clients trained) and its records."""
    config = load_run_config(run_dir / CONFIG_FILE)
    if (config.algorithm, config.adapter.placement) != ("pfedlora", "branch"):
        raise SystemExit(
            f"--from-run {run_dir}: the run is {config.algorithm} (placement {config.adapter.placement}); "
            "allowed: pfedlora with the branch placement"
        )
    final = final_state(run_dir, dataset)
    records, logged = final.records, final.logged_accuracy
    if logged is not None and not final.matches:
        raise SystemExit(
            f"--from-run {run_dir}: finished here at {records[-1]['mean_accuracy']:.4%} mean accuracy, the "
            f"run logged {logged:.4%}: not the run's clients (another code version?)"
        )
    if logged is not None:
        first = final.replayed_from
        start = f"round {first}'s checkpoint" if first else "the start (no checkpoint)"
        print(
            f"rounds {first + 1} to {len(records)}, rerun from {start}, reach the run's own last mean "
            f"accuracy, {records[-1]['mean_accuracy']:.2%}"
        )
    federation = final.federation
    return config, federation, records


def smoke_run(folder: Path, dataset: Dataset) -> Path:
    """A 2-round run on ``dataset`` checkpointed after round 1, written to ``folder``, for --smoke."""
    smoke = ["federation.num_clients=4", "federation.rounds=2", "federation.sample_fraction=0.5"]
    config = load_config(None, [*FIXED, *smoke, "federation.checkpoint_every=1", "federation.eval_every=1"])
    run_experiment(config, folder, dataset=dataset, workers=1)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--from-run", type=Path, metavar="DIR", help="diagnose this run (see above)")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    parser.add_argument(
        "--smoke", action="store_true", help="a few seconds on synthetic data: a 2-round run, then --from-run"
    )
    args = parser.parse_args()
    if args.from_run is not None and args.overrides:
        raise SystemExit("--from-run takes the run's own configuration: give no --set")
    if args.smoke:
        with tempfile.TemporaryDirectory() as folder:
            dataset = synthetic_dataset()
            config, federation, records = finish_run_in_memory(smoke_run(Path(folder), dataset), dataset)
            diagnose(config, federation, records, args.out)
    elif args.from_run is not None:
        diagnose(*finish_run_in_memory(args.from_run, None), args.out)
    else:
        config = load_config(None, [*FIXED, "federation.eval_every=1000", *args.overrides])
        federation = build_federation(config)
        diagnose(config, federation, run_federation(federation), args.out)


def diagnose(
    config: ExperimentConfig, federation: Federation, records: list[RoundRecord], out: Path | None
) -> None:
    """Score every client of ``federation`` (after its last round) with the three predictors; print the
    figures, and write them to ``out`` as JSON when given."""
    num_classes = len(federation.clients[0].dataset.classes)
    accuracies: dict[str, list[float]] = {name: [] for name in PREDICTORS}
    class_hits = {name: torch.zeros(num_classes, dtype=torch.int64) for name in PREDICTORS[:2]}
    class_total = torch.zeros(num_classes, dtype=torch.int64)
    fixed_by_adapter = broken_by_adapter = 0
    for client_id, data in enumerate(federation.clients):
        client = federation.client_states[client_id].eval()
        assert isinstance(client, BranchModel)
        hits = dict.fromkeys(PREDICTORS, 0)
        total = 0
        with torch.inference_mode(), autocast(config.train, data.train_indices.device):
            for x, y in data.eval_batches(config.eval_split, 1024):
                local = client.local(x)  # (B, C)
                branch = client.scaling * client.lora_branch(x)  # (B, C)
                y = y.cpu()
                right = {
                    name: logits.argmax(1).cpu() == y
                    for name, logits in zip(PREDICTORS, (local + branch, local, branch), strict=True)
                }
                for name in PREDICTORS:
                    hits[name] += int(right[name].sum())
                for name in class_hits:
                    class_hits[name] += torch.bincount(y[right[name]], minlength=num_classes)
                class_total += torch.bincount(y, minlength=num_classes)
                with_adapter, alone = right["with adapter"], right["local model alone"]
                fixed_by_adapter += int((with_adapter & ~alone).sum())
                broken_by_adapter += int((~with_adapter & alone).sum())
                total += len(y)
        for name in PREDICTORS:
            if total:  # a client without evaluation samples is left out, as the run's mean leaves it out
                accuracies[name].append(hits[name] / total)
    figures: dict[str, Any] = {
        "rounds": len(records),
        "mean_accuracy_of_the_run": records[-1]["mean_accuracy"],
        "mean_accuracy": {name: sum(v) / len(v) for name, v in accuracies.items()},
        "predictions_fixed_by_adapter": fixed_by_adapter,
        "predictions_broken_by_adapter": broken_by_adapter,
        "samples": int(class_total.sum()),
        "class_accuracy": {
            name: (correct.double() / class_total.clamp(min=1)).tolist()
            for name, correct in class_hits.items()
        },
        "classes": list(federation.clients[0].dataset.classes),
    }
    print(f"pFedLoRA-branch after {figures['rounds']} rounds, mean test accuracy over clients:")
    for name, value in figures["mean_accuracy"].items():
        print(f"{name:>20}: {100 * value:.2f}%")
    print(
        f"the adapter turns {fixed_by_adapter} of {figures['samples']} predictions right and "
        f"{broken_by_adapter} wrong"
    )
    print("accuracy by class (all clients' samples): with adapter / local model alone")
    for c, name in enumerate(figures["classes"]):
        with_adapter, alone = (figures["class_accuracy"][p][c] for p in PREDICTORS[:2])
        print(f"{name:>20}: {100 * with_adapter:6.2f}% / {100 * alone:6.2f}%")
    if out is not None:
        out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
