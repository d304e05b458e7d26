"""`weights_manifest.yaml`: where each released checkpoint lives and what to fetch of it, schema-checked.

An entry names either a Hub repository (`repo`, `revision`) or a folder shipped in this repository
(`local_path`, relative to the manifest file), the components (subfolders) to fetch, which of them are
native transformers, their dtype and parameter count, and sha256 digests per file: optional for Hub
entries, required for every file of a shipped folder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..checks import check_keys, load_yaml
from ..families import FAMILIES
from .errors import ManifestError

__all__ = ["MANIFEST_PATH", "ManifestEntry", "load_manifest"]

MANIFEST_PATH = Path(__file__).resolve().parent.parent.parent / "weights_manifest.yaml"

TRANSFORMER_DTYPES = ("float32", "bfloat16", "float16")

_REQUIRED = {"family", "components", "transformer_dtype", "transformer_parameters"}
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMPONENT = re.compile(r"[\w.-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ManifestEntry:
    """One released (or shipped) checkpoint.

    Attributes:
        name: the entry's key, e.g. "flux1-dev".
        family: a family of the registry (`teacache_models.families`).
        components: subfolders to fetch (diffusers pipeline components).
        transformers: the components holding native transformers (Wan2.2 A14B: two experts).
        transformer_dtype: the dtype the transformers run in ("bfloat16", ...).
        transformer_parameters: parameters of each transformer (a check on what was loaded).
        repo, revision: the Hub repository and revision; None for a shipped folder.
        local_path: the shipped folder (absolute); None for a Hub entry.
        gated: the repository needs a token and an accepted license.
        approx_download_gb: a size hint; the download script prints the exact sizes.
        sha256: file path (relative to the checkpoint root) -> digest, checked after fetching.
    """

    name: str
    family: str
    components: tuple[str, ...]
    transformers: tuple[str, ...]
    transformer_dtype: str
    transformer_parameters: float
    repo: str | None = None
    revision: str = "main"
    local_path: Path | None = None
    gated: bool = False
    approx_download_gb: float | None = None
    sha256: dict[str, str] = field(default_factory=dict)
    description: str = ""

    @property
    def transformer_class(self) -> str:
        return FAMILIES[self.family].transformer

    def allow_patterns(self, components: tuple[str, ...] | list[str] | None = None) -> list[str]:
        """snapshot_download patterns for `components` (default: all of them) plus `model_index.json`."""
        chosen = self.components if components is None else tuple(components)
        unknown = [c for c in chosen if c not in self.components]
        if unknown:
            raise ValueError(f"{self.name} has no components {unknown}; it has {list(self.components)}")
        return ["model_index.json", *(f"{component}/*" for component in chosen)]


# An entry's keys are the fields of `ManifestEntry` (its name is the key it stands under in the manifest).
_KEYS = {f.name for f in fields(ManifestEntry)} - {"name"}


def load_manifest(path: str | Path | None = None) -> dict[str, ManifestEntry]:
    """Read and check the weights manifest (default: `weights_manifest.yaml` at the repository root)."""
    path = MANIFEST_PATH if path is None else Path(path)
    if not path.is_file():
        raise ManifestError(f"weights manifest {str(path)!r} does not exist")
    try:
        data = load_yaml(path.read_text(), str(path))
    except yaml.YAMLError as error:
        raise ManifestError(f"{path} is not valid YAML: {error}") from None
    except ValueError as error:  # a repeated key
        raise ManifestError(str(error)) from None
    if not isinstance(data, dict) or not data:
        raise ManifestError(f"{path} must map entry names to entries, got {type(data).__name__}")
    return {str(name): _entry(path, str(name), value) for name, value in data.items()}


def _entry(path: Path, name: str, data: Any) -> ManifestEntry:
    where = f"{path}: entry {name!r}"

    def fail(message: str) -> ManifestError:
        return ManifestError(f"{where}: {message}")

    check_keys(where, data, _KEYS, _REQUIRED, ManifestError)
    if ("repo" in data) == ("local_path" in data):
        raise fail("needs exactly one of repo (a Hub repository) and local_path (a folder shipped here)")
    if data["family"] not in FAMILIES:
        raise fail(f"family {data['family']!r} is not one of {list(FAMILIES)}")
    # The YAML keys are the entry's field names, and a key left out takes the entry's default: the checks
    # below replace only the values they convert.
    values = dict(data, name=name)
    components = values["components"] = _names(fail, "components", data["components"])
    transformers = values["transformers"] = _names(fail, "transformers", data.get("transformers", ["transformer"]))
    if not set(transformers) <= set(components):
        raise fail(f"transformers {list(transformers)} must all be among components {list(components)}")
    if data["transformer_dtype"] not in TRANSFORMER_DTYPES:
        raise fail(f"transformer_dtype {data['transformer_dtype']!r} is not one of {list(TRANSFORMER_DTYPES)}")
    values["transformer_parameters"] = _positive(fail, "transformer_parameters", data["transformer_parameters"])
    if data.get("approx_download_gb") is not None:
        values["approx_download_gb"] = _positive(fail, "approx_download_gb", data["approx_download_gb"])
    if "gated" in data and not isinstance(data["gated"], bool):
        raise fail(f"gated must be true or false, got {data['gated']!r}")
    if "revision" in data and (not isinstance(data["revision"], str) or not data["revision"]):
        raise fail(f"revision must be a branch, tag or commit hash, got {data['revision']!r}")
    if "description" in data:
        values["description"] = str(data["description"])
    sha256 = data.get("sha256") or {}
    if not isinstance(sha256, dict):
        raise fail(f"sha256 must map file paths to digests, got {type(sha256).__name__}")
    for file, digest in sha256.items():
        if not isinstance(file, str) or Path(file).is_absolute() or ".." in Path(file).parts:
            raise fail(f"sha256 key {file!r} must be a path relative to the checkpoint root")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise fail(f"sha256 of {file!r} must be 64 lowercase hex digits, got {digest!r}")
    values["sha256"] = dict(sha256)
    repo = data.get("repo")
    if repo is not None:
        if not isinstance(repo, str) or not _REPO_ID.fullmatch(repo):
            raise fail(f"repo must be a Hub repository id 'owner/name', got {repo!r}")
    else:
        if not isinstance(data["local_path"], str):
            raise fail(f"local_path must be a path relative to the manifest, got {data['local_path']!r}")
        if data.get("gated"):
            raise fail("a folder shipped in this repository cannot be gated")
        if not sha256:
            raise fail("a shipped folder (local_path) needs the sha256 of every file")
        values["local_path"] = (path.parent / data["local_path"]).resolve()
    return ManifestEntry(**values)


def _names(fail: Any, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise fail(f"{key} must be a non-empty list of folder names, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not _COMPONENT.fullmatch(item):
            raise fail(f"{key} entry {item!r} is not a folder name")
    if len(set(value)) != len(value):
        raise fail(f"{key} lists a folder twice: {value}")
    return tuple(value)


def _positive(fail: Any, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise fail(f"{key} must be a positive number, got {value!r}")
    return float(value)
