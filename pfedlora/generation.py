"""What a language-model client writes: ``pfedlora generate RUN_DIR --client K --prompt "..."``.

Client K's personalized model after the last round (rebuilt as :func:`~pfedlora.export.export_client` does:
from the last checkpoint, the later rounds run again) continues the prompt, greedily or by seeded sampling;
the frozen base without any adapter continues it too, for contrast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pfedlora.config import load_run_config
from pfedlora.data import Dataset
from pfedlora.errors import ConfigError
from pfedlora.models.causal_lm import LanguageModelClient, adapters_on, language_model_arch
from pfedlora.models.transformer import family_tokenizer
from pfedlora.simulation.experiment import final_state
from pfedlora.tasks import TASKS


@dataclass(frozen=True)
class Continuations:
    """The prompt's continuation by the client's personalized model and by the frozen base."""

    client_id: int
    arch: str
    personalized: str
    base: str


@dataclass(frozen=True)
class Decoding:
    """How to continue a prompt: greedy (``temperature`` 0) or sampled at ``temperature`` from ``seed``."""

    max_new_tokens: int = 40
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}: allowed: 1 or more")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: allowed: 0 (greedy) or more")


def continue_prompt(
    client: LanguageModelClient, tokenizer: object, prompt: str, decoding: Decoding, *, adapted: bool = True
) -> str:
    """The continuation of ``prompt`` by ``client`` (``adapted`` False: by its frozen base alone)."""
    encoded = tokenizer(prompt, return_tensors="pt")  # type: ignore[operator]
    base = client.base()
    device = client.device_marker.device
    kwargs = {
        "max_new_tokens": decoding.max_new_tokens,
        "do_sample": decoding.temperature > 0,
        "pad_token_id": tokenizer.pad_token_id,  # type: ignore[attr-defined]
    }
    if decoding.temperature > 0:
        kwargs.update(temperature=decoding.temperature, top_k=0, top_p=1.0)
    with (
        torch.random.fork_rng(devices=[]),  # transformers samples from the global RNG: seeded, then restored
        torch.inference_mode(),
        adapters_on(base, client.adapters() if adapted else []),
    ):
        torch.manual_seed(decoding.seed)
        out = base.generate(  # type: ignore[operator]
            input_ids=encoded["input_ids"].to(device),
            attention_mask=encoded["attention_mask"].to(device),
            **kwargs,
        )
    new = out[0, encoded["input_ids"].shape[1] :]
    text: str = tokenizer.decode(new, skip_special_tokens=True)  # type: ignore[attr-defined]
    return text


def generate(
    run_dir: str | os.PathLike[str],
    client_id: int,
    prompt: str,
    decoding: Decoding = Decoding(),
    dataset: Dataset | None = None,
) -> Continuations:
    """Client ``client_id``'s continuation of ``prompt`` after the last round of the language-modeling run
    in ``run_dir``, and the frozen base's."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir / "config.toml")
    if not TASKS[config.data.task].generative:
        raise ConfigError(
            f"{str(run_dir)!r} is a {config.data.task} run; generate needs a language-modeling run "
            "(data.task = 'language-modeling')"
        )
    if not 0 <= client_id < config.federation.num_clients:
        raise ConfigError(
            f"--client {client_id} is out of range; allowed: 0 to {config.federation.num_clients - 1}"
        )
    client = final_state(run_dir, dataset).federation.client_states.view(client_id)
    assert isinstance(client, LanguageModelClient)
    arch = config.architecture_of(client_id)
    tokenizer = family_tokenizer(language_model_arch(arch).family, config.model)
    return Continuations(
        client_id,
        arch,
        continue_prompt(client, tokenizer, prompt, decoding),
        continue_prompt(client, tokenizer, prompt, decoding, adapted=False),
    )
