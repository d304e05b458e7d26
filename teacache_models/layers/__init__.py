"""Building blocks that are the same across model families."""

from .attention import MultiHeadAttentionBase, attention
from .embeddings import MLPEmbedder, timestep_sinusoids
from .feedforward import FeedForward
from .kv_cache import KVLayerCache
from .linear import LINEAR_KERNELS, OneDNNLinear, linear_activation, onednn_available, set_linear_kernel
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
    "LINEAR_KERNELS",
    "AdaLayerNormContinuous",
    "AdaLayerNormZero",
    "AdaLayerNormZeroSingle",
    "FP32LayerNorm",
    "FeedForward",
    "KVLayerCache",
    "MLPEmbedder",
    "MultiHeadAttentionBase",
    "OneDNNLinear",
    "RMSNorm",
    "apply_rotary_complex",
    "apply_rotary_interleaved",
    "attention",
    "clip_fp16",
    "linear_activation",
    "modulate",
    "onednn_available",
    "rope_cos_sin",
    "set_linear_kernel",
    "timestep_sinusoids",
]
