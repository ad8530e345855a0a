"""FedIT: FedAvg of a LoRA adapter on a frozen base model (the homogeneous federated-LoRA reference).

Zhang, Vahidian, Kuo, Li, Ruan, Feng, Chen. "Towards Building the Federated GPT: Federated Instruction
Tuning", ICASSP 2024, arXiv 2305.05644 (Shepherd). Every client holds the same pretrained model, frozen;
each round a sampled client replaces its adapter with the global one, trains only the adapter and uploads
it with its sample count; the server takes the sample-weighted mean. This is pFedLoRA's adapter phase
alone, with the same placements, so it needs one architecture for every client.

Shared: the adapter tensors. Private: nothing trained (the base stays as pretrained).

For language modeling every client runs the frozen causal LM with one LoRA adapter of ``adapter.rank`` (no
private one: the architectures' private ranks are unused) whose A and B the server averages separately, as
FlowerTune and OpenFedLLM do (:func:`~pfedlora.algorithms.lora_aggregation.fedit`): the global update is then
avg(B)·avg(A), not the average of the clients' updates.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pfedlora.algorithms.base import ClientContext, Upload, register_algorithm
from pfedlora.algorithms.fedavg import require_one_architecture
from pfedlora.algorithms.pfedlora import PFedLoRA, PFedLoRAClient
from pfedlora.algorithms.state import State
from pfedlora.config import ExperimentConfig


@register_algorithm
class FedIT(PFedLoRA):
    """FedAvg of the LoRA adapter, base frozen; needs one architecture for every client."""

    name = "fedit"
    one_architecture = True
    tasks: ClassVar[tuple[str, ...]] = ("classification", "language-modeling")

    def __init__(self, config: ExperimentConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
        if config.data.task == "classification":  # language models: one base whatever the private ranks
            require_one_architecture(config, "fedit averages one adapter on one frozen base model")
        super().__init__(config, input_shape, num_classes)

    def create_client(self, arch: str, generator: torch.Generator) -> PFedLoRAClient:
        if not self.task.generative:
            return super().create_client(arch, generator)
        adapter = self.config.adapter
        return self.language_model(
            arch, generator, private=False, shared_rank=adapter.rank, shared_alpha=adapter.effective_alpha
        )

    def train(self, client: PFedLoRAClient, message: State, ctx: ClientContext) -> Upload:
        self.receive(client, message)
        self.train_adapter_phase(client, ctx)
        return Upload(self.shared_state(client), ctx.data.num_train)
