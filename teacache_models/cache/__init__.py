"""TeaCache: skip a diffusion transformer's block stack when its input has barely moved."""

from .mixin import Deferred, ObserverHandle, StepObserver, TeaCacheMixin, relative_l1_distance
from .schedule import TeaCacheIndicator
from .state import BranchStats, StepObservation, TeaCacheStats

__all__ = [
    "BranchStats",
    "Deferred",
    "ObserverHandle",
    "StepObservation",
    "StepObserver",
    "TeaCacheIndicator",
    "TeaCacheMixin",
    "TeaCacheStats",
    "relative_l1_distance",
]
