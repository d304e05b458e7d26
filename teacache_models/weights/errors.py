"""The errors of the weights package: bad manifest, bad checkpoint, weights not reachable."""

from __future__ import annotations

__all__ = ["CheckpointError", "ManifestError", "MissingWeightsError", "WeightsUnavailableError"]


class ManifestError(ValueError):
    """`weights_manifest.yaml` (or a file given in its place) does not follow the schema."""


class CheckpointError(ValueError):
    """A checkpoint on disk is unusable: corrupted, incomplete, or for another architecture.

    Raised before any tensor is handed to the caller, so no half-loaded model ever escapes.
    """


class WeightsUnavailableError(OSError):
    """The weights are neither on disk nor downloadable now (offline, gated, unknown repository)."""


class MissingWeightsError(CheckpointError, OSError):
    """A folder has no weights of the kind asked for (e.g. only variant files): an OSError, as diffusers raises."""
