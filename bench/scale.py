"""Scale: memory, client-store disk and seconds per round as the federation grows at a fixed number of clients
per round (prints figures, asserts nothing).

For each N a fresh process runs pFedLoRA on Fashion-MNIST (IID, every client at least 5 samples: 60,000
images allow 6 per client at N = 10,000) with the same training work per round whatever N: ``--sampled``
clients per round, each ``train.local_steps`` steps of 5 samples. Only the last round evaluates, every
client, timed apart from the rounds. Reported per N: median seconds per round (rounds 2..R), peak resident
memory of the whole process (setup, rounds and the final evaluation), resident memory after setup, the
client store (states in memory, bytes spilled to disk, states written out), and the final evaluation's
seconds (medians over ``--repeats``, the order of sizes alternating; memory: the largest); then ratios
against the smallest N.

    python bench/scale.py [--clients 100,1000,10000] [--rounds 20] [--sampled 10] [--memory-mb 256]
                          [--workers 1] [--repeats 2] [--json FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import synthetic_dataset  # bench/common.py
from rich.console import Console
from rich.table import Table

from pfedlora.config import load_config
from pfedlora.data import Dataset, load_dataset
from pfedlora.simulation.experiment import open_run
from pfedlora.simulation.federation import Federation
from pfedlora.simulation.loop import run_rounds
from pfedlora.simulation.workers import WorkerPool

console = Console()
MiB = 2**20


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def dataset_for(smoke: bool) -> Dataset:
    return synthetic_dataset() if smoke else load_dataset("fashion-mnist")


def one_size(args: argparse.Namespace, num_clients: int, run_dir: Path) -> dict:
    """Run the federation of ``num_clients`` clients; its figures."""
    config = load_config(
        None,
        [
            "device=cpu",
            f"federation.num_clients={num_clients}",
            f"federation.sample_fraction={args.sampled / num_clients}",
            f"federation.rounds={args.rounds}",
            f"federation.eval_every={args.rounds}",
            "federation.checkpoint_every=0",
            f"federation.client_memory_mb={args.memory_mb}",
            "data.partition=iid",
            "data.min_train_samples=5",
            "train.batch_size=5",
            "train.drop_last=true",
            f"train.local_steps={args.steps}",
        ],
    )
    dataset = dataset_for(args.smoke)
    torch.set_num_threads(1)
    started = time.perf_counter()
    with open_run(config, dataset, args.workers, run_dir) as (server, clients):
        setup_seconds = time.perf_counter() - started
        setup_resident = resident_bytes()
        records = run_rounds(server, clients)
        if isinstance(clients, WorkerPool):
            stores = clients.store_figures()
            worker_peaks = clients.peak_memory()
        else:
            assert isinstance(server, Federation)
            stores = [server.client_states.figures()]
            worker_peaks = []
    wall = time.perf_counter() - started
    rounds = [r["round_seconds"] for r in records]
    return {
        "num_clients": num_clients,
        "sampled": len(records[-1]["sampled"]),
        "seconds_per_round": statistics.median(rounds[1:] or rounds),
        "setup_seconds": setup_seconds,
        "final_evaluation_seconds": wall - setup_seconds - sum(rounds),
        "setup_resident_bytes": setup_resident,
        "peak_resident_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "worker_peak_bytes": worker_peaks,
        "store_bytes_in_memory": sum(s["bytes_in_memory"] for s in stores),
        "store_bytes_on_disk": sum(s["bytes_on_disk"] for s in stores),
        "states_written": sum(s["writes"] for s in stores),
        "mean_accuracy": records[-1]["mean_accuracy"],
    }


def report(results: list[dict], args: argparse.Namespace) -> None:
    title = (
        f"pFedLoRA, {args.sampled} clients per round, {args.rounds} rounds, client memory budget "
        f"{args.memory_mb} MiB, workers {args.workers}"
    )
    table = Table(title=title)
    columns = ("N", "s / round", "peak RSS", "RSS after setup", "store: memory", "store: disk",
               "states written", "final eval s", "setup s")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for r in results:
        peak = r["peak_resident_bytes"] + sum(r["worker_peak_bytes"])
        table.add_row(
            f"{r['num_clients']:,}",
            f"{r['seconds_per_round']:.3f}",
            f"{peak / MiB:,.0f} MiB",
            f"{r['setup_resident_bytes'] / MiB:,.0f} MiB",
            f"{r['store_bytes_in_memory'] / MiB:,.0f} MiB",
            f"{r['store_bytes_on_disk'] / MiB:,.0f} MiB",
            f"{r['states_written']:,}",
            f"{r['final_evaluation_seconds']:.1f}",
            f"{r['setup_seconds']:.1f}",
        )
    console.print(table)
    base = results[0]
    for r in results[1:]:
        peak = r["peak_resident_bytes"] + sum(r["worker_peak_bytes"])
        base_peak = base["peak_resident_bytes"] + sum(base["worker_peak_bytes"])
        speed = r["seconds_per_round"] / base["seconds_per_round"]
        console.print(
            f"N={r['num_clients']:,} against N={base['num_clients']:,}: seconds per round "
            f"{speed:.2f}x, peak memory {peak / base_peak:.2f}x, "
            f"final evaluation {1000 * r['final_evaluation_seconds'] / r['num_clients']:.1f} ms per client"
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        per_client = (last["setup_resident_bytes"] - first["setup_resident_bytes"]) / (
            last["num_clients"] - first["num_clients"]
        )
        console.print(f"memory per client held at setup (data views, ids): {per_client / 1024:.1f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="100,1000,10000", help="federation sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sampled", type=int, default=10, help="clients per round")
    parser.add_argument("--steps", type=int, default=10, help="local steps of 5 samples per client")
    parser.add_argument("--memory-mb", type=float, default=256.0, help="federation.client_memory_mb")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per size, the order of sizes alternating"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on synthetic data")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.rounds, args.sampled, args.steps, args.memory_mb = "10,40", 3, 4, 2, 8.0
        args.repeats = 1
    if args.one is not None:  # a child: one size, figures as one JSON line
        print(json.dumps(one_size(args, args.one, args.run_dir)))
        return
    sizes = [int(n) for n in args.clients.split(",")]
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory(prefix="pfedlora-scale-") as scratch:
        for repeat in range(args.repeats):
            for num_clients in sizes if repeat % 2 == 0 else sizes[::-1]:  # drift falls on every size
                run_dir = Path(scratch) / f"n{num_clients}-{repeat}"
                runs[num_clients].append(measure(args, num_clients, run_dir))
                console.print(f"N={num_clients:,}, repeat {repeat + 1}: done")
    results = [combine(runs[n]) for n in sizes]
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"repeats": runs, "combined": results}, indent=1) + "\n")


def measure(args: argparse.Namespace, num_clients: int, run_dir: Path) -> dict:
    """One size's figures: in this process with --smoke (the figures mean nothing, the code runs), else in
    a fresh process, so that its peak memory is its own."""
    if args.smoke:
        return one_size(args, num_clients, run_dir)
    command = [sys.executable, __file__, "--one", str(num_clients), "--run-dir", str(run_dir)]
    for option in ("rounds", "sampled", "steps", "memory_mb", "workers"):
        command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    figures: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def combine(repeats: list[dict]) -> dict:
    """One size's figures over its repeats: median seconds, largest memory and store."""
    combined = dict(repeats[0])
    for key in ("seconds_per_round", "setup_seconds", "final_evaluation_seconds"):
        combined[key] = statistics.median(r[key] for r in repeats)
    for key in (
        "setup_resident_bytes",
        "peak_resident_bytes",
        "store_bytes_in_memory",
        "store_bytes_on_disk",
    ):
        combined[key] = max(r[key] for r in repeats)
    return combined


if __name__ == "__main__":
    main()
