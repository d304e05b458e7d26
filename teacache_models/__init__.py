"""teacache_models: native diffusion transformers with TeaCache built in.

Importing the package loads no model and touches no file; model classes live in
`teacache_models.models`.
"""

from typing import Any

from .cache import TeaCacheMixin, TeaCacheStats
from .params import SamplingParams, TeaCacheParams

__all__ = ["SamplingParams", "TeaCacheMixin", "TeaCacheParams", "TeaCacheStats", "apply_teacache", "remove_teacache"]


def apply_teacache(pipe: Any, params: TeaCacheParams) -> Any:
    """Run TeaCache inside a diffusers pipeline (see `teacache_models.integrations.diffusers`)."""
    from .integrations.diffusers import apply_teacache

    return apply_teacache(pipe, params)


def remove_teacache(pipe: Any) -> Any:
    """Put back the diffusers transformers `apply_teacache` replaced."""
    from .integrations.diffusers import remove_teacache

    return remove_teacache(pipe)


__version__ = "0.1.0"
