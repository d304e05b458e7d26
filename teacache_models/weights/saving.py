"""Saving a native transformer in the diffusers layout, so diffusers and this library both load it back.

A folder gets `config.json` (`_class_name` and the constructor arguments) and the state dict as
safetensors: one `diffusion_pytorch_model.safetensors`, or shards
`diffusion_pytorch_model-0000i-of-0000n.safetensors` with the `...safetensors.index.json` that maps
each key to its shard, as `ModelMixin.save_pretrained` writes them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..models.base import ConfiguredModel
from .checkpoint import variant_name

__all__ = ["parse_shard_size", "save_pretrained"]

WEIGHTS_NAME = "diffusion_pytorch_model"
# The diffusers release whose on-disk format this writes (its loader reads the key for warnings only).
DIFFUSERS_FORMAT_VERSION = "0.42.0"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_shard_size(size: int | str) -> int:
    """A shard size in bytes, from an int or a string such as "10GB", "500MB" or "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    if isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
        if match and match.group(2).upper() in _UNITS:
            value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
            if value > 0:
                return value
    raise ValueError(f"max_shard_size must be a positive number of bytes or a size such as '10GB', got {size!r}")


def save_pretrained(
    model: ConfiguredModel,
    save_directory: str | Path,
    max_shard_size: int | str = "10GB",
    safe_serialization: bool = True,
    variant: str | None = None,
    is_main_process: bool = True,
) -> Path:
    """Write `model` to `save_directory` in the diffusers layout; returns the folder.

    Shards hold whole tensors in state-dict order, each shard at most `max_shard_size` bytes unless one
    tensor alone is larger. Only safetensors is written (`safe_serialization=False` is refused).
    `variant` ("fp16") names the files as diffusers does (`diffusion_pytorch_model.fp16.safetensors`,
    shards `diffusion_pytorch_model.fp16-00001-of-00002.safetensors` and the index
    `diffusion_pytorch_model.safetensors.index.fp16.json`); the files of other variants are kept.
    """
    if not isinstance(model, ConfiguredModel):
        raise TypeError(f"model must be a native model (a ConfiguredModel), got {type(model).__name__}")
    if safe_serialization is not True:
        raise ValueError(
            "safe_serialization must be True: only safetensors is written (no pickle files), "
            f"got {safe_serialization!r}"
        )
    if variant is not None and (not isinstance(variant, str) or not variant or "/" in variant or "-" in variant):
        raise ValueError(f"variant must be a name such as 'fp16' or None, got {variant!r}")
    if not isinstance(is_main_process, bool):
        raise TypeError(f"is_main_process must be True or False, got {is_main_process!r}")
    limit = parse_shard_size(max_shard_size)
    state = model.state_dict()
    on_meta = [key for key, tensor in state.items() if tensor.is_meta]
    if on_meta:
        raise ValueError(f"{len(on_meta)} tensors have no data (meta device), e.g. {on_meta[:3]}: load weights first")
    folder = Path(save_directory).expanduser()
    if folder.is_file():
        raise ValueError(f"save_directory must be a folder, got the file {folder}")
    if not is_main_process:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    stem = WEIGHTS_NAME if variant is None else f"{WEIGHTS_NAME}.{variant}"
    _remove_previous_weights(folder, stem)

    config = {"_class_name": type(model).__name__, "_diffusers_version": DIFFUSERS_FORMAT_VERSION}
    config.update(model.config.to_dict())
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shards = _shard(state, limit)
    if len(shards) == 1:
        _write_shard(shards[0], folder / f"{stem}.safetensors")
        return folder
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        name = f"{stem}-{index:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(_nbytes(tensor) for tensor in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_name = variant_name(f"{WEIGHTS_NAME}.safetensors.index.json", variant)
    (folder / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _shard(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = _nbytes(tensor)
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, path, {"format": "pt"})


def _remove_previous_weights(folder: Path, stem: str) -> None:
    """Weights of an earlier save of the same variant in another sharding would be read alongside the new ones."""
    variant = stem[len(WEIGHTS_NAME) + 1 :] or None
    index = variant_name(f"{WEIGHTS_NAME}.safetensors.index.json", variant)
    shard = re.compile(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors")
    for old in folder.iterdir():
        if old.is_file() and (old.name == index or shard.fullmatch(old.name)):
            old.unlink()
