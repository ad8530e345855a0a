"""Federated-LoRA methods for language models beyond FedIT: FFA-LoRA, FedSA-LoRA, HetLoRA, FlexLoRA, FLoRA.

Papers: FFA-LoRA (ICLR 2024, arXiv 2403.12313), FedSA-LoRA (ICLR 2025, arXiv 2410.01463), HetLoRA (EMNLP
2024, arXiv 2401.06432), FlexLoRA (NeurIPS 2024, arXiv 2402.11505), FLoRA (NeurIPS 2024, arXiv 2409.05976).

Every client runs the frozen causal LM (:mod:`pfedlora.models.causal_lm`) with one LoRA adapter on the
adapted modules, trained on its own text each round; what travels and how the server combines it is the
method's rule, one function each in :mod:`pfedlora.algorithms.lora_aggregation`. One scaling alpha/r
(``adapter.alpha`` over ``adapter.rank``: :func:`lora_scale`) serves every client and the server, also
where ranks differ by client (a client of rank r_k then has alpha = scaling · r_k), so that B·A means the
same update everywhere.

=========== ==================== ============================== ================================
method      client rank          down / up                      server
=========== ==================== ============================== ================================
FFA-LoRA    ``adapter.rank``     B / B (A frozen, one seed)     mean of B (exact)
FedSA-LoRA  ``adapter.rank``     A / A (B private)              mean of A
HetLoRA     its architecture's   its share of the padded A, B   norm-weighted mean of padded A, B
FlexLoRA    its architecture's   best rank-r_k factors / A, B   ΔW = Σ w_k B_k A_k, SVD per client
FLoRA       its architecture's   merged ΔW (dense) / A, B       ΔW += scaling · Σ w_k B_k A_k
=========== ==================== ============================== ================================

Where this follows the papers' main algorithm rather than their code: HetLoRA's rank self-pruning and
FlexLoRA's rank selection by client resources are left out (each client's rank is its architecture's);
FLoRA's clients start every round from a fresh adapter on the merged base, as in its paper.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from pfedlora.algorithms.base import (
    Algorithm,
    ClientContext,
    PeftAdapter,
    Upload,
    UploadBound,
    register_algorithm,
)
from pfedlora.algorithms.lora_aggregation import (
    LORA_RULES,
    Factors,
    best_rank,
    lora_scale,
    weighted_update,
)
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.metrics import FlopMeter
from pfedlora.models._init import kaiming_uniform_
from pfedlora.models.causal_lm import (
    DEFAULT_TARGETS,
    SHARED_PREFIX,
    LanguageModelClient,
    adapted_modules,
    frozen_causal_lm,
    language_model_arch,
)
from pfedlora.models.transformer import FAMILIES
from pfedlora.seeding import torch_generator

KEY_A, KEY_B = ".lora_A.default.weight", ".lora_B.default.weight"
MERGED_PREFIX, DELTA = "merged.", ".delta"


def key_of(module: str, factor: str) -> str:
    """The state-dict key of factor "A", "B" or "delta" of ``module``."""
    if factor == "delta":
        return f"{MERGED_PREFIX}{module}{DELTA}"
    return f"{SHARED_PREFIX}{module}{KEY_A if factor == 'A' else KEY_B}"


def factor_of(key: str) -> tuple[str, str] | None:
    """(module, factor) of a state-dict key of :func:`key_of`'s form, else None."""
    for prefix, suffix, factor in (
        (SHARED_PREFIX, KEY_A, "A"),
        (SHARED_PREFIX, KEY_B, "B"),
        (MERGED_PREFIX, DELTA, "delta"),
    ):
        if key.startswith(prefix) and key.endswith(suffix):
            return key[len(prefix) : -len(suffix)], factor
    return None


class FederatedLoRA(Algorithm[LanguageModelClient]):
    """One LoRA adapter per client on the frozen language model; the server combines by the method's rule."""

    tasks: ClassVar[tuple[str, ...]] = ("language-modeling",)
    rule: ClassVar[str]
    """The method's server rule in ``LORA_RULES``."""
    down: ClassVar[tuple[str, ...]] = ("A", "B")
    """The factors the server sends ("delta": a dense merged update)."""
    up: ClassVar[tuple[str, ...]] = ("A", "B")
    """The factors a client uploads."""
    trained: ClassVar[tuple[str, ...]] = ("A", "B")
    """The factors a client trains."""
    ranks_per_client: ClassVar[bool] = False
    """True: a client's rank is its architecture's (``<family>-r<k>``), else ``adapter.rank``."""
    server_keeps: ClassVar[str] = "factors"
    """"factors" (the global A and/or B) or "delta" (a dense update per module)."""

    @functools.cached_property
    def scaling(self) -> float:
        """alpha / r, one number for every client and the server."""
        adapter = self.config.adapter
        return lora_scale(adapter.effective_alpha, adapter.rank)

    @functools.cached_property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every adapted module of the frozen model."""
        arch = language_model_arch(self.config.federation.architectures[0])
        checkpoint = FAMILIES[arch.family].locate(self.model_settings)
        targets = self.config.adapter.targets or DEFAULT_TARGETS
        layers = adapted_modules(frozen_causal_lm(checkpoint, "cpu", self.base_dtype), targets)
        return {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}

    def rank_of(self, arch: str) -> int:
        """The rank of a client of architecture ``arch``."""
        return language_model_arch(arch).private_rank if self.ranks_per_client else self.config.adapter.rank

    @property
    def largest_rank(self) -> int:
        return max(self.rank_of(arch) for arch in self.config.federation.architectures)

    def create_client(self, arch: str, generator: torch.Generator) -> LanguageModelClient:
        rank = self.rank_of(arch)
        return self.language_model(
            arch,
            generator,
            private=False,
            shared_rank=rank,
            shared_alpha=self.scaling * rank,
            merged=self.server_keeps == "delta" and "delta" in self.down,
        )

    def is_shared(self, key: str) -> bool:
        parsed = factor_of(key)
        return parsed is not None and (parsed[1] in self.up or parsed[1] in self.down)

    def shared_state(self, client: LanguageModelClient) -> State:
        """What the client uploads: its factors of ``up``."""
        return {
            k: v.detach()
            for k, v in client.state_dict().items()
            if (parsed := factor_of(k)) is not None and parsed[1] in self.up
        }

    def check_shared_shapes(self, shared: Mapping[str, State]) -> None:
        """With ranks per client the factors differ in rank by design: the modules must be the same."""
        if not self.ranks_per_client:
            super().check_shared_shapes(shared)

    def initial_server_state(self, template: LanguageModelClient) -> State:
        if self.server_keeps == "delta":
            return {
                key_of(m, "delta"): torch.zeros(shape, device=template.device_marker.device)
                for m, shape in self.layer_shapes.items()
            }
        if self.ranks_per_client:  # the global factors are of the largest rank
            arch = self.config.federation.architectures[0]
            template = self.language_model(
                arch,
                torch_generator(self.config.seed, "server-init", "largest-rank"),
                private=False,
                shared_rank=self.largest_rank,
                shared_alpha=self.scaling * self.largest_rank,
            ).to(template.device_marker.device)
        kept = set(self.up) | set(self.down)
        return {
            k: v.detach().clone()
            for k, v in template.state_dict().items()
            if (parsed := factor_of(k)) is not None and parsed[1] in kept
        }

    def broadcast(self, server_state: State, client_id: int, server_round: int) -> State:
        """The server's factors of ``down`` (a method may give each client its own: see the subclasses)."""
        return {
            k: v for k, v in server_state.items() if (p := factor_of(k)) is not None and p[1] in self.down
        }

    def receive(self, client: LanguageModelClient, message: State) -> None:
        """The server's tensors overwrite the client's of the same names (strictly: names and shapes)."""
        own = client.state_dict()
        unknown = sorted(set(message) - set(own))
        if unknown or set(message) != {k for k in own if self._received(k)}:
            raise ValueError(
                f"expected the global {', '.join(self.down)} of every module, got {sorted(message)}"
            )
        for key, value in message.items():
            if value.shape != own[key].shape:
                raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        client.load_state_dict(message, strict=False)

    def _received(self, key: str) -> bool:
        parsed = factor_of(key)
        return parsed is not None and parsed[1] in self.down

    def train(self, client: LanguageModelClient, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)
        assert client.adapter is not None
        parameters = [
            p
            for name, p in client.adapter.named_parameters()
            if (parsed := factor_of(SHARED_PREFIX + name)) is not None and parsed[1] in self.trained
        ]
        train_on_client_data(client, parameters, ctx, self.config.train, phase="adapter")
        return Upload(self.shared_state(client), ctx.data.num_train)

    def check_upload(self, server_state: State, tensors: State) -> None:
        """Every module's factors of ``up``, A (r, in) and B (out, r) with one rank r: the method's rank
        (``adapter.rank``), or with ranks per client any up to the federation's largest."""
        expected = {key_of(m, f) for m in self.layer_shapes for f in self.up}
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or extra:
            raise ValueError(f"missing tensors: {missing[:3]}; unexpected tensors: {extra[:3]}")
        ranks = set()
        for key, value in tensors.items():
            module, factor = factor_of(key) or ("", "")
            out_features, in_features = self.layer_shapes[module]
            if value.dim() != 2 or value.dtype != torch.float32:
                raise ValueError(f"{key} must be a float32 matrix, got {value.dtype} {tuple(value.shape)}")
            wrong = value.shape[1] != in_features if factor == "A" else value.shape[0] != out_features
            if wrong:
                raise ValueError(f"{key} has shape {tuple(value.shape)}, not that of a factor of {module}")
            ranks.add(int(value.shape[0] if factor == "A" else value.shape[1]))
        allowed = range(1, self.largest_rank + 1) if self.ranks_per_client else (self.config.adapter.rank,)
        if len(ranks) != 1 or next(iter(ranks)) not in allowed:
            raise ValueError(f"the factors' ranks {sorted(ranks)} are not one rank of {allowed}")

    def upload_bound(self, server_state: State) -> UploadBound:
        """Every module's factors of ``up`` at the federation's largest rank, in float32."""
        rank = self.largest_rank
        values = sum(
            rank * (in_features if factor == "A" else out_features)
            for out_features, in_features in self.layer_shapes.values()
            for factor in self.up
        )
        return UploadBound(len(self.layer_shapes) * len(self.up), 4 * values)

    def uploads_by_module(self, server_state: State, uploads: Sequence[Upload]) -> dict[str, list[Factors]]:
        """Each module's factors of every upload (a factor the method does not upload: the server's)."""
        out: dict[str, list[Factors]] = {}
        for module in self.layer_shapes:
            out[module] = [
                Factors(
                    u.tensors.get(key_of(module, "A"), server_state.get(key_of(module, "A"), torch.empty(0))),
                    u.tensors.get(key_of(module, "B"), server_state.get(key_of(module, "B"), torch.empty(0))),
                )
                for u in uploads
            ]
        return out

    def aggregate(
        self,
        server_state: State,
        uploads: Sequence[Upload],
        server_round: int,
        meter: FlopMeter | None = None,
    ) -> State:
        """The method's rule (``LORA_RULES[rule]``) on every module: the global factors it returns."""
        if not uploads:
            return server_state
        rule, weights = LORA_RULES[self.rule], [u.num_examples for u in uploads]
        new_state = dict(server_state)
        for module, factors in self.uploads_by_module(server_state, uploads).items():
            common = rule(factors, weights).common
            assert common is not None
            for factor, value in (("A", common.A), ("B", common.B)):
                if key_of(module, factor) in server_state:
                    new_state[key_of(module, factor)] = value
        return new_state

    def peft_adapter(self, server_state: State) -> PeftAdapter | None:
        """Where the server keeps whole factors (A and B), they are a PEFT adapter onto the frozen model."""
        if self.server_keeps != "factors" or not all(
            key_of(m, f) in server_state for m in self.layer_shapes for f in ("A", "B")
        ):
            return None
        rank = int(server_state[key_of(next(iter(self.layer_shapes)), "A")].shape[0])
        targets = tuple(self.layer_shapes)
        return PeftAdapter(server_state, targets, rank, self.scaling * rank, SHARED_PREFIX)


@register_algorithm
class FFALoRA(FederatedLoRA):
    """FFA-LoRA: A frozen at one seeded initialisation on every client, B trained and averaged."""

    name = "ffa-lora"
    rule = "ffa-lora"
    down = ("B",)
    up = ("B",)
    trained = ("B",)

    def create_client(self, arch: str, generator: torch.Generator) -> LanguageModelClient:
        """A client whose A is the federation's one frozen A (drawn from the seed alone)."""
        client = super().create_client(arch, generator)
        assert client.adapter is not None
        common = torch_generator(self.config.seed, "ffa-lora-A")
        with torch.no_grad():
            for module in client.adapter.modules_adapted:
                kaiming_uniform_(client.adapter.leaf(module).weights()[0], common)
        return client


@register_algorithm
class FedSALoRA(FederatedLoRA):
    """FedSA-LoRA: A and B trained, A shared and averaged, B private."""

    name = "fedsa-lora"
    rule = "fedsa-lora"
    down = ("A",)
    up = ("A",)


@register_algorithm
class HetLoRA(FederatedLoRA):
    """HetLoRA: ranks per client; padded factors averaged with weights from the updates' norms."""

    name = "hetlora"
    rule = "hetlora"
    ranks_per_client = True

    def broadcast(self, server_state: State, client_id: int, server_round: int) -> State:
        """The first r_k rows of the global A and columns of the global B."""
        rank = self.rank_of(self.config.architecture_of(client_id))
        out = {}
        for key, value in server_state.items():
            parsed = factor_of(key)
            assert parsed is not None
            out[key] = value[:rank].clone() if parsed[1] == "A" else value[:, :rank].clone()
        return out

    def uploads_by_module(self, server_state: State, uploads: Sequence[Upload]) -> dict[str, list[Factors]]:
        """Every upload zero-padded to the global rank, so that the average is of the global's shape."""
        rank = self.largest_rank
        padded = {}
        for module, factors in super().uploads_by_module(server_state, uploads).items():
            padded[module] = [
                Factors(
                    torch.cat([f.A, f.A.new_zeros(rank - f.rank, f.A.shape[1])]),
                    torch.cat([f.B, f.B.new_zeros(f.B.shape[0], rank - f.rank)], dim=1),
                )
                for f in factors
            ]
        return padded


@register_algorithm
class FlexLoRA(FederatedLoRA):
    """FlexLoRA: the weighted sum of the clients' updates; each client gets its best rank-r_k factors."""

    name = "flexlora"
    rule = "flexlora"
    ranks_per_client = True
    server_keeps = "delta"

    def broadcast(self, server_state: State, client_id: int, server_round: int) -> State:
        """Per module the best rank-r_k approximation of ΔW (truncated SVD); before any update (ΔW = 0) a
        fresh adapter, A drawn from the seed and the rank alone and B zero, so that training can start."""
        rank = self.rank_of(self.config.architecture_of(client_id))
        out = {}
        for module in self.layer_shapes:
            delta = server_state[key_of(module, "delta")]
            if bool((delta == 0).all()):
                a = kaiming_uniform_(
                    delta.new_empty(rank, delta.shape[1]),
                    torch_generator(self.config.seed, "flexlora-init", rank, module),
                )
                best = Factors(a, delta.new_zeros(delta.shape[0], rank))
            else:
                best = best_rank(delta, rank)
            out[key_of(module, "A")] = best.A.to(delta.dtype)
            out[key_of(module, "B")] = best.B.to(delta.dtype)
        return out

    def aggregate(
        self,
        server_state: State,
        uploads: Sequence[Upload],
        server_round: int,
        meter: FlopMeter | None = None,
    ) -> State:
        """ΔW = Σ w_k B_k A_k per module (the rule's sum, before its per-client truncation)."""
        if not uploads:
            return server_state
        weights = [u.num_examples for u in uploads]
        return {
            key_of(module, "delta"): weighted_update(factors, weights).to(torch.float32)
            for module, factors in self.uploads_by_module(server_state, uploads).items()
        }


@register_algorithm
class FLoRA(FederatedLoRA):
    """FLoRA: stacked factors, whose product is exactly the weighted sum of the updates, merged into the
    base; every round starts from a fresh adapter."""

    name = "flora"
    rule = "flora"
    ranks_per_client = True
    server_keeps = "delta"
    down = ("delta",)

    def train(self, client: LanguageModelClient, message: State, ctx: ClientContext) -> Upload:
        """A fresh adapter (A from this round's generator, B zero) on the merged base, then training."""
        assert client.adapter is not None
        with torch.no_grad():
            for module in client.adapter.modules_adapted:
                a, b = client.adapter.leaf(module).weights()
                kaiming_uniform_(a, ctx.generator)
                b.zero_()
        return super().train(client, message, ctx)

    def aggregate(
        self,
        server_state: State,
        uploads: Sequence[Upload],
        server_round: int,
        meter: FlopMeter | None = None,
    ) -> State:
        """ΔW += scaling · Σ w_k B_k A_k per module (the rule's stacked product, exact)."""
        if not uploads:
            return server_state
        rule, weights = LORA_RULES[self.rule], [u.num_examples for u in uploads]
        new_state = {}
        for module, factors in self.uploads_by_module(server_state, uploads).items():
            merged = rule(factors, weights).merged
            assert merged is not None
            key = key_of(module, "delta")
            new_state[key] = (server_state[key].to(torch.float64) + self.scaling * merged).to(torch.float32)
        return new_state
