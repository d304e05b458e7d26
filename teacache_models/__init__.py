"""teacache_models: native diffusion transformers with TeaCache built in.

Importing the package loads no model and touches no file; model classes live in
`teacache_models.models`.
"""

from .cache import TeaCacheMixin, TeaCacheStats
from .params import SamplingParams, TeaCacheParams

__all__ = ["SamplingParams", "TeaCacheMixin", "TeaCacheParams", "TeaCacheStats"]
__version__ = "0.1.0"
