"""Models: the architectures clients run (registry ``MODELS``; the paper's CNN family), LoRA layers and the
homogeneous adapter placements (registry ``PLACEMENTS``)."""

from pfedlora.models.adapters import (
    PLACEMENTS,
    BranchModel,
    LayersModel,
    LoRABranch,
    PersonalizedModel,
    Placement,
    adaptable_layers,
    attach_adapter,
    check_homogeneous,
    homogeneous_targets,
    validate_targets,
)
from pfedlora.models.base import FeatureClassifier
from pfedlora.models.cnn import ARCHITECTURES, HeteroCNN, init_parameters_
from pfedlora.models.lora import (
    ADAPTER_PREFIX,
    adapter_state_dict,
    is_adapter_key,
    load_adapter,
    load_adapter_state_dict,
    save_adapter,
)
from pfedlora.models.peft_lora import (
    inject_lora,
    is_lora_layer,
    merge_adapters,
    save_peft_adapter,
    unmerge_adapters,
)
from pfedlora.models.registry import MODELS, ModelBuilder, ModelSettings, build_model
from pfedlora.models.transformer import TransformerClassifier, is_transformer, tokenizer_for

__all__ = [
    "ADAPTER_PREFIX",
    "ARCHITECTURES",
    "MODELS",
    "PLACEMENTS",
    "BranchModel",
    "FeatureClassifier",
    "HeteroCNN",
    "LayersModel",
    "LoRABranch",
    "ModelBuilder",
    "ModelSettings",
    "PersonalizedModel",
    "Placement",
    "TransformerClassifier",
    "adaptable_layers",
    "adapter_state_dict",
    "attach_adapter",
    "build_model",
    "check_homogeneous",
    "homogeneous_targets",
    "init_parameters_",
    "inject_lora",
    "is_adapter_key",
    "is_lora_layer",
    "is_transformer",
    "load_adapter",
    "load_adapter_state_dict",
    "merge_adapters",
    "save_adapter",
    "save_peft_adapter",
    "tokenizer_for",
    "unmerge_adapters",
    "validate_targets",
]
