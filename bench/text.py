"""Transformer clients on one core: samples per second of each family, depth and phase (prints figures,
asserts nothing).

For ``--archs`` (default minilm-l2, -l4, -l6: the first k layers of all-MiniLM-L6-v2, and smollm2-l8, -l16:
of the SmolLM2-135M decoder), in fp32 and bf16, one intra-op thread, batches of ``--batch`` random token
sequences of ``--length`` tokens (ids drawn from each family's vocabulary):

- pFedLoRA's local phase, training the whole model (``model.trainable_layers = -1``), the top layer and the
  head (1) or the head alone (0), with the "layers" adapter attached and frozen;
- its adapter phase for the "layers" placement (LoRA on q/k/v of the shared layers and the head: the
  backward pass runs through the whole encoder), the "head" placement (features once per batch without
  autograd, then the head's LoRA) and the "branch" placement (the private model once per batch without
  autograd, then the text branch on the family's frozen token embeddings);
- inference (evaluation).

FLOPs per sample from PyTorch's counter come with each figure.

    python bench/text.py [--archs minilm-l2,smollm2-l8] [--steps 8] [--batch 32] [--length 64] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from pfedlora.algorithms import ClientContext, create_algorithm
from pfedlora.config import load_config
from pfedlora.data import Dataset
from pfedlora.metrics import FlopMeter
from pfedlora.models import family_of, family_tokenizer
from pfedlora.seeding import torch_generator
from pfedlora.simulation.local import client_accuracy
from pfedlora.testing import tiny_bert, tiny_text_dataset, whole_client_data

console = Console()


def client_context(dataset: Dataset, arch: str) -> ClientContext:
    """All of ``dataset``'s training samples as one client's data."""
    data = whole_client_data(dataset)
    generator = torch_generator(0, "bench", arch)
    return ClientContext(
        client_id=0, arch=arch, server_round=1, data=data, generator=generator, meter=FlopMeter()
    )


def measure(args: argparse.Namespace, arch: str, precision: str, overrides: list[str]) -> dict[str, float]:
    """Samples/s and FLOPs/sample of each phase and of inference for one architecture and precision."""
    steps, batch = args.steps, args.batch
    vocabulary = (
        0 if args.smoke else len(family_tokenizer(family_of(arch).name, load_config(None, overrides).model))
    )
    dataset = tiny_text_dataset(args.length, per_split=steps * batch, vocabulary=vocabulary, groups=3)
    base = [
        "device=cpu",
        f"federation.architectures={arch}",
        f"model.max_length={args.length}",
        f"train.batch_size={batch}",
        f"train.local_steps={steps}",
        f"train.precision={precision}",
        *overrides,
    ]
    figures: dict[str, float] = {}

    def timed(name: str, extra: list[str], phase: str) -> None:
        config = load_config(None, [*base, *extra])
        algorithm = create_algorithm(config, dataset.input_shape, dataset.num_classes)
        client = algorithm.create_client(arch, torch_generator(0, "bench-init"))
        ctx = client_context(dataset, arch)
        started = time.perf_counter()
        if phase == "inference":
            client_accuracy(algorithm, client, ctx.data, "train")
            seconds, samples, flops = time.perf_counter() - started, ctx.data.num_train, float("nan")
        else:
            getattr(algorithm, f"train_{phase}_phase")(client, ctx)
            seconds, samples = time.perf_counter() - started, ctx.meter.samples
            flops = ctx.meter.total / max(samples, 1)
        figures[name] = samples / seconds
        figures[f"{name} flops"] = flops

    for layers in (-1, 1, 0):
        timed(
            f"local, trainable {layers}",
            ["adapter.placement=layers", f"model.trainable_layers={layers}"],
            "local",
        )
    timed("adapter, layers", ["adapter.placement=layers"], "adapter")
    timed("adapter, head", ["adapter.placement=head"], "adapter")
    timed("adapter, branch", ["adapter.placement=branch"], "adapter")
    timed("inference", ["adapter.placement=layers"], "inference")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--archs", default="minilm-l2,minilm-l4,minilm-l6,smollm2-l8,smollm2-l16", help="comma-separated"
    )
    parser.add_argument("--steps", type=int, default=8, help="training steps per measurement")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="tokens per sample")
    parser.add_argument("--smoke", action="store_true", help="a tiny random BERT: does it run?")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as folder:
        if args.smoke:
            args.steps, args.batch, args.length = 2, 4, 8
            checkpoint = tiny_bert(Path(folder) / "tiny")
            archs, overrides = ["hf-l1", "hf-l3"], [f"model.checkpoint={checkpoint}"]
        else:
            archs, overrides = [arch.strip() for arch in args.archs.split(",") if arch.strip()], []
        console.print(
            f"torch {torch.__version__}, 1 thread, batch {args.batch}, {args.length} tokens, "
            f"{args.steps} steps per measurement"
        )
        for precision in ("fp32", "bf16"):
            rows = {arch: measure(args, arch, precision, overrides) for arch in archs}
            table = Table(title=f"samples/s on one core, {precision} (GFLOP per sample)")
            table.add_column("phase")
            for arch in archs:
                table.add_column(arch, justify="right")
            for name in (k for k in rows[archs[0]] if not k.endswith(" flops")):
                cells = []
                for arch in archs:
                    flops = rows[arch][f"{name} flops"]
                    shown = "" if flops != flops else f" ({flops / 1e9:.3g})"  # NaN: not counted
                    cells.append(f"{rows[arch][name]:.1f}{shown}")
                table.add_row(name, *cells)
            console.print(table)


if __name__ == "__main__":
    main()
