"""One native transformer per model family, each with TeaCache built in."""

from .base import ConfiguredModel, ModelConfig, Transformer2DModelOutput
from .flux import FluxTransformer2DModel
from .z_image import ZImageTransformer2DModel

__all__ = [
    "ConfiguredModel",
    "FluxTransformer2DModel",
    "ModelConfig",
    "Transformer2DModelOutput",
    "ZImageTransformer2DModel",
]
