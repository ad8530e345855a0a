"""Zero-shot: every client predicts with the pretrained language model as it is; nothing trains or travels.

The floor of generative personalization: what the frozen base makes of each client's own text before any
training (perplexity on the client's test text), the "base model" row of federated LLM benchmarks such as
OpenFedLLM (Ye et al., arXiv 2402.06954). Shared: nothing. Private: nothing.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pfedlora.algorithms.base import Algorithm, ClientContext, Upload, register_algorithm
from pfedlora.algorithms.state import State
from pfedlora.models.causal_lm import LanguageModelClient


@register_algorithm
class ZeroShot(Algorithm[LanguageModelClient]):
    """The pretrained language model on every client, untrained (language modeling only)."""

    name = "zero-shot"
    tasks: ClassVar[tuple[str, ...]] = ("language-modeling",)
    changes_predictions: ClassVar[bool] = False

    def create_client(self, arch: str, generator: torch.Generator) -> LanguageModelClient:
        return self.language_model(arch, generator, private=False)

    def is_shared(self, key: str) -> bool:
        return False

    def train(self, client: LanguageModelClient, message: State, ctx: ClientContext) -> Upload:
        return Upload({}, ctx.data.num_train)
