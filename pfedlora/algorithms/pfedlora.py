"""pFedLoRA: model-heterogeneous personalized FL with a shared low-rank adapter.

Yi, Yu, Wang, Liu, Li. "pFedLoRA: Model-Heterogeneous Personalized Federated Learning with LoRA Tuning",
arXiv 2310.13283. Every client keeps a private model ω_k of its own architecture; only a homogeneous
low-rank adapter θ_k travels. Each round a sampled client replaces its adapter with the global one, then
trains in two phases (SPEC §2): "local" (θ frozen, train ω on CE) and "adapter" (ω frozen, train θ on CE),
and uploads θ_k with its sample count; the server takes the sample-weighted mean. Prediction uses
F(x; ω_k, θ_k).

Shared: the adapter tensors (state-dict keys with a ``lora_`` component). Private: everything else.

For language modeling (``data.task = "language-modeling"``) ω_k is the client's private LoRA adapter on the
frozen causal LM, of its architecture's rank, and θ a shared LoRA adapter of ``adapter.rank`` on the same
layers (:mod:`pfedlora.models.causal_lm`); the phases and the server are the same.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pfedlora.algorithms.base import Algorithm, ClientContext, PeftAdapter, Upload, register_algorithm
from pfedlora.algorithms.state import State
from pfedlora.algorithms.training import train_on_client_data
from pfedlora.config import ExperimentConfig
from pfedlora.errors import ConfigError
from pfedlora.models import (
    PLACEMENTS,
    PersonalizedModel,
    attach_adapter,
    branch_family,
    build_model,
    family_of,
    homogeneous_targets,
    is_adapter_key,
    is_transformer,
    load_adapter_state_dict,
    validate_targets,
)
from pfedlora.models.causal_lm import SHARED_PREFIX, LanguageModelClient
from pfedlora.models.peft_lora import lora_targets
from pfedlora.seeding import torch_generator

LOCAL_PREFIX = "local."
"""Where a personalized model keeps its local model's tensors."""

PFedLoRAClient = PersonalizedModel | LanguageModelClient
"""A client's state: a private model with the adapter, or a language model's private and shared adapters."""


@register_algorithm
class PFedLoRA(Algorithm[PFedLoRAClient]):
    """Alternating local/adapter training with FedAvg of the adapters."""

    name = "pfedlora"
    uploads_global_state = True
    adapter_placements = True
    tasks: ClassVar[tuple[str, ...]] = ("classification", "language-modeling")

    def __init__(self, config: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__(config, input_shape, num_classes)
        self.targets = self._resolve_targets()

    def _resolve_targets(self) -> tuple[str, ...]:
        """Explicit targets, validated, or every layer with one name and shape across the federation (none
        for a language model: its adapters' targets are module names, :mod:`~pfedlora.models.causal_lm`)."""
        if self.task.generative or not PLACEMENTS[self.config.adapter.placement].takes_targets:
            return ()
        probe = torch_generator(self.config.seed, "target-probe")
        models = {
            arch: build_model(arch, self.input_shape, self.num_classes, probe, self.model_settings)
            for arch in dict.fromkeys(self.config.federation.architectures)
        }
        if self.config.adapter.targets:
            return validate_targets(models, self.config.adapter.targets)
        targets = homogeneous_targets(models)
        families = sorted({family_of(arch).name for arch in models if is_transformer(arch)})
        head = next(iter(models.values())).HEAD_NAME
        if len(families) > 1 and all(t == head or t.startswith(f"{head}.") for t in targets):
            raise ConfigError(
                f"adapter.placement 'layers': the families {', '.join(families)} share no layer of one name "
                "and shape but the head; use adapter.placement 'head' (LoRA on the common head) or "
                "'branch', or name adapter.targets"
            )
        return targets

    def create_client(self, arch: str, generator: torch.Generator) -> PFedLoRAClient:
        adapter = self.config.adapter
        if self.task.generative:
            return self.language_model(
                arch, generator, shared_rank=adapter.rank, shared_alpha=adapter.effective_alpha
            )
        return attach_adapter(
            build_model(arch, self.input_shape, self.num_classes, generator, self.model_settings),
            placement=adapter.placement,
            rank=adapter.rank,
            alpha=adapter.effective_alpha,
            targets=self.targets,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            generator=generator,
            settings=self.model_settings,
            branch_family=branch_family(self.config) if self.model_settings.views else "",
        )

    def is_shared(self, key: str) -> bool:
        return is_adapter_key(key)

    def peft_adapter(self, server_state: State) -> PeftAdapter | None:
        """Placements "layers" and "head": the global adapter is PEFT LoRA on the local model's layers,
        loadable with ``PeftModel.from_pretrained`` onto the local model of any architecture of the run; for a
        language model, onto the frozen causal LM."""
        prefix = SHARED_PREFIX if self.task.generative else LOCAL_PREFIX
        targets = lora_targets(server_state, prefix)
        if targets is None:
            return None
        adapter = self.config.adapter
        return PeftAdapter(server_state, targets, adapter.rank, adapter.effective_alpha, prefix)

    def receive(self, client: PFedLoRAClient, message: State) -> None:
        """The global adapter overwrites the client's (strictly: AdapterMismatchError names a difference)."""
        load_adapter_state_dict(client, message)

    def train(self, client: PFedLoRAClient, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)
        phases = [self.train_local_phase, self.train_adapter_phase]
        if self.config.adapter.phase_order == "adapter-first":
            phases.reverse()
        for train_phase in phases:
            train_phase(client, ctx)
        return Upload(self.shared_state(client), ctx.data.num_train)

    def train_local_phase(self, client: PFedLoRAClient, ctx: ClientContext) -> None:
        """θ frozen; ω trained on CE(F(x; ω, θ), y): global knowledge flows into the local model."""
        train_on_client_data(client, client.local_parameters(), ctx, self.config.train, phase="local")

    def train_adapter_phase(self, client: PFedLoRAClient, ctx: ClientContext) -> None:
        """ω frozen; θ trained on the same loss: local knowledge flows into the adapter.

        What does not depend on θ runs once per batch without autograd: the whole local model for the
        branch placement, all but the head for LoRA on the head alone (SPEC §2.1).
        """

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                prefix = client.frozen_prefix(x)
            if prefix is None:
                return ctx.task.batch_loss(client, x, y)
            return ctx.task.loss(client.forward_from_prefix(prefix, x), x, y)

        train_on_client_data(
            client,
            client.adapter_parameters(),
            ctx,
            self.config.train,
            phase="adapter",
            epochs=self.config.adapter.epochs,
            lr=self.config.adapter_lr,
            loss_fn=loss,
        )
