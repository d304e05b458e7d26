"""Which LoRA to load and at which weight: the CLI's `--lora PATH_OR_HUB_ID[:SCALE]` and a zoo entry's `loras`."""

from __future__ import annotations

from dataclasses import dataclass

from .adapters import check_lora_scale

__all__ = ["LoraSpec", "parse_lora_argument"]


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA to load into a pipeline: a path or Hub id, its weight, and optionally the file in a folder or
    repository and the adapter's name."""

    source: str
    scale: float = 1.0
    weight_name: str | None = None
    adapter_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"a LoRA source must be a non-empty path or Hub id, got {self.source!r}")
        object.__setattr__(self, "scale", check_lora_scale(f"the scale of LoRA {self.source!r}", self.scale))
        for name in ("weight_name", "adapter_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} of LoRA {self.source!r} must be None or a non-empty string, got {value!r}")


def parse_lora_argument(value: str) -> LoraSpec:
    """`PATH_OR_HUB_ID[:SCALE]` (the CLI's `--lora`): the part after the last ':' is the scale when it reads as
    a number."""
    source, separator, scale = value.rpartition(":")
    if separator and source:
        try:
            number = float(scale)
        except ValueError:
            return LoraSpec(value)
        return LoraSpec(source, number)
    return LoraSpec(value)
