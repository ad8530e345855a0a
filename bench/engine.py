"""The engine against today's engine, as ratios measured in one run (prints figures, asserts nothing).

1. The default ``pfedlora run`` with today's engine (every client in one process with all cores as intra-op
   threads, NCHW layout, foreach SGD; ``--workers 0 --set train.channels_last=false --set
   train.sgd_kernel=foreach``) and with this one (a worker process per usable core, one thread each,
   channels-last, fused SGD), in fp32 and in bf16: wall seconds (setup and
   evaluations included), their ratio, mean accuracy, and peak resident memory of every process. Each run
   is a fresh subprocess; the order of the variants alternates between repeats.
2. The CNN training step on one core, in fp32 and bf16, against the same-precision dense matmul rate of that
   core (FLOPs from PyTorch's counter).
3. ``compare`` of the nine methods (N=100, C=10%) one by one on today's engine against ``--jobs`` on this one.

    python bench/engine.py [--rounds 80] [--compare-rounds 30] [--repeats 1] [--jobs 2] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import synthetic_dataset  # bench/common.py
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from pfedlora.algorithms.training import autocast, clip_gradients, sgd
from pfedlora.compare import plan_variants, run_comparison
from pfedlora.config import TrainConfig, load_config
from pfedlora.data import Dataset, load_dataset
from pfedlora.models import ARCHITECTURES, build_model
from pfedlora.seeding import torch_generator
from pfedlora.simulation.experiment import open_run, summarize
from pfedlora.simulation.loop import run_rounds
from pfedlora.simulation.workers import WorkerPool, usable_cores

console = Console()
TODAY = ("today's engine", 0, ("train.channels_last=false", "train.sgd_kernel=foreach"))
THIS = ("this engine", None, ())
THIS_BF16 = ("this engine, bf16", None, ("train.precision=bf16",))
ENGINES = (TODAY, THIS, THIS_BF16)
STEP_VARIANTS = ((False, "foreach"), (True, "foreach"), (True, "fused"))
"""(channels_last, sgd_kernel) of the training steps measured: today's engine's step (NCHW, foreach), the
same in channels-last, then this engine's (channels-last, fused)."""
NINE = ["pfedlora", "standalone", "lg-fedavg", "fml", "fedkd", "fedgh", "fedapen", "fedproto"]


def dataset_for(smoke: bool) -> Dataset:
    return synthetic_dataset() if smoke else load_dataset("fashion-mnist")


# --- 1. the default run ----------------------------------------------------------------------------------


def one_run(args: argparse.Namespace, label: str) -> dict:
    """One run of the default job with the engine named ``label``; its figures."""
    _, workers, extra = next(v for v in ENGINES if v[0] == label)
    overrides = [f"federation.rounds={args.rounds}", *extra, *args.overrides]
    config = load_config(None, overrides)
    dataset = dataset_for(args.smoke)
    started = time.perf_counter()
    with open_run(config, dataset, workers) as (server, clients):
        records = run_rounds(server, clients)
        peaks = clients.peak_memory() if isinstance(clients, WorkerPool) else []
    seconds = time.perf_counter() - started
    summary = summarize(server, records, seconds)
    return {
        "engine": label,
        "seconds": seconds,
        "accuracy": summary["mean_accuracy_last"],
        "main_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "worker_peak_bytes": peaks,
    }


def default_runs(args: argparse.Namespace) -> list[dict]:
    results = []
    for repeat in range(args.repeats):
        order = ENGINES if repeat % 2 == 0 else ENGINES[::-1]
        for label, _, _ in order:
            if args.smoke:  # in this process: the figures mean nothing, the code runs
                results.append(one_run(args, label))
                continue
            # A fresh process per run, so that peak memory and warm caches belong to that run alone.
            command = [sys.executable, __file__, "--one", label, "--rounds", str(args.rounds)]
            command += ["--smoke"] * args.smoke + [f"--set={o}" for o in args.overrides]
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ.copy())
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def report_default_runs(results: list[dict], rounds: int) -> None:
    table = Table(title=f"the default job, {rounds} rounds ({usable_cores()} usable cores)")
    for column in ("engine", "wall s", "mean acc", "peak RSS main", "peak RSS per worker"):
        table.add_column(column, justify="right")
    for r in results:
        workers = ", ".join(f"{b / 2**20:.0f}" for b in r["worker_peak_bytes"]) or "–"
        table.add_row(
            r["engine"],
            f"{r['seconds']:.1f}",
            f"{100 * r['accuracy']:.2f}%",
            f"{r['main_peak_bytes'] / 2**20:.0f} MiB",
            f"{workers} MiB" if r["worker_peak_bytes"] else "–",
        )
    console.print(table)
    seconds = {label: sum(r["seconds"] for r in results if r["engine"] == label) for label, _, _ in ENGINES}
    console.print(
        f"speed-up of this engine: [bold]{seconds[TODAY[0]] / seconds[THIS[0]]:.2f}x[/] (wall time), "
        f"with bf16 {seconds[TODAY[0]] / seconds[THIS_BF16[0]]:.2f}x"
    )


# --- 2. the training step against the matmul rate of one core --------------------------------------------


def matmul_rate(dtype: torch.dtype, size: int, seconds: float) -> float:
    generator = torch_generator(0, "matmul")
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    a @ b
    repeats, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        repeats += 1
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def step_rate(arch: str, train: TrainConfig, steps: int, batch: int) -> float:
    """FLOP/s of the training step (forward, backward, clipping, SGD) of ``arch`` on one core."""
    model = build_model(arch, (1, 28, 28), 10, torch_generator(0, arch))
    layout = torch.channels_last if train.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)  # type: ignore[call-overload]
    parameters = list(model.parameters())
    optimizer = sgd(parameters, 0.01, train)
    generator = torch_generator(0, "x")
    x = torch.randn(batch, 1, 28, 28, generator=generator).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,), generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(train, x.device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        clip_gradients(parameters, train.grad_clip)
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return flops * steps / (time.perf_counter() - started)


def step_rates(args: argparse.Namespace) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        size, seconds, steps = (256, 0.2, 2) if args.smoke else (1024, 3.0, 60)
        peaks = {
            p: matmul_rate(dtype, size, seconds)
            for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        }
        table = Table(title="training step on one core (batch 64) against that core's dense matmul rate")
        for column in ("model", "precision", "layout", "SGD", "GFLOP/s", "% of matmul"):
            table.add_column(column, justify="right")
        archs = list(ARCHITECTURES)[:1] if args.smoke else list(ARCHITECTURES)
        for precision in ("fp32", "bf16"):
            for arch in archs:
                for channels_last, kernel in STEP_VARIANTS:
                    train = TrainConfig(precision=precision, channels_last=channels_last, sgd_kernel=kernel)
                    rate = step_rate(arch, train, steps, 64)
                    layout = "channels-last" if channels_last else "NCHW"
                    share = f"{100 * rate / peaks[precision]:.0f}%"
                    table.add_row(arch, precision, layout, kernel, f"{rate / 1e9:.1f}", share)
        console.print(
            f"dense matmul, one core ({size}²): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
            f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s"
        )
        console.print(table)
    finally:
        torch.set_num_threads(threads)


# --- 3. compare of the nine methods ----------------------------------------------------------------------


def compare_nine(args: argparse.Namespace) -> None:
    dataset = dataset_for(args.smoke)
    rounds = args.compare_rounds
    base = [f"federation.rounds={rounds}", f"federation.eval_every={rounds}", *args.overrides]
    algorithms = NINE[:2] if args.smoke else NINE
    placements = ["branch"] if args.smoke else ["branch", "layers"]
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides, jobs, workers in (
            (TODAY[0], [*base, *TODAY[2]], 1, 0),
            (THIS[0], base, args.jobs, None),
        ):
            variants = plan_variants(algorithms, placements, None, overrides)
            started = time.perf_counter()
            out = Path(scratch) / name.replace(" ", "-")
            run_comparison(variants, out, jobs=jobs, workers=workers, dataset=dataset)
            figures[name] = time.perf_counter() - started
    methods = len(algorithms) - 1 + len(placements)
    console.print(
        f"compare of {methods} methods, {rounds} rounds: today's engine one by one "
        f"{figures[TODAY[0]]:.1f} s, this engine with --jobs {args.jobs} {figures[THIS[0]]:.1f} s: "
        f"[bold]{figures[TODAY[0]] / figures[THIS[0]]:.2f}x[/]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=80, help="rounds of the default job (section 1)")
    parser.add_argument("--compare-rounds", type=int, default=30, help="rounds of each compared method")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each engine in section 1")
    parser.add_argument("--jobs", type=int, default=usable_cores(), help="compare --jobs of this engine")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--only", choices=("default", "step", "compare"), help="run one section")
    parser.add_argument("--smoke", action="store_true", help="a few seconds on synthetic data: does it run?")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.compare_rounds = 1, 1
        args.overrides = ["federation.num_clients=4", "federation.sample_fraction=0.5", *args.overrides]
    if args.one:
        print(json.dumps(one_run(args, args.one)))
        return
    console.print(f"torch {torch.__version__}, {usable_cores()} usable cores")
    if args.only in (None, "default"):
        report_default_runs(default_runs(args), args.rounds)
    if args.only in (None, "step"):
        step_rates(args)
    if args.only in (None, "compare"):
        compare_nine(args)


if __name__ == "__main__":
    main()
