"""Text-to-image and text-to-video pipelines: our transformer and denoising loop, diffusers' VAE, scheduler
and text encoders (the `pipelines` extra, imported lazily).

    from teacache_models.pipelines import load_pipeline
    pipe = load_pipeline("flux1-dev", torch_dtype="bfloat16", device="cuda")
    result = pipe("a red fox in the snow", pipe.default_sampling_params(teacache="fast", seed=0))
"""

from .base import Pipeline, PipelineResult
from .loading import load_pipeline

__all__ = ["Pipeline", "PipelineResult", "load_pipeline"]
