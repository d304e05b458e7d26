"""From a model-zoo name, a local path or a Hub id to a local folder, through `snapshot_download`.

Only the components the manifest lists (or the caller asks for) are fetched. `cache_dir`, `token`,
`revision` and offline mode (`local_files_only`, or `HF_HUB_OFFLINE=1` in the environment) go to
huggingface_hub, whose progress bars show the download. Access failures become one clear
`WeightsUnavailableError` saying what to do: accept a license and pass a token, or run the download
command before going offline. `huggingface_hub` is imported only when something is fetched.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import format_keys, verify_sha256
from .errors import CheckpointError, WeightsUnavailableError
from .manifest import ManifestEntry, load_manifest

__all__ = ["DownloadPlan", "PlannedFile", "describe", "download_command", "plan_download", "resolve_weights"]

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TRUE = {"1", "ON", "YES", "TRUE"}
# What a transformer stored at a repository's root (an original release) needs.
_ROOT_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json"]


@dataclass(frozen=True)
class PlannedFile:
    filename: str
    size: int | None
    cached: bool


@dataclass(frozen=True)
class DownloadPlan:
    """What fetching a name involves: the source, its revision and every file with its size."""

    name: str
    source: str
    revision: str
    files: tuple[PlannedFile, ...]

    @property
    def bytes_to_download(self) -> int:
        return sum(f.size or 0 for f in self.files if not f.cached)

    @property
    def bytes_cached(self) -> int:
        return sum(f.size or 0 for f in self.files if f.cached)


def download_command(name: str) -> str:
    """The command that fetches `name` (for messages)."""
    return f"python scripts/download_weights.py {name}"


def resolve_weights(
    name_or_path: str | Path,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
    components: Sequence[str] | None = None,
    manifest: str | Path | None = None,
) -> Path:
    """A local folder holding the weights of a manifest name, a local path or a Hub repository id.

    Args:
        name_or_path: a `weights_manifest.yaml` entry ("flux1-dev"), an existing path, or "owner/repo".
        cache_dir: the Hugging Face cache to use (default: huggingface_hub's).
        token: Hub token for gated repositories (default: the stored login or HF_TOKEN).
        revision: overrides the manifest's revision (default "main" for a Hub id).
        local_files_only: never reach the Hub; None follows HF_HUB_OFFLINE.
        components: subfolders to fetch ("" for the repository root); default: the manifest entry's
            components, or the whole repository for a Hub id.
        manifest: another manifest file (default: the repository's).

    Files with a sha256 in the manifest are verified; a shipped folder (`local_path`) always is.
    """
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(f"name_or_path must be a string or a path, got {type(name_or_path).__name__}")
    name = str(name_or_path)
    entry = load_manifest(manifest).get(name)
    if entry is not None:
        return _resolve_entry(entry, cache_dir, token, revision, local_files_only, components)
    path = Path(name).expanduser()
    if path.exists():
        return path
    if _HUB_ID.fullmatch(name):
        return _HubSource.of(name, None, revision, components).fetch(cache_dir, token, local_files_only)
    raise ValueError(
        f"{name!r} is not a manifest entry ({sorted(load_manifest(manifest))}), an existing path, "
        "or a Hugging Face repository id 'owner/name'"
    )


def plan_download(
    name: str,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    components: Sequence[str] | None = None,
    manifest: str | Path | None = None,
) -> DownloadPlan:
    """List what `resolve_weights` would fetch for `name`, with sizes, without downloading (needs the Hub)."""
    entry = load_manifest(manifest).get(name)
    if entry is not None and entry.local_path is not None:
        folder = entry.local_path
        files = tuple(
            PlannedFile(str(p.relative_to(folder)), p.stat().st_size, True)
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        )
        return DownloadPlan(name, str(folder), "shipped", files)
    if entry is None and not _HUB_ID.fullmatch(name):
        raise ValueError(f"{name!r} is neither a manifest entry nor a Hugging Face repository id 'owner/name'")
    source = _HubSource.of(name, entry, revision, components)
    infos = source.snapshot_download(cache_dir, token, offline=False, dry_run=True)
    files = tuple(PlannedFile(i.filename, i.file_size, not i.will_download) for i in infos)
    return DownloadPlan(name, source.repo, source.revision, files)


def _resolve_entry(
    entry: ManifestEntry,
    cache_dir: str | Path | None,
    token: str | bool | None,
    revision: str | None,
    local_files_only: bool | None,
    components: Sequence[str] | None,
) -> Path:
    if entry.local_path is None:
        source = _HubSource.of(entry.name, entry, revision, components)
        folder = source.fetch(cache_dir, token, local_files_only)
        # Only digests of what was fetched: a component left out is not missing.
        wanted = {f: d for f, d in entry.sha256.items() if any(fnmatch.fnmatch(f, p) for p in source.patterns)}
        verify_sha256(folder, wanted)
        return folder
    entry.allow_patterns(components)  # a shipped folder is checked whole, but `components` must be among its own
    folder = entry.local_path
    if not folder.is_dir():
        raise WeightsUnavailableError(f"{entry.name}: its shipped folder {folder} is missing from this checkout")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    unlisted = sorted(present - set(entry.sha256))
    if unlisted:
        raise CheckpointError(f"{folder} holds files without a sha256 in the manifest: {format_keys(unlisted)}")
    verify_sha256(folder, entry.sha256)
    return folder


def _component_patterns(components: Sequence[str]) -> list[str]:
    if isinstance(components, str) or not components:
        raise ValueError(f"components must be a non-empty list of subfolder names, got {components!r}")
    patterns = ["model_index.json"]
    for component in components:
        patterns += _ROOT_PATTERNS if component in ("", ".") else [f"{component}/*"]
    return patterns


def _offline_from_environment() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


@dataclass(frozen=True)
class _HubSource:
    """What fetching `name` asks of the Hub: `repo` at `revision`, the files matching `patterns` (None: all)."""

    name: str
    repo: str
    revision: str
    patterns: list[str] | None
    gated: bool = False

    @classmethod
    def of(
        cls, name: str, entry: ManifestEntry | None, revision: str | None, components: Sequence[str] | None
    ) -> _HubSource:
        """The source of a manifest entry fetched from the Hub, or (`entry` None) of the Hub id `name`;
        `revision` overrides the entry's ("main" for a Hub id), `components` chooses the subfolders."""
        if entry is not None:
            return cls(name, entry.repo, revision or entry.revision, entry.allow_patterns(components), entry.gated)
        return cls(name, name, revision or "main", None if components is None else _component_patterns(components))

    def fetch(self, cache_dir: str | Path | None, token: str | bool | None, local_files_only: bool | None) -> Path:
        """The local folder, fetched or found in the cache (only looked up there when offline)."""
        offline = _offline_from_environment() if local_files_only is None else bool(local_files_only)
        what = "everything" if self.patterns is None else ", ".join(self.patterns)
        action = "looking in the cache for" if offline else "fetching"
        logger.info("%s: %s %s@%s (%s)", self.name, action, self.repo, self.revision, what)
        return Path(self.snapshot_download(cache_dir, token, offline))

    def snapshot_download(
        self, cache_dir: str | Path | None, token: str | bool | None, offline: bool, dry_run: bool = False
    ) -> Any:
        """huggingface_hub's `snapshot_download` (with `dry_run`: the files it would fetch); a failure becomes
        the error that says what to do."""
        import huggingface_hub

        try:
            return huggingface_hub.snapshot_download(
                self.repo,
                revision=self.revision,
                allow_patterns=self.patterns,
                cache_dir=cache_dir,
                token=token,
                local_files_only=offline,
                dry_run=dry_run,
            )
        except Exception as error:
            raise _access_error(error, self.name, self.repo, token, self.gated, offline) from None


def _access_error(
    error: Exception, name: str, repo: str, token: str | bool | None, gated: bool, offline: bool
) -> Exception:
    from huggingface_hub import errors, get_token

    if isinstance(error, errors.GatedRepoError) or (gated and isinstance(error, errors.HfHubHTTPError)):
        have_token = bool(token) or (token is None and get_token() is not None)
        why = "the token used has no access to it" if have_token else "no token was given or found"
        return WeightsUnavailableError(
            f"{name}: {repo} is a gated repository and {why}: accept its license at https://huggingface.co/{repo} "
            "while logged in, then pass token=... (download_weights.py --token), set HF_TOKEN or run `hf auth login`"
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return WeightsUnavailableError(f"{name}: {repo} is not a Hub repository, or it is private to another account")
    if isinstance(error, errors.RevisionNotFoundError):
        return WeightsUnavailableError(f"{name}: {repo} has no revision as requested ({error})")
    if isinstance(error, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled | errors.DryRunError):
        if offline or _offline_from_environment():
            return WeightsUnavailableError(
                f"{name} is not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE or "
                f"local_files_only): download it first, while online, with `{download_command(name)}`"
            )
        return WeightsUnavailableError(
            f"{name}: the Hub could not be reached and {repo} is not fully in the cache ({error}); "
            f"retry `{download_command(name)}` when online"
        )
    if isinstance(error, errors.HfHubHTTPError | OSError):
        return WeightsUnavailableError(f"{name}: fetching {repo} failed: {error}")
    return error


def describe(plan: DownloadPlan) -> list[str]:
    """Human-readable lines for a plan: every file to fetch with its size, then totals."""
    lines = [f"{plan.name}: {plan.source} @ {plan.revision}"]
    for file in plan.files:
        state = "cached" if file.cached else "fetch"
        lines.append(f"  {state:6} {_size(file.size):>10}  {file.filename}")
    fetched = sum(not f.cached for f in plan.files)
    lines.append(
        f"  {fetched} of {len(plan.files)} files to download: {_size(plan.bytes_to_download)} "
        f"({_size(plan.bytes_cached)} already cached)"
    )
    return lines


def _size(size: int | None) -> str:
    if size is None:
        return "?"
    if size < 1000:
        return f"{size} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"
