"""TeaCache: skip a diffusion transformer's block stack when its input has barely moved."""

from .mixin import Deferred, TeaCacheMixin, relative_l1_distance
from .state import BranchStats, TeaCacheStats

__all__ = ["BranchStats", "Deferred", "TeaCacheMixin", "TeaCacheStats", "relative_l1_distance"]
