"""Checkpoint files on disk: safetensors headers, sharded indexes, sha256, one tensor at a time.

Headers are parsed and checked here rather than through the `safetensors` package so that every way a
file can be broken gets an error naming the file, and so that tensor data is read with plain `readinto`
calls into memory the model will own: nothing is memory-mapped, so the page cache never counts towards
the process's resident memory and peak RSS stays at the size of the weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import CheckpointError, MissingWeightsError

__all__ = [
    "Checkpoint",
    "TensorInfo",
    "file_sha256",
    "format_keys",
    "open_checkpoint",
    "read_safetensors_header",
    "read_tensor",
    "variant_name",
    "verify_sha256",
]

CONFIG_NAME = "config.json"
# diffusers' names; preferred when a folder also holds other variants (e.g. `.fp16.safetensors`).
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
# A variant's files: diffusion_pytorch_model.<variant>.safetensors, its shards <...>.<variant>-0000i-of-0000n and
# its index diffusion_pytorch_model.safetensors.index.<variant>.json.
_VARIANT_FILE = re.compile(
    r"diffusion_pytorch_model(?:\.safetensors\.index\.([\w]+)\.json|\.([\w]+)(?:-\d{5}-of-\d{5})?\.safetensors)"
)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The safetensors format's own bound on the JSON header.
_MAX_HEADER_BYTES = 100 * 2**20
_HASH_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's files, checked for completeness, without any tensor data read yet.

    Attributes:
        source: the folder (or single file) it was opened from.
        config: the `config.json` next to the weights, None when there is none.
        tensors: every tensor by its key, in file order.
    """

    source: Path
    config: dict | None
    tensors: dict[str, TensorInfo]

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(info.file for info in self.tensors.values()))

    @property
    def nbytes(self) -> int:
        return sum(info.end - info.start for info in self.tensors.values())


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: every byte of the data section must belong to one tensor.

    A truncated, padded or overwritten file fails here, before any tensor data is read.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, less than its 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {header_len} bytes, "
                f"the file has {size}; delete it and download it again"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} has a corrupted safetensors header ({error}); download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupted safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} has a corrupted header entry for {name!r}: {entry!r}") from None
        if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has byte range {begin}..{end}, not its shape {shape}")
        tensors[name] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    position = data_start
    for info in sorted(tensors.values(), key=lambda i: i.start):
        if info.start != position:
            raise CheckpointError(f"{path} has overlapping or scattered tensor data at byte {info.start}: corrupted")
        position = info.end
    if position != size:
        raise CheckpointError(
            f"{path} holds {size - data_start} bytes of tensor data but its header describes {position - data_start}: "
            "the file is truncated or corrupted; delete it and download it again"
        )
    return dict(sorted(tensors.items(), key=lambda item: item[1].start))


def read_tensor(info: TensorInfo, handle: BinaryIO) -> torch.Tensor:
    """Read one tensor from an open (unbuffered) file into fresh CPU memory."""
    tensor = torch.empty(info.shape, dtype=info.dtype)
    if tensor.numel() == 0:
        return tensor
    buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    handle.seek(info.start)
    done = 0
    while done < len(buffer):
        count = handle.readinto(buffer[done:])
        if not count:
            raise CheckpointError(f"{info.file} ended while reading a tensor: the file was truncated while in use")
        done += count
    return tensor


def variant_name(name: str, variant: str | None) -> str:
    """diffusers' file name of a variant: the variant goes before the last suffix
    (`diffusion_pytorch_model.fp16.safetensors`, `diffusion_pytorch_model.safetensors.index.fp16.json`)."""
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def open_checkpoint(path: Path, variant: str | None = None) -> Checkpoint:
    """Find a checkpoint's weights in a folder (single or sharded safetensors) or take one file, and check them.

    Args:
        path: a folder holding `config.json` and `*.safetensors` (or a `*.safetensors.index.json` with its
            shards), or one `.safetensors` file (original-release checkpoints); a `config.json` beside a
            single file is read too.
        variant: read the files of this variant (diffusers' names, see `variant_name`) in a folder; a
            CheckpointError naming the files looked for when it has none.
    """
    path = Path(path)
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            raise CheckpointError(f"{path} is not a .safetensors file; only safetensors checkpoints are supported")
        if variant is not None:
            raise CheckpointError(f"variant={variant!r} selects files in a folder; {path} is one file")
        return Checkpoint(path, _read_config(path.parent), read_safetensors_header(path))
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    if variant is not None:
        return Checkpoint(path, _read_config(path), _variant_tensors(path, variant))
    _refuse_variants_only(path)
    index = _pick(path, INDEX_SUFFIX)
    if index is not None:
        tensors = _read_index(index)
    else:
        single = _pick(path, ".safetensors")
        if single is None:
            others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = f" (found {others}: pickle checkpoints are not loaded, for safety)" if others else ""
            raise CheckpointError(f"{path} holds no *.safetensors weights{hint}")
        tensors = read_safetensors_header(single)
    return Checkpoint(path, _read_config(path), tensors)


def _refuse_variants_only(folder: Path) -> None:
    """A folder whose weights are all variants (`diffusion_pytorch_model.fp16.safetensors`) holds no default
    weights: diffusers' loader refuses it with this message (an OSError), and so does this one."""
    names = [p.name for p in folder.iterdir() if p.is_file() and p.name.endswith((".safetensors", ".json"))]
    default = [n for n in names if n == WEIGHTS_NAME or n == WEIGHTS_NAME + ".index.json"]
    other = [n for n in names if n.endswith(".safetensors") and not _VARIANT_FILE.fullmatch(n) and n not in default]
    variants = sorted({m.group(1) or m.group(2) for n in names if (m := _VARIANT_FILE.fullmatch(n))})
    if variants and not default and not other:
        raise MissingWeightsError(
            f"Error no file named {WEIGHTS_NAME} found in directory {folder}: it holds only the variants "
            f"{variants} of the weights; pass variant={variants[0]!r} (Error no file named "
            "diffusion_pytorch_model.bin found in directory either: pickle weights are never read)"
        )


def _variant_tensors(folder: Path, variant: str) -> dict[str, TensorInfo]:
    index = folder / variant_name(WEIGHTS_NAME + ".index.json", variant)
    single = folder / variant_name(WEIGHTS_NAME, variant)
    if index.is_file():
        return _read_index(index)
    if single.is_file():
        return read_safetensors_header(single)
    found = sorted(p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".json")))
    raise CheckpointError(
        f"{folder} has no {variant!r} variant of its weights: neither {single.name} nor {index.name} "
        f"(found {found}); pass variant=None for the default files"
    )


def _pick(folder: Path, suffix: str) -> Path | None:
    candidates = sorted(p for p in folder.iterdir() if p.name.endswith(suffix) and p.is_file())
    if suffix == ".safetensors":
        candidates = [p for p in candidates if not p.name.endswith(INDEX_SUFFIX)]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    preferred = folder / (WEIGHTS_NAME if suffix == ".safetensors" else WEIGHTS_NAME + ".index.json")
    if preferred in candidates:
        return preferred
    names = [p.name for p in candidates]
    raise CheckpointError(f"{folder} holds several candidate weight files {names}; pass the one to load as the path")


def _read_index(index: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index} is not a valid index ({error!r}); download it again") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has an empty or malformed weight_map")
    shard_names = list(dict.fromkeys(weight_map.values()))
    # A shard is a file beside the index: a name that is no string, or a path that leaves the folder, is corruption.
    odd = [name for name in shard_names if not isinstance(name, str) or not name or Path(name).name != name]
    if odd:
        raise CheckpointError(
            f"{index} has a malformed weight_map: shard names must be file names beside the index, got {odd[:5]!r}"
        )
    missing = [name for name in shard_names if not (index.parent / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{index} names shards that are missing from {index.parent}: {missing}; the download is incomplete, "
            "fetch it again"
        )
    tensors: dict[str, TensorInfo] = {}
    for name in shard_names:
        header = read_safetensors_header(index.parent / name)
        duplicates = sorted(set(header) & set(tensors))
        if duplicates:
            raise CheckpointError(f"{index.parent / name} repeats tensors of another shard: {format_keys(duplicates)}")
        tensors.update(header)
    absent = sorted(key for key, shard in weight_map.items() if key not in tensors or tensors[key].file.name != shard)
    if absent:
        raise CheckpointError(f"{index} maps tensors to shards that do not hold them: {format_keys(absent)}")
    return tensors


def _read_config(folder: Path) -> dict | None:
    path = folder / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb", buffering=0) as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(folder: Path, expected: Mapping[str, str]) -> None:
    """Check files (paths relative to `folder`) against their sha256; name every missing or mismatched file."""
    problems = []
    for relative, digest in expected.items():
        path = Path(folder) / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif (actual := file_sha256(path)) != digest:
            problems.append(f"{relative}: sha256 {actual}, expected {digest}")
    if problems:
        raise CheckpointError(
            f"{folder} does not match its manifest: " + "; ".join(problems) + ". Delete the files and download again"
        )


def format_keys(keys: list[str], limit: int = 30) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
