"""Throughput benchmark: prints figures, asserts nothing about time.

1. The machine's dense float32 matmul GFLOP/s, measured in this run (the ceiling to compare against).
2. Plain training of each cnn alone: samples/s and achieved GFLOP/s (FLOPs from PyTorch's counter).
3. A whole federated pFedLoRA round against plain training on the same samples: the same client models,
   batches and parameter groups, trained by a hand-written loop without sampling, channel copies,
   aggregation or bookkeeping. The difference is what the federated machinery costs.

    python bench/throughput.py [--device cpu|cuda] [--rounds 3] [--clients 20] [--json out.json] [--smoke]

The round loop runs in this process (``LocalClients``, PyTorch's own thread count): this measures the loop's
overhead, not the worker pool (see ``bench/engine.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import synthetic_dataset  # bench/common.py
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from pfedlora.algorithms.training import clip_gradients, sgd
from pfedlora.config import load_config
from pfedlora.data import ClientData, Dataset, load_dataset
from pfedlora.metrics import Channel, FlopMeter
from pfedlora.models import ARCHITECTURES, build_model
from pfedlora.seeding import torch_generator
from pfedlora.simulation import LocalClients, build_federation, run_round, sample_clients

console = Console()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def matmul_gflops(device: torch.device, size: int = 2048, seconds: float = 2.0) -> float:
    a = torch.randn(size, size, device=device, generator=torch_generator(0, "a", device=device))
    b = torch.randn(size, size, device=device, generator=torch_generator(0, "b", device=device))
    a @ b  # warm-up
    repeats, elapsed = 0, 0.0
    while elapsed < seconds:
        elapsed += timed(lambda: a @ b, device)
        repeats += 1
    return 2 * size**3 * repeats / elapsed / 1e9


def plain_training(arch: str, data: ClientData, batch_size: int, steps: int, device: torch.device) -> dict:
    """Train one cnn alone with SGD for ``steps`` batches; samples/s and GFLOP/s."""
    dataset = data.dataset
    model = build_model(arch, dataset.input_shape, dataset.num_classes, torch_generator(0, arch)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    generator = torch_generator(0, "batches")
    batches = []
    while len(batches) < steps + 3:
        batches.extend(b for b in data.train_batches(batch_size, generator) if len(b[1]) == batch_size)
    batches = batches[: steps + 3]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step(*batches[0])
    flops_per_step = counter.get_total_flops()
    for x, y in batches[1:3]:
        step(x, y)
    seconds = timed(lambda: [step(x, y) for x, y in batches[3:]], device)
    return {
        "arch": arch,
        "samples_per_second": steps * batch_size / seconds,
        "gflops_per_second": steps * flops_per_step / seconds / 1e9,
        "train_flops_per_sample": flops_per_step / batch_size,
    }


def federated_vs_plain(args: argparse.Namespace, device: torch.device, dataset: Dataset) -> dict:
    """Rounds of pFedLoRA through the round loop, then the same work by a plain loop on copies."""
    config = load_config(
        None,
        [
            f"device={device.type}",
            f"federation.num_clients={args.clients}",
            f"federation.sample_fraction={args.fraction}",
            f"federation.rounds={args.rounds}",
        ],
    )
    federation = build_federation(config, dataset)
    plain_states = {cid: copy.deepcopy(state) for cid, state in federation.client_states.items()}
    train = config.train
    channel, clients = Channel(), LocalClients(federation, FlopMeter())

    def federated(rounds: range) -> int:
        return sum(run_round(federation, clients, r, channel)["train_samples"] for r in rounds)

    def plain(rounds: range) -> None:
        for server_round in rounds:
            for cid in sample_clients(args.clients, args.fraction, config.seed, server_round):
                model, data = plain_states[cid], federation.clients[cid]
                generator = torch_generator(config.seed, "train", cid, server_round)
                for params in (model.local_parameters(), model.adapter_parameters()):
                    for p in model.parameters():
                        p.requires_grad_(False)
                    for p in params:
                        p.requires_grad_(True)
                    optimizer = sgd(params, train.lr, train)
                    for x, y in data.train_batches(train.batch_size, generator):
                        optimizer.zero_grad(set_to_none=True)
                        F.cross_entropy(model(x), y).backward()
                        clip_gradients(params, train.grad_clip)
                        optimizer.step()

    # Round 1 warms both paths up (and lets the FLOP meter count its first step of each kind). Then the two
    # paths alternate round by round, each going first every other round, so drift favours neither.
    federated(range(1, 2))
    plain(range(1, 2))
    samples, federated_seconds, plain_seconds = 0, 0.0, 0.0
    for server_round in range(2, args.rounds + 2):
        rounds = range(server_round, server_round + 1)
        for path in ("federated", "plain") if server_round % 2 else ("plain", "federated"):
            if path == "federated":
                counted: list[int] = []
                federated_seconds += timed(
                    lambda rounds=rounds, counted=counted: counted.append(federated(rounds)), device
                )
                samples += counted[0]
            else:
                plain_seconds += timed(lambda rounds=rounds: plain(rounds), device)
    return {
        "clients": args.clients,
        "sample_fraction": args.fraction,
        "rounds": args.rounds,
        "train_samples": samples,
        "federated_seconds": federated_seconds,
        "plain_seconds": plain_seconds,
        "federated_samples_per_second": samples / federated_seconds,
        "plain_samples_per_second": samples / plain_seconds,
        "overhead_percent": 100 * (federated_seconds / plain_seconds - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per cnn")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on synthetic data: does it run?")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.smoke:
        args.steps, args.clients, args.rounds = 2, 4, 1

    console.print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = matmul_gflops(device, size=256 if args.smoke else 2048, seconds=0.1 if args.smoke else 2.0)
    console.print(f"dense float32 matmul: [bold]{peak:.1f} GFLOP/s[/]")

    source = synthetic_dataset() if args.smoke else load_dataset("fashion-mnist")
    dataset = source.to(device)
    everything = ClientData(
        dataset=dataset,
        train_indices=torch.arange(len(dataset.train_y), device=device),
        test_indices=torch.arange(0, device=device),
        validation_indices=torch.arange(0, device=device),
        augment=False,
    )
    table = Table(title=f"plain training on Fashion-MNIST, batch {args.batch_size}")
    for column in ("model", "samples/s", "GFLOP/s", "% of matmul peak", "train MFLOPs/sample"):
        table.add_column(column, justify="right")
    archs = list(ARCHITECTURES)[:1] if args.smoke else list(ARCHITECTURES)
    models = [plain_training(arch, everything, args.batch_size, args.steps, device) for arch in archs]
    for row in models:
        table.add_row(
            row["arch"],
            f"{row['samples_per_second']:.0f}",
            f"{row['gflops_per_second']:.1f}",
            f"{100 * row['gflops_per_second'] / peak:.0f}%",
            f"{row['train_flops_per_sample'] / 1e6:.2f}",
        )
    console.print(table)

    rounds = federated_vs_plain(args, device, source)
    table = Table(title="pFedLoRA rounds vs plain training on the same samples")
    for column in ("setting", "samples", "federated s", "plain s", "federated samples/s", "overhead"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{rounds['clients']} clients × {rounds['sample_fraction']:g}, {rounds['rounds']} rounds",
        str(rounds["train_samples"]),
        f"{rounds['federated_seconds']:.2f}",
        f"{rounds['plain_seconds']:.2f}",
        f"{rounds['federated_samples_per_second']:.0f}",
        f"{rounds['overhead_percent']:+.1f}%",
    )
    console.print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"matmul_gflops": peak, "models": models, "rounds": rounds}, handle, indent=2)


if __name__ == "__main__":
    main()
