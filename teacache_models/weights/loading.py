"""Loading a native transformer from a checkpoint on disk, within about the checkpoint's size of memory.

The model is built with its parameters on the meta device (no memory, no initialisation), the whole
checkpoint is checked against it from the safetensors headers alone (missing, unexpected and
mis-shaped keys, all listed by name), and only then are tensors read, one at a time, cast to the
requested dtype, moved to the device and assigned into the model shard by shard. Any error is raised
before the model is returned, so a half-loaded model never reaches the caller.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..models.base import ConfiguredModel, kept_in_float32
from .checkpoint import Checkpoint, format_keys, open_checkpoint, read_tensor
from .conversion import KeyMapping, OriginalFormat, detect_original_format
from .errors import CheckpointError

__all__ = [
    "TORCH_DTYPES",
    "from_pretrained",
    "load_transformer",
    "locate_weights",
    "parameters_on_meta",
    "resolve_device",
]

M = TypeVar("M", bound=ConfiguredModel)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative tolerance of the parameter-count check against the manifest (its counts have 4-5 digits).
_PARAMETER_COUNT_TOLERANCE = 0.005


def load_transformer(
    path: str | Path,
    model_class: type[M],
    subfolder: str | None = "transformer",
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    config: Mapping[str, Any] | None = None,
    variant: str | None = None,
) -> M:
    """Load a native transformer from a local checkpoint.

    Args:
        path: a diffusers-format folder (`<path>/<subfolder>/config.json` with one `*.safetensors` or
            shards and their `*.safetensors.index.json`), that subfolder itself, or an original-release
            checkpoint (a BFL Flux `.safetensors` file, a Wan-AI Wan2.1 folder or file).
        model_class: the native class, e.g. `FluxTransformer2DModel`.
        subfolder: the component folder under `path`; ignored when `path` is the folder or file itself.
        torch_dtype: float32, bfloat16 or float16 (a dtype or its name); None loads float32, as diffusers
            does. Modules the class lists in `_keep_in_fp32_modules` stay float32 in any case.
        device: where the weights go; each tensor is moved there as it is read.
        config: constructor arguments overriding those of `config.json` (or those read off an original
            checkpoint's shapes, e.g. Flux's `axes_dims_rope`).
        variant: read the files of this variant (`diffusion_pytorch_model.<variant>.safetensors`, or its
            shards and `diffusion_pytorch_model.safetensors.index.<variant>.json`); an error when missing.

    Returns:
        The model in eval mode.
    """
    if not (isinstance(model_class, type) and issubclass(model_class, ConfiguredModel)):
        raise TypeError(f"model_class must be a native model class (a ConfiguredModel), got {model_class!r}")
    dtype = _resolve_dtype(torch_dtype)
    device = resolve_device(device)
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping of constructor arguments or None, got {type(config).__name__}")
    source = locate_weights(Path(path).expanduser(), subfolder)
    checkpoint = open_checkpoint(source, variant)
    shapes = {key: info.shape for key, info in checkpoint.tensors.items()}
    original = detect_original_format(model_class, shapes)
    if original is not None:
        arguments = original.infer_config(shapes, checkpoint.config, config or {})
    else:
        arguments = _diffusers_config(checkpoint, model_class)
    model = _build_on_meta(model_class, {**arguments, **(config or {})}, source)
    mappings = _check_keys(model, _mappings(original, shapes, model.config), checkpoint)
    _load(model, mappings, checkpoint, dtype, device)
    return model.eval()


def from_pretrained(
    model_class: type[M],
    path_or_name: str | Path,
    subfolder: str | None = "transformer",
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    device_map: Any = None,
    low_cpu_mem_usage: bool = True,
    use_safetensors: bool | None = None,
    config: Mapping[str, Any] | None = None,
    manifest: str | Path | None = None,
) -> M:
    """`ModelClass.from_pretrained`: a local path loads directly; a manifest name or Hub id is fetched first.

    The keywords are diffusers' (see `ConfiguredModel.from_pretrained`); only `subfolder` is fetched. A
    manifest entry must be of `model_class`'s family, and the loaded parameter count must match the
    manifest's.
    """
    from .download import resolve_weights
    from .manifest import load_manifest

    # Checked before any download: a wrong device or dtype should not cost a multi-GB fetch first.
    torch_dtype = _one_dtype(torch_dtype, dtype)
    _resolve_dtype(torch_dtype)
    device = resolve_device(_one_device(device, device_map))
    if not isinstance(low_cpu_mem_usage, bool):
        raise TypeError(f"low_cpu_mem_usage must be True or False, got {low_cpu_mem_usage!r}")
    if use_safetensors is False:
        raise ValueError(
            "use_safetensors=False asks for pickle weights, which are never loaded (unsafe): leave it None or True"
        )
    if variant is not None and (not isinstance(variant, str) or not variant or "/" in variant):
        raise ValueError(f"variant must be a name such as 'fp16' or None, got {variant!r}")
    if isinstance(path_or_name, str | Path) and Path(path_or_name).expanduser().exists():
        return load_transformer(path_or_name, model_class, subfolder, torch_dtype, device, config, variant)
    entry = load_manifest(manifest).get(str(path_or_name))
    if entry is not None:
        if entry.transformer_class != model_class.__name__:
            raise ValueError(
                f"{entry.name} holds {entry.transformer_class} weights, not {model_class.__name__}: "
                f"load it with {entry.transformer_class}.from_pretrained"
            )
        if subfolder not in entry.transformers:
            raise ValueError(f"{entry.name} has transformers in {list(entry.transformers)}, not in {subfolder!r}")
    folder = resolve_weights(
        path_or_name,
        cache_dir=cache_dir,
        token=token,
        revision=revision,
        local_files_only=local_files_only,
        components=[subfolder or ""],
        manifest=manifest,
    )
    model = load_transformer(folder, model_class, subfolder, torch_dtype, device, config, variant)
    if entry is not None:
        count = sum(p.numel() for p in model.parameters())
        if abs(count - entry.transformer_parameters) > _PARAMETER_COUNT_TOLERANCE * entry.transformer_parameters:
            raise CheckpointError(
                f"{entry.name}/{subfolder} has {count:,} parameters, the manifest expects "
                f"{entry.transformer_parameters:,.0f}: the repository or the manifest changed"
            )
    return model


def _one_dtype(torch_dtype: torch.dtype | str | None, dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """`dtype` is diffusers' alias of `torch_dtype`: either may be given, or both when they agree."""
    if dtype is None or torch_dtype is None:
        return torch_dtype if dtype is None else dtype
    if _resolve_dtype(torch_dtype) != _resolve_dtype(dtype):
        raise ValueError(f"torch_dtype={torch_dtype!r} and its alias dtype={dtype!r} disagree: pass one of them")
    return torch_dtype


def _one_device(device: torch.device | str | None, device_map: Any) -> torch.device | str:
    """The one device the weights go to, from `device` or diffusers' `device_map`.

    A device map spreads a model over several devices (accelerate's dispatch hooks); here the whole model
    goes to one device, so only the maps that name one are accepted: None, "cpu", a device ("cuda:0",
    an index, a `torch.device`) or `{"": device}`.
    """
    if isinstance(device_map, Mapping) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        device_map = torch.device("cuda", device_map) if device_map >= 0 else device_map
    if device_map is not None and not isinstance(device_map, str | torch.device):
        raise ValueError(
            f"device_map must be None, 'cpu', one device ('cuda:0', 0, a torch.device) or {{'': device}}, got "
            f"{device_map!r}: a model is loaded whole onto one device"
        )
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(
            f"device_map={device_map!r} spreads a model over several devices, which these models do not do: "
            "pass None, 'cpu' or one device such as 'cuda:0'"
        )
    if device_map is None:
        return "cpu" if device is None else device
    if device is not None and resolve_device(device) != resolve_device(device_map):
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree: pass one of them")
    return device_map


def locate_weights(path: Path, subfolder: str | None) -> Path:
    """The folder (or file) holding the weights: `path/subfolder` when it exists, else `path` itself."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    if subfolder and (path / subfolder).is_dir():
        return path / subfolder
    if (path / "config.json").is_file() or any(path.glob("*.safetensors")):
        return path
    where = f"no {subfolder}/ folder and " if subfolder else ""
    raise CheckpointError(f"{path} has {where}no config.json or *.safetensors of its own")


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a `torch.device` this machine has, or a ValueError naming what is allowed."""
    allowed = "'cpu', 'cuda', 'cuda:N' or another torch device this machine has"
    if isinstance(device, str) and device.strip():
        try:
            device = torch.device(device.strip())
        except RuntimeError:
            raise ValueError(f"device must be {allowed}, got {device!r}") from None
    if not isinstance(device, torch.device):
        raise ValueError(f"device must be {allowed}, got {device!r}")
    if device.type == "meta":
        raise ValueError("device 'meta' holds no data: weights cannot be loaded onto it; use 'cpu' or 'cuda'")
    if device.type == "cpu":
        return device
    try:  # an empty tensor asks the backend itself: built in, a device present, the index in range
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        text = str(error).strip() or type(error).__name__
        reason = text.splitlines()[0].split(". ")[0][:200]  # torch's first sentence says which backend failed
        raise ValueError(f"device {str(device)!r} is not available on this machine: {reason}") from None
    return device


def _resolve_dtype(torch_dtype: torch.dtype | str | None) -> torch.dtype:
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, str) and torch_dtype in TORCH_DTYPES:
        return TORCH_DTYPES[torch_dtype]
    if isinstance(torch_dtype, torch.dtype) and torch_dtype in TORCH_DTYPES.values():
        return torch_dtype
    raise ValueError(f"torch_dtype must be one of {list(TORCH_DTYPES)} (or the torch dtype), got {torch_dtype!r}")


def _diffusers_config(checkpoint: Checkpoint, model_class: type) -> dict[str, Any]:
    config = checkpoint.config
    if config is None:
        raise CheckpointError(f"{checkpoint.source} has weights but no config.json to build the model from")
    class_name = config.get("_class_name")
    if class_name is not None and class_name != model_class.__name__:
        raise CheckpointError(
            f"{checkpoint.source} holds a {class_name} checkpoint (config.json), not a {model_class.__name__}: "
            "load it with its own class, or point at the right subfolder"
        )
    return config


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device and leave buffers where they are built.

    Parameters are all in the checkpoint, so allocating and initialising them would only cost time and
    memory; buffers stay real because non-persistent ones (RoPE tables) are in no checkpoint and must
    be computed. Module construction in other threads meanwhile would be affected too (as with
    accelerate's `init_empty_weights`, which diffusers uses the same way).
    """
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _build_on_meta(model_class: type[M], arguments: dict[str, Any], source: Path) -> M:
    try:
        with parameters_on_meta():
            return model_class.from_config(arguments)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the config of {source} does not build a {model_class.__name__}: {error}") from None


def _mappings(original: OriginalFormat | None, shapes: dict, config: Mapping[str, Any]) -> list[KeyMapping]:
    if original is None:
        return [KeyMapping(key, key) for key in shapes]
    return original.map_keys(shapes, config)


def _check_keys(model: torch.nn.Module, mappings: list[KeyMapping], checkpoint: Checkpoint) -> list[KeyMapping]:
    """Compare the checkpoint with the model by key and shape; return the mappings to load."""
    state = model.state_dict()
    expected = {key: tuple(tensor.shape) for key, tensor in state.items()}
    found = {m.target: m.shape(checkpoint.tensors[m.source].shape) for m in mappings}
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = [k for k in found if k not in expected and not any(p.search(k) for p in ignored)]
    missing = [k for k in expected if k not in found]
    mismatched = [f"{k} {found[k]} (model {expected[k]})" for k in found if k in expected and found[k] != expected[k]]
    # Float weights stored as integers or booleans (quantized checkpoints) cannot be cast back to floats.
    not_float = [
        f"{m.target} ({checkpoint.tensors[m.source].dtype})"
        for m in mappings
        if m.target in expected
        and state[m.target].is_floating_point()
        and not checkpoint.tensors[m.source].dtype.is_floating_point
    ]
    problems = [
        f"{label}: {format_keys(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
            ("integer or boolean tensors for float weights (quantized checkpoints are not supported)", not_float),
        )
        if keys
    ]
    if problems:
        name = type(model).__name__
        raise CheckpointError(
            f"{checkpoint.source} does not match {name}({_short(model.config)}): " + "; ".join(problems)
        )
    return [m for m in mappings if m.target in expected]


def _short(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


def _load(
    model: torch.nn.Module,
    mappings: list[KeyMapping],
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    by_file: dict[Path, dict[str, list[KeyMapping]]] = defaultdict(lambda: defaultdict(list))
    for mapping in mappings:
        by_file[checkpoint.tensors[mapping.source].file][mapping.source].append(mapping)
    for file, sources in by_file.items():
        shard = {}
        with file.open("rb", buffering=0) as handle:
            for source in sorted(sources, key=lambda key: checkpoint.tensors[key].start):
                tensor = read_tensor(checkpoint.tensors[source], handle)
                for mapping in sources[source]:
                    value = mapping.apply(tensor)
                    if value.is_floating_point():
                        value = value.to(torch.float32 if kept_in_float32(model, mapping.target) else dtype)
                    shard[mapping.target] = value.to(device)
                del tensor
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device and not buffer.is_meta:
                module._buffers[name] = buffer.to(device)
    leftover = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{checkpoint.source} left tensors unloaded: {format_keys(leftover)}")
