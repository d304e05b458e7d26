"""Fitting TeaCache's rescaling polynomial: record distances during uncached runs, fit, plot.

TeaCache skips the block stack while the accumulated, rescaled change of a cheap indicator stays below a
threshold. The rescaling polynomial maps the indicator's relative L1 change between consecutive steps (x)
to the change of what the blocks produce (y). Calibration observes both during generations that skip
nothing and fits `numpy.polyfit(x, y, degree)`, per model.

Recording works on any model with the `TeaCacheMixin` seam and any sampler that declares its steps with
`model.teacache_step(...)`: `DistanceRecorder` watches each step through the model's step observer
(`add_teacache_observer`) while the sampler runs with `calibration_params(indicator)`, a threshold of 0
(bit-identical to an uncached run) that makes the model compute the chosen indicator at every step.
Writing a fit, a threshold table or a new preset into a zoo config: `calibration_config`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache.mixin import TeaCacheMixin, relative_l1_distance
from .cache.state import StepObservation
from .params import TeaCacheParams

__all__ = [
    "BRANCH_FITS",
    "TARGETS",
    "BranchFits",
    "DistanceRecord",
    "DistanceRecorder",
    "PolynomialFit",
    "as_branch_fits",
    "calibration_params",
    "fit_branches",
    "fit_polynomial",
    "plot_fit",
    "record_runs",
    "record_runs_per_model",
]

# What y measures: the block stack's output, or its residual (output - input), which TeaCache caches.
TARGETS = ("output", "residual")
# How `fit_branches` treats the two CFG branches: one polynomial for both, one each, or one each when they differ.
BRANCH_FITS = ("auto", "joint", "separate")
# "auto" fits per branch when that removes at least this share of the joint fit's squared residual. The
# demo models' branches leave 96-99% of it (one polynomial serves both).
BRANCHES_DIFFER_GAIN = 0.2


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


def as_branch_fits(fit: PolynomialFit | BranchFits) -> BranchFits:
    """A fit as `BranchFits`: one polynomial is the joint fit of both branches."""
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
    fits = as_branch_fits(fit)
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
