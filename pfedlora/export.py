"""One client's personalized model out of a finished run: ``pfedlora export RUN_DIR --client K``.

A run keeps its clients' private states only up to its last checkpoint, so the client's state after the
last round is rebuilt first (:func:`~pfedlora.simulation.experiment.final_state`: the rounds after the last
checkpoint run again in memory). The export folder holds:

- ``client.json`` (who the client is: id, architecture, algorithm, placement, classes, the round) and
  ``config.toml`` (the run's configuration);
- ``client.safetensors``: the client's whole state (private model, adapter, any learned coefficient), which
  :func:`load_client` rebuilds into a model that predicts;
- for a transformer client: ``encoder/``, the client's own encoder as a Hugging Face folder (its weights
  without the adapter, and its family's tokenizer), which ``transformers.AutoModel.from_pretrained`` loads;
  where the shared adapter is PEFT LoRA on the encoder (placements "layers" and "head" with LoRA inside),
  ``encoder-adapter/`` in PEFT's format, which ``peft.PeftModel.from_pretrained`` puts on that encoder; and
  ``head.safetensors``, the projection (where there is one) and the classifier, its LoRA merged in.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pfedlora.algorithms import AnyAlgorithm, create_algorithm
from pfedlora.config import ExperimentConfig, config_to_toml, load_run_config
from pfedlora.data import Dataset
from pfedlora.errors import ConfigError
from pfedlora.models import TransformerClassifier, model_settings
from pfedlora.models.lora import is_adapter_key
from pfedlora.models.peft_lora import ADAPTER_NAME, lora_targets, save_peft_state
from pfedlora.models.transformer import _pretrained, family_tokenizer
from pfedlora.seeding import torch_generator
from pfedlora.simulation.experiment import final_state
from pfedlora.simulation.federation import load_run_dataset

logger = logging.getLogger(__name__)

CLIENT_JSON = "client.json"
CLIENT_STATE = "client.safetensors"
ENCODER_DIR = "encoder"
ENCODER_ADAPTER_DIR = "encoder-adapter"
HEAD_FILE = "head.safetensors"


def export_client(
    run_dir: str | os.PathLike[str],
    client_id: int,
    out_dir: str | os.PathLike[str],
    dataset: Dataset | None = None,
) -> Path:
    """Write client ``client_id``'s personalized model after the last round of the finished run in
    ``run_dir`` into ``out_dir`` (see the module's docstring); returns ``out_dir``."""
    run_dir, out = Path(run_dir), Path(out_dir)
    config = load_run_config(run_dir / "config.toml")
    if not 0 <= client_id < config.federation.num_clients:
        raise ConfigError(
            f"--client {client_id} is out of range; allowed: 0 to {config.federation.num_clients - 1}"
        )
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export folder {str(out)!r} already exists and is not empty")
    dataset = dataset if dataset is not None else load_run_dataset(config)
    final = final_state(run_dir, dataset)
    if final.logged_accuracy is not None and not final.matches:
        logger.warning(
            "the rebuilt run ends at %.4f mean accuracy, the run logged %.4f (a run trained with several "
            "threads per client differs in the last bits): the export is the rebuilt client",
            final.records[-1]["mean_accuracy"],
            final.logged_accuracy,
        )
    federation = final.federation
    module = federation.client_states.view(client_id)
    algorithm = federation.algorithm
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(config_to_toml(config), encoding="utf-8")
    about = {
        "client_id": client_id,
        "architecture": config.architecture_of(client_id),
        "algorithm": config.algorithm,
        "placement": config.adapter.placement,
        "round": final.records[-1]["round"],
        "classes": list(dataset.classes),
        "input_shape": list(algorithm.input_shape),
        "num_classes": algorithm.num_classes,
        "rebuilt_from_checkpoint_of_round": final.replayed_from,
        "rebuilt_matches_the_run": final.matches,
    }
    (out / CLIENT_JSON).write_text(json.dumps(about, indent=1) + "\n", encoding="utf-8")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(out / CLIENT_STATE)
    )
    local = getattr(module, "local", module)
    if isinstance(local, TransformerClassifier):
        _export_transformer(local, config, out)
    return out


def _export_transformer(local: TransformerClassifier, config: ExperimentConfig, out: Path) -> None:
    """``encoder/`` (plain weights and tokenizer), ``encoder-adapter/`` (PEFT) and ``head.safetensors``."""
    state = local.state_dict()
    encoder_state = {
        key.removeprefix("encoder.").replace(".base_layer.", "."): value
        for key, value in state.items()
        if key.startswith("encoder.") and not is_adapter_key(key)
    }
    plain = copy.deepcopy(_pretrained(local.checkpoint, local.depth))  # the family's module, no LoRA
    plain.load_state_dict(encoder_state, strict=True)
    plain.save_pretrained(str(out / ENCODER_DIR))
    family_tokenizer(local.family, config.model).save_pretrained(str(out / ENCODER_DIR))
    encoder_lora = {k: v for k, v in state.items() if k.startswith("encoder.") and is_adapter_key(k)}
    targets = lora_targets(encoder_lora, "encoder.")
    if targets:
        adapter = config.adapter
        save_peft_state(
            encoder_lora,
            out / ENCODER_ADAPTER_DIR,
            targets,
            adapter.rank,
            adapter.effective_alpha,
            "encoder.",
        )
    head: dict[str, torch.Tensor] = {}
    if local.projection is not None:
        head.update({f"projection.{k}": v for k, v in local.projection.state_dict().items()})
    head.update({f"classifier.{k}": v for k, v in _merged_linear(local.head).state_dict().items()})
    save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(out / HEAD_FILE))


def _merged_linear(layer: nn.Module) -> nn.Linear:
    """``layer`` as a plain linear layer: a PEFT LoRA wrapper's update merged into a copy of its base."""
    wrapped: Any = layer
    base = wrapped.get_base_layer() if hasattr(wrapped, "get_base_layer") else layer
    if not isinstance(base, nn.Linear):
        raise ConfigError(f"the head is a {type(base).__name__}, not a linear layer")
    merged = nn.Linear(base.in_features, base.out_features)
    merged.load_state_dict(base.state_dict())
    if base is not layer:
        with torch.no_grad():
            merged.weight.add_(wrapped.get_delta_weight(ADAPTER_NAME))
    return merged


@dataclass
class ExportedClient:
    """A client rebuilt from its export folder: its algorithm (what predicts) and its model."""

    config: ExperimentConfig
    algorithm: AnyAlgorithm
    module: nn.Module
    about: dict[str, Any]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class indices for a batch of inputs shaped as the run's (images (B, C, H, W), or text (B, 2·V, L)
        as :meth:`encode` makes it)."""
        self.module.eval()
        return self.algorithm.predict(self.module, x).argmax(1)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts as a text batch of the run: the tokenization of each of its families, (B, 2·V, L)."""
        from pfedlora.data.corpora import TextCorpus
        from pfedlora.data.text import tokenize_corpus

        settings = model_settings(self.config)
        tokenizers = [family_tokenizer(family, self.config.model) for family in settings.views]
        empty = torch.zeros(len(texts), dtype=torch.int64)
        corpus = TextCorpus("texts", tuple(texts), empty, empty, tuple(texts), empty, empty, ("",), ("",))
        x: torch.Tensor = tokenize_corpus(corpus, tokenizers, self.config.model.max_length).train_x
        return x


def load_client(folder: str | os.PathLike[str]) -> ExportedClient:
    """The client exported into ``folder`` by :func:`export_client`, ready to predict."""
    folder = Path(folder)
    if not (folder / CLIENT_JSON).is_file():
        raise ConfigError(f"{str(folder)!r} is not an exported client (no {CLIENT_JSON})")
    about = json.loads((folder / CLIENT_JSON).read_text(encoding="utf-8"))
    config = load_run_config(folder / "config.toml")
    algorithm = create_algorithm(config, tuple(about["input_shape"]), int(about["num_classes"]))
    module = algorithm.create_client(about["architecture"], torch_generator(config.seed, "export"))
    module.load_state_dict(load_file(str(folder / CLIENT_STATE)), strict=True)
    return ExportedClient(config, algorithm, module.eval(), about)
