"""What the shared adapter adds to each client: pFedLoRA-branch's predictor with and without it.

Runs pFedLoRA with the branch placement (the default federation unless overridden), then scores every
client's evaluation split (test, or validation when one is carved) with (a) pFedLoRA's predictor
F(x) = f_local(x) + (alpha/r) g(x), (b) the private model alone, f_local(x), and (c) the shared branch
alone, g(x). It prints the mean accuracy over clients of each, how many predictions the adapter turns
from wrong to right and from right to wrong, and, per class, the accuracy with and without the adapter
(over all clients' samples); ``--out FILE`` writes the same figures as JSON.

    python bench/adapter_diagnosis.py [--set key=value ...] [--out FILE.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import synthetic_dataset  # bench/common.py

from pfedlora.algorithms.training import autocast
from pfedlora.config import load_config
from pfedlora.models.adapters import BranchModel
from pfedlora.simulation import build_federation, run_federation

PREDICTORS = ("with adapter", "local model alone", "adapter alone")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on synthetic data: does it run?")
    args = parser.parse_args()
    smoke = ["federation.num_clients=4", "federation.rounds=1", "federation.sample_fraction=0.5"] * args.smoke
    fixed = ["algorithm=pfedlora", "adapter.placement=branch", "federation.eval_every=1000"]
    config = load_config(None, [*fixed, *smoke, *args.overrides])
    federation = build_federation(config, synthetic_dataset() if args.smoke else None)
    records = run_federation(federation)
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
    figures = {
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
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
