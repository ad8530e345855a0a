"""The heterogeneous CNN family of pFedLoRA's protocol (SPEC §3; Yi et al., arXiv 2310.13283).

Every model is conv5x5 → ReLU → maxpool2 → conv5x5 → ReLU → maxpool2 → fc1 → ReLU → fc2 → ReLU (the 500-d
representation) → fc3. The five architectures differ only in conv2's channels and fc1's width, so ``conv1``
and ``fc3`` have the same shape everywhere while the middle of the network does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pfedlora.errors import ConfigError
from pfedlora.models._init import default_bound, kaiming_uniform_, uniform_
from pfedlora.models.base import FeatureClassifier
from pfedlora.models.registry import MODELS, ModelBuilder, ModelSettings

# name -> (conv2 out channels, fc1 out features); each registers in MODELS (bottom of this module)
ARCHITECTURES: dict[str, tuple[int, int]] = {
    "cnn1": (32, 2000),
    "cnn2": (16, 2000),
    "cnn3": (32, 1000),
    "cnn4": (32, 800),
    "cnn5": (32, 500),
}

_KERNEL = 5
_CONV1_CHANNELS = 16
_MIN_SIDE = 16  # smallest height/width that leaves >= 1 pixel after two (5x5 valid conv, 2x2 pool) blocks


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``input_shape`` as a ``(channels, height, width)`` tuple of positive ints, or ConfigError."""
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ConfigError(f"input_shape must be (channels, height, width) of positive ints, got {shape}")
    return shape


def conv_pool_side(side: int) -> int:
    """Output side of a 5x5 valid convolution followed by a 2x2 max-pool (floor), as in these models."""
    return (side - (_KERNEL - 1)) // 2


def init_parameters_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every nn.Linear / nn.Conv2d in ``module`` like PyTorch's default, from ``generator``.

    Weights get Kaiming-uniform with ``a=sqrt(5)`` and biases U(±1/sqrt(fan_in)), exactly as
    ``reset_parameters`` does, visiting layers in ``module.modules()`` order (weight, then bias). Other
    parameters (e.g. LoRA factors) are left alone.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            kaiming_uniform_(layer.weight, generator)
            if layer.bias is not None:
                uniform_(layer.bias, default_bound(layer.weight.shape), generator)


class HeteroCNN(FeatureClassifier):
    """One member of the CNN family: ``features`` gives the 500-d representation, ``head`` is fc3.

    Layers are created without drawing from the global RNG and initialised from ``generator``; without
    one, from a fresh generator seeded 0 (so construction is deterministic). Prefer :func:`build_model`.
    """

    FEATURE_DIM: ClassVar[int] = 500
    HEAD_NAME: ClassVar[str] = "fc3"

    def __init__(
        self,
        conv2_channels: int,
        fc1_features: int,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        channels, height, width = check_input_shape(input_shape)
        for name, value in (
            ("conv2_channels", conv2_channels),
            ("fc1_features", fc1_features),
            ("num_classes", num_classes),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        out_h, out_w = conv_pool_side(conv_pool_side(height)), conv_pool_side(conv_pool_side(width))
        if out_h < 1 or out_w < 1:
            raise ConfigError(
                f"input_shape {(channels, height, width)} is too small for the CNN family: "
                f"height and width must be at least {_MIN_SIDE}"
            )
        self.input_shape = (channels, height, width)
        self.feature_dim = self.FEATURE_DIM
        self.num_classes = num_classes
        self.conv2_channels = conv2_channels
        self.fc1_features = fc1_features
        self.flat_features = conv2_channels * out_h * out_w

        # Built on the meta device so that PyTorch's own init (global RNG) never runs.
        meta = torch.device("meta")
        self.conv1 = nn.Conv2d(channels, _CONV1_CHANNELS, _KERNEL, device=meta)
        self.conv2 = nn.Conv2d(_CONV1_CHANNELS, conv2_channels, _KERNEL, device=meta)
        self.fc1 = nn.Linear(self.flat_features, fc1_features, device=meta)
        self.fc2 = nn.Linear(fc1_features, self.FEATURE_DIM, device=meta)
        self.fc3 = nn.Linear(self.FEATURE_DIM, num_classes, device=meta)
        self.to_empty(device="cpu")
        init_parameters_(self, generator if generator is not None else torch.Generator().manual_seed(0))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 500-d representation (after fc2 and its ReLU)."""
        # relu(max_pool(x)) is max_pool(relu(x)), values and gradients alike (ReLU is monotone and zeroes
        # the gradient wherever the window's maximum is not positive), on a quarter of the elements.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # (B, 16, h1, w1)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # (B, conv2_channels, h2, w2)
        x = torch.flatten(x, 1)  # (B, flat_features)
        x = F.relu(self.fc1(x))  # (B, fc1_features)
        return F.relu(self.fc2(x))  # (B, 500)


def _cnn(conv2_channels: int, fc1_features: int) -> ModelBuilder:
    def build(
        input_shape: Sequence[int], num_classes: int, generator: torch.Generator, settings: ModelSettings
    ) -> FeatureClassifier:
        return HeteroCNN(conv2_channels, fc1_features, input_shape, num_classes, generator=generator)

    return build


for _arch, (_conv2_channels, _fc1_features) in ARCHITECTURES.items():
    MODELS.add(_arch, _cnn(_conv2_channels, _fc1_features))
