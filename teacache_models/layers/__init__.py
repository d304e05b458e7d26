"""Building blocks that are the same across model families."""

from .attention import attention
from .embeddings import MLPEmbedder, timestep_sinusoids
from .feedforward import FeedForward
from .normalization import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    FP32LayerNorm,
    RMSNorm,
    modulate,
)
from .precision import clip_fp16
from .rope import apply_rotary_complex, apply_rotary_interleaved, rope_cos_sin

__all__ = [
    "AdaLayerNormContinuous",
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "FP32LayerNorm",
    "FeedForward",
    "MLPEmbedder",
    "RMSNorm",
    "apply_rotary_complex",
    "apply_rotary_interleaved",
    "attention",
    "clip_fp16",
    "modulate",
    "rope_cos_sin",
    "timestep_sinusoids",
]
