"""How the federated-LoRA methods combine their clients' adapters: pure functions of (uploads, weights).

One LoRA layer's adapter is a pair of factors, ``A`` (r × in) and ``B`` (out × r); its update of the base
weight is ``(alpha / r) · B A`` (:func:`lora_scale`, one function for server and clients, so the two can
never scale by different factors). ``weights`` are the clients' aggregation weights (sample counts, say),
normalised here. Each rule below is exactly what its paper's server does to one layer:

- **FedIT** (Zhang et al., ICASSP 2024; the rule of FlowerTune and OpenFedLLM): A and B averaged *separately*.
  The global update is then avg(B)·avg(A), which is not the average of the clients' updates avg(B·A).
- **FFA-LoRA** (Sun et al., ICLR 2024): A frozen at one seeded initialisation shared by every client, only B
  trained and averaged; since A is common, avg(B)·A = avg(B·A): exact.
- **FedSA-LoRA** (Guo et al., ICLR 2025): A averaged (the shared knowledge), B kept private by each client.
- **HetLoRA** (Cho et al., EMNLP 2024): client ranks differ; each A, B is zero-padded to the largest rank,
  clients are weighted by the Frobenius norm of their update B·A (times their own weight), the padded
  factors are averaged, and each client takes the first r_k rows of A and columns of B back.
- **FlexLoRA** (Bai et al., NeurIPS 2024): the server forms the weighted sum of the clients' updates
  ΔW = Σ w_k B_k A_k and gives each client the best rank-r_k approximation of it (truncated SVD, split
  as B = U_r √S_r, A = √S_r V_rᵀ).
- **FLoRA** (Wang et al., NeurIPS 2024): stacking. B_stack = [B_1 … B_K] and A_stack = [w_1 A_1; …; w_K A_K]
  make B_stack A_stack = Σ w_k B_k A_k exactly; the server merges that update into the base and the
  clients start the next round from fresh adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pfedlora.registry import Registry


def lora_scale(alpha: float, rank: int) -> float:
    """LoRA's scaling of ``B A``: alpha / r (the one definition, for the server and the clients)."""
    if rank < 1:
        raise ValueError(f"a LoRA rank must be at least 1, got {rank}")
    return alpha / rank


@dataclass(frozen=True)
class Factors:
    """One client's adapter of one layer: A (r × in), B (out × r)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def product(self) -> torch.Tensor:
        """B A (out × in), the update before scaling."""
        return self.B @ self.A


@dataclass(frozen=True)
class Aggregate:
    """What a server rule sends back for one layer: per client its new factors (None where the client keeps
    its own, or where a rule sends one global pair: see ``common``), and an update merged into the base."""

    common: Factors | None = None
    """The factors every client receives (FedIT, FFA-LoRA's B with the shared A, FedSA-LoRA's A; HetLoRA's
    padded global factors, of which each client takes its rank's share)."""
    per_client: tuple[Factors, ...] = ()
    """Each client's own factors (HetLoRA, FlexLoRA: one per client, of its rank)."""
    merged: torch.Tensor | None = None
    """An update (out × in, unscaled) the server merges into the base weight (FLoRA)."""


def normalised(weights: Sequence[float]) -> torch.Tensor:
    """``weights`` divided by their sum (float64); ValueError unless non-negative with a positive sum."""
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if w.numel() == 0 or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got {list(weights)}")
    return w / w.sum()


def _mean(tensors: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack([t.to(torch.float64) for t in tensors])  # (K, ...)
    return torch.tensordot(w, stacked, dims=1).to(tensors[0].dtype)


def fedit(uploads: Sequence[Factors], weights: Sequence[float]) -> Aggregate:
    """FedIT: A and B averaged separately (FlowerTune's and OpenFedLLM's rule)."""
    w = normalised(weights)
    return Aggregate(common=Factors(_mean([u.A for u in uploads], w), _mean([u.B for u in uploads], w)))


def ffa_lora(uploads: Sequence[Factors], weights: Sequence[float]) -> Aggregate:
    """FFA-LoRA: A is the clients' common frozen A; B averaged (exact, as A is the same everywhere)."""
    first = uploads[0].A
    if any(not torch.equal(u.A, first) for u in uploads):
        raise ValueError("FFA-LoRA's clients must share one frozen A; an upload holds another")
    return Aggregate(common=Factors(first, _mean([u.B for u in uploads], normalised(weights))))


def fedsa_lora(uploads: Sequence[Factors], weights: Sequence[float]) -> Aggregate:
    """FedSA-LoRA: A averaged and sent back; each B stays with its client (``common.B`` is unused: the
    clients' own)."""
    w = normalised(weights)
    return Aggregate(common=Factors(_mean([u.A for u in uploads], w), torch.empty(0)))


def _padded(factors: Factors, rank: int) -> Factors:
    """``factors`` zero-padded to ``rank`` (A's rows, B's columns)."""
    extra = rank - factors.rank
    A = torch.cat([factors.A, factors.A.new_zeros(extra, factors.A.shape[1])])
    B = torch.cat([factors.B, factors.B.new_zeros(factors.B.shape[0], extra)], dim=1)
    return Factors(A, B)


def hetlora(uploads: Sequence[Factors], weights: Sequence[float]) -> Aggregate:
    """HetLoRA: zero-pad to the largest rank, weight by ‖B_k A_k‖_F × the client's weight, average, and
    truncate back to each client's own rank."""
    rank = max(u.rank for u in uploads)
    norms = [float(torch.linalg.matrix_norm(u.product().to(torch.float64))) for u in uploads]
    combined = [float(v) * n for v, n in zip(weights, norms, strict=True)]
    w = normalised(combined) if sum(combined) > 0 else normalised(weights)
    padded = [_padded(u, rank) for u in uploads]
    A, B = _mean([p.A for p in padded], w), _mean([p.B for p in padded], w)
    return Aggregate(
        common=Factors(A, B),
        per_client=tuple(Factors(A[: u.rank].clone(), B[:, : u.rank].clone()) for u in uploads),
    )


def weighted_update(uploads: Sequence[Factors], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_k B_k A_k (out × in), in float64."""
    w = normalised(weights)
    total = torch.zeros_like(uploads[0].product(), dtype=torch.float64)
    for wk, upload in zip(w, uploads, strict=True):
        total += float(wk) * upload.product().to(torch.float64)
    return total


def best_rank(update: torch.Tensor, rank: int) -> Factors:
    """The best rank-``rank`` approximation of ``update`` in Frobenius norm (Eckart–Young), as factors
    B = U_r √S_r (out × r), A = √S_r V_rᵀ (r × in)."""
    U, S, Vh = torch.linalg.svd(update.to(torch.float64), full_matrices=False)
    root = S[:rank].sqrt()
    return Factors(root[:, None] * Vh[:rank], U[:, :rank] * root[None, :])


def flexlora(uploads: Sequence[Factors], weights: Sequence[float]) -> Aggregate:
    """FlexLoRA: the weighted sum of the clients' updates, and for each client its best approximation of
    the client's own rank."""
    update = weighted_update(uploads, weights)
    dtype = uploads[0].A.dtype
    out = []
    for u in uploads:
        best = best_rank(update, u.rank)
        out.append(Factors(best.A.to(dtype), best.B.to(dtype)))
    return Aggregate(per_client=tuple(out))


def flora(uploads: Sequence[Factors], weights: Sequence[float]) -> Aggregate:
    """FLoRA: stacked factors whose product is exactly Σ w_k B_k A_k, merged into the base (clients then
    start from fresh adapters)."""
    w = normalised(weights)
    A_stack = torch.cat([float(wk) * u.A.to(torch.float64) for wk, u in zip(w, uploads, strict=True)])
    B_stack = torch.cat([u.B.to(torch.float64) for u in uploads], dim=1)
    return Aggregate(merged=B_stack @ A_stack)


Rule = Callable[[Sequence[Factors], Sequence[float]], Aggregate]

LORA_RULES: Registry[Rule] = Registry("lora aggregation rule")
"""Every federated-LoRA server rule, by the name of its method."""
for _name, _rule in (
    ("fedit", fedit),
    ("ffa-lora", ffa_lora),
    ("fedsa-lora", fedsa_lora),
    ("hetlora", hetlora),
    ("flexlora", flexlora),
    ("flora", flora),
):
    LORA_RULES.add(_name, _rule)
