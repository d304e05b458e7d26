"""Where a LoRA comes from: a state dict, a safetensors file, a folder holding one, or a Hub repository.

Only safetensors are read: a pickle (`.bin`, `.pt`, `.ckpt` ...) can run code when it is loaded, so it is
refused with the conversion to use. The metadata `save_lora_weights` writes (the adapter's `LoraConfig`,
as JSON under `lora_adapter_metadata`) is returned beside the tensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_WEIGHT_NAME", "LoraFile", "read_lora"]

# The file name diffusers' `save_lora_weights` writes, chosen first in a folder holding several files.
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class LoraFile:
    """The tensors of a LoRA, the adapter config stored beside them (or None) and where they came from."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] | None
    source: str


def read_lora(
    source: str | Path | Mapping[str, torch.Tensor] | LoraFile,
    weight_name: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    force_download: bool = False,
) -> LoraFile:
    """Read a LoRA: a `LoraFile` or a mapping of tensors as it is, else a local `.safetensors` file, a folder
    holding one (the `weight_name` file, `pytorch_lora_weights.safetensors`, or its only `.safetensors`), or a
    Hub repository id (`owner/name`) fetched through huggingface_hub with the download options.

    Raises FileNotFoundError for a path that does not exist, ValueError for a pickle file, a file that is
    not safetensors or a folder with no (or several) candidates, TypeError for another kind of source.
    """
    if isinstance(source, LoraFile):
        return source
    if isinstance(source, Mapping):
        return LoraFile(_checked_tensors(dict(source), "the state dict"), None, "a state dict")
    if not isinstance(source, str | Path):
        raise TypeError(
            f"a LoRA must be a path, a Hub id or a state dict (a mapping of tensors), got {type(source).__name__}"
        )
    path = Path(source)
    if subfolder:
        path = path / subfolder
    if path.exists():
        return _read_local(path, weight_name)
    if not isinstance(source, Path) and _HUB_ID.fullmatch(str(source)) and not _looks_like_a_file(str(source)):
        file = _download(
            str(source), weight_name, subfolder, cache_dir, token, revision, local_files_only, force_download
        )
        return _read_file(file)
    raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist (nor is it a Hub id of the form 'owner/name')")


def _looks_like_a_file(name: str) -> bool:
    return name.endswith((".safetensors", *PICKLE_SUFFIXES))


def _read_local(path: Path, weight_name: str | None) -> LoraFile:
    if path.is_dir():
        path = _pick_file(path, weight_name, sorted(p.name for p in path.iterdir() if p.is_file()))
    return _read_file(path)


def _pick_file(folder: Path, weight_name: str | None, names: list[str]) -> Path:
    """The file to read in a folder (or a Hub repository: `folder` is then only its name in messages)."""
    if weight_name is not None:
        if weight_name not in names:
            raise FileNotFoundError(f"{folder} has no file {weight_name!r}; it holds {names}")
        return folder / weight_name
    candidates = [name for name in names if name.endswith(".safetensors")]
    if DEFAULT_WEIGHT_NAME in candidates:
        return folder / DEFAULT_WEIGHT_NAME
    if len(candidates) == 1:
        return folder / candidates[0]
    if candidates:
        raise ValueError(f"{folder} holds several LoRA files {candidates}: pass weight_name= to choose one")
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{folder} holds only pickle files {pickles}: {_PICKLE_ADVICE}")
    raise FileNotFoundError(f"{folder} holds no .safetensors LoRA file (it holds {names})")


_PICKLE_ADVICE = (
    "pickle files are refused (loading one can run arbitrary code); only safetensors LoRAs are read. Convert it "
    "where you trust it: safetensors.torch.save_file(torch.load(path, weights_only=True), 'lora.safetensors')"
)


def _read_file(path: Path) -> LoraFile:
    from safetensors import SafetensorError, safe_open

    if path.name.endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{path}: {_PICKLE_ADVICE}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}); only safetensors LoRAs are read"
        ) from None
    stored = metadata.get(METADATA_KEY)
    try:
        config = json.loads(stored) if stored else None
    except json.JSONDecodeError:
        raise ValueError(f"{path}: its {METADATA_KEY!r} metadata is not JSON") from None
    return LoraFile(_checked_tensors(tensors, str(path)), config, str(path))


def _checked_tensors(state_dict: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    if not state_dict:
        raise ValueError(f"{source} holds no tensors: it is not a LoRA")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"{source}: a LoRA maps names to tensors, got {key!r}: {type(value).__name__}")
    return state_dict


def _download(
    repo_id: str,
    weight_name: str | None,
    subfolder: str | None,
    cache_dir: str | Path | None,
    token: str | bool | None,
    revision: str | None,
    local_files_only: bool | None,
    force_download: bool = False,
) -> Path:
    """Fetch one LoRA file of a Hub repository (the file `_pick_file` chooses among the repository's)."""
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError

    options = dict(cache_dir=cache_dir, token=token, revision=revision, force_download=force_download)
    try:
        if weight_name is None:
            names = huggingface_hub.list_repo_files(repo_id, revision=revision, token=token)
            if subfolder:
                names = [n.removeprefix(f"{subfolder}/") for n in names if n.startswith(f"{subfolder}/")]
            weight_name = _pick_file(Path(repo_id), None, [n for n in names if "/" not in n]).name
        file = huggingface_hub.hf_hub_download(
            repo_id, weight_name, subfolder=subfolder, local_files_only=bool(local_files_only), **options
        )
    except (HfHubHTTPError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise FileNotFoundError(
            f"LoRA {repo_id!r} could not be fetched from the Hub ({type(error).__name__}: {error}); "
            "check the id, pass token= for a gated repository, or give a local path"
        ) from error
    return Path(file)
