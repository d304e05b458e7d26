"""The checks of user input at the public boundary, one vocabulary for the whole package: sampling and
TeaCache settings, model constructor arguments, and the tensors a model is called with.

Every check raises with the argument's name, the value received and what is allowed (`ValueError`, or
`TypeError` where the caller's contract says so), so a bad setting or input fails where it is given
instead of deep inside torch. `require_*` return the checked value normalised (a numpy integer as an
int); `check_*` only check; `is_int` is the predicate the others build on. Invariants inside the package
are `assert`s, not these.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import torch

from .lora import check_lora_scale

__all__ = [
    "batch_vector",
    "check_architecture",
    "check_attention_kwargs",
    "check_dtype",
    "check_guidance",
    "check_keys",
    "check_patch_grid",
    "check_residuals",
    "check_rope_axes",
    "check_tensor",
    "check_tokens",
    "check_typed_arguments",
    "check_video_latents",
    "controlnet_residuals",
    "is_int",
    "load_yaml",
    "require_bool",
    "require_int",
    "require_number",
    "require_real_tensor",
]


def is_int(value: Any, minimum: int) -> bool:
    """True for an int (not a bool) of at least `minimum`."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def require_int(name: str, value: Any, minimum: int, wrong_type: type[Exception] = ValueError) -> int:
    """`value` as an int (numpy integers included), or the error that names `name` and what is allowed;
    `wrong_type` is raised for a value that is no integer at all."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise wrong_type(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def require_number(name: str, value: Any, minimum: float | None = None) -> float:
    """`value` as a finite float, at least `minimum` when given."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a finite real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def require_bool(name: str, value: Any, wrong_type: type[Exception] = ValueError) -> bool:
    """`value` if it is True or False (not 0, 1 or another truthy value)."""
    if not isinstance(value, bool):
        raise wrong_type(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_keys(
    where: str,
    data: Any,
    allowed: Iterable[str],
    required: Iterable[str] = (),
    error: type[Exception] = ValueError,
) -> dict:
    """`data`, a mapping read from a file (a YAML section), if it has only `allowed` keys and every `required`
    one; else `error` naming `where` and the keys that are unknown or missing."""
    if not isinstance(data, dict):
        raise error(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise error(f"{where} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(set(required) - set(data))
    if missing:
        raise error(f"{where} is missing keys {missing}")
    return data


def load_yaml(text: Any, where: str) -> Any:
    """`yaml.safe_load(text)`, except that a mapping repeating a key is a ValueError naming `where`, the key
    and its line: PyYAML keeps the last value silently, which would drop the first without a word."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if not isinstance(key, Hashable):
                continue  # construct_mapping names an unhashable key itself
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ValueError(f"{where} repeats the key {key!r} (line {line}) in one mapping")
            seen.add(key)
        return loader.construct_mapping(node)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=UniqueKeyLoader)


def check_architecture(
    args: Mapping[str, Any],
    positive: Iterable[str] = (),
    non_negative: Iterable[str] = (),
    optional_positive: Iterable[str] = (),
    flags: Iterable[str] = (),
    positive_numbers: Iterable[str] = (),
) -> None:
    """Check the constructor arguments named in each group.

    Args:
        args: the constructor's arguments by name.
        positive: integers >= 1; non_negative: integers >= 0 (e.g. layer counts);
        optional_positive: None or an integer >= 1; flags: True or False;
        positive_numbers: real numbers > 0 (epsilons, ratios, RoPE bases).
    """
    for name in positive:
        if not is_int(args[name], 1):
            raise ValueError(f"{name} must be a positive integer, got {args[name]!r}")
    for name in non_negative:
        if not is_int(args[name], 0):
            raise ValueError(f"{name} must be an integer >= 0, got {args[name]!r}")
    for name in optional_positive:
        if args[name] is not None and not is_int(args[name], 1):
            raise ValueError(f"{name} must be None or a positive integer, got {args[name]!r}")
    for name in flags:
        require_bool(name, args[name])
    for name in positive_numbers:
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_typed_arguments(hints: Mapping[str, Any], args: Mapping[str, Any], skip: Iterable[str] = ()) -> None:
    """Check constructor arguments by their annotation, as `check_architecture` does by group.

    `bool`: True or False; `int`: a positive integer, or one >= 0 for a count of blocks (a name ending in
    "layers"); `int | None` (and `out_channels`): None or a positive integer; `float`: a positive number.
    Arguments of any other type (tuples, strings) and those in `skip` are the model's own to check.
    """
    groups: dict[str, list[str]] = {
        group: [] for group in ("positive", "non_negative", "optional_positive", "flags", "positive_numbers")
    }
    for name, hint in hints.items():
        if name in skip or name not in args:
            continue
        if hint is bool:
            groups["flags"].append(name)
        elif hint == int | None or (hint is int and name == "out_channels"):
            # diffusers' models read out_channels=None as in_channels, whatever its annotation says.
            groups["optional_positive"].append(name)
        elif hint is int:
            groups["non_negative" if name.endswith("layers") else "positive"].append(name)
        elif hint is float:
            groups["positive_numbers"].append(name)
    check_architecture(args, **groups)


def check_rope_axes(
    name: str, axes: Any, head_dim: int, num_axes: int | None = None, minimum: int = 2, head_name: str | None = None
) -> tuple[int, ...]:
    """RoPE channels per position axis: even integers >= `minimum` summing to the head width.

    Args:
        name: the argument's name; axes: its value.
        head_dim: the width the axes must add up to; head_name: how to call it in the error.
        num_axes: the required number of axes, if fixed.
    """
    allowed = f"{'' if num_axes is None else f'{num_axes} '}even integers >= {minimum}"
    if isinstance(axes, str | bytes) or not isinstance(axes, Iterable):
        raise ValueError(f"{name} must be {allowed}, got {axes!r}")
    axes = tuple(axes)
    if (
        not axes
        or (num_axes is not None and len(axes) != num_axes)
        or any(not is_int(a, minimum) or a % 2 for a in axes)
    ):
        raise ValueError(f"{name} must be {allowed}, got {axes}")
    if sum(axes) != head_dim:
        raise ValueError(f"{name} {axes} must sum to {head_name or 'attention_head_dim'} {head_dim}, got {sum(axes)}")
    return axes


def check_tensor(name: str, value: Any, shape: tuple[int | str | tuple[int, ...], ...]) -> torch.Tensor:
    """A floating-point tensor of the given rank and sizes.

    Args:
        name: the argument's name, for the error.
        value: what was passed.
        shape: one entry per dimension: an int (that size exactly), a tuple of ints (one of those
            sizes) or a string (any size; the string names it in the error, e.g. "B", "L").
    """
    expected = "(" + ", ".join("|".join(map(str, d)) if isinstance(d, tuple) else str(d) for d in shape) + ")"
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {expected}, got {type(value).__name__}")
    fits = value.ndim == len(shape) and all(
        isinstance(d, str) or (size in d if isinstance(d, tuple) else size == d)
        for d, size in zip(shape, value.shape, strict=False)
    )
    if not fits:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value


def check_attention_kwargs(name: str, value: Any) -> None:
    """None or a dict holding at most a LoRA `scale`, a finite number: diffusers pops that before the attention
    runs, and it multiplies the loaded adapters' weights for the call (see `lora_scale_from`). Other keys feed
    attention-processor hooks these models lack."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be None or a dict, got {type(value).__name__}")
    if set(value) - {"scale"}:
        raise ValueError(
            f"{name} {sorted(value)} are not supported: this model has no IP-adapter or attention-processor "
            "hooks; pass None (a LoRA 'scale' alone is accepted: it weights the loaded adapters)"
        )
    if "scale" in value:
        check_lora_scale(f"{name}['scale']", value["scale"])


def check_dtype(name: str, value: torch.Tensor, expected: torch.dtype) -> None:
    """`value` has the dtype of the layer it feeds: PyTorch's linear layers do not mix dtypes. Not checked
    under autocast, which casts the inputs of those layers itself."""
    if value.dtype != expected and not torch.is_autocast_enabled(value.device.type):
        raise TypeError(
            f"{name} must have the dtype of the model's weights that read it ({expected}), got {value.dtype}; "
            "cast it with .to()"
        )


def check_patch_grid(name: str, sizes: tuple[int, ...], patches: tuple[int, ...]) -> tuple[int, ...]:
    """Latent (frames, height, width) sizes that patches of `patches` tile exactly -> patches per axis."""
    for axis, size, patch in zip(("frames", "height", "width"), sizes, patches, strict=True):
        if size == 0 or size % patch:
            raise ValueError(
                f"{name} {axis} must be a positive multiple of the patch size {patch}, got {size}: frames, "
                f"height, width {tuple(sizes)} must be positive multiples of {tuple(patches)}"
            )
    return tuple(size // patch for size, patch in zip(sizes, patches, strict=True))


def check_video_latents(
    name: str, value: Any, channels: int, dtype: torch.dtype, patches: tuple[int, int, int]
) -> tuple[int, tuple[int, ...]]:
    """Video latents: a floating-point (B, channels, F, H, W) tensor of at least one sample, in the `dtype` of
    the layer it feeds, whose frames, height and width the (pt, p, p) `patches` tile -> B and the patches per
    axis."""
    check_tensor(name, value, ("B", channels, "F", "H", "W"))
    check_dtype(name, value, dtype)
    if value.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample, got shape {tuple(value.shape)}")
    return value.shape[0], check_patch_grid(name, tuple(value.shape[2:]), patches)


def check_tokens(
    name: str, value: Any, batch: int | None, width: int, min_length: int = 0, broadcast: bool = False
) -> None:
    """A floating-point (B, L, width) tensor with L >= `min_length`, and B == `batch` unless it is None (or B == 1
    where `broadcast`: one sample's tokens that the model broadcasts over the batch)."""
    sizes = "B" if batch is None else (1, batch) if broadcast else batch
    check_tensor(name, value, (sizes, "L", width))
    if value.shape[1] < min_length:
        raise ValueError(f"{name} must hold at least {min_length} token(s), got shape {tuple(value.shape)}")


def check_residuals(name: str, samples: Any, target: tuple[int, ...], dtype: torch.dtype | None) -> list[torch.Tensor]:
    """ControlNet residuals: a non-empty sequence of tensors (or one stacked tensor, indexed along dim 0)
    that each broadcast to `target` without promoting the `dtype` of the stream they are added to (None:
    any dtype, e.g. under autocast, where the next layer casts anyway).

    Returns them as a list.
    """
    expected = "(" + ", ".join(map(str, target)) + ")"
    allowed = f"a non-empty list of tensors broadcastable to {expected}"
    if isinstance(samples, torch.Tensor):
        if samples.ndim != len(target) + 1:
            raise ValueError(
                f"{name} must be {allowed} (or one stacked tensor), got a tensor of shape {tuple(samples.shape)}"
            )
        samples = list(samples)  # a stacked tensor is read one residual per index, as a list would be
    elif isinstance(samples, str | bytes) or not isinstance(samples, Sequence):
        raise TypeError(f"{name} must be None or {allowed}, got {type(samples).__name__}")
    if not samples:
        raise ValueError(f"{name} must be None or {allowed}, got an empty {type(samples).__name__}")
    for index, sample in enumerate(samples):
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"{name}[{index}] must be a tensor, got {type(sample).__name__}")
        shape = tuple(sample.shape)
        if len(shape) > len(target) or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False)):
            raise ValueError(f"{name}[{index}] must broadcast to {expected}, got {shape}")
        if dtype is not None and torch.promote_types(sample.dtype, dtype) != dtype:
            raise TypeError(f"{name}[{index}] must not promote the {dtype} hidden states, got {sample.dtype}")
    return list(samples)


def controlnet_residuals(
    name: str, samples: Any, blocks: torch.nn.ModuleList, hidden_states: torch.Tensor
) -> list[torch.Tensor] | None:
    """Checked ControlNet residuals for the stream `hidden_states` that `blocks` update, or None.

    diffusers reads them only inside the block loop, so with no blocks they are ignored, whatever they
    are. Under autocast the next layer casts its input, so a residual may promote the stream.
    """
    if samples is None or not len(blocks):
        return None
    dtype = None if torch.is_autocast_enabled(hidden_states.device.type) else hidden_states.dtype
    return check_residuals(name, samples, tuple(hidden_states.shape), dtype)


def require_real_tensor(name: str, value: Any, device: torch.device) -> torch.Tensor:
    """A number (as a (1,) tensor on `device`) or a real tensor (not bool, not complex): a timestep, a scale."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a tensor or a number, got {type(value).__name__}")
        return torch.tensor([float(value)], device=device)
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be a real tensor, got {value.dtype}")
    return value


def batch_vector(name: str, value: Any, batch: int, device: torch.device) -> torch.Tensor:
    """A number or a real tensor of shape (), (1,) or (B,) (a timestep, a guidance scale) -> (1,) or (B,)."""
    value = require_real_tensor(name, value, device)
    if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must have shape (), (1,) or ({batch},), got {tuple(value.shape)}")
    return value.reshape(-1)


def check_guidance(guidance: Any, guidance_embeds: bool, with_embeds: str, without_embeds: str) -> None:
    """A guidance scale given exactly when the model embeds one; the errors name a checkpoint of each kind."""
    if guidance_embeds and guidance is None:
        raise ValueError(f"guidance is required: this model has guidance_embeds=True (e.g. {with_embeds})")
    if not guidance_embeds and guidance is not None:
        raise ValueError(f"guidance must be None: this model has guidance_embeds=False (e.g. {without_embeds})")
