"""Why FedProto is far below training alone here: three predictors of the same trained FedProto clients.

Runs FedProto (Fashion-MNIST, the default federation unless overridden), then evaluates every client's
test split with (a) the nearest global prototype over all classes (FedProto's predictor, SPEC §4),
(b) the nearest global prototype among the classes the client holds, and (c) the client's own classifier
head, and prints the distance of each client's class means to the global prototypes.

    python bench/fedproto_diagnosis.py [--set key=value ...] [--smoke]
"""

from __future__ import annotations

import argparse

import torch
from common import synthetic_dataset  # bench/common.py

from pfedlora.algorithms.prototypes import class_feature_means
from pfedlora.config import load_config
from pfedlora.metrics import FlopMeter
from pfedlora.simulation import build_federation, run_federation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on synthetic data: does it run?")
    args = parser.parse_args()
    smoke = ["federation.num_clients=4", "federation.rounds=1", "federation.sample_fraction=0.5"] * args.smoke
    config = load_config(None, ["algorithm=fedproto", "federation.eval_every=1000", *smoke, *args.overrides])
    federation = build_federation(config, synthetic_dataset() if args.smoke else None)
    records = run_federation(federation)
    accuracy = 100 * records[-1]["mean_accuracy"]
    print(f"FedProto after {len(records)} rounds: mean test accuracy {accuracy:.2f}%")
    hits = {"nearest prototype, all classes": [], "nearest prototype, own classes": [], "own head": []}
    gaps = []
    for client_id, data in enumerate(federation.clients):
        client = federation.client_states[client_id].eval()
        num_classes = client.global_prototypes.shape[0]
        own = torch.zeros(num_classes, dtype=torch.bool)
        own[data.dataset.train_y[data.train_indices].unique()] = True
        correct = dict.fromkeys(hits, 0)
        total = 0
        with torch.inference_mode():
            for x, y in data.eval_batches("test", 1024):
                scores = client.prototype_scores(x)  # (B, C)
                correct["nearest prototype, all classes"] += int((scores.argmax(1) == y).sum())
                own_scores = scores.masked_fill(~own, float("-inf"))
                correct["nearest prototype, own classes"] += int((own_scores.argmax(1) == y).sum())
                correct["own head"] += int((client(x).argmax(1) == y).sum())
                total += len(y)
        for name in hits:
            hits[name].append(correct[name] / total)
        means, counts = class_feature_means(client.model, data, num_classes, 256, FlopMeter(), "diag")
        held = counts > 0
        local_to_global = (means[held] - client.global_prototypes[held]).norm(dim=1).mean()
        between_global = torch.cdist(client.global_prototypes, client.global_prototypes).mean()
        gaps.append((float(local_to_global), float(between_global)))
    for name, values in hits.items():
        print(f"{name:>32}: {100 * sum(values) / len(values):.2f}% mean over clients")
    local, between = (sum(g[i] for g in gaps) / len(gaps) for i in (0, 1))
    print(f"mean distance of a client's class mean to its global prototype: {local:.3f}")
    print(f"mean distance between two global prototypes:                   {between:.3f}")


if __name__ == "__main__":
    main()
