"""For a lent GPU: N CNN clients trained one after another against same-architecture clients trained together.

Each "round" every client (client i runs cnn{(i mod 5)+1}) trains one epoch of SGD (momentum, weight decay)
on its own samples, all resident on the device. One after another: an nn.Module and an optimizer per
client, as the simulator does (foreach SGD: the update the vmapped path reproduces). Together: the
clients of one architecture as one stacked set of parameters, their steps batched with ``torch.func.vmap``
over ``functional_call`` (one kernel per layer for the whole group). Both paths alternate in one run; the
script prints rounds per second of each, their ratio, and how far the two paths' weights drift apart
(float reassociation only).

    python bench/gpu.py [--device cuda] [--clients 100] [--samples 600] [--rounds 3] [--smoke]

``--smoke`` runs a few seconds on the CPU (10 clients, 128 samples each) so that the script cannot rot.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from pfedlora.models import build_model
from pfedlora.seeding import torch_generator

console = Console()
LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.01, 0.9, 1e-3, 64


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clients_data(count: int, samples: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised synthetic images (count, samples, 1, 28, 28) and labels (count, samples) on ``device``."""
    generator = torch_generator(0, "gpu-bench")
    x = torch.randn(count, samples, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (count, samples), generator=generator)
    return x.to(device), y.to(device)


def one_after_another(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, foreach=True)
        for m in models
    ]

    def round_() -> None:
        for i, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            for start in range(0, x.shape[1], BATCH):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[i, start : start + BATCH]), y[i, start : start + BATCH]).backward()
                optimizer.step()

    return round_


def arch_of(client: int) -> str:
    return f"cnn{client % 5 + 1}"


def together(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> tuple[Callable[[], None], dict]:
    """One vmapped SGD step per batch for every architecture group; returns the round and the stacked
    parameters by architecture (to compare with the other path)."""
    groups: dict[str, list[int]] = {}
    for i in range(len(models)):
        groups.setdefault(arch_of(i), []).append(i)
    stacks = {}
    for key, members in groups.items():
        params, buffers = stack_module_state([models[i] for i in members])  # each (G, ...)
        template = models[members[0]]
        momentum = {name: torch.zeros_like(p) for name, p in params.items()}

        def loss(
            p: dict, b: dict, xb: torch.Tensor, yb: torch.Tensor, template: nn.Module = template
        ) -> torch.Tensor:
            return F.cross_entropy(functional_call(template, (p, b), (xb,)), yb)

        stacks[key] = (members, params, buffers, momentum, vmap(grad(loss)))

    def round_() -> None:
        for members, params, buffers, momentum, step_grads in stacks.values():
            index = torch.tensor(members, device=x.device)
            xs, ys = x[index], y[index]  # (G, samples, ...)
            for start in range(0, x.shape[1], BATCH):
                grads = step_grads(
                    params, buffers, xs[:, start : start + BATCH], ys[:, start : start + BATCH]
                )
                with torch.no_grad():
                    for name, p in params.items():
                        g = grads[name] + WEIGHT_DECAY * p
                        momentum[name].mul_(MOMENTUM).add_(g)
                        p.sub_(LR * momentum[name])

    return round_, stacks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--samples", type=int, default=600, help="training samples per client")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few seconds on the CPU: does it run?")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.clients, args.samples, args.rounds = "cpu", 10, 128, 1
    device = torch.device(args.device)
    x, y = clients_data(args.clients, args.samples, device)

    def fresh() -> list[nn.Module]:
        return [
            build_model(arch_of(i), (1, 28, 28), 10, torch_generator(0, "client", i)).to(device)
            for i in range(args.clients)
        ]

    sequential_models = fresh()
    sequential = one_after_another(sequential_models, x, y)
    grouped, stacks = together(fresh(), x, y)
    sequential()  # warm-up (and the first round of both paths' weights)
    grouped()
    seconds = {"one after another": 0.0, "together": 0.0}
    for r in range(args.rounds):
        for name, run in (("one after another", sequential), ("together", grouped))[
            :: 1 if r % 2 == 0 else -1
        ]:
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            seconds[name] += time.perf_counter() - started
    drift = max(
        float((params[name][slot] - dict(sequential_models[i].named_parameters())[name]).abs().max())
        for members, params, _, _, _ in stacks.values()
        for slot, i in enumerate(members)
        for name in params
    )
    console.print(f"device {device}, {args.clients} clients × {args.samples} samples, batch {BATCH}")
    for name, total in seconds.items():
        console.print(f"{name:>18}: {args.rounds / total:.3f} rounds/s")
    ratio = seconds["one after another"] / seconds["together"]
    console.print(
        f"together / one after another: [bold]{ratio:.2f}x[/]; largest weight difference {drift:.2e}"
    )


if __name__ == "__main__":
    main()
