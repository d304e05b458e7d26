"""Forecast: a cache decision that measures the error of the prediction a skipped step will use.

TeaCache (`TeaCacheParams(method="teacache")`, the default) sums a fitted polynomial of its indicator's
change from step to step and skips while the sum, its estimate of how far the block-stack output has moved
since the last computed step, stays under the threshold. That estimates the error of reusing the cached
residual; with the residual extrapolated (`residual_order=1`) it no longer says how wrong a skipped step is.

`method="forecast"` forecasts the indicator, which every step computes anyway, with the rule a skipped step
forecasts the residual with: the value at the branch's last computed step, plus `extrapolation_scale` times
the slope between its last two computed steps for each step since (`residual_order=1`; order 0 reuses
the value). A step is skipped while the indicator's relative L1 distance from its forecast stays under
`teacache_thresh`. Where the trajectory moves as forecast, any number of steps skip at little cost; where it
bends, the forecast fails on the indicator too and the step computes. Nothing is fitted, so it runs on
checkpoints without a published fit; the decision reads only the indicator and the step index, which every
rank holds (under sequence parallelism the distances are reduced over the ranks' shards in one collective).

With `forecast_slope="indicator"` a step is carried along the slope by how far its own indicator has moved
along the indicator's slope (the least-squares projection of its change since the last computed step onto
the change between the last two, at least 0), instead of by the number of steps: a trajectory that slows
down or speeds up between computed steps is followed, and the residual of a skipped step is carried by the
same amount. The projection is one more reduction over the ranks' shards, before the distances.

Two settings place the computed steps, besides the threshold. `forecast_cadence`: the first gap the
threshold chooses for a branch (from its previous computed step to the step the threshold makes compute)
becomes the branch's cadence, and a step also computes once that many steps have passed since the last
computed one. `forecast_tail`: the last steps never compute, and a cadence step that would fall among them
computes just before them. Both read only the step index and the branch's computed steps, which every rank
holds alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .state import BranchState, TeaCacheSession

__all__ = ["FORECAST", "Trace", "along", "extrapolate", "forecast_should_skip", "indicator_progress"]

FORECAST = "forecast"
SLOPE_FROM_INDICATOR = "indicator"


def along(value: torch.Tensor, older: torch.Tensor, factor: float) -> torch.Tensor:
    """`value` carried `factor` times the step from `older` to it further."""
    return value + factor * (value - older)


def extrapolate(
    value: torch.Tensor,
    step: int,
    older: torch.Tensor | None,
    older_step: int | None,
    at_step: int,
    scale: float = 1.0,
) -> torch.Tensor:
    """`value` (of `step`) carried to `at_step` along `scale` times the slope from `older` (of `older_step`);
    `value` itself without an older value.

    The slope factor is formed first, so that `scale=1` gives the same floating-point result as the plain
    linear extrapolation `value + (at_step - step) / (step - older_step) * (value - older)`.
    """
    if older is None:
        return value
    factor = (at_step - step) / (step - older_step)
    if scale != 1:
        factor = scale * factor
    return along(value, older, factor)


@dataclass
class Trace:
    """A tensor's values at a branch's last two computed steps: what the forecast extrapolates."""

    value: torch.Tensor | None = None
    step: int | None = None
    older: torch.Tensor | None = None
    older_step: int | None = None

    def record(self, value: torch.Tensor, step: int, keep_older: bool) -> None:
        """Keep `value` of computed step `step`; the one before it only when `keep_older` and it has the same
        shape, dtype and device."""
        previous = self.value
        keep = keep_older and previous is not None and same_layout(previous, value)
        self.older, self.older_step = (previous, self.step) if keep else (None, None)
        self.value, self.step = value, step

    def forecast(self, at_step: int, scale: float) -> torch.Tensor | None:
        if self.value is None:
            return None
        return extrapolate(self.value, self.step, self.older, self.older_step, at_step, scale)

    def clear(self) -> None:
        self.value = self.older = None
        self.step = self.older_step = None


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)


def _distances(
    pairs: tuple[tuple[torch.Tensor, torch.Tensor | None], ...], forced: bool, group: dist.ProcessGroup | None
) -> tuple[bool, list[float | None]]:
    """The forced flag (true on any rank of `group`) and, for each pair (a, b), the relative L1 distance
    mean|a - b| / mean|b| over the whole tensor that the ranks' shards make up: one collective per step on
    every rank, forced or not, so no rank waits for a reduction another skipped. A pair whose b is None, or
    any pair on a forced step, gives None."""
    if group is None:
        if forced:
            return True, [None] * len(pairs)
        from .mixin import relative_l1_distance  # the mixin imports this module

        return False, [None if b is None else relative_l1_distance(a, b).item() for a, b in pairs]
    device = pairs[0][0].device  # the first pair's a is a tensor on every rank
    stats = torch.zeros(1 + 2 * len(pairs), dtype=torch.float32, device=device)
    stats[0] = float(forced)
    if not forced:
        for index, (a, b) in enumerate(pairs):
            if b is not None:
                b = b.float()
                stats[1 + 2 * index] = (a.float() - b).abs().sum()
                stats[2 + 2 * index] = b.abs().sum()
    dist.all_reduce(stats, group=group)
    values = stats.tolist()
    if values[0] > 0:
        return True, [None] * len(pairs)
    sums = zip(values[1::2], values[2::2], strict=True)
    return False, [
        None if b is None else (difference / scale if scale else float("inf"))
        for (_, b), (difference, scale) in zip(pairs, sums, strict=True)
    ]


def indicator_progress(indicator: torch.Tensor, trace: Trace, group: dist.ProcessGroup | None) -> float:
    """How far `indicator` has moved along the slope of `trace` (which holds two values): the least-squares
    factor `p` of `indicator - value ~ p * (value - older)` over the whole tensor (float32, the ranks' shards
    summed), at least 0; 0 where the slope is zero. Every rank of `group` calls it at the same steps (the traces
    are equal), and one whose shard changed layout adds nothing."""
    stats = torch.zeros(2, dtype=torch.float32, device=indicator.device)
    if same_layout(trace.value, indicator):
        value = trace.value.float()
        slope = value - trace.older.float()
        stats[0] = ((indicator.float() - value) * slope).sum()
        stats[1] = (slope * slope).sum()
    if group is not None:
        dist.all_reduce(stats, group=group)
    along_slope, length = stats.tolist()
    return max(0.0, along_slope / length) if length > 0 else 0.0


def forecast_should_skip(
    session: TeaCacheSession,
    state: BranchState,
    step_index: int,
    forced: bool,
    at_limit: bool,
    indicator: torch.Tensor,
    group: dist.ProcessGroup | None,
) -> tuple[bool, float | None]:
    """The forecast decision for one branch at `step_index`: (skip, the indicator's distance from the branch's
    previous step, for the fit monitor; None on a forced step).

    `forced`: the step must compute (first or last steps, no cached residual, changed inputs); `at_limit`:
    `max_consecutive_skips` steps were skipped in a row. Updates the branch's state as TeaCache's decision
    does; `accumulated_rel_l1_distance` holds the step's forecast error (0 after a computed step).
    """
    params = session.params
    order_one = params.residual_order >= 1
    trace = state.indicator_trace
    state.forecast_factor = None
    if params.forecast_slope == SLOPE_FROM_INDICATOR and trace.older is not None:
        # The factor the step's indicator measures; a skipped step carries its residual by the same one.
        factor = params.extrapolation_scale * indicator_progress(indicator, trace, group)
        state.forecast_factor = (step_index, factor)
        forecast = along(trace.value, trace.older, factor)
    else:
        forecast = trace.forecast(step_index, params.extrapolation_scale)
    forced = forced or forecast is None or not same_layout(forecast, indicator)
    # The forecast's error relative to the indicator the step has; the change since the previous step as
    # TeaCache measures it (the fit monitor's x).
    pairs = ((indicator, state.previous_modulated_input), (forecast, None if forced else indicator))
    forced, (distance, error) = _distances(pairs, forced, group)
    state.previous_modulated_input = indicator.detach()
    if not forced:
        state.accumulated_rel_l1_distance = error
        # A threshold of 0 never skips, so that 0 is exact.
        if params.teacache_thresh > 0 and _rule_skips(session, state, step_index, error):
            if not at_limit:
                return True, distance
            state.limit_forced_steps.append(step_index)
    state.accumulated_rel_l1_distance = 0.0
    state.indicator_trace.record(indicator.detach(), step_index, keep_older=order_one)
    return False, distance


def _rule_skips(session: TeaCacheSession, state: BranchState, step_index: int, error: float) -> bool:
    """Whether a step that is not forced skips by the forecast's rule (the threshold, then `forecast_tail` and
    `forecast_cadence`), `max_consecutive_skips` aside. Keeps the branch's cadence when the threshold first
    makes it compute."""
    params = session.params
    last_step = session.num_inference_steps - 1
    if step_index > last_step - params.forecast_tail:
        return True
    if error >= params.teacache_thresh:
        if params.forecast_cadence and state.cadence_gap is None:
            state.cadence_gap = (step_index - state.indicator_trace.step, step_index)
        return False
    if state.cadence_gap is None:
        return True
    due = state.indicator_trace.step + state.cadence_gap[0]
    if due > last_step:
        return True  # the cadence ends with the schedule
    if params.forecast_tail:
        due = min(due, last_step - params.forecast_tail)
    return step_index < due
