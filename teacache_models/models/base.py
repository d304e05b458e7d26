"""What every native transformer shares: its architecture config and the diffusers-style output."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import typing
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.utils.checkpoint

from ..checks import check_typed_arguments
from ..layers.linear import linear_kernel_of, set_linear_kernel
from ..lora import LoraMixin

__all__ = [
    "ConfiguredModel",
    "ModelConfig",
    "ModelOutput",
    "Transformer2DModelOutput",
    "compute_dtype",
    "kept_in_float32",
    "register_config",
]

# Keys diffusers writes into every config.json that are not constructor arguments.
_CONFIG_METADATA_PREFIX = "_"

_LOGGER = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., None])
M = TypeVar("M", bound=torch.nn.Module)


def kept_in_float32(model: torch.nn.Module, key: str) -> bool:
    """Whether the parameter `key` belongs to a module the model's class keeps in float32 whatever the
    model's dtype (`_keep_in_fp32_modules`): diffusers' rule, a listed name as a part of the dotted key."""
    modules = getattr(model, "_keep_in_fp32_modules", None) or ()
    if isinstance(modules, str):  # diffusers also accepts one name as a bare string
        modules = (modules,)
    return any(name in key.split(".") for name in modules)


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in, as diffusers' `ModelMixin.dtype`: that of its first floating-point
    parameter outside the modules kept in float32 (Wan's scale-shift tables stay float32 in a bfloat16
    model)."""
    floating = [(key, p.dtype) for key, p in model.named_parameters() if p.is_floating_point()]
    computed = (dtype for key, dtype in floating if not kept_in_float32(model, key))
    return next(computed, floating[0][1] if floating else torch.float32)


class ModelConfig(dict):
    """A model's constructor arguments, read-only, readable as `config["x"]` or `config.x`.

    A `dict` (as diffusers' `FrozenDict`), so diffusers' `from_config` accepts it; `_class_name` names the
    model's class, as in a diffusers `config.json`.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}") from None

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a model config is read-only; build a new model with from_config(dict(config, ...))")

    __setattr__ = __delattr__ = __setitem__ = __delitem__ = _read_only
    clear = pop = popitem = setdefault = update = __ior__ = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        # copy, deepcopy and pickle rebuild it from a plain dict instead of filling it key by key.
        return type(self), (dict(self),)

    def __repr__(self) -> str:
        return f"ModelConfig({dict.__repr__(self)})"

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


class ModelOutput(OrderedDict):
    """diffusers' output behaviour (`BaseOutput`): each field by attribute (`out.sample`), key
    (`out["sample"]`) and index (`out[0]`); `keys()`, `values()`, `items()` and `to_tuple()` hold the
    fields that are not None. Subclasses are dataclasses."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                OrderedDict.__setitem__(self, field.name, value)

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        OrderedDict.__setitem__(self, key, value)
        object.__setattr__(self, key, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self and value is not None:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)

    def __reduce__(self) -> tuple:
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())


@dataclasses.dataclass(eq=False)
class Transformer2DModelOutput(ModelOutput):
    """The `return_dict=True` result: `sample` is the model's prediction."""

    sample: torch.Tensor


def register_config(init: F) -> F:
    """Record the constructor arguments of a model, defaults included, as its read-only `config`.

    The names are those of the checkpoint's `config.json`, so a config round-trips unchanged. Before the
    constructor runs, the arguments annotated `bool`, `int`, `int | None` or `float` are checked by their
    annotation (`checks.check_typed_arguments`), except those the class lists in `_arguments_checked_by_model`;
    the constructor checks the rest (RoPE axes, choices among names).
    """
    signature = inspect.signature(init)
    hints = typing.get_type_hints(init)

    @functools.wraps(init)
    def wrapper(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        values.pop("self")
        check_typed_arguments(hints, values, skip=getattr(type(self), "_arguments_checked_by_model", ()))
        init(self, *args, **kwargs)
        self.config = ModelConfig({"_class_name": type(self).__name__, **values})

    return wrapper  # type: ignore[return-value]


class ConfiguredModel(LoraMixin, torch.nn.Module):
    """Base of the native transformers: a constructor recorded with `register_config`, `from_config`, and LoRA
    adapters (`LoraMixin`: `load_lora_adapter`, `set_adapters`, `fuse_lora` ...)."""

    config: ModelConfig

    # diffusers' class-level data (a model class overrides what differs): modules kept in float32 in a half-
    # precision model, blocks a device map must not split, modules layerwise casting leaves alone, and the
    # blocks compiled once and reused (`compile_repeated_blocks`).
    _keep_in_fp32_modules: ClassVar[list[str] | None] = None
    _no_split_modules: ClassVar[list[str] | None] = None
    _skip_layerwise_casting_patterns: ClassVar[list[str] | None] = None
    _repeated_blocks: ClassVar[list[str]] = []
    # Constructor arguments with a bound of their own, which `register_config` leaves to the constructor.
    _arguments_checked_by_model: ClassVar[tuple[str, ...]] = ()
    # Gradient checkpointing (training, as diffusers' `enable_gradient_checkpointing`): every block of the
    # stack is called through `call_block`, which recomputes its activations in the backward pass.
    _supports_gradient_checkpointing: ClassVar[bool] = True
    gradient_checkpointing: bool = False

    def __getattr__(self, name: str) -> Any:
        """Submodules, parameters and buffers as in `nn.Module`; a config field, as diffusers still allows,
        with a FutureWarning pointing at `model.config`."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        config = self.__dict__.get("config")
        if config is not None and name in config and not name.startswith("_"):
            warnings.warn(
                f"reading the config field {name!r} as an attribute of {type(self).__name__} is deprecated, as "
                f"in diffusers: read model.config.{name}",
                FutureWarning,
                stacklevel=2,
            )
            return config[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def to(self, *args: Any, **kwargs: Any) -> ConfiguredModel:
        """`nn.Module.to`; casting a model that keeps modules in float32 to another float dtype casts them too,
        so it warns as diffusers does (load with `torch_dtype` to keep them in float32)."""
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        keep = self._keep_in_fp32_modules
        if keep and dtype is not None and dtype.is_floating_point and dtype != torch.float32:
            _LOGGER.warning(
                f"There are modules in {type(self).__name__} that should be kept in float32: {keep}. Casting "
                "directly with `to()` can lead to inconsistent results; set `torch_dtype` in `from_pretrained()` "
                "instead to keep these modules in float32."
            )
        return super().to(*args, **kwargs)

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable[..., Any] | None = None) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (less memory when
        training, same gradients). `gradient_checkpointing_func(block, *inputs)` runs one block; the default
        is `torch.utils.checkpoint.checkpoint` without reentrancy, as in diffusers."""
        if gradient_checkpointing_func is None:
            gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        elif not callable(gradient_checkpointing_func):
            raise TypeError(
                "gradient_checkpointing_func must be callable as func(block, *inputs), got "
                f"{type(gradient_checkpointing_func).__name__}"
            )
        self._gradient_checkpointing_func = gradient_checkpointing_func
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        """Keep block activations again (the default)."""
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether `enable_gradient_checkpointing` is in effect."""
        return self.gradient_checkpointing

    def call_block(self, block: torch.nn.Module, *inputs: Any) -> Any:
        """Run one block of the stack: checkpointed when enabled and gradients are being recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *inputs)
        return block(*inputs)

    def register_to_config(self, **fields: Any) -> None:
        """Add or replace fields of `config` (diffusers' `register_to_config`); the config stays read-only."""
        self.config = ModelConfig({**self.config, **fields})

    @classmethod
    def from_config(cls: type[M], config: Mapping[str, Any], **overrides: Any) -> M:
        """Build the model from a `config.json` mapping (or another model's `config`), `overrides` replacing
        its values; unknown keys are an error, not silently dropped."""
        return _build_from_config(cls, {**config, **overrides} if overrides else config)

    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | Path,
        subfolder: str | None = "transformer",
        torch_dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> M:
        """Load real weights: a local diffusers folder (or original-release checkpoint) directly, a
        `weights_manifest.yaml` name or Hub id after fetching `subfolder` (see `teacache_models.weights`).

        The options of diffusers' `ModelMixin.from_pretrained` keep their meaning: `torch_dtype` (or its
        alias `dtype`), `variant` (e.g. "fp16": the `diffusion_pytorch_model.fp16.safetensors` files),
        `subfolder` (None: the folder itself; the default "transformer" falls back to the folder itself
        when it has no such subfolder), `revision`, `cache_dir`, `local_files_only`, `token`, `device_map`
        (None, "cpu" or one device: every weight goes there) and `low_cpu_mem_usage` (loading is always
        low-memory: True and False give the same model). Also `device` (as a one-device `device_map`),
        `config` (constructor overrides) and `manifest` (another weights manifest). Any other keyword is a
        TypeError naming it.
        """
        # Imported here: the models do not depend on the weights package (nor on huggingface_hub).
        from ..weights.loading import from_pretrained

        return from_pretrained(cls, pretrained_model_name_or_path, subfolder, torch_dtype, device, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | Path,
        max_shard_size: int | str = "10GB",
        safe_serialization: bool = True,
        variant: str | None = None,
        is_main_process: bool = True,
    ) -> Path:
        """Write `config.json` and safetensors (sharded above `max_shard_size`, with an index) in the diffusers
        layout, which diffusers' class and `from_pretrained` both load; `variant` ("fp16") names the files
        `diffusion_pytorch_model.fp16.safetensors` as diffusers does. Only safetensors is written
        (`safe_serialization=False` is refused). A process with `is_main_process=False` writes nothing.
        Returns the folder."""
        from ..weights.saving import save_pretrained

        return save_pretrained(self, save_directory, max_shard_size, safe_serialization, variant, is_main_process)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameters, as diffusers counts them: `only_trainable` counts those requiring a
        gradient, `exclude_embeddings` leaves out the weights of `nn.Embedding` layers."""
        embeddings = set()
        if exclude_embeddings:
            embeddings = {id(m.weight) for m in self.modules() if isinstance(m, torch.nn.Embedding)}
        return sum(
            p.numel() for p in self.parameters() if id(p) not in embeddings and (p.requires_grad or not only_trainable)
        )

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
