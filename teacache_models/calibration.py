"""Fitting TeaCache's rescaling polynomial: record distances during uncached runs, fit, plot, write a zoo config.

TeaCache skips the block stack while the accumulated, rescaled change of a cheap indicator stays below a
threshold. The rescaling polynomial maps the indicator's relative L1 change between consecutive steps (x)
to the change of what the blocks produce (y). Calibration observes both during generations that skip
nothing and fits `numpy.polyfit(x, y, degree)`, per model.

Recording works on any model with the `TeaCacheMixin` seam and any sampler that declares its steps with
`model.teacache_step(...)`: `DistanceRecorder` watches each step through the model's step observer
(`add_teacache_observer`) while the sampler runs with `calibration_params(indicator)`, a threshold of 0
(bit-identical to an uncached run) that makes the model compute the chosen indicator at every step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache.forecast import FORECAST
from .cache.mixin import TeaCacheMixin, relative_l1_distance
from .cache.state import StepObservation
from .params import TeaCacheParams

__all__ = [
    "BRANCH_FITS",
    "CALIBRATED_PRESET",
    "MIN_PSNR_DB",
    "TARGETS",
    "BranchFits",
    "DistanceRecord",
    "DistanceRecorder",
    "PolynomialFit",
    "add_preset",
    "calibration_params",
    "calibration_source",
    "fit_branches",
    "fit_polynomial",
    "plot_fit",
    "presets_using",
    "record_runs",
    "record_runs_per_model",
    "threshold_for_psnr",
    "threshold_rule_note",
    "write_coefficients",
    "write_expert_fits",
    "write_threshold_table",
]

# What y measures: the block stack's output, or its residual (output - input), which TeaCache caches.
TARGETS = ("output", "residual")
_SOURCE_PREFIX = "coefficients: scripts/calibrate.py"
# How `fit_branches` treats the two CFG branches: one polynomial for both, one each, or one each when they differ.
BRANCH_FITS = ("auto", "joint", "separate")
# "auto" fits per branch when that removes at least this share of the joint fit's squared residual. The
# demo models' branches leave 96-99% of it (one polynomial serves both).
BRANCHES_DIFFER_GAIN = 0.2
# The preset `scripts/calibrate.py --write-config` adds to an entry that has none for the calibrated indicator,
# and the rule of its threshold: the largest of the measured threshold table up to which every threshold keeps
# the mean PSNR against uncached at or above MIN_PSNR_DB (30 dB: the lower of the two quality levels the README's
# benchmarks compare methods at; `--min-psnr` asks for another). Every smaller threshold must pass too, so a
# noisy table cannot pick a threshold above one that failed.
CALIBRATED_PRESET = "calibrated"
MIN_PSNR_DB = 30.0


def calibration_params(indicator: str | None = None) -> TeaCacheParams:
    """TeaCache settings for a recording run: nothing is skipped, the chosen indicator is computed every step.

    `indicator` None is the model's default indicator.
    """
    return TeaCacheParams(
        teacache_thresh=0.0, coefficients=(0.0,), start_skipping=0, end_skipping=0, indicator=indicator
    )


@dataclass(frozen=True)
class DistanceRecord:
    """One pair of consecutive steps (`step - 1`, `step`) of one CFG branch of one generation."""

    generation: int
    is_cfg_negative: bool
    step: int
    x: float  # relative L1 change of the indicator
    y: float  # relative L1 change of the block-stack output (or residual)


class DistanceRecorder:
    """Records indicator and block-stack distances of `model` between consecutive steps, per CFG branch.

    Use it as a context manager around generations that run with `calibration_params(...)`:

        with DistanceRecorder(model, target="output") as recorder:
            sample(demo, prompts, seeds, teacache=calibration_params("temb"))
        records = recorder.records

    It watches the model through a step observer (`add_teacache_observer`) while the context is open;
    nothing on the model is replaced. Each `enable_teacache` call starts a new generation; a branch's
    first step, or a step that does not follow the branch's previous one, gives no record.
    """

    def __init__(self, model: TeaCacheMixin, target: str = "output") -> None:
        if not callable(getattr(model, "add_teacache_observer", None)):
            raise TypeError(f"model must be a TeaCacheMixin model, got {type(model).__name__}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
        self.model = model
        self.target = target
        self.records: list[DistanceRecord] = []
        # The model's generation counter -> this recorder's generation index, in order of appearance.
        self._generations: dict[int, int] = {}
        # Per branch: (generation, step, indicator, target tensor) of the branch's latest step.
        self._previous: dict[bool, tuple[int, int, torch.Tensor, torch.Tensor]] = {}
        self._handle: Any = None

    def points(self, is_cfg_negative: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of all records, or of one branch's."""
        chosen = [r for r in self.records if is_cfg_negative is None or r.is_cfg_negative == is_cfg_negative]
        return np.array([r.x for r in chosen]), np.array([r.y for r in chosen])

    def __enter__(self) -> DistanceRecorder:
        if self._handle is not None:
            raise RuntimeError("this DistanceRecorder is already recording")
        self._handle = self.model.add_teacache_observer(self._observe)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.remove()
        self._handle = None
        self._previous.clear()

    def _observe(self, step: StepObservation) -> None:
        params = step.teacache_params
        if params is not None and params.teacache_thresh != 0:
            raise ValueError(
                f"a recording run must skip nothing: got teacache_thresh={params.teacache_thresh}; "
                "run the sampler with calibration_params(indicator)"
            )
        if step.indicator is None:
            raise RuntimeError(
                "the block stack ran without its indicator: run the sampler with "
                "teacache=calibration_params(indicator) while recording"
            )
        generation = self._generations.setdefault(step.generation, len(self._generations))
        target = step.output if self.target == "output" else step.output - step.hidden_states
        previous = self._previous.get(step.is_cfg_negative)
        if previous is not None and previous[:2] == (generation, step.step_index - 1):
            x = relative_l1_distance(step.indicator, previous[2]).item()
            y = relative_l1_distance(target, previous[3]).item()
            self.records.append(DistanceRecord(generation, step.is_cfg_negative, step.step_index, x, y))
        self._previous[step.is_cfg_negative] = (generation, step.step_index, step.indicator, target)


@dataclass(frozen=True)
class PolynomialFit:
    """A least-squares polynomial y ~ poly(x), highest degree first (`numpy.poly1d` order)."""

    coefficients: tuple[float, ...]
    num_points: int
    r_squared: float
    x_min: float
    x_max: float

    @property
    def degree(self) -> int:
        return len(self.coefficients) - 1

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return np.polyval(self.coefficients, x)

    def as_dict(self) -> dict[str, Any]:
        return {
            "coefficients": list(self.coefficients),
            "degree": self.degree,
            "num_points": self.num_points,
            "r_squared": self.r_squared,
            "x_range": [self.x_min, self.x_max],
        }


def fit_polynomial(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, degree: int = 4) -> PolynomialFit:
    """Fit `numpy.polyfit(x, y, degree)` and report R^2 (1 - residual / total sum of squares) and the x range."""
    if isinstance(degree, bool) or not isinstance(degree, Integral) or degree < 0:
        raise ValueError(f"degree must be an integer >= 0, got {degree!r}")
    degree = int(degree)
    try:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"x and y must be sequences of real numbers: {error}") from None
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    if len(x) <= degree:
        raise ValueError(f"a degree-{degree} fit needs more than {degree} points, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        bad = int((~np.isfinite(x) | ~np.isfinite(y)).sum())
        raise ValueError(f"x and y must be finite: {bad} of {len(x)} points are not")
    if len(np.unique(x)) <= degree:
        # Fewer distinct x than coefficients leave the fit undetermined: polyfit would return one of many.
        raise ValueError(f"a degree-{degree} fit needs more than {degree} distinct x values, got {len(np.unique(x))}")
    coefficients = np.polyfit(x, y, degree)
    residual = float(np.sum((y - np.polyval(coefficients, x)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    r_squared = 1 - residual / total if total > 0 else (1.0 if residual == 0 else 0.0)
    return PolynomialFit(tuple(float(c) for c in coefficients), len(x), r_squared, float(x.min()), float(x.max()))


@dataclass(frozen=True)
class BranchFits:
    """One model's calibration: the joint polynomial of both CFG branches and, where the branches differ, one
    per branch (`positive`, `negative`), which then replace it.

    `residual_share`: the per-branch fits' squared residual as a share of the joint fit's (None with one branch).
    """

    joint: PolynomialFit
    positive: PolynomialFit | None = None
    negative: PolynomialFit | None = None
    residual_share: float | None = None

    @property
    def per_branch(self) -> bool:
        return self.negative is not None

    @property
    def coefficients(self) -> tuple[float, ...]:
        """The positive branch's polynomial (both branches' when there is one)."""
        return self.positive.coefficients if self.per_branch else self.joint.coefficients

    @property
    def coefficients_negative(self) -> tuple[float, ...] | None:
        return self.negative.coefficients if self.per_branch else None

    @property
    def calibrated_range(self) -> tuple[float, float]:
        """The indicator distances fitted on, both branches together."""
        return self.joint.x_min, self.joint.x_max

    def describe(self) -> str:
        share = "" if self.residual_share is None else f"; per-branch residual {self.residual_share:.0%} of joint"
        if not self.per_branch:
            return f"one fit for both branches{share}"
        return (
            f"one fit per CFG branch (the branches differ{share}): positive {self.positive.num_points} points, "
            f"R^2 {self.positive.r_squared:.4f}; negative {self.negative.num_points} points, R^2 "
            f"{self.negative.r_squared:.4f}"
        )


def fit_branches(records: Sequence[DistanceRecord], degree: int = 4, branch_fits: str = "auto") -> BranchFits:
    """Fit the records of both CFG branches: one polynomial (`branch_fits` "joint"), one per branch ("separate"),
    or one per branch where that removes at least `BRANCHES_DIFFER_GAIN` of the joint fit's squared residual
    ("auto"). A run without a negative branch gets one polynomial whatever is asked."""
    if branch_fits not in BRANCH_FITS:
        raise ValueError(f"branch_fits must be one of {list(BRANCH_FITS)}, got {branch_fits!r}")
    joint = fit_polynomial([r.x for r in records], [r.y for r in records], degree)
    by_branch = {negative: [r for r in records if r.is_cfg_negative == negative] for negative in (False, True)}
    if branch_fits == "joint" or not all(by_branch.values()):
        return BranchFits(joint)
    fits = {
        negative: fit_polynomial([r.x for r in rs], [r.y for r in rs], degree) for negative, rs in by_branch.items()
    }

    def squared_residual(fit_of: Callable[[bool], PolynomialFit]) -> float:
        return sum(
            float(np.sum((np.array([r.y for r in rs]) - fit_of(negative)(np.array([r.x for r in rs]))) ** 2))
            for negative, rs in by_branch.items()
        )

    joint_residual = squared_residual(lambda _: joint)
    share = squared_residual(fits.__getitem__) / joint_residual if joint_residual > 0 else 1.0
    if branch_fits == "auto" and share > 1 - BRANCHES_DIFFER_GAIN:
        return BranchFits(joint, residual_share=share)
    return BranchFits(joint, fits[False], fits[True], share)


def _branch_fits(fit: PolynomialFit | BranchFits) -> BranchFits:
    return fit if isinstance(fit, BranchFits) else BranchFits(fit)


def plot_fit(
    records: Sequence[DistanceRecord],
    fit: PolynomialFit | BranchFits,
    path: str | Path,
    title: str,
    x_label: str,
    y_label: str,
) -> None:
    """Save a scatter of the records (one colour per CFG branch) with the fitted curve (one per branch where the
    branches have their own) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'teacache_models[demo]'") from error
    figure, axes = plt.subplots(figsize=(6, 4.2), dpi=110)
    for negative, colour, label in ((False, "tab:blue", "positive branch"), (True, "tab:orange", "negative branch")):
        xs = [r.x for r in records if r.is_cfg_negative == negative]
        ys = [r.y for r in records if r.is_cfg_negative == negative]
        if xs:
            axes.scatter(xs, ys, s=6, alpha=0.35, color=colour, label=label, linewidths=0)
    fits = _branch_fits(fit)
    curves = [(fits.joint, "black", "")]
    if fits.per_branch:
        curves = [(fits.positive, "navy", "positive "), (fits.negative, "darkred", "negative ")]
    for curve, colour, branch in curves:
        grid = np.linspace(curve.x_min, curve.x_max, 200)
        label = f"{branch}degree-{curve.degree} fit, $R^2$={curve.r_squared:.3f}"
        axes.plot(grid, curve(grid), color=colour, linewidth=1.5, label=label)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def calibration_source(fit: PolynomialFit | BranchFits, previous_source: str = "") -> str:
    """A preset's `source` saying where its coefficients come from, keeping the threshold's justification."""
    rest = previous_source
    if rest.startswith(_SOURCE_PREFIX):
        rest = rest.split("; ", 1)[1] if "; " in rest else ""
    fits = _branch_fits(fit)
    low, high = fits.calibrated_range
    if fits.per_branch:
        note = (
            f"{_SOURCE_PREFIX} fit per CFG branch on {fits.positive.num_points} + {fits.negative.num_points} points "
            f"(R^2 {fits.positive.r_squared:.3f} / {fits.negative.r_squared:.3f}, x in [{low:.3g}, {high:.3g}])"
        )
    else:
        note = (
            f"{_SOURCE_PREFIX} fit on {fits.joint.num_points} points (R^2 {fits.joint.r_squared:.3f}, "
            f"x in [{low:.3g}, {high:.3g}])"
        )
    return f"{note}; {rest}" if rest else note


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the lines that belong to the key at `start` (more indented than `indent`)."""
    end = start + 1
    while end < len(lines) and (not _is_content(lines[end]) or _indent(lines[end]) > indent):
        end += 1
    # Trailing blank or comment lines belong to what follows.
    while end > start + 1 and not _is_content(lines[end - 1]):
        end -= 1
    return end


def _find_key(lines: list[str], key: str, start: int, end: int, indent: int | None) -> int | None:
    pattern = re.compile(rf"^( *){re.escape(key)}:(\s|$)")
    for index in range(start, end):
        match = pattern.match(lines[index])
        if match and (indent is None or len(match.group(1)) == indent):
            return index
    return None


def _set_key(lines: list[str], start: int, end: int, child_indent: int, key: str, value: str) -> None:
    """Replace the value (with any continuation lines) of `key` in lines[start:end], or insert it at `start`."""
    index = _find_key(lines, key, start, end, child_indent)
    new_line = f"{' ' * child_indent}{key}: {value}\n"
    if index is None:
        lines.insert(start, new_line)
        return
    lines[index : _block_end(lines, index, child_indent)] = [new_line]


def _drop_key(lines: list[str], start: int, end: int, child_indent: int, key: str) -> None:
    """Remove `key` (with any continuation lines) from lines[start:end], if it is there."""
    index = _find_key(lines, key, start, end, child_indent)
    if index is not None:
        del lines[index : _block_end(lines, index, child_indent)]


def _coefficients_text(coefficients: Sequence[float]) -> str:
    return "[" + ", ".join(f"{c:.8e}" for c in coefficients) + "]"


def _range_text(fits: BranchFits | tuple[float, float]) -> str:
    low, high = fits.calibrated_range if isinstance(fits, BranchFits) else fits
    return f"[{low:.6g}, {high:.6g}]"


def _check_written(path: Path, where: str, written: Any, fits: BranchFits | TeaCacheParams) -> None:
    """`written` (a preset's params or a fit read back by the zoo loader) holds the polynomials of `fits`."""

    def same(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
        if a is None or b is None:
            return a is b
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-7) for x, y in zip(a, b, strict=True))

    if not (
        same(written.coefficients, fits.coefficients)
        and same(written.coefficients_negative, fits.coefficients_negative)
    ):
        raise RuntimeError(f"{path}: {where} did not take the new coefficients")


def presets_using(
    presets: Mapping[str, Mapping[str, Any]],
    indicator: str,
    default_indicator: str,
    use_ret_steps: bool | None = None,
) -> list[str]:
    """Names of the presets (a zoo config's `teacache.presets`, as read from YAML) that use `indicator`: a preset
    without an `indicator` key uses `default_indicator`; `use_ret_steps` True or False keeps that mode only."""
    return [
        name
        for name, preset in presets.items()
        if (preset.get("indicator") or default_indicator) == indicator
        and (use_ret_steps is None or bool(preset.get("use_ret_steps", False)) == use_ret_steps)
    ]


def write_coefficients(
    config_path: str | Path,
    indicator: str,
    fit: PolynomialFit | BranchFits,
    default_indicator: str,
    use_ret_steps: bool | None = None,
) -> list[str]:
    """Set the coefficients (and `coefficients_negative` where the branches have their own fits, else remove
    it), their `calibrated_range` (the indicator distances fitted on) and `source` of every preset of a zoo
    config that uses `indicator`, and of the entry's fit for it in `teacache.fits`, if it has one there.

    Edits the YAML text so comments and every other key stay as they are. A preset without an `indicator` key
    uses `default_indicator` (the model's default). `use_ret_steps` True or False limits the update to presets
    of that mode. A forecast preset (`method: forecast`) keeps its `source`, which justifies its threshold, not a
    fit: it gets the new polynomials only if it carries its own, else it takes them from the others when the
    file is read. A fit in `teacache.fits` is rewritten whole: its new source says where it comes from and a
    `borrowed_from` goes (the fit is now the checkpoint's own). Returns the names of the presets written; the
    file is written only once the zoo loader reads the result, so a broken result fails here.
    """
    import yaml

    from .zoo import EXPERT_NAMES

    path = Path(config_path)
    text = path.read_text()
    teacache_data = (yaml.safe_load(text) or {}).get("teacache") or {}
    presets = teacache_data.get("presets") or {}
    entry_fits = teacache_data.get("fits") or {}
    # A fit keyed by indicator (per-expert fits are `write_expert_fits`' business).
    in_fits = indicator in entry_fits and not set(entry_fits) & set(EXPERT_NAMES)
    chosen = presets_using(presets, indicator, default_indicator, use_ret_steps)
    if not chosen and not in_fits:
        raise ValueError(
            f"{path} has no TeaCache preset using indicator {indicator!r}"
            + ("" if use_ret_steps is None else f" with use_ret_steps={use_ret_steps}")
            + f" and no teacache.fits entry for it; its presets: {sorted(presets)}"
        )
    # A forecast preset needs no fit (its coefficients only feed the fit monitor): one that carries none
    # inherits the fit written into the others, and its source is never rewritten.
    forecast = {name for name in chosen if presets[name].get("method") == FORECAST}
    written = [name for name in chosen if name not in forecast or presets[name].get("coefficients") is not None]
    if in_fits:
        # The fit goes to teacache.fits; presets that carry no coefficients take it from there.
        written = [name for name in written if presets[name].get("coefficients") is not None]
    if not written and not in_fits:
        raise ValueError(
            f"{path}: the presets using indicator {indicator!r} ({chosen}) are forecast presets without "
            "coefficients; give one of them a `coefficients:` line (or add a TeaCache preset) to write the fit to"
        )
    lines = text.splitlines(keepends=True)
    teacache = _find_key(lines, "teacache", 0, len(lines), 0)
    teacache_end = None if teacache is None else _block_end(lines, teacache, 0)
    presets_at = None if teacache is None else _find_key(lines, "presets", teacache + 1, teacache_end, None)
    if presets_at is None:
        raise ValueError(f"{path}: expected a block-style 'teacache:' mapping with a 'presets:' key")
    presets_indent = _indent(lines[presets_at])
    fits = _branch_fits(fit)
    for name in written:
        presets_end = _block_end(lines, presets_at, presets_indent)
        header = next(
            i
            for i in range(presets_at + 1, presets_end)
            if _is_content(lines[i]) and _indent(lines[i]) > presets_indent and lines[i].strip().startswith(f"{name}:")
        )
        header_indent = _indent(lines[header])
        end = _block_end(lines, header, header_indent)
        child_indent = next((_indent(line) for line in lines[header + 1 : end] if _is_content(line)), None)
        if child_indent is None:
            raise ValueError(f"{path}: preset {name!r} is written in flow style ({{...}}); write it as a block first")
        source = calibration_source(fits, str(presets[name].get("source", "")))
        values = {} if name in forecast else {"source": _yaml_string(source)}
        values |= {
            "coefficients": _coefficients_text(fits.coefficients),
            "coefficients_negative": fits.coefficients_negative and _coefficients_text(fits.coefficients_negative),
            "calibrated_range": _range_text(fits),
        }
        for key, value in values.items():
            end = _block_end(lines, header, header_indent)
            if value is None:
                _drop_key(lines, header + 1, end, child_indent, key)
            else:
                _set_key(lines, header + 1, end, child_indent, key, value)
    if in_fits:
        _replace_fit(lines, teacache, indicator, fits)
    entry = _write_checked(path, "".join(lines))
    if in_fits:
        _check_written(path, f"teacache.fits.{indicator}", entry.fits[indicator], fits)
    for name in chosen:
        _check_written(path, f"preset {name!r}", entry.presets[name].params, fits)
    return written


def _replace_fit(lines: list[str], teacache: int, indicator: str, fits: BranchFits) -> None:
    """Replace the block (or flow-style line) of `teacache.fits.<indicator>` with the new fit, in block style."""
    end = _block_end(lines, teacache, 0)
    step = next(_indent(line) for line in lines[teacache + 1 : end] if _is_content(line))
    fits_at = _find_key(lines, "fits", teacache + 1, end, step)
    if fits_at is None:
        raise ValueError("expected a block-style 'teacache.fits:' mapping")
    at = _find_key(lines, indicator, fits_at + 1, _block_end(lines, fits_at, step), None)
    if at is None:
        raise ValueError(f"expected a block-style 'teacache.fits:' mapping with a '{indicator}:' key")
    indent = _indent(lines[at])
    values = {
        "coefficients": _coefficients_text(fits.coefficients),
        "coefficients_negative": fits.coefficients_negative and _coefficients_text(fits.coefficients_negative),
        "calibrated_range": _range_text(fits),
        "source": _yaml_string(calibration_source(fits)),
    }
    block = [f"{' ' * indent}{indicator}:\n"]
    block += [f"{' ' * (indent + step)}{key}: {value}\n" for key, value in values.items() if value is not None]
    lines[at : _block_end(lines, at, indent)] = block


def _yaml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def record_runs(
    model: TeaCacheMixin, run: Callable[[TeaCacheParams], Any], indicator: str | None, target: str = "output"
) -> list[DistanceRecord]:
    """Call `run(params)` (one or more generations with those TeaCache params) while recording `model`."""
    return record_runs_per_model({"model": model}, run, indicator, target)["model"]


def record_runs_per_model(
    models: Mapping[str, TeaCacheMixin],
    run: Callable[[TeaCacheParams], Any],
    indicator: str | None,
    target: str = "output",
) -> dict[str, list[DistanceRecord]]:
    """Call `run(params)` once while recording each of `models` ({name: model}) on its own, as Wan2.2 A14B's
    two experts: each expert's records pair only its own consecutive steps (none across the switch)."""
    with ExitStack() as stack:
        recorders = {name: stack.enter_context(DistanceRecorder(model, target)) for name, model in models.items()}
        run(calibration_params(indicator))
    return {name: recorder.records for name, recorder in recorders.items()}


def write_expert_fits(config_path: str | Path, indicator: str, fits: Mapping[str, PolynomialFit | BranchFits]) -> None:
    """Set each expert's fit of `indicator` in `teacache.fits` of a two-expert zoo config ({expert: {indicator:
    {coefficients, coefficients_negative (where the expert's branches differ), calibrated_range, source}}});
    fits of other indicators are kept (shared ones are copied to each expert).

    Rewrites the `fits:` block (comments inside it are dropped; every other line stays as it is); the file is
    written only once the zoo loader reads the result, so a broken result fails here and leaves it as it was.
    """
    import yaml

    from .zoo import EXPERT_NAMES

    if set(fits) != set(EXPERT_NAMES):
        raise ValueError(f"fits must hold one fit per expert {list(EXPERT_NAMES)}, got {sorted(fits)}")
    path = Path(config_path)
    text = path.read_text()
    teacache_data = (yaml.safe_load(text) or {}).get("teacache") or {}
    presets = (teacache_data.get("presets") or {}).items()
    carrying = [name for name, preset in presets if {"coefficients", "calibrated_range"} & set(preset)]
    if carrying:
        raise ValueError(
            f"{path}: presets {carrying} carry coefficients or a calibrated range, which would override both "
            "experts' fits: move them to teacache.fits first"
        )
    old = teacache_data.get("fits") or {}
    per_expert = old if any(name in EXPERT_NAMES for name in old) else {name: old for name in EXPERT_NAMES}
    lines = text.splitlines(keepends=True)
    teacache = _find_key(lines, "teacache", 0, len(lines), 0)
    if teacache is None:
        raise ValueError(f"{path}: expected a block-style 'teacache:' mapping")
    end = _block_end(lines, teacache, 0)
    step = next(_indent(line) for line in lines[teacache + 1 : end] if _is_content(line))
    block = [f"{' ' * step}fits:\n"]
    for expert in EXPERT_NAMES:
        block.append(f"{' ' * 2 * step}{expert}:\n")
        expert_fits = dict(per_expert.get(expert) or {})
        fit = _branch_fits(fits[expert])
        expert_fits[indicator] = {
            "coefficients": _coefficients_text(fit.coefficients),
            **({"coefficients_negative": _coefficients_text(fit.coefficients_negative)} if fit.per_branch else {}),
            "calibrated_range": _range_text(fit),
            "source": _yaml_string(calibration_source(fit)),
        }
        for name, entry in expert_fits.items():
            block.append(f"{' ' * 3 * step}{name}:\n")
            for key, value in entry.items():
                if name != indicator:
                    value = _yaml_string(str(value)) if isinstance(value, str) else json.dumps(value)
                block.append(f"{' ' * 4 * step}{key}: {value}\n")
    index = _find_key(lines, "fits", teacache + 1, end, step)
    if index is None:
        lines[teacache + 1 : teacache + 1] = block
    else:
        lines[index : _block_end(lines, index, step)] = block
    entry = _write_checked(path, "".join(lines))
    for expert, fit in fits.items():
        _check_written(path, f"expert {expert!r}", entry.rescaling_fits(expert)[indicator], _branch_fits(fit))


def write_threshold_table(
    config_path: str | Path, preset: str, rows: Sequence[tuple[float, float, float]], source: str
) -> None:
    """Set `teacache.threshold_table` of a zoo config: the rows [threshold, mean computed fraction, mean PSNR dB]
    measured with preset `preset`'s settings. One flow-style line, so the rest of the file stays as it is."""

    path = Path(config_path)
    lines = path.read_text().splitlines(keepends=True)
    teacache = _find_key(lines, "teacache", 0, len(lines), 0)
    if teacache is None:
        raise ValueError(f"{path}: expected a block-style 'teacache:' mapping")
    end = _block_end(lines, teacache, 0)
    child_indent = next(_indent(line) for line in lines[teacache + 1 : end] if _is_content(line))
    cells = ", ".join(f"[{t:.6g}, {f:.4f}, {p:.2f}]" for t, f, p in rows)
    value = f"{{preset: {preset}, source: {_yaml_string(source)}, rows: [{cells}]}}"
    _set_key(lines, teacache + 1, end, child_indent, "threshold_table", value)
    table = _write_checked(path, "".join(lines)).threshold_table
    if table is None or len(table.rows) != len(rows):
        raise RuntimeError(f"{path}: the threshold table did not read back")


def _write_checked(path: Path, text: str) -> Any:
    """Write `text` to the zoo config `path` once the zoo loader reads it (tried as a file beside it, so relative
    LoRA paths resolve the same): a result the loader refuses raises its error and leaves `path` as it was."""
    from .zoo import load_zoo_entry

    trial = path.with_name(f".{path.stem}.writing{path.suffix}")
    trial.write_text(text)
    try:
        load_zoo_entry(trial)
    except ValueError as error:
        trial.unlink()
        raise ValueError(f"{str(error).replace(str(trial), str(path))} (the file was left as it was)") from None
    except BaseException:
        trial.unlink()
        raise
    trial.replace(path)
    return load_zoo_entry(path)


def threshold_for_psnr(
    rows: Sequence[tuple[float, float, float]], min_psnr_db: float = MIN_PSNR_DB
) -> tuple[float, float, float]:
    """The row [threshold, mean computed fraction, mean PSNR dB] of a measured threshold table with the largest
    threshold up to which every threshold keeps the mean PSNR at or above `min_psnr_db`."""
    if not rows:
        raise ValueError("the threshold table is empty: no threshold was measured")
    chosen = None
    for row in sorted(rows):
        if row[2] < min_psnr_db:
            break
        chosen = row
    if chosen is None:
        smallest = min(rows)
        raise ValueError(
            f"no measured threshold keeps a mean PSNR of {min_psnr_db:g} dB against uncached: the smallest, "
            f"{smallest[0]:g}, gives {smallest[2]:.2f} dB"
        )
    return chosen


def threshold_rule_note(
    rows: Sequence[tuple[float, float, float]],
    chosen: tuple[float, float, float],
    min_psnr_db: float,
    pairs: int,
    steps: int | None = None,
) -> str:
    """How a threshold chosen by `threshold_for_psnr` was chosen, with the numbers measured (on `pairs`
    prompt/seed pairs of `steps` steps): for a preset's `source`."""
    ordered = sorted(rows)
    above = ordered[ordered.index(chosen) + 1 :]
    after = (
        f"next measured, {above[0][0]:g}: {above[0][1]:.1%} computed, {above[0][2]:.2f} dB"
        if above
        else "the largest threshold measured"
    )
    return (
        f"threshold: scripts/calibrate.py, the largest measured threshold up to which the mean PSNR against "
        f"uncached stays >= {min_psnr_db:g} dB on {pairs} prompt/seed pairs"
        f"{'' if steps is None else f' of {steps} steps'}: {chosen[0]:g}, {chosen[1]:.1%} of the "
        f"block-stack calls computed, {chosen[2]:.2f} dB ({after}; every row in teacache.threshold_table)"
    )


def _preset_lines(params: TeaCacheParams, source: str, indent: int) -> list[str]:
    """YAML lines of a preset: the threshold and the indicator, every other field that differs from
    `TeaCacheParams`' defaults, and `source`."""
    import yaml

    defaults = TeaCacheParams()
    lines = []
    for field in dataclasses.fields(TeaCacheParams):
        value = getattr(params, field.name)
        always = field.name in ("teacache_thresh", "indicator")
        if value is None or (not always and value == getattr(defaults, field.name)):
            continue
        if field.name in ("coefficients", "coefficients_negative"):
            text = _coefficients_text(value)
        elif field.name == "calibrated_range":
            text = _range_text(value)
        elif isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w-]*", value) and yaml.safe_load(value) == value:
            text = value  # a plain name (indicator, method) reads as the hand-written presets do
        else:
            text = json.dumps(value)
        lines.append(f"{' ' * indent}{field.name}: {text}\n")
    return [*lines, f"{' ' * indent}source: {_yaml_string(source)}\n"]


def add_preset(
    config_path: str | Path, name: str, params: TeaCacheParams, source: str, make_default: bool = False
) -> None:
    """Add TeaCache preset `name` to a zoo config: `params`' threshold and indicator, its other fields that
    differ from `TeaCacheParams`' defaults (coefficients, `calibrated_range` ... where it carries them) and
    `source`, as a block after the existing presets (`presets: {}` becomes a block); `make_default` also sets
    `teacache.default` to it.

    Edits the YAML text so comments and every other key stay as they are; the file is written only once the zoo
    loader reads the result, so a broken result fails here and leaves it as it was.
    """
    import yaml

    path = Path(config_path)
    text = path.read_text()
    existing = ((yaml.safe_load(text) or {}).get("teacache") or {}).get("presets") or {}
    if name in existing:
        raise ValueError(f"{path} already has a TeaCache preset {name!r}; its presets: {sorted(existing)}")
    lines = text.splitlines(keepends=True)
    teacache = _find_key(lines, "teacache", 0, len(lines), 0)
    end = None if teacache is None else _block_end(lines, teacache, 0)
    step = None if teacache is None else next(_indent(line) for line in lines[teacache + 1 : end] if _is_content(line))
    presets_at = None if teacache is None else _find_key(lines, "presets", teacache + 1, end, step)
    if presets_at is None:
        raise ValueError(f"{path}: expected a block-style 'teacache:' mapping with a 'presets:' key")
    value = lines[presets_at].split(":", 1)[1].split("#", 1)[0].strip()
    if value == "{}":
        lines[presets_at] = f"{' ' * step}presets:\n"
    elif value:
        raise ValueError(f"{path}: teacache.presets is written in flow style ({value}); write it as a block first")
    presets_end = _block_end(lines, presets_at, step)
    # The new preset takes the indent of the presets already there, else one step more than `presets:`.
    indent = next((_indent(line) for line in lines[presets_at + 1 : presets_end] if _is_content(line)), 2 * step)
    lines[presets_end:presets_end] = [
        f"{' ' * indent}# Added by scripts/calibrate.py --write-config.\n",
        f"{' ' * indent}{name}:\n",
        *_preset_lines(params, source, indent + step),
    ]
    if make_default:
        _set_key(lines, teacache + 1, _block_end(lines, teacache, 0), step, "default", name)
    entry = _write_checked(path, "".join(lines))
    written = entry.presets[name].params
    if written.teacache_thresh != params.teacache_thresh or (make_default and entry.default_preset != name):
        raise RuntimeError(f"{path}: preset {name!r} did not read back as written")
    if params.coefficients is not None:
        _check_written(path, f"preset {name!r}", written, params)
