"""One native transformer per model family, each with TeaCache built in."""

from .base import ConfiguredModel, ModelConfig, Transformer2DModelOutput
from .flux import FluxTransformer2DModel
from .flux2 import Flux2Transformer2DModel
from .hunyuan_video import HunyuanVideoTransformer3DModel
from .hunyuan_video15 import HunyuanVideo15Transformer3DModel
from .qwen_image import QwenImageTransformer2DModel
from .qwen_image21 import QwenImage21Transformer2DModel
from .wan import WanTransformer3DModel
from .wan_experts import WanExpertPair
from .z_image import ZImageTransformer2DModel

__all__ = [
    "ConfiguredModel",
    "Flux2Transformer2DModel",
    "FluxTransformer2DModel",
    "HunyuanVideo15Transformer3DModel",
    "HunyuanVideoTransformer3DModel",
    "ModelConfig",
    "QwenImage21Transformer2DModel",
    "QwenImageTransformer2DModel",
    "Transformer2DModelOutput",
    "WanExpertPair",
    "WanTransformer3DModel",
    "ZImageTransformer2DModel",
]
