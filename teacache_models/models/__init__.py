"""One native transformer per model family, each with TeaCache built in."""

from .base import ConfiguredModel, ModelConfig, Transformer2DModelOutput
from .flux import FluxTransformer2DModel

__all__ = ["ConfiguredModel", "FluxTransformer2DModel", "ModelConfig", "Transformer2DModelOutput"]
