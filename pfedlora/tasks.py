"""What a federation learns (registry ``TASKS``, the ``data.task`` values): how a batch's scores are turned
into a training loss and into evaluation counts, and which figure the counts give.

- ``classification``: a model's scores are class logits (B, C); the loss is cross-entropy against the labels,
  and a client's figure is its accuracy.
- ``language-modeling``: a model's scores are next-token logits (B, L, V) over the client's own text, a batch
  x (B, 2, L) being token ids and attention mask; the loss is the mean cross-entropy of every real token
  after the first given the ones before it (padding excluded), and a client's figures are its perplexity
  (exp of the mean negative log-likelihood per token; lower is better) and its next-token top-1 accuracy.

A task joins by registering a :class:`Task` in ``TASKS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.registry import Registry


class Counts(NamedTuple):
    """One client's evaluation, summable over batches: hits, scored items (samples or tokens) and the
    summed negative log-likelihood of the items (nats)."""

    correct: int
    total: int
    loss_sum: float = 0.0


@dataclass(frozen=True)
class Task:
    """A learning task: its loss and its evaluation (see the module docstring)."""

    name: str
    metric: str
    """The headline figure per client: "accuracy" (higher is better) or "perplexity" (lower is better)."""
    generative: bool
    """Whether a model's scores are next-token logits over its input (a causal language model's)."""
    about: str

    def loss(self, scores: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean training loss of a batch."""
        if not self.generative:
            return F.cross_entropy(scores, y)
        logits, targets = next_token_targets(scores, x)
        return F.cross_entropy(logits, targets, ignore_index=IGNORE)

    def scored_items(self, x: torch.Tensor) -> int:
        """How many items :meth:`counts` scores in a batch ``x``: its samples, or for language modeling the
        real tokens after the first of each sample."""
        return int(x[:, 1, 1:].sum()) if self.generative else len(x)

    def shortened(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        """A text batch x (B, 2, L) with each sample cut to its first ``tokens`` real tokens (the rest
        padding), the same shape (language modeling only)."""
        if not self.generative:
            raise ValueError(f"task {self.name!r} has no text batches to shorten")
        kept = x[:, 1] * (x[:, 1].cumsum(dim=1) <= tokens)
        return torch.stack([x[:, 0] * kept, kept], dim=1)

    def batch_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`loss` of ``model``'s scores of a batch; a language model that gives the logits of the real
        next tokens alone (``next_token_logits``) gives the same mean without scoring the padding."""
        next_token_logits = getattr(model, "next_token_logits", None)
        if self.generative and next_token_logits is not None:
            logits, targets = next_token_logits(x)
            return F.cross_entropy(logits, targets)
        return self.loss(model(x), x, y)

    def batch_counts(
        self,
        predict: Callable[[torch.Tensor], torch.Tensor],
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`counts` of a batch scored by ``predict``; for a language model with ``next_token_logits``,
        from those."""
        next_token_logits = getattr(model, "next_token_logits", None)
        if self.generative and next_token_logits is not None:
            return _counts(*next_token_logits(x))
        return self.counts(predict(x), x, y)

    def counts(self, scores: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(hits, items, summed NLL) of a batch as a float64 tensor of 3 on the scores' device (summed over
        batches on the device, read once per client)."""
        if not self.generative:
            return _counts(scores, y)
        return _counts(*next_token_targets(scores, x))


def _counts(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    valid = targets != IGNORE
    nll = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    hits = ((logits.argmax(dim=-1) == targets) & valid).sum()
    return torch.stack([hits.double(), valid.sum().double(), nll.double()])


IGNORE = -100
"""The target index that cross-entropy skips (padding)."""


def next_token_targets(logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, L, V) and a text batch x (B, 2, L) of token ids and mask -> the logits of positions
    0..L-2 flattened (B·(L-1), V) and their targets, the next real token or ``IGNORE`` (B·(L-1),)."""
    ids, mask = x[:, 0].long(), x[:, 1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)  # (B, L-1)
    return logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1)


def perplexity(counts: Counts) -> float | None:
    """exp(summed NLL / tokens); None without tokens."""
    return math.exp(counts.loss_sum / counts.total) if counts.total else None


TASKS: Registry[Task] = Registry("data.task")
"""Every task, by name."""

CLASSIFICATION = TASKS.add(
    "classification",
    Task("classification", "accuracy", False, "class of each sample; accuracy per client"),
)
LANGUAGE_MODELING = TASKS.add(
    "language-modeling",
    Task(
        "language-modeling",
        "perplexity",
        True,
        "each client's own text, next token by next token; perplexity and top-1 accuracy per client",
    ),
)
