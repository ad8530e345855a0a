"""FedKD: adaptive mutual distillation between a private mentor and a shared mentee, with SVD compression.

Wu, Wu, Lyu, Qi, Huang, Xie. "Communication-efficient federated learning via knowledge distillation",
Nature Communications 13, 2032 (2022), arXiv 2108.13323. Every client keeps a private "mentor" M (its own
architecture), a copy of the shared "mentee" S (``fedkd.shared_arch``, cnn5 by default) and a private
linear map W (500×500) from S's 500-d representation into M's. Per batch, with task losses CE_M and CE_S,
hidden features h_M, h_S and the denominator D = CE_M + CE_S (detached), SPEC §4:

    loss_M = CE_M + [KL(S ‖ M) + MSE(h_M, W h_S)] / D,   loss_S = CE_S + [KL(M ‖ S) + MSE(W h_S, h_M)] / D.

Symmetric form of the hidden loss (our reading; the paper writes one hidden loss for both models): in
loss_M the target W h_S is detached, so it trains M only; in loss_S the target h_M is detached, so it trains
S *and* W (W maps the mentee into the mentor's space, as a FitNets regressor belongs to the student). The
two terms have the same value, and their gradients together are exactly those of the undetached
MSE(h_M, W h_S) w.r.t. M, S and W.

Communication (SPEC §4). Each 2-D weight (a conv weight first reshaped to (out, in·k·k)) travels as a
truncated SVD keeping the fewest singular values whose squared sum holds a fraction T of the energy, T
rising linearly from ``fedkd.energy_start`` in round 1 to ``fedkd.energy_end`` in round
``federation.rounds``. A matrix M ≈ U diag(S) Vᵀ under key ``<param>`` is sent as ``<param>.U`` (m, k),
``<param>.S`` (k,) and ``<param>.V`` (n, k); biases and other 1-D tensors, and any matrix whose factors
would not be smaller than the matrix itself (k·(m+n+1) ≥ m·n), are sent whole under ``<param>``. Shapes do
not travel: the receiver knows S's architecture and reshapes each reconstruction to its own tensor of that
name. The client uploads its *update* ΔS = S_after − S_received, compressed; the server reconstructs the
uploads, adds their sample-weighted mean to the exact global S it keeps as its state, and broadcasts S
itself re-compressed with the round's T, so what a client receives is a lossy copy of S wherever the
factors are the smaller form. (Weights near their random initialisation have flat spectra: 95% of the
energy of cnn5's fc1/fc2 takes rank ~300 of 500, above the break-even rank ~250, so those travel whole.)

Shared: the mentee S (state-dict keys ``shared.*``; it travels only in the compressed form above, whose
keys ``shared.<param>`` and ``shared.<param>.U/.S/.V`` are what :meth:`FedKD.is_shared` admits).
Private: the mentor M (``local.*``) and W (``projection.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.algorithms.base import ClientContext, Upload, UploadBound, register_algorithm
from pfedlora.algorithms.distillation import (
    DistillationOptions,
    ModelPair,
    SharedModelAlgorithm,
    build_pair,
    kl_divergence,
    load_shared_,
)
from pfedlora.algorithms.state import State, check_dtypes
from pfedlora.config import option
from pfedlora.errors import ConfigError
from pfedlora.metrics import FlopMeter
from pfedlora.models import FeatureClassifier, init_parameters_


@dataclass(frozen=True)
class FedKDOptions(DistillationOptions):
    """FedKD's ``[fedkd]`` section."""

    energy_start: float = option(0.95, low=0, high=1, low_inclusive=False)
    """T in round 1: the share of each matrix's squared singular values its factors keep."""
    energy_end: float = option(0.98, low=0, high=1, low_inclusive=False)
    """T in the last round (T rises linearly in between)."""

    def check(self) -> None:
        if self.energy_start > self.energy_end:
            raise ConfigError(
                f"fedkd.energy_start ({self.energy_start}) must not exceed fedkd.energy_end "
                f"({self.energy_end})"
            )


FACTOR_SUFFIXES: tuple[str, ...] = (".U", ".S", ".V")
"""Key suffixes of a factorised matrix: left singular vectors, singular values, right singular vectors."""


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest k with Σ_{i<k} s_i² ≥ energy · Σ_i s_i² (singular values in descending order).

    Zero for an all-zero spectrum (nothing to send); never more than the number of singular values.
    """
    squared = singular_values.detach().to(torch.float64).square()
    total = squared.sum()
    if total <= 0:
        return 0
    fraction = squared.cumsum(0) / total  # non-decreasing, last entry 1 up to rounding
    threshold = torch.tensor([energy], dtype=torch.float64, device=fraction.device)
    first = int(torch.searchsorted(fraction, threshold)[0])  # first index whose fraction is >= energy
    return min(first + 1, singular_values.numel())


def svd_factors(matrix: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` of the truncated SVD of ``matrix`` (m, n) that keeps a fraction ``energy``.

    ``U`` is (m, k), ``S`` (k,), ``V`` (n, k), with k = :func:`energy_rank`; ``(U * S) @ V.T`` ≈ ``matrix``.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # (m, r), (r,), (r, n)
    k = energy_rank(s, energy)
    return u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].T.contiguous()


def compress(state: Mapping[str, torch.Tensor], energy: float) -> State:
    """``state`` in its wire form (module docstring): factors for the matrices where they are smaller."""
    out: State = {}
    for key, tensor in state.items():
        if tensor.dim() < 2:
            out[key] = tensor
            continue
        matrix = tensor.reshape(tensor.shape[0], -1)  # (out, in·k·k) for a conv weight
        u, s, v = svd_factors(matrix, energy)
        rows, cols = matrix.shape
        if s.numel() * (rows + cols + 1) >= rows * cols:
            out[key] = tensor
        else:
            out.update({f"{key}.U": u, f"{key}.S": s, f"{key}.V": v})
    return out


def decompress(payload: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]) -> State:
    """The tensors of ``shapes`` rebuilt from their wire form; missing or unexpected keys raise KeyError."""
    out: State = {}
    used: set[str] = set()
    names: tuple[str, ...]
    for key, shape in shapes.items():
        if key in payload:
            tensor, names = payload[key], (key,)
        else:
            names = tuple(key + suffix for suffix in FACTOR_SUFFIXES)
            missing = [n for n in names if n not in payload]
            if missing:
                raise KeyError(f"payload lacks {key!r} and its factors {', '.join(missing)}")
            u, s, v = (payload[n] for n in names)
            tensor = (u * s) @ v.T  # (m, k) · diag(k) · (k, n) -> (m, n)
        if tensor.numel() != torch.Size(shape).numel():
            raise ValueError(f"payload tensor {key!r} has {tensor.numel()} elements, expected shape {shape}")
        out[key] = tensor.reshape(shape)
        used.update(names)
    unexpected = sorted(set(payload) - used)
    if unexpected:
        raise KeyError(f"payload holds unexpected tensors: {', '.join(unexpected)}")
    return out


class MentorMentee(ModelPair):
    """The FedKD client: mentor ``local``, mentee ``shared`` and the private map W (``projection``).

    Calling it runs the mentor (the prediction).
    """

    def __init__(self, local: FeatureClassifier, shared: FeatureClassifier, projection: nn.Linear) -> None:
        super().__init__(local, shared)
        self.projection = projection


@register_algorithm
class FedKD(SharedModelAlgorithm[MentorMentee]):
    """Adaptive mutual distillation with a shared small mentee sent as truncated SVD factors."""

    name = "fedkd"
    options_type = FedKDOptions
    schedule_spans_rounds = True  # the energy threshold runs from its start to its end value over the rounds

    def create_client(self, arch: str, generator: torch.Generator) -> MentorMentee:
        local, shared = build_pair(self.config, arch, self.input_shape, self.num_classes, generator)
        # On the meta device so that PyTorch's own init (global RNG) never runs; then drawn from generator.
        projection = nn.Linear(shared.feature_dim, local.feature_dim, bias=False, device="meta")
        projection = projection.to_empty(device="cpu")
        init_parameters_(projection, generator)
        return MentorMentee(local, shared, projection)

    def energy(self, server_round: int) -> float:
        """T in ``server_round``: linear from its start value in round 1 to its end value in the last."""
        options: FedKDOptions = self.options
        rounds = self.config.federation.rounds
        progress = min(max(server_round - 1, 0) / max(rounds - 1, 1), 1.0)
        start, end = options.energy_start, options.energy_end
        return start + (end - start) * progress

    def losses(
        self, client: MentorMentee, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_M, loss_S)`` on one batch; loss_M reaches only M, loss_S only S and W."""
        reduction = self.options.kl_reduction
        h_mentor, h_mentee = client.local.features(x), client.shared.features(x)  # (B, 500) each
        z_mentor, z_mentee = client.local.head(h_mentor), client.shared.head(h_mentee)  # (B, C) each
        ce_mentor, ce_mentee = F.cross_entropy(z_mentor, y), F.cross_entropy(z_mentee, y)
        # Adaptive weight: distillation counts less while both models still predict badly.
        scale = (ce_mentor + ce_mentee).detach().clamp_min(1e-12)
        mapped = client.projection(h_mentee)  # (B, 500): W h_S
        loss_mentor = (
            ce_mentor
            + (kl_divergence(z_mentor, z_mentee, reduction) + F.mse_loss(h_mentor, mapped.detach())) / scale
        )
        loss_mentee = (
            ce_mentee
            + (kl_divergence(z_mentee, z_mentor, reduction) + F.mse_loss(mapped, h_mentor.detach())) / scale
        )
        return loss_mentor, loss_mentee

    def receive(self, client: MentorMentee, message: State) -> None:
        """The global mentee, rebuilt from its factors, overwrites the client's."""
        shapes = {k: v.shape for k, v in self.shared_state(client).items()}
        load_shared_(client, decompress(message, shapes))

    def train(self, client: MentorMentee, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)
        received = {k: v.clone() for k, v in self.shared_state(client).items()}
        self.train_mutually(client, list(client.parameters()), ctx, ctx.data)
        update = {k: v - received[k] for k, v in self.shared_state(client).items()}  # ΔS
        return Upload(compress(update, self.energy(ctx.server_round)), ctx.data.num_train)

    def broadcast(self, server_state: State, client_id: int, server_round: int) -> State:
        """The exact global S, compressed with this round's T (lossy where factors are sent)."""
        return compress(server_state, self.energy(server_round))

    def check_upload(self, server_state: State, tensors: State) -> None:
        """An update of every global tensor, whole or as consistent float32 factors."""
        check_dtypes(tensors, torch.float32)
        try:
            decompress(tensors, {k: v.shape for k, v in server_state.items()})
        except (KeyError, RuntimeError) as error:  # RuntimeError: factors whose shapes do not chain
            raise ValueError(str(error).strip("'\"")) from None

    def upload_bound(self, server_state: State) -> UploadBound:
        """Every tensor whole or as three factors (U, S, V) whose values, at any rank up to the full one,
        take at most three times the whole tensor's."""
        whole = super().upload_bound(server_state)
        return UploadBound(3 * whole.tensors, 3 * whole.bytes)

    def aggregate(
        self,
        server_state: State,
        uploads: Sequence[Upload],
        server_round: int,
        meter: FlopMeter | None = None,
    ) -> State:
        """S plus the sample-weighted mean of the reconstructed updates."""
        if not uploads:
            return server_state
        shapes = {k: v.shape for k, v in server_state.items()}
        updates = [decompress(u.tensors, shapes) for u in uploads]
        mean_update = self.combine(updates, [u.num_examples for u in uploads])
        return {k: v + mean_update[k] for k, v in server_state.items()}
