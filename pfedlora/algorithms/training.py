"""The local optimisation loop shared by every algorithm: SGD over minibatches of a client's data."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial

import torch
from torch import nn

from pfedlora.algorithms.base import ClientContext
from pfedlora.config import TrainConfig
from pfedlora.data import ClientData
from pfedlora.hardware import bf16_is_fast, runs_in_bf16
from pfedlora.metrics import FlopMeter

Batch = tuple[torch.Tensor, torch.Tensor]
logger = logging.getLogger(__name__)

SHORT_STEP_TOKENS = (2, 3, 4)
"""The lengths (real tokens per sample) of the short steps that fit a language model's FLOP parabola."""


def autocast(train: TrainConfig, device: torch.device) -> AbstractContextManager[object]:
    """bfloat16 autocast on ``device`` where ``train.precision`` means bf16 there
    (:func:`~pfedlora.hardware.runs_in_bf16`); otherwise a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=runs_in_bf16(train.precision, device))


def log_precision(train: TrainConfig, device: torch.device) -> None:
    """Say what "auto" chose on ``device``, and warn where "bf16" is asked of a CPU without AMX tiles: its
    bf16 matrix products are no faster than fp32 there (:func:`~pfedlora.hardware.bf16_is_fast`)."""
    if train.precision == "auto":
        chosen = "bf16" if runs_in_bf16(train.precision, device) else "fp32"
        logger.info("train.precision = auto: %s on %s", chosen, device.type)
    elif train.precision == "bf16" and device.type == "cpu" and not bf16_is_fast(device):
        logger.warning(
            "train.precision = bf16 on a CPU without AMX tiles: its bf16 matrix products are no faster than "
            "fp32 here, often slower; for speed on this machine, train.precision = fp32 or auto"
        )


def sgd(parameters: Sequence[nn.Parameter], lr: float, train: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay in the kernel ``train.sgd_kernel`` names: fused (one pass over
    each tensor) or foreach (a few multi-tensor passes, bit for bit the per-parameter loop)."""
    fused = train.sgd_kernel == "fused"
    return torch.optim.SGD(
        parameters,
        lr=lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        fused=fused,
        foreach=not fused,
    )


def clip_gradients(parameters: Sequence[nn.Parameter], max_norm: float) -> None:
    """Scale the gradients so that their total norm is at most ``max_norm``, as ``clip_grad_norm_`` does.

    That function multiplies every gradient by the clipping factor even when the factor is 1, a pass over
    every gradient that changes nothing. On the CPU, where reading the norm costs no device sync, the pass
    is skipped unless the factor is below 1: bit for bit the same gradients, less memory traffic.
    """
    if not parameters:
        return
    if parameters[0].device.type != "cpu":
        torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if not max_norm / (norm + 1e-6) >= 1:  # clip_grad_norm_'s factor (clamped at 1; NaN scales too)
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm, foreach=True)


@contextmanager
def trainable(module: nn.Module, parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Within the block only ``parameters`` require grad, so frozen ones get no weight gradient."""
    chosen = {id(p) for p in parameters}
    previous = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in previous:
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)


def run_sgd(
    parameters: Sequence[nn.Parameter],
    epochs: int,
    batches: Callable[[], Iterable[Batch]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train: TrainConfig,
    lr: float,
    meter: FlopMeter,
    kind: Hashable,
    after_step: Callable[[], None] | None = None,
    steps: int = 0,
    cost_key: Callable[[torch.Tensor], Hashable] | None = None,
    cost_items: Callable[[torch.Tensor], int] | None = None,
    shortened: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> None:
    """``epochs`` passes of SGD (momentum, weight decay, gradient-norm clipping) on ``loss_fn``, or, when
    ``steps`` > 0, exactly ``steps`` steps (as many passes as that takes, the last one cut short).

    A fresh optimizer serves each call, so momentum never carries stale directions across rounds or
    phases. ``batches`` is called once per pass; every step is charged to ``meter`` under ``kind``.
    ``after_step`` runs after every optimizer step (e.g. a projection onto a constraint set). Where a step's
    FLOPs are not proportional to its samples, either they are a polynomial of degree at most 2 in a count
    of items for a batch shape and ``cost_key(x)`` (a language model's real tokens): ``cost_items(x)``,
    charged from the parabola through the counted steps of each (:meth:`~pfedlora.metrics.FlopMeter.run`), a
    counted step's forward and backward running once more under the counter before the step itself, so
    ``loss_fn`` must draw no random numbers there; or, without ``cost_items``, ``cost_key(x)`` and the batch
    size are added to ``kind``, so that each distinct pair is counted once. With ``cost_items``,
    ``shortened(x, n)`` (each sample of ``x`` cut to its first ``n`` tokens) gives the parabola's first three
    points from short copies of a kind's first batch, where they are steps of the same kind.
    """
    if epochs == 0 or not parameters:
        return
    optimizer = sgd(parameters, lr, train)
    device = parameters[0].device

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(x, y)
        clip_gradients(parameters, train.grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step()

    def forward_backward(x: torch.Tensor, y: torch.Tensor) -> None:
        # What a step counts, without its update; the step's zero_grad clears these gradients.
        with autocast(train, device):
            loss = loss_fn(x, y)
        loss.backward()

    def short_steps(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[int, Callable[[], None]]]:
        assert cost_items is not None and shortened is not None
        group = None if cost_key is None else cost_key(x)
        for tokens in SHORT_STEP_TOKENS:
            short = shortened(x, tokens)
            if cost_key is None or cost_key(short) == group:
                yield cost_items(short), partial(forward_backward, short, y)

    def charged(x: torch.Tensor, y: torch.Tensor) -> None:
        if cost_items is not None:
            meter.run(
                (kind, tuple(x.shape), None if cost_key is None else cost_key(x)),
                len(y),
                partial(step, x, y),
                items=cost_items(x),
                probe=partial(forward_backward, x, y),
                fit=None if shortened is None else partial(short_steps, x, y),
            )
        else:
            meter.run(kind if cost_key is None else (kind, len(x), cost_key(x)), len(y), partial(step, x, y))

    if steps <= 0:
        for _ in range(epochs):
            for x, y in batches():
                charged(x, y)
        return
    done = 0
    while done < steps:
        for x, y in batches():
            charged(x, y)
            done += 1
            if done == steps:
                return


def train_on_client_data(
    client: nn.Module,
    parameters: Sequence[nn.Parameter],
    ctx: ClientContext,
    train: TrainConfig,
    *,
    phase: str,
    epochs: int | None = None,
    lr: float | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    data: ClientData | None = None,
    after_step: Callable[[], None] | None = None,
) -> None:
    """SGD on ``parameters`` alone (the rest of ``client`` frozen) over the client's batches (in the order
    ``train.batch_order`` says).

    Defaults: ``train.local_epochs`` epochs at ``train.lr`` of the task's loss (cross-entropy for
    classification) on ``client(x)`` over
    ``ctx.data`` (``train.local_steps`` steps instead, when set). Charged to ``ctx.meter`` as
    ``(ctx.arch, phase)``. Parameters frozen for good (those whose ``requires_grad`` is False between
    phases, e.g. a transformer's pretrained layers below ``model.trainable_layers``) are left out.
    """
    data = ctx.data if data is None else data
    parameters = [p for p in parameters if p.requires_grad]

    def task_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ctx.task.batch_loss(client, x, y)

    with trainable(client, parameters):
        run_sgd(
            parameters,
            train.local_epochs if epochs is None else epochs,
            lambda: data.train_batches(
                train.batch_size, ctx.generator, train.batch_order == "reshuffle", train.drop_last
            ),
            task_loss if loss_fn is None else loss_fn,
            train,
            train.lr if lr is None else lr,
            ctx.meter,
            kind=(ctx.arch, phase),
            after_step=after_step,
            steps=train.local_steps,
            cost_items=ctx.task.scored_items if ctx.task.generative else None,
            cost_key=getattr(client, "cost_group", None) if ctx.task.generative else None,
            shortened=ctx.task.shortened if ctx.task.generative else None,
        )
