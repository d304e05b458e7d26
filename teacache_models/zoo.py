"""The model zoo: one YAML file per released model under `configs/`, read into typed objects.

A zoo file is plain data that maps one-to-one onto `SamplingParams` (section `sampling`) and
`TeaCacheParams` (each entry of `teacache.presets`); unknown keys are an error that names the file.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .families import FAMILIES, transformer_class
from .params import SamplingParams, TeaCacheParams

__all__ = ["TASKS", "ZOO_DIR", "TeaCachePreset", "ZooEntry", "check_sampling_overrides", "list_zoo", "load_zoo_entry"]

ZOO_DIR = Path(__file__).resolve().parent.parent / "configs"
# Names that select no preset: `sampling_params` and the CLI read them as "cache off" and "the default preset".
_RESERVED_PRESET_NAMES = ("off", "default")
# t2i text-to-image, t2v text-to-video, i2v image-to-video (an image is required), ti2v text-and-image-to-video
# (the image is optional).
TASKS = ("t2i", "t2v", "i2v", "ti2v")

_TOP_KEYS = {"name", "description", "manifest", "family", "task", "transformer", "sampling", "teacache"}
_SAMPLING_KEYS = {f.name for f in dataclasses.fields(SamplingParams)} - {"teacache_params"}
_PRESET_KEYS = {f.name for f in dataclasses.fields(TeaCacheParams)} | {"source"}


@dataclass(frozen=True)
class TeaCachePreset:
    """A named TeaCache setting and where its threshold comes from (a measured or published point)."""

    params: TeaCacheParams
    source: str


@dataclass(frozen=True)
class ZooEntry:
    """One released model: its weights (manifest name), architecture family and default sampling."""

    name: str
    description: str
    manifest: str
    family: str
    transformer: str
    sampling: SamplingParams
    presets: dict[str, TeaCachePreset]
    default_preset: str
    task: str = "t2i"
    path: Path | None = None

    @property
    def is_video(self) -> bool:
        return self.task != "t2i"

    def sampling_params(self, teacache: str = "default", **overrides: Any) -> SamplingParams:
        """The model's sampling defaults with TeaCache preset `teacache` ("off", "default" or a name)."""
        check_sampling_overrides(overrides)
        preset = self.default_preset if teacache == "default" else teacache
        if preset == "off":
            cache = None
        else:
            if preset not in self.presets:
                raise ValueError(
                    f"{self.name} has no TeaCache preset {teacache!r}; choose 'off', 'default' or one of "
                    f"{sorted(self.presets)}"
                )
            cache = self.presets[preset].params
        return dataclasses.replace(self.sampling, teacache_params=cache, **overrides)


def check_sampling_overrides(overrides: dict[str, Any]) -> None:
    """Keyword overrides of sampling defaults must name `SamplingParams` fields other than the cache, which
    the `teacache` argument chooses."""
    if "teacache_params" in overrides:
        raise TypeError(
            "teacache_params is chosen by teacache= ('off', 'default' or a preset name); for other TeaCache "
            "settings, dataclasses.replace the returned SamplingParams"
        )
    unknown = sorted(set(overrides) - _SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unknown sampling settings {unknown}; SamplingParams fields: {sorted(_SAMPLING_KEYS)}")


def _check_keys(where: str, data: Any, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{where} is missing keys {missing}")
    return data


def _check_indicator(where: str, params: TeaCacheParams, family: str) -> None:
    """A preset's indicator must be one the entry's transformer computes (checked when the file is read, not
    when a generation starts)."""
    model_class = transformer_class(family)
    supported = model_class.supported_teacache_indicators
    if params.indicator is not None and params.indicator not in supported:
        raise ValueError(
            f"{where}: indicator {params.indicator!r} is not one of {model_class.__name__}'s {list(supported)}"
        )


def load_zoo_entry(name_or_path: str | Path) -> ZooEntry:
    """Read and validate a zoo entry, given its name (a file under `configs/`) or a YAML path."""
    if not isinstance(name_or_path, str | Path) or not str(name_or_path):
        raise ValueError(f"a zoo entry is named by a zoo name or a .yaml path, got {name_or_path!r}")
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        if path.exists():
            raise ValueError(f"model-zoo config {str(path)!r} is not a YAML file (.yaml or .yml)")
        path = ZOO_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(str(name_or_path), list_zoo(), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
            raise ValueError(f"unknown model {str(name_or_path)!r}{hint} Known models: {list_zoo()}")
    if not path.is_file():
        raise ValueError(f"model-zoo config {str(path)!r} does not exist")
    where = str(path)
    try:
        with path.open() as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise ValueError(f"{where} is not valid YAML: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{where} is not a text file: {error}") from None
    data = _check_keys(where, data, _TOP_KEYS, _TOP_KEYS - {"description", "task"})
    if data["family"] not in FAMILIES:
        raise ValueError(f"{where}: family {data['family']!r} is not one of {list(FAMILIES)}")
    for key in ("name", "manifest", "transformer"):
        if not isinstance(data[key], str) or not data[key]:
            raise ValueError(f"{where}: {key} must be a non-empty string, got {data[key]!r}")
    if data["transformer"] != FAMILIES[data["family"]].transformer:
        raise ValueError(
            f"{where}: transformer {data['transformer']!r} is not the {data['family']} transformer "
            f"{FAMILIES[data['family']].transformer!r}"
        )
    task = data.get("task", "t2i")
    if task not in TASKS:
        raise ValueError(f"{where}: task {task!r} is not one of {list(TASKS)}")
    sampling = _check_keys(f"{where}: sampling", data["sampling"], _SAMPLING_KEYS)
    teacache = _check_keys(f"{where}: teacache", data["teacache"], {"default", "presets"}, {"default", "presets"})
    presets_data = teacache["presets"] or {}
    if not isinstance(presets_data, dict):
        raise ValueError(
            f"{where}: teacache.presets must be a mapping of preset names, got {type(presets_data).__name__}"
        )
    presets = {}
    for preset_name, preset in presets_data.items():
        if not isinstance(preset_name, str) or preset_name in _RESERVED_PRESET_NAMES:
            raise ValueError(
                f"{where}: teacache.presets: a preset name must be a string other than "
                f"{list(_RESERVED_PRESET_NAMES)}, got {preset_name!r}"
            )
        preset = dict(_check_keys(f"{where}: teacache.presets.{preset_name}", preset, _PRESET_KEYS, {"source"}))
        source = preset.pop("source")
        try:
            presets[preset_name] = TeaCachePreset(TeaCacheParams(**preset), str(source))
        except ValueError as error:
            raise ValueError(f"{where}: teacache.presets.{preset_name}: {error}") from None
        _check_indicator(f"{where}: teacache.presets.{preset_name}", presets[preset_name].params, data["family"])
    # "off": TeaCache stays off unless asked for (a model without a measured or published threshold).
    if not isinstance(teacache["default"], str) or (
        teacache["default"] != "off" and teacache["default"] not in presets
    ):
        raise ValueError(f"{where}: teacache.default {teacache['default']!r} is not 'off' or one of {sorted(presets)}")
    default_params = presets[teacache["default"]].params if teacache["default"] != "off" else None
    try:
        sampling_params = SamplingParams(**sampling, teacache_params=default_params)
    except ValueError as error:
        raise ValueError(f"{where}: sampling: {error}") from None
    return ZooEntry(
        name=str(data["name"]),
        description=str(data.get("description", "")),
        manifest=str(data["manifest"]),
        family=data["family"],
        transformer=str(data["transformer"]),
        sampling=sampling_params,
        presets=presets,
        default_preset=teacache["default"],
        task=task,
        path=path,
    )


def list_zoo() -> list[str]:
    """Names of the model-zoo entries shipped under `configs/`."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.yaml")) if ZOO_DIR.is_dir() else []
