"""Building blocks that are the same across model families."""

from .attention import attention
from .embeddings import MLPEmbedder, timestep_sinusoids
from .feedforward import FeedForward
from .normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle, modulate
from .rope import apply_rotary_interleaved, rope_cos_sin

__all__ = [
    "AdaLayerNormContinuous",
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "FeedForward",
    "MLPEmbedder",
    "apply_rotary_interleaved",
    "attention",
    "modulate",
    "rope_cos_sin",
    "timestep_sinusoids",
]
