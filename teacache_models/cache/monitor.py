"""How well a generation's coefficients fit the model: a step observer every TeaCache generation carries.

At each computed step of a branch the block stack has just run, so the actual relative L1 change of its
output since the branch's last computed step is known. The rescaling polynomial predicted the change of one
step from the indicator's change over that step; over a span of skipped steps TeaCache sums these
predictions (the accumulator). The output's change over the span (the chord) is shorter than the sum of its
steps' changes (the path) wherever it turns; the monitor estimates by how much from the indicator, whose
chord and path it sees: the prediction of the span's change is

    accumulator * (indicator chord / indicator path) ** SPAN_STRAIGHTNESS_EXPONENT

which is the accumulator itself between consecutive computed steps (chord = path). The monitor keeps these
(predicted, actual) pairs per branch and the indicator distances it saw; at the generation's last step it
judges the fit and warns once when the coefficients clearly do not describe the model (another checkpoint's
fit, a LoRA or a fine-tune), naming `scripts/calibrate.py`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..params import evaluate_polynomial
from .state import CoefficientFit, StepObservation, branch_name

__all__ = ["SPAN_STRAIGHTNESS_EXPONENT", "FitMonitor"]

# The block-stack output turns more than the indicator over a span of steps: on the demo models' uncached runs
# (10 prompts, 20 steps, spans of 2 to 6 steps) the output's chord/path ratio is the indicator's raised to
# 2.1-2.7 on average. With 2, the demo models' own fits read 0.87-1.07 over the spans their presets skip.
SPAN_STRAIGHTNESS_EXPONENT = 2.0


@dataclass
class _BranchRecord:
    # At the branch's last computed step: its block-stack output, its indicator and its index.
    last_output: torch.Tensor | None = None
    last_indicator: torch.Tensor | None = None
    last_step: int = 0
    # Since then: the summed prediction (the accumulator) and the summed indicator distances (the path).
    predicted: float = 0.0
    path: float = 0.0
    # (predicted, actual) change since the branch's last computed step, and the steps between them, per
    # computed step with a prediction.
    pairs: list[tuple[float, float, int]] = field(default_factory=list)
    nonpositive_predictions: int = 0
    distances: list[float] = field(default_factory=list)
    outside_range_steps: list[int] = field(default_factory=list)


@dataclass(eq=False)
class FitMonitor:
    """Watches one generation (one `enable_teacache` call) of a model through its step observer.

    `coefficients` are per CFG branch: {is_cfg_negative: polynomial}.
    """

    coefficients: dict[bool, tuple[float, ...]]
    calibrated_range: tuple[float, float] | None
    num_inference_steps: int
    model_name: str
    # Under sequence parallelism each rank holds a shard of the output: the change is measured over the
    # whole tensor, as the indicator's distance is, so every rank reads the same fit.
    process_group: Callable[[], Any] = lambda: None
    warned: bool = field(default=False, init=False)
    _branches: dict[bool, _BranchRecord] = field(
        default_factory=lambda: {False: _BranchRecord(), True: _BranchRecord()}, init=False, repr=False
    )
    _generation: int | None = field(default=None, init=False, repr=False)

    def __call__(self, step: StepObservation) -> None:
        coefficients = self.coefficients.get(step.is_cfg_negative, ())
        if step.teacache_params is None or not any(coefficients):
            return  # TeaCache is off or switched itself off, or a recording run's zero polynomial: nothing predicted
        if self._generation is None:
            self._generation = step.generation
        if step.generation != self._generation:
            return  # a later generation carries its own monitor
        record = self._branches[step.is_cfg_negative]
        if step.distance is not None:
            record.distances.append(step.distance)
            low_high = self.calibrated_range
            if low_high is not None and not low_high[0] <= step.distance <= low_high[1]:
                record.outside_range_steps.append(step.step_index)
            predicted = evaluate_polynomial(coefficients, step.distance)
            record.nonpositive_predictions += predicted <= 0
            record.predicted += predicted
            record.path += step.distance
        if not step.skipped:
            previous = record.last_output
            if previous is not None and step.distance is not None and previous.shape == step.output.shape:
                actual = self._distance(step.output, previous)
                predicted = record.predicted
                spans = step.step_index - record.last_step > 1 and record.path > 0
                if spans and step.indicator is not None and record.last_indicator is not None:
                    chord = self._distance(step.indicator, record.last_indicator)
                    predicted *= (chord / record.path) ** SPAN_STRAIGHTNESS_EXPONENT
                record.pairs.append((predicted, actual, step.step_index - record.last_step))
            record.last_output, record.last_indicator = step.output, step.indicator
            record.last_step = step.step_index
            record.predicted = record.path = 0.0
        if step.step_index == self.num_inference_steps - 1:
            record.last_output = record.last_indicator = None
            self._warn_if_misfit()

    def _distance(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """The relative L1 distance of the whole tensor (gathered over the ranks' shards under sequence parallelism)."""
        from .mixin import _group_distance, relative_l1_distance  # the mixin imports this module

        group = self.process_group()
        if group is None:
            return relative_l1_distance(current, previous).item()
        return _group_distance(current, previous, False, group)[1]

    def fit(self, is_cfg_negative: bool) -> CoefficientFit:
        record = self._branches[is_cfg_negative]
        actual = [a for _, a, _ in record.pairs]
        r_squared = None
        if len(actual) >= 2:
            mean = sum(actual) / len(actual)
            total = sum((a - mean) ** 2 for a in actual)
            residual = sum((a - p) ** 2 for p, a, _ in record.pairs)
            r_squared = 1 - residual / total if total > 0 else None
        return CoefficientFit(
            points=len(record.pairs),
            consecutive_points=sum(gap == 1 for *_, gap in record.pairs),
            mean_ratio=_geometric_mean_ratio([(p, a) for p, a, _ in record.pairs]),
            r_squared=r_squared,
            steps_with_distance=len(record.distances),
            nonpositive_predictions=record.nonpositive_predictions,
            indicator_range=(min(record.distances), max(record.distances)) if record.distances else None,
            calibrated_range=self.calibrated_range,
            outside_range_steps=tuple(record.outside_range_steps),
        )

    def release_tensors(self) -> None:
        for record in self._branches.values():
            record.last_output = record.last_indicator = None

    def _warn_if_misfit(self) -> None:
        if self.warned:
            return
        bad = {branch_name(negative): self.fit(negative) for negative in (False, True)}
        bad = {name: fit for name, fit in bad.items() if fit.misfit}
        if not bad:
            return
        self.warned = True
        details = "; ".join(f"{name}: {fit.describe()}" for name, fit in bad.items())
        warnings.warn(
            f"TeaCache's coefficients do not fit {self.model_name} in this generation ({details}): the "
            "threshold does not mean what it was chosen for. Fit coefficients for this checkpoint with "
            "scripts/calibrate.py",
            RuntimeWarning,
            stacklevel=2,
        )


def _geometric_mean_ratio(pairs: list[tuple[float, float]]) -> float | None:
    ratios = [actual / predicted for predicted, actual in pairs if predicted > 0 and actual > 0]
    return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
