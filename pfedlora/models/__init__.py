"""Models: the heterogeneous CNN family, LoRA layers and the homogeneous adapter placements."""

from pfedlora.models.adapters import (
    PLACEMENTS,
    LoRABranch,
    PersonalizedModel,
    adaptable_layers,
    attach_adapter,
    check_homogeneous,
    homogeneous_targets,
    validate_targets,
)
from pfedlora.models.cnn import ARCHITECTURES, HeteroCNN, build_model, init_parameters_
from pfedlora.models.lora import (
    ADAPTER_PREFIX,
    LoRAConv2d,
    LoRALayer,
    LoRALinear,
    adapter_state_dict,
    is_adapter_key,
    load_adapter,
    load_adapter_state_dict,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)

__all__ = [
    "ADAPTER_PREFIX",
    "ARCHITECTURES",
    "PLACEMENTS",
    "HeteroCNN",
    "LoRABranch",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "PersonalizedModel",
    "adaptable_layers",
    "adapter_state_dict",
    "attach_adapter",
    "build_model",
    "check_homogeneous",
    "homogeneous_targets",
    "init_parameters_",
    "is_adapter_key",
    "load_adapter",
    "load_adapter_state_dict",
    "merge_adapters",
    "save_adapter",
    "unmerge_adapters",
    "validate_targets",
]
