"""The model zoo: one YAML file per released model under `configs/`, read into typed objects.

A zoo file is plain data that maps one-to-one onto `SamplingParams` (section `sampling`) and
`TeaCacheParams` (each entry of `teacache.presets`); unknown keys are an error that names the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .checks import check_keys, load_yaml
from .families import FAMILIES, transformer_class
from .lora.spec import LoraSpec
from .params import RescalingFit, SamplingParams, TeaCacheParams

__all__ = [
    "EXPERT_NAMES",
    "TASKS",
    "TASK_IMAGES",
    "VIDEO_TASKS",
    "ZOO_DIR",
    "TeaCacheFit",
    "TeaCachePreset",
    "ThresholdRow",
    "ThresholdTable",
    "ZooEntry",
    "check_sampling_overrides",
    "list_zoo",
    "load_zoo_entry",
]

ZOO_DIR = Path(__file__).resolve().parent.parent / "configs"
# Names that select no preset: `sampling_params` and the CLI read them as "cache off" and "the default preset".
_RESERVED_PRESET_NAMES = ("off", "default")
# t2i text-to-image, t2v text-to-video, i2v image-to-video (an image is required), ti2v text-and-image-to-video
# (the image is optional), ti2i text-to-image with optional reference images (FLUX.2), edit image editing (one or
# more input images are required), layered decomposition of an input image into RGBA layers.
TASKS = ("t2i", "t2v", "i2v", "ti2v", "ti2i", "edit", "layered")
VIDEO_TASKS = ("t2v", "i2v", "ti2v")
# Per task: whether its models take input images ("required", "optional" or "no") and how many at most (None:
# the model's pipeline says, `Pipeline.max_images`).
TASK_IMAGES: dict[str, tuple[str, int | None]] = {
    "t2i": ("no", 0),
    "t2v": ("no", 0),
    "i2v": ("required", 1),
    "ti2v": ("optional", 1),
    "ti2i": ("optional", None),
    "edit": ("required", None),
    "layered": ("required", 1),
}

_TOP_KEYS = {"name", "description", "manifest", "family", "task", "transformer", "sampling", "teacache", "loras"}
_LORA_KEYS = {"source", "scale", "weight_name", "adapter_name"}
_SAMPLING_KEYS = {f.name for f in dataclasses.fields(SamplingParams)} - {"teacache_params"}
_PRESET_KEYS = {f.name for f in dataclasses.fields(TeaCacheParams)} | {"source"}
_FIT_KEYS = {"coefficients", "coefficients_negative", "calibrated_range", "source", "borrowed_from"}
# Two-expert entries (Wan2.2 A14B) may key `teacache.fits` by expert: {expert: {indicator: fit}}.
EXPERT_NAMES = ("transformer", "transformer_2")


@dataclass(frozen=True)
class TeaCacheFit:
    """A checkpoint's rescaling polynomial for one indicator (highest degree first) and where it comes from.

    `coefficients_negative`: the negative CFG branch's own polynomial where calibration found the branches
    differ (None: `coefficients` for both). `calibrated_range`: the indicator distances it was fitted on.
    """

    coefficients: tuple[float, ...]
    source: str
    # The zoo name of the checkpoint whose fit this one reuses (no fit of its own), None for its own.
    borrowed_from: str | None = None
    coefficients_negative: tuple[float, ...] | None = None
    calibrated_range: tuple[float, float] | None = None

    def rescaling(self) -> RescalingFit:
        """The fit as a model holds it (`set_teacache_fits`)."""
        return RescalingFit(self.coefficients, self.coefficients_negative, self.calibrated_range)


@dataclass(frozen=True)
class TeaCachePreset:
    """A named TeaCache setting and where its threshold comes from (a measured or published point)."""

    params: TeaCacheParams
    source: str


@dataclass(frozen=True)
class ThresholdRow:
    """One threshold of a preset, measured: the mean fraction of block-stack calls computed, and the mean PSNR
    against the uncached output."""

    teacache_thresh: float
    computed_fraction: float
    psnr_db: float

    @property
    def speedup(self) -> float:
        """The speedup the computed steps allow (steps / computed steps); wall clock adds the skipped steps'
        small cost."""
        return 1.0 / self.computed_fraction


@dataclass(frozen=True)
class ThresholdTable:
    """Thresholds of one preset's settings (coefficients, indicator, options) against what they computed.

    Written by `scripts/calibrate.py --write-config`; read to pick a threshold from a target speedup.
    """

    preset: str
    rows: tuple[ThresholdRow, ...]
    source: str

    def row_for_speedup(self, target_speedup: float) -> ThresholdRow:
        """The lowest threshold (the most faithful) whose computed steps give at least `target_speedup`."""
        reaching = [row for row in self.rows if row.speedup >= target_speedup]
        if not reaching:
            best = max(self.rows, key=lambda row: row.speedup)
            raise ValueError(
                f"target speedup {target_speedup:g} is beyond the threshold table: its fastest row, threshold "
                f"{best.teacache_thresh:g}, computes {best.computed_fraction:.0%} of the steps ({best.speedup:.2f}x)"
            )
        return min(reaching, key=lambda row: row.teacache_thresh)


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
    # Per indicator: the checkpoint's fit (from `teacache.fits`, or the coefficients its presets carry).
    fits: dict[str, TeaCacheFit] = dataclasses.field(default_factory=dict)
    threshold_table: ThresholdTable | None = None
    # LoRAs loaded with the model, each active at its scale (a path relative to the YAML, or a Hub id).
    loras: tuple[LoraSpec, ...] = ()
    # Per expert, per indicator: each expert's own fit (a two-expert entry whose `teacache.fits` is keyed by
    # expert); empty when both experts share `fits`.
    expert_fits: dict[str, dict[str, TeaCacheFit]] = dataclasses.field(default_factory=dict)

    def teacache_fits(self, expert: str | None = None) -> dict[str, tuple[float, ...]]:
        """{indicator: coefficients} of the transformer `expert` (the positive branch's where the branches
        have their own): the expert's own fits when the entry has per-expert fits, else the entry's."""
        return {name: fit.coefficients for name, fit in self.rescaling_fits(expert).items()}

    def rescaling_fits(self, expert: str | None = None) -> dict[str, RescalingFit]:
        """{indicator: fit with its per-branch polynomials and calibrated range}, what a loader hands the
        transformer `expert` (`set_teacache_fits`): the expert's own fits when the entry has them, else the
        entry's."""
        if expert is not None and expert not in EXPERT_NAMES:
            raise ValueError(f"expert must be one of {list(EXPERT_NAMES)}, got {expert!r}")
        fits = self.expert_fits.get(expert or "transformer", self.fits) if self.expert_fits else self.fits
        return {name: fit.rescaling() for name, fit in fits.items()}

    def install_teacache_fits(self, models: Mapping[str, Any], stacklevel: int = 2) -> None:
        """Hand the fits to `models` ({component name: transformer}, `set_teacache_fits`), each expert its own
        when the entry has per-expert fits; a fit borrowed from another checkpoint is announced once, with a
        UserWarning at `stacklevel` as seen from the caller."""
        every_fit = [*self.fits.values(), *(f for fits in self.expert_fits.values() for f in fits.values())]
        borrowed = sorted({fit.borrowed_from for fit in every_fit if fit.borrowed_from})
        if borrowed:
            warnings.warn(
                f"no TeaCache coefficients have been fitted for {self.name}: using those of "
                f"{', '.join(borrowed)}, which may skip too many or too few steps; calibrate this model to "
                "replace them",
                UserWarning,
                stacklevel=stacklevel + 1,
            )
        for name, model in models.items():
            model.set_teacache_fits(self.rescaling_fits(name if name in EXPERT_NAMES else None))

    @property
    def is_video(self) -> bool:
        return self.task in VIDEO_TASKS

    def teacache_for_speedup(self, target_speedup: float) -> TeaCacheParams:
        """The settings of the threshold table's preset, with the lowest measured threshold whose computed
        steps give at least `target_speedup` (steps / computed steps)."""
        if isinstance(target_speedup, bool) or not isinstance(target_speedup, int | float):
            raise TypeError(f"target_speedup must be a number, got {target_speedup!r}")
        if not math.isfinite(target_speedup) or target_speedup < 1:
            raise ValueError(f"target_speedup must be a finite number >= 1, got {target_speedup}")
        table = self.threshold_table
        if table is None:
            raise ValueError(
                f"{self.name} has no TeaCache threshold table, so no threshold can be picked from a target "
                f"speedup: measure one with scripts/calibrate.py --model {self.name} --write-config "
                f"<its yaml>, or give a threshold"
            )
        row = table.row_for_speedup(target_speedup)
        return dataclasses.replace(self.presets[table.preset].params, teacache_thresh=row.teacache_thresh)

    def sampling_params(
        self, teacache: str = "default", target_speedup: float | None = None, **overrides: Any
    ) -> SamplingParams:
        """The model's sampling defaults with TeaCache preset `teacache` ("off", "default" or a name), or with
        the threshold picked from `target_speedup` (`teacache_for_speedup`)."""
        check_sampling_overrides(overrides)
        if target_speedup is not None:
            if teacache != "default":
                raise ValueError(
                    f"target_speedup picks the threshold itself: leave teacache='default', got {teacache!r}"
                )
            return dataclasses.replace(
                self.sampling, teacache_params=self.teacache_for_speedup(target_speedup), **overrides
            )
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


def _read_fits(where: str, data: Any, family: str, key: str = "teacache.fits") -> dict[str, TeaCacheFit]:
    """`teacache.fits`: {indicator: {coefficients, source}}, each indicator one the family's transformer offers."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: {key} must be a mapping of indicator names, got {type(data).__name__}")
    supported = transformer_class(family).supported_teacache_indicators
    fits = {}
    for name, fit in data.items():
        fit = check_keys(f"{where}: {key}.{name}", fit, _FIT_KEYS, {"coefficients", "source"})
        if name not in supported:
            raise ValueError(f"{where}: {key}: indicator {name!r} is not one of {list(supported)}")
        try:
            checked = RescalingFit(fit["coefficients"], fit.get("coefficients_negative"), fit.get("calibrated_range"))
        except ValueError as error:
            raise ValueError(f"{where}: {key}.{name}: {error}") from None
        lender = fit.get("borrowed_from")
        if lender is not None and (not isinstance(lender, str) or lender not in list_zoo()):
            raise ValueError(f"{where}: {key}.{name}: borrowed_from {lender!r} is not a zoo entry")
        fits[name] = TeaCacheFit(
            checked.coefficients,
            str(fit["source"]),
            lender,
            checked.coefficients_negative,
            checked.calibrated_range,
        )
    return fits


def _read_expert_fits(where: str, data: Any, family: str) -> dict[str, dict[str, TeaCacheFit]]:
    """Per-expert `teacache.fits` ({expert: {indicator: fit}}, keys among `EXPERT_NAMES`): both experts of a
    two-expert family, each with a fit for the same indicators; {} when the fits are keyed by indicator."""
    if not isinstance(data, dict) or not any(name in EXPERT_NAMES for name in data):
        return {}
    unknown = sorted(str(name) for name in set(data) - set(EXPERT_NAMES))
    if unknown:
        raise ValueError(
            f"{where}: teacache.fits: {unknown} are not expert names; per-expert fits are keyed by "
            f"{list(EXPERT_NAMES)} only"
        )
    if family != "wan":
        raise ValueError(f"{where}: teacache.fits: per-expert fits are for Wan2.2 A14B (family wan), not {family}")
    missing = [name for name in EXPERT_NAMES if name not in data]
    if missing:
        raise ValueError(f"{where}: teacache.fits has per-expert fits but none for {missing}: give both experts'")
    expert_fits = {name: _read_fits(where, data[name], family, f"teacache.fits.{name}") for name in EXPERT_NAMES}
    indicators = {name: set(fits) for name, fits in expert_fits.items()}
    for name, own in indicators.items():
        for other, theirs in indicators.items():
            if theirs - own:
                raise ValueError(
                    f"{where}: teacache.fits.{name} is missing indicator(s) {sorted(theirs - own)} that "
                    f"teacache.fits.{other} has: each expert needs a fit for every indicator"
                )
    return expert_fits


def _read_preset(where: str, preset: dict, family: str, fits: dict[str, TeaCacheFit]) -> TeaCachePreset:
    """A preset: its indicator must be one the transformer computes (checked when the file is read, not when a
    generation starts); without coefficients it takes the entry's fit for that indicator, and coefficients it
    does carry become the fit of an indicator that has none (two different ones for one indicator are an error)."""
    source = preset.pop("source")
    try:
        params = TeaCacheParams(**preset)
        indicator = transformer_class(family).teacache_indicator_for(params).name
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    fit = fits.get(indicator)
    if params.coefficients is None and fit is not None:
        params = dataclasses.replace(
            params,
            coefficients=fit.coefficients,
            coefficients_negative=fit.coefficients_negative,
            calibrated_range=params.calibrated_range or fit.calibrated_range,
        )
    elif params.coefficients is not None and fit is None:
        fits[indicator] = TeaCacheFit(
            params.coefficients,
            str(source),
            coefficients_negative=params.coefficients_negative,
            calibrated_range=params.calibrated_range,
        )
    elif params.coefficients is not None and _polynomials(params) != _polynomials(fit):
        raise ValueError(
            f"{where}: coefficients {_polynomials_text(params)} differ from the entry's fit for indicator "
            f"{indicator!r} {_polynomials_text(fit)}: one checkpoint has one fit per indicator"
        )
    return TeaCachePreset(params, str(source))


def _polynomials(fit: TeaCacheParams | TeaCacheFit) -> tuple:
    return fit.coefficients, fit.coefficients_negative


def _polynomials_text(fit: TeaCacheParams | TeaCacheFit) -> str:
    negative = fit.coefficients_negative
    return f"{list(fit.coefficients)}" + ("" if negative is None else f" (negative branch {list(negative)})")


def _check_expert_preset(
    where: str, params: TeaCacheParams, family: str, expert_fits: dict[str, dict[str, TeaCacheFit]]
) -> None:
    """With per-expert fits a preset carries no coefficients (each expert takes its own) and its indicator has
    a fit in every expert."""
    for key in ("coefficients", "calibrated_range"):
        if getattr(params, key) is not None:
            raise ValueError(
                f"{where}: {key}: this entry has per-expert fits (teacache.fits.<expert>), which each expert "
                f"takes with its own calibrated range; a preset's {key} would override both"
            )
    indicator = transformer_class(family).teacache_indicator_for(params).name
    if indicator not in expert_fits["transformer"]:
        raise ValueError(
            f"{where}: indicator {indicator!r} has no per-expert fit; teacache.fits.<expert> has "
            f"{sorted(expert_fits['transformer'])}"
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
            data = load_yaml(handle, where)
    except yaml.YAMLError as error:
        raise ValueError(f"{where} is not valid YAML: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{where} is not a text file: {error}") from None
    data = check_keys(where, data, _TOP_KEYS, _TOP_KEYS - {"description", "task", "loras"})
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
    sampling = check_keys(f"{where}: sampling", data["sampling"], _SAMPLING_KEYS)
    teacache = check_keys(
        f"{where}: teacache",
        data["teacache"],
        {"default", "presets", "fits", "threshold_table"},
        {"default", "presets"},
    )
    expert_fits = _read_expert_fits(where, teacache.get("fits"), data["family"])
    fits = {} if expert_fits else _read_fits(where, teacache.get("fits"), data["family"])
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
        preset_where = f"{where}: teacache.presets.{preset_name}"
        preset = dict(check_keys(preset_where, preset, _PRESET_KEYS, {"source"}))
        presets[preset_name] = _read_preset(preset_where, preset, data["family"], fits)
        if expert_fits:
            _check_expert_preset(preset_where, presets[preset_name].params, data["family"], expert_fits)
    # "off": TeaCache stays off unless asked for (a model without a measured or published threshold).
    if not isinstance(teacache["default"], str) or (
        teacache["default"] != "off" and teacache["default"] not in presets
    ):
        raise ValueError(f"{where}: teacache.default {teacache['default']!r} is not 'off' or one of {sorted(presets)}")
    default_params = presets[teacache["default"]].params if teacache["default"] != "off" else None
    table = teacache.get("threshold_table")
    table = None if table is None else _read_threshold_table(f"{where}: teacache.threshold_table", table, presets)
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
        fits=fits,
        expert_fits=expert_fits,
        threshold_table=table,
        loras=_loras(where, data.get("loras"), path.parent),
    )


def _read_threshold_table(where: str, data: Any, presets: dict[str, TeaCachePreset]) -> ThresholdTable:
    data = check_keys(where, data, {"preset", "rows", "source"}, {"preset", "rows", "source"})
    if data["preset"] not in presets:
        raise ValueError(f"{where}: preset {data['preset']!r} is not one of {sorted(presets)}")
    rows = data["rows"]
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: rows must be a non-empty list of [threshold, computed fraction, PSNR dB]")
    parsed = []
    for index, row in enumerate(rows):
        valid = (
            isinstance(row, list)
            and len(row) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in row)
        )
        if not valid or row[0] < 0 or not 0 < row[1] <= 1:
            raise ValueError(
                f"{where}: rows[{index}] must be [threshold >= 0, computed fraction in (0, 1], PSNR dB], got {row!r}"
            )
        if any(row[0] == other.teacache_thresh for other in parsed):
            raise ValueError(f"{where}: rows[{index}] repeats threshold {row[0]}: one row per threshold")
        parsed.append(ThresholdRow(float(row[0]), float(row[1]), float(row[2])))
    return ThresholdTable(
        str(data["preset"]), tuple(sorted(parsed, key=lambda r: r.teacache_thresh)), str(data["source"])
    )


def _loras(where: str, data: Any, folder: Path) -> tuple[LoraSpec, ...]:
    """The entry's `loras`: a list of {source, scale, weight_name, adapter_name}; a relative source is
    resolved against the YAML's folder when it exists there (otherwise it is a Hub id)."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ValueError(f"{where}: loras must be a list of {{source, scale}} mappings, got {type(data).__name__}")
    specs = []
    for index, item in enumerate(data):
        item = check_keys(f"{where}: loras[{index}]", item, _LORA_KEYS, {"source"})
        source = item["source"]
        if not isinstance(source, str) or not source:
            raise ValueError(f"{where}: loras[{index}]: source must be a non-empty path or Hub id, got {source!r}")
        local = folder / source
        try:
            specs.append(LoraSpec(**dict(item, source=str(local.resolve()) if local.exists() else source)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: loras[{index}]: {error}") from None
    return tuple(specs)


def list_zoo() -> list[str]:
    """Names of the model-zoo entries shipped under `configs/`."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.yaml")) if ZOO_DIR.is_dir() else []
