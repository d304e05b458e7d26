"""What every native transformer shares: its architecture config and the diffusers-style output."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..layers.linear import linear_kernel_of, set_linear_kernel

__all__ = [
    "ConfiguredModel",
    "ModelConfig",
    "Transformer2DModelOutput",
    "compute_dtype",
    "kept_in_float32",
    "register_config",
]

# Keys diffusers writes into every config.json that are not constructor arguments.
_CONFIG_METADATA_PREFIX = "_"

F = TypeVar("F", bound=Callable[..., None])
M = TypeVar("M", bound=torch.nn.Module)


def kept_in_float32(model: torch.nn.Module, key: str) -> bool:
    """Whether the parameter `key` belongs to a module the model's class keeps in float32 whatever the
    model's dtype (`_keep_in_fp32_modules`): diffusers' rule, a listed name as a part of the dotted key."""
    modules = getattr(model, "_keep_in_fp32_modules", None) or ()
    return any(name in key.split(".") for name in modules)


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in, as diffusers' `ModelMixin.dtype`: that of its first floating-point
    parameter outside the modules kept in float32 (Wan's scale-shift tables stay float32 in a bfloat16
    model)."""
    floating = [(key, p.dtype) for key, p in model.named_parameters() if p.is_floating_point()]
    computed = (dtype for key, dtype in floating if not kept_in_float32(model, key))
    return next(computed, floating[0][1] if floating else torch.float32)


class ModelConfig(Mapping[str, Any]):
    """A model's constructor arguments, read-only, readable as `config["x"]` or `config.x`."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a model config is read-only")

    def __repr__(self) -> str:
        return f"ModelConfig({self._values!r})"

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)


@dataclass
class Transformer2DModelOutput:
    """The `return_dict=True` result: `sample` is the model's prediction."""

    sample: torch.Tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.sample,)[index]

    def to_tuple(self) -> tuple[torch.Tensor]:
        return (self.sample,)


def register_config(init: F) -> F:
    """Record the constructor arguments of a model, defaults included, as its read-only `config`.

    The names are those of the checkpoint's `config.json`, so a config round-trips unchanged.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        values = dict(bound.arguments)
        values.pop("self")
        self.config = ModelConfig(values)

    return wrapper  # type: ignore[return-value]


class ConfiguredModel(torch.nn.Module):
    """Base of the native transformers: a constructor recorded with `register_config`, and `from_config`."""

    config: ModelConfig

    @classmethod
    def from_config(cls: type[M], config: Mapping[str, Any]) -> M:
        """Build the model from a `config.json` mapping; unknown keys are an error, not silently dropped."""
        return _build_from_config(cls, config)

    @classmethod
    def from_pretrained(
        cls: type[M],
        path_or_name: str | Path,
        subfolder: str | None = "transformer",
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        **kwargs: Any,
    ) -> M:
        """Load real weights: a local diffusers folder (or original-release checkpoint) directly, a
        `weights_manifest.yaml` name or Hub id after fetching `subfolder` (see `teacache_models.weights`).

        `kwargs`: `config` (constructor overrides) and the download options of `resolve_weights`
        (cache_dir, token, revision, local_files_only, manifest).
        """
        # Imported here: the models do not depend on the weights package (nor on huggingface_hub).
        from ..weights.loading import from_pretrained

        return from_pretrained(cls, path_or_name, subfolder, torch_dtype, device, **kwargs)

    def save_pretrained(
        self, save_directory: str | Path, max_shard_size: int | str = "10GB", safe_serialization: bool = True
    ) -> Path:
        """Write `config.json` and safetensors (sharded above `max_shard_size`, with an index) in the diffusers
        layout, which diffusers' class and `from_pretrained` both load. Returns the folder."""
        from ..weights.saving import save_pretrained

        return save_pretrained(self, save_directory, max_shard_size, safe_serialization)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes in (see `compute_dtype`), as diffusers' `ModelMixin.dtype`."""
        return compute_dtype(self)

    @property
    def device(self) -> torch.device:
        """The device of the first parameter, as diffusers' `ModelMixin.device`."""
        return next((p.device for p in self.parameters()), torch.device("cpu"))

    def set_linear_kernel(self: M, kernel: str) -> M:
        """Run the model's linear layers on `kernel`: "aten" (PyTorch's, the default) or "onednn"
        (float32 CPU inference through oneDNN; equal to float32 rounding, often faster: see
        `teacache_models.layers.linear`). Returns the model."""
        set_linear_kernel(self, kernel)
        return self

    @property
    def linear_kernel(self) -> str | None:
        """The kernel of the linear layers: "aten" or "onednn"."""
        return linear_kernel_of(self)


def _build_from_config(cls: type[M], config: Mapping[str, Any]) -> M:
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    parameters = inspect.signature(cls.__init__).parameters
    accepted = {name for name in parameters if name != "self"}
    arguments = {k: v for k, v in config.items() if not k.startswith(_CONFIG_METADATA_PREFIX)}
    unknown = sorted(set(arguments) - accepted)
    if unknown:
        raise ValueError(
            f"config has keys that {cls.__name__} does not accept: {unknown}; accepted keys: {sorted(accepted)}"
        )
    class_name = config.get("_class_name")
    if class_name is not None and class_name != cls.__name__:
        raise ValueError(f"config is for {class_name!r}, not {cls.__name__!r}")
    return cls(**arguments)
