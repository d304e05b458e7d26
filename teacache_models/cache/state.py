"""TeaCache state of one generation: per CFG branch, plus the statistics a caller reads afterwards."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..params import TeaCacheParams
from .forecast import Trace, along, extrapolate

__all__ = [
    "BranchState",
    "BranchStats",
    "CoefficientFit",
    "StepContext",
    "StepObservation",
    "TeaCacheSession",
    "TeaCacheStats",
    "branch_name",
]


def branch_name(is_cfg_negative: bool) -> str:
    return "negative" if is_cfg_negative else "positive"


@dataclass
class BranchState:
    """What one CFG branch remembers between its steps.

    `input_signature` describes the block-stack input and indicator of the previous step (shape, dtype,
    device); a step whose signature differs cannot reuse the residual and always computes.
    """

    previous_modulated_input: torch.Tensor | None = None
    previous_residual: torch.Tensor | None = None
    # For `residual_order=1`: the step of `previous_residual`, and the residual and step computed before it.
    previous_residual_step: int | None = None
    older_residual: torch.Tensor | None = None
    older_residual_step: int | None = None
    accumulated_rel_l1_distance: float = 0.0
    consecutive_skips: int = 0
    input_signature: tuple | None = None
    computed_steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    # Computed steps that the threshold would have skipped: `max_consecutive_skips` made them compute.
    limit_forced_steps: list[int] = field(default_factory=list)
    # Method "forecast": the indicator at the last two computed steps, which it forecasts the indicator from.
    indicator_trace: Trace = field(default_factory=Trace)
    # `forecast_slope="indicator"`: (step, factor) of the latest decision, the factor a skip there carries by.
    forecast_factor: tuple[int, float] | None = None
    # `forecast_cadence`: (the branch's first gap, the step whose decision set it); None until the threshold
    # first makes the branch compute.
    cadence_gap: tuple[int, int] | None = None

    def stats(self, coefficient_fit: CoefficientFit | None = None) -> BranchStats:
        return BranchStats(
            tuple(self.computed_steps), tuple(self.skipped_steps), tuple(self.limit_forced_steps), coefficient_fit
        )

    def skip_residual(self, step_index: int, params: TeaCacheParams) -> torch.Tensor:
        """What a skipped step adds to the block-stack input (see `TeaCacheParams.residual_order` and
        `extrapolation_scale`)."""
        if params.residual_order == 0:
            return self.previous_residual
        measured = self.forecast_factor
        if measured is not None and measured[0] == step_index and self.older_residual is not None:
            return along(self.previous_residual, self.older_residual, measured[1])
        return extrapolate(
            self.previous_residual,
            self.previous_residual_step,
            self.older_residual,
            self.older_residual_step,
            step_index,
            params.extrapolation_scale,
        )

    def record_residual(self, residual: torch.Tensor, step_index: int, order: int) -> None:
        """Keep a computed step's residual (and, for order 1, the one before it if it has the same shape,
        dtype and device)."""
        previous = self.previous_residual
        keep_older = (
            order >= 1
            and previous is not None
            and (previous.shape, previous.dtype, previous.device) == (residual.shape, residual.dtype, residual.device)
        )
        self.older_residual = previous if keep_older else None
        self.older_residual_step = self.previous_residual_step if keep_older else None
        self.previous_residual = residual
        self.previous_residual_step = step_index
        self.consecutive_skips = 0

    @property
    def last_step(self) -> int | None:
        """The latest step index this branch recorded (computed or skipped), None before its first."""
        steps = self.computed_steps[-1:] + self.skipped_steps[-1:]
        return max(steps) if steps else None

    def forget_step(self, step_index: int) -> None:
        """Undo a step whose call raised: drop it from the record and make the branch's next step compute.

        The failure may have come between the decision and the residual it would have cached, so the
        indicator and residual kept so far no longer belong together.
        """
        for steps in (self.computed_steps, self.skipped_steps, self.limit_forced_steps):
            if steps and steps[-1] == step_index:
                steps.pop()
        if self.cadence_gap is not None and self.cadence_gap[1] == step_index:
            self.cadence_gap = None
        self.release_tensors()
        self.previous_residual_step = self.older_residual_step = None
        self.accumulated_rel_l1_distance = 0.0
        self.consecutive_skips = 0

    def release_tensors(self) -> None:
        self.indicator_trace.clear()
        self.forecast_factor = None
        self.previous_modulated_input = None
        self.previous_residual = None
        self.older_residual = None
        self.input_signature = None


@dataclass(frozen=True)
class StepObservation:
    """What a step observer (`TeaCacheMixin.add_teacache_observer`) sees of one step of one CFG branch.

    Attributes:
        generation: counts the model's `enable_teacache` calls (-1 before the first).
        step_index, is_cfg_negative: the step and branch declared by `teacache_step()`.
        indicator_name: the indicator of the running generation (the model's default when TeaCache is off).
        indicator: the indicator the decision read, None when TeaCache made no decision (off, or switched off).
        hidden_states, output: the block stack's input and output (on a skipped step: the input plus the
            cached residual).
        skipped: TeaCache reused the residual instead of running the blocks.
        distance: the indicator's relative L1 change from the branch's previous step, None on a forced step.
        accumulated_rel_l1_distance: the branch's accumulator after the decision, None without a decision
            (method "forecast": the step's forecast error if it skipped, 0 if it computed).
        teacache_params: the running generation's parameters, None when TeaCache is off.
        row: under per-sample state (`TeaCacheParams.per_sample`), the batch row this observation is of (its
            tensors are that row's, batch size 1, and `teacache_params` that row's); None for a whole batch.
    """

    generation: int
    step_index: int
    is_cfg_negative: bool
    indicator_name: str
    indicator: torch.Tensor | None
    hidden_states: torch.Tensor
    output: torch.Tensor
    skipped: bool
    distance: float | None
    accumulated_rel_l1_distance: float | None
    teacache_params: TeaCacheParams | None
    row: int | None = None


@dataclass
class StepContext:
    """The step and CFG branch a `teacache_step()` (or `teacache_rows_step()`) context declares for one call."""

    step_index: int
    is_cfg_negative: bool
    batched_cfg: bool = False
    used: bool = False
    # The branches whose state the call has changed (both for a batched call split per branch): what a
    # failed call must undo.
    planned: list[bool] = field(default_factory=list)
    # What the decision saw, for the step observers: the indicator and its relative L1 distance.
    indicator: torch.Tensor | None = None
    distance: float | None = None
    # A call of requests batched step by step (`teacache_rows_step`): each row's state and step index.
    rows: list[TeaCacheSession] | None = None
    row_steps: list[int] | None = None


@dataclass
class TeaCacheSession:
    """One generation's cache: created by `enable_teacache`, read by `teacache_stats`.

    Under per-sample state `rows` holds one session per batch row (each with its own params, branches and
    fit monitor); `row_params` are what rows are made from (one per row, or one for any batch size).
    """

    params: TeaCacheParams
    coefficients: tuple[float, ...]
    num_inference_steps: int
    first_forced_steps: int
    last_forced_steps: int
    active: bool = True
    closed: bool = False
    disabled_reason: str | None = None
    branches: dict[bool, BranchState] = field(default_factory=lambda: {False: BranchState(), True: BranchState()})
    # The generation's FitMonitor (`monitor.py`) and the handle of its step observer.
    monitor: Any = None
    monitor_handle: Any = None
    rows: list[TeaCacheSession] | None = None
    row_params: tuple[TeaCacheParams, ...] = ()
    # The negative CFG branch's own polynomial, where the fit has one (None: `coefficients`).
    coefficients_negative: tuple[float, ...] | None = None

    def branch_coefficients(self, is_cfg_negative: bool) -> tuple[float, ...]:
        return (self.coefficients_negative if is_cfg_negative else None) or self.coefficients

    @property
    def per_sample(self) -> bool:
        return bool(self.row_params)

    def stats(self, enabled: bool, disabled_reason: str | None) -> TeaCacheStats:
        """This session's record, per branch, with its fit monitor's judgement of the coefficients."""
        positive, negative = self.branches[False], self.branches[True]
        return TeaCacheStats(
            enabled=enabled,
            teacache_thresh=self.params.teacache_thresh,
            num_inference_steps=self.num_inference_steps,
            positive=positive.stats(self.monitor.fit(False)),
            negative=negative.stats(self.monitor.fit(True)),
            disabled_reason=disabled_reason,
        )

    def release_tensors(self) -> None:
        for state in self.branches.values():
            state.release_tensors()
        if self.monitor is not None:
            self.monitor.release_tensors()
        for row in self.rows or ():
            row.release_tensors()


# A fit is judged from this many (predicted, actual) pairs of a branch at least.
MIN_POINTS = 3
# Actual / predicted change, as a geometric mean, outside [1 / FACTOR, FACTOR]: the coefficients do not fit.
# On the demo models at their presets (10 prompts x 2 seeds, both branches) their own fits read 0.87-1.07 per
# generation; Wan-family coefficients on the Flux demo (Wan2.1-1.3B's, wan-digits') and FLUX.1-dev's on
# either demo 0.49-0.69.
MISFIT_FACTOR = 1.3


@dataclass(frozen=True)
class CoefficientFit:
    """The coefficients against one branch's block stack during one generation.

    Attributes:
        points: computed steps with a prediction (a branch's first step and forced steps have none).
        consecutive_points: those that directly follow a computed step.
        mean_ratio: geometric mean of actual / predicted change since the branch's previous computed step,
            over all points; 1 is a perfect fit. Over a span of skipped steps the prediction is the
            accumulator scaled by how straight the indicator moved (see `monitor.py`). None without a point.
        r_squared: 1 - SS_res / SS_tot of the actual changes against the predicted ones; None under 2 points.
        steps_with_distance: steps whose indicator distance was computed (skipped steps included).
        nonpositive_predictions: those of them where the polynomial predicted no change or a negative one.
        indicator_range: the smallest and largest indicator distance seen; None when none was computed.
        calibrated_range: the distances the coefficients were fitted on (`TeaCacheParams.calibrated_range`,
            else the model's fit's).
        outside_range_steps: the steps whose distance fell outside `calibrated_range`.
    """

    points: int = 0
    consecutive_points: int = 0
    mean_ratio: float | None = None
    r_squared: float | None = None
    steps_with_distance: int = 0
    nonpositive_predictions: int = 0
    indicator_range: tuple[float, float] | None = None
    calibrated_range: tuple[float, float] | None = None
    outside_range_steps: tuple[int, ...] = ()

    @property
    def outside_calibrated_range(self) -> bool | None:
        """Whether some step's indicator distance fell outside `calibrated_range`; None when it is unknown."""
        return None if self.calibrated_range is None else bool(self.outside_range_steps)

    @property
    def misfit(self) -> bool:
        """True when the coefficients clearly do not describe this block stack."""
        if self.steps_with_distance >= MIN_POINTS and self.nonpositive_predictions * 2 > self.steps_with_distance:
            return True  # the indicator moves, and the polynomial says the output does not
        judged = self.points >= MIN_POINTS and self.mean_ratio is not None
        return judged and abs(math.log(self.mean_ratio)) > math.log(MISFIT_FACTOR)

    def as_dict(self) -> dict[str, Any]:
        return {
            "points": self.points,
            "consecutive_points": self.consecutive_points,
            "mean_ratio": self.mean_ratio,
            "r_squared": self.r_squared,
            "steps_with_distance": self.steps_with_distance,
            "nonpositive_predictions": self.nonpositive_predictions,
            "indicator_range": list(self.indicator_range) if self.indicator_range else None,
            "calibrated_range": list(self.calibrated_range) if self.calibrated_range else None,
            "outside_range_steps": list(self.outside_range_steps),
            "outside_calibrated_range": self.outside_calibrated_range,
            "misfit": self.misfit,
        }

    def describe(self) -> str:
        ratio = "n/a" if self.mean_ratio is None else f"{self.mean_ratio:.2f}"
        text = f"actual/predicted change {ratio} over {self.points} computed steps"
        if self.nonpositive_predictions:
            text += f", change predicted <= 0 at {self.nonpositive_predictions} of {self.steps_with_distance} steps"
        return text


@dataclass(frozen=True)
class BranchStats:
    """Which step indices of one CFG branch ran the block stack and which reused the cached residual.

    `limit_forced_steps`, a subset of `computed_steps`, are those that computed only because
    `max_consecutive_skips` steps had been skipped in a row: the threshold did not decide them.
    `coefficient_fit` says how well the coefficients predicted this branch's block-stack output.
    """

    computed_steps: tuple[int, ...] = ()
    skipped_steps: tuple[int, ...] = ()
    limit_forced_steps: tuple[int, ...] = ()
    # Measurements in floating point, which differ in the last bits between equal schedules (another
    # reduction order, sequence-parallel shards): two records compare equal when their schedules do.
    coefficient_fit: CoefficientFit | None = field(default=None, compare=False)

    @property
    def num_computed(self) -> int:
        return len(self.computed_steps)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_steps)


@dataclass(frozen=True)
class TeaCacheStats:
    """The latest generation's TeaCache record, per CFG branch.

    `enabled` says whether TeaCache is still switched on; `disabled_reason` says why it switched itself
    off during the generation, if it did.
    """

    enabled: bool = False
    teacache_thresh: float | None = None
    num_inference_steps: int | None = None
    positive: BranchStats = BranchStats()
    negative: BranchStats = BranchStats()
    disabled_reason: str | None = None
    # Per-sample state (`TeaCacheParams.per_sample`): one record per batch row; `positive` and `negative`
    # then stay empty, since no schedule belongs to the batch as a whole.
    rows: tuple[TeaCacheStats, ...] = ()

    @property
    def num_computed(self) -> int:
        if self.rows:
            return sum(row.num_computed for row in self.rows)
        return self.positive.num_computed + self.negative.num_computed

    @property
    def num_skipped(self) -> int:
        if self.rows:
            return sum(row.num_skipped for row in self.rows)
        return self.positive.num_skipped + self.negative.num_skipped

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON: the numbers of a run's sidecar."""
        if self.rows:
            return {
                "enabled": self.enabled,
                "num_inference_steps": self.num_inference_steps,
                "disabled_reason": self.disabled_reason,
                "rows": [row.as_dict() for row in self.rows],
            }
        return {
            "enabled": self.enabled,
            "teacache_thresh": self.teacache_thresh,
            "num_inference_steps": self.num_inference_steps,
            "disabled_reason": self.disabled_reason,
            "branches": {
                name: {
                    "computed_steps": list(stats.computed_steps),
                    "skipped_steps": list(stats.skipped_steps),
                    "limit_forced_steps": list(stats.limit_forced_steps),
                    "coefficient_fit": stats.coefficient_fit.as_dict() if stats.coefficient_fit else None,
                }
                for name, stats in (("positive", self.positive), ("negative", self.negative))
            },
        }

    def summary(self) -> str:
        """One line: computed and skipped steps per branch (per row under per-sample state)."""
        if self.rows:
            return "; ".join(f"row {i}: {row.summary()}" for i, row in enumerate(self.rows))
        parts = []
        for name, stats in (("positive", self.positive), ("negative", self.negative)):
            if stats.num_computed or stats.num_skipped:
                forced = stats.limit_forced_steps
                by_limit = f" ({len(forced)} by max_consecutive_skips)" if forced else ""
                parts.append(f"{name}: {stats.num_computed} computed{by_limit}, {stats.num_skipped} skipped")
                parts[-1] += _fit_note(stats.coefficient_fit)
        text = "; ".join(parts) if parts else "no cached steps recorded"
        if self.disabled_reason:
            text += f" (TeaCache disabled: {self.disabled_reason})"
        return text


def _fit_note(fit: CoefficientFit | None) -> str:
    """What the summary line adds about the coefficients: only what needs attention."""
    if fit is None:
        return ""
    notes = []
    if fit.misfit:
        notes.append(f"coefficients do not fit: {fit.describe()}")
    if fit.outside_range_steps:
        notes.append(f"indicator outside the calibrated range at {len(fit.outside_range_steps)} steps")
    return f" ({'; '.join(notes)})" if notes else ""
