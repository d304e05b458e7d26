"""The forecast method (`TeaCacheParams(method="forecast")`): its rule replayed by hand, state isolation,
threshold 0, bad values.

The toy model of the core tests has the timestep broadcast over the tokens as its indicator, so every
forecast and every relative error below is plain arithmetic on the timesteps.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from teacache_models import TeaCacheParams
from teacache_models.cache.forecast import Trace, extrapolate
from tests.test_teacache_core import TIMESTEPS, TinyModel, computed_residual, generate, make_input, run_branch

FORECAST = dict(method="forecast", residual_order=1, extrapolation_scale=0.5, end_skipping=0, forecast_slope="steps")
# The slope measured on the indicator (`forecast_slope="indicator"`).
MEASURED = dict(FORECAST, forecast_slope="indicator")
# The measured slope with the cadence of the first gap and the last two steps forecast.
CADENCE = dict(MEASURED, forecast_cadence=True, forecast_tail=2)
SETTINGS = pytest.mark.parametrize("setting", [FORECAST, MEASURED, CADENCE], ids=["steps", "indicator", "cadence"])


class TinyModelWithoutFit(TinyModel):
    teacache_row_inputs = frozenset({"t"})  # t carries one timestep per batch row

    def __init__(self) -> None:
        super().__init__()
        self.set_teacache_fits({})


def replay(
    timesteps: list[float],
    thresh: float,
    scale: float,
    first: int = 1,
    last: int = 0,
    slope: str = "steps",
    cadence: bool = False,
    tail: int = 0,
    order: int = 1,
) -> list[int]:
    """The forecast rule written out for a scalar indicator: the computed steps."""
    computed: list[tuple[int, float]] = []
    final = len(timesteps) - 1
    gap = None  # the cadence: the first gap the threshold chose
    for step, t in enumerate(timesteps):
        if step < first or step >= len(timesteps) - last or not computed:
            computed.append((step, t))
            continue
        (s1, t1), older = computed[-1], computed[-2] if len(computed) > 1 and order else None
        if older is None:
            forecast = t1
        elif slope == "steps":
            forecast = t1 + scale * (step - s1) / (s1 - older[0]) * (t1 - older[1])
        else:  # how far the indicator itself moved along the slope, never backwards
            forecast = t1 + scale * max(0.0, (t - t1) / (t1 - older[1])) * (t1 - older[1])
        if thresh > 0 and step > final - tail:
            continue  # the tail is forecast, whatever the error
        if abs(forecast - t) / abs(t) >= thresh:
            gap = step - s1 if cadence and gap is None else gap
            computed.append((step, t))
        elif gap is not None and s1 + gap <= final and step >= min(s1 + gap, final - tail):
            computed.append((step, t))
    return [step for step, _ in computed]


def rule_of(setting: dict) -> dict:
    """The `replay` arguments of a setting of the forecast."""
    return dict(slope=setting["forecast_slope"], cadence=setting.get("forecast_cadence", False),
                tail=setting.get("forecast_tail", 0))  # fmt: skip


def test_decisions_replayed_by_hand():
    # Timesteps 1, .95, .90, .80, .75, .70, .50, .40; the forecast carries the last computed value along half
    # the slope between the last two computed steps:
    #   step 1: one computed step, forecast 1.0: error .05/.95 = .0526 > .03, computes
    #   step 2: .95 + .5 * (1/1) * (.95 - 1) = .925, error .025/.90 = .0278: skips
    #   step 3: .95 + .5 * (2/1) * (-.05) = .90, error .10/.80 = .125: computes
    #   step 4: .80 + .5 * (1/2) * (.80 - .95) = .7625, error .0125/.75 = .0167: skips
    #   step 5: .80 + .5 * (2/2) * (-.15) = .725, error .025/.70 = .0357: computes
    #   step 6: .70 + .5 * (1/2) * (.70 - .80) = .675, error .175/.5 = .35: computes
    #   step 7: .50 + .5 * (1/1) * (.50 - .70) = .40, error 0: skips (the last step is not forced)
    model = TinyModelWithoutFit()
    xs = [make_input(k) for k in range(len(TIMESTEPS))]
    outputs = generate(model, TeaCacheParams(teacache_thresh=0.03, **FORECAST), xs)
    stats = model.teacache_stats().positive
    assert stats.computed_steps == (0, 1, 3, 5, 6) == tuple(replay(TIMESTEPS, 0.03, 0.5))
    assert stats.skipped_steps == (2, 4, 7)
    # A skipped step adds the residual forecast the same way: half the slope of the last two computed residuals.
    r = {k: computed_residual(model, xs[k], TIMESTEPS[k]) for k in stats.computed_steps}
    expected = {
        2: r[1] + 0.5 * (1 / 1) * (r[1] - r[0]),
        4: r[3] + 0.5 * (1 / 2) * (r[3] - r[1]),
        7: r[6] + 0.5 * (1 / 1) * (r[6] - r[5]),
    }
    with torch.no_grad():
        for step, residual in expected.items():
            torch.testing.assert_close(outputs[step], model.head(model.embed(xs[step]) + residual))
            assert not torch.allclose(outputs[step], model.head(model.embed(xs[step]) + r[max(r)]))


@pytest.mark.parametrize("thresh", [0.01, 0.03, 0.06, 0.2])
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("slope", ["steps", "indicator"])
def test_schedule_follows_the_rule_at_every_setting(thresh, scale, slope):
    timesteps = [1.0, 0.97, 0.93, 0.88, 0.80, 0.74, 0.69, 0.61, 0.52, 0.49, 0.30, 0.28]
    model = TinyModelWithoutFit()
    xs = [make_input(0)] * len(timesteps)
    params = TeaCacheParams(teacache_thresh=thresh, **dict(FORECAST, extrapolation_scale=scale, forecast_slope=slope))
    generate(model, params, xs, timesteps=timesteps)
    assert list(model.teacache_stats().positive.computed_steps) == replay(timesteps, thresh, scale, slope=slope)


def test_the_measured_slope_replayed_by_hand():
    # Timesteps 1, .95, .90, .80, .75, .70, .50, .40, threshold .06, half the slope. The factor is how far the
    # step's indicator moved along the last two computed ones' slope, (t - t1) / (t1 - t0), times .5:
    #   step 1: one computed step, forecast 1.0: error .05/.95 = .0526: skips (adds r0)
    #   step 2: forecast 1.0 still: error .10/.90 = .111: computes
    #   step 3: factor .5 * (.80 - .90) / (.90 - 1) = .5: .90 - .05 = .85, error .05/.80 = .0625: computes
    #   step 4: factor .5 * (.75 - .80) / (.80 - .90) = .25: .80 - .025 = .775, error .025/.75 = .0333: skips
    #   step 5: factor .5 * (.70 - .80) / (-.10) = .5: .75, error .05/.70 = .0714: computes
    #   step 6: factor .5 * (-.20) / (-.10) = 1: .60, error .10/.50 = .2: computes
    #   step 7: factor .5 * (-.10) / (-.20) = .25: .45, error .05/.40 = .125: computes
    model = TinyModelWithoutFit()
    xs = [make_input(k) for k in range(len(TIMESTEPS))]
    outputs = generate(model, TeaCacheParams(teacache_thresh=0.06, **MEASURED), xs)
    stats = model.teacache_stats().positive
    assert stats.computed_steps == (0, 2, 3, 5, 6, 7) == tuple(replay(TIMESTEPS, 0.06, 0.5, slope="indicator"))
    # The steps' rule at the same threshold skips other steps: the factors differ.
    assert replay(TIMESTEPS, 0.06, 0.5) != list(stats.computed_steps)
    r = {k: computed_residual(model, xs[k], TIMESTEPS[k]) for k in stats.computed_steps}
    with torch.no_grad():
        torch.testing.assert_close(outputs[1], model.head(model.embed(xs[1]) + r[0]))
        # Step 4 carries the residual by the factor its indicator measured (.25), not by the steps' (.5 * 1/1).
        expected = r[3] + 0.25 * (r[3] - r[2])
        torch.testing.assert_close(outputs[4], model.head(model.embed(xs[4]) + expected))
        steps_rule = r[3] + 0.5 * (r[3] - r[2])
        assert not torch.allclose(outputs[4], model.head(model.embed(xs[4]) + steps_rule))


def test_the_measured_slope_never_runs_backwards():
    # 1.0, .90 and .80 compute (errors .111 and .0625 over .06); then the indicator turns back to .81: its
    # projection on the slope is -.1, so the factor is 0, the forecast is .80 (error .0123) and the skipped step
    # reuses the last residual instead of carrying it backwards.
    model = TinyModelWithoutFit()
    timesteps = [1.0, 0.9, 0.8, 0.81]
    xs = [make_input(k) for k in range(4)]
    outputs = generate(model, TeaCacheParams(teacache_thresh=0.06, **MEASURED), xs, timesteps=timesteps)
    stats = model.teacache_stats().positive
    assert stats.computed_steps == (0, 1, 2) and stats.skipped_steps == (3,)
    assert model._branch_state(False).forecast_factor == (3, 0.0)
    with torch.no_grad():
        reused = computed_residual(model, xs[2], timesteps[2])
        torch.testing.assert_close(outputs[3], model.head(model.embed(xs[3]) + reused))


def test_cadence_and_tail_replayed_by_hand():
    # Order 0 (the forecast is the last computed value), threshold .3, timesteps that slow down after step 3 and
    # jump at the last step. Errors relative to the step's own indicator:
    #   steps 1-2: .1/.9 and .2/.8 within .3; step 3: .3/.7 = .43 computes (the threshold's first gap: 3)
    #   steps 4-9 from .70: .03 to .21, within; step 10: .50/.20 = 2.5 computes
    # With the cadence, steps 6 and 9 compute too (3 steps after the last computed one), and step 10 from .58
    # (1.9) by the threshold. With the last two steps forecast as well, the cadence step due at 9 (in the tail)
    # computes at 8, and the jump at step 10 is forecast, not computed. The tail alone only skips 9 and 10.
    timesteps = [1.0, 0.9, 0.8, 0.7, 0.68, 0.66, 0.64, 0.62, 0.6, 0.58, 0.2]
    xs = [make_input(k) for k in range(len(timesteps))]
    expected = {(False, 0): (0, 3, 10), (True, 0): (0, 3, 6, 9, 10), (True, 2): (0, 3, 6, 8), (False, 2): (0, 3)}
    for (cadence, tail), computed in expected.items():
        model = TinyModelWithoutFit()
        params = TeaCacheParams(
            teacache_thresh=0.3, method="forecast", end_skipping=0, forecast_cadence=cadence, forecast_tail=tail
        )
        outputs = generate(model, params, xs, timesteps=timesteps)
        assert model.teacache_stats().positive.computed_steps == computed, (cadence, tail)
        assert tuple(replay(timesteps, 0.3, 1.0, cadence=cadence, tail=tail, order=0)) == computed
    # The forecast tail step adds the residual of the last computed step (order 0: reuse).
    with torch.no_grad():
        reused = computed_residual(model, xs[3], timesteps[3])
        torch.testing.assert_close(outputs[10], model.head(model.embed(xs[10]) + reused))


@pytest.mark.parametrize("thresh", [0.005, 0.02, 0.05, 0.1, 0.3])
@pytest.mark.parametrize("tail", [0, 1, 3])
@pytest.mark.parametrize("slope", ["steps", "indicator"])
def test_cadence_schedules_follow_the_rule(thresh, tail, slope):
    timesteps = [1.0, 0.97, 0.93, 0.88, 0.80, 0.74, 0.69, 0.61, 0.52, 0.49, 0.30, 0.28, 0.27, 0.25]
    model = TinyModelWithoutFit()
    xs = [make_input(0)] * len(timesteps)
    params = TeaCacheParams(
        teacache_thresh=thresh, **dict(FORECAST, forecast_slope=slope, forecast_cadence=True, forecast_tail=tail)
    )
    generate(model, params, xs, timesteps=timesteps)
    computed = list(model.teacache_stats().positive.computed_steps)
    assert computed == replay(timesteps, thresh, 0.5, slope=slope, cadence=True, tail=tail)
    assert all(step <= len(timesteps) - 1 - tail for step in computed)


def test_a_failed_step_drops_the_cadence_it_set():
    from teacache_models.cache.state import BranchState

    state = BranchState(computed_steps=[0, 3], cadence_gap=(3, 3))
    state.forget_step(3)
    assert state.cadence_gap is None and state.computed_steps == [0]
    state = BranchState(computed_steps=[0, 3, 6], cadence_gap=(3, 3))
    state.forget_step(6)
    assert state.cadence_gap == (3, 3)


def test_reuse_order_forecasts_the_last_computed_value():
    # Order 0: the indicator's change since the last computed step, against the threshold (no accumulation).
    model = TinyModelWithoutFit()
    params = TeaCacheParams(teacache_thresh=0.12, method="forecast")
    generate(model, params, [make_input(0)] * len(TIMESTEPS))
    # Errors relative to the step's own indicator: from 1.0, .95 (.053) and .90 (.111) within 12%, .80 (.25)
    # not; from .80, .75 (.067) within, .70 (.143) not; from .70, .50 (.4) not; the last step is forced.
    assert model.teacache_stats().positive.computed_steps == (0, 3, 5, 6, 7)


@SETTINGS
def test_threshold_zero_is_bit_identical_and_one_step_of_history_reuses(setting):
    model = TinyModelWithoutFit()
    xs = [make_input(k) for k in range(len(TIMESTEPS))]
    with torch.no_grad():
        plain = [model(x, torch.tensor([t])) for x, t in zip(xs, TIMESTEPS, strict=True)]
    outputs = generate(model, TeaCacheParams(teacache_thresh=0.0, **setting), xs)
    assert model.teacache_stats().positive.num_skipped == 0  # the tail too: threshold 0 never skips
    assert all(torch.equal(a, b) for a, b in zip(outputs, plain, strict=True))


def test_forecast_needs_no_fit_and_teacache_still_does():
    model = TinyModelWithoutFit()
    with pytest.raises(ValueError, match="no TeaCache coefficients"):
        model.enable_teacache(TeaCacheParams(teacache_thresh=0.1), 8)
    model.enable_teacache(TeaCacheParams(teacache_thresh=0.1, method="forecast"), 8)
    assert model.teacache_enabled


def test_max_consecutive_skips_applies_to_the_forecast():
    model = TinyModelWithoutFit()
    xs = [make_input(0)] * len(TIMESTEPS)
    generate(model, TeaCacheParams(teacache_thresh=10.0, max_consecutive_skips=2, **FORECAST), xs)
    stats = model.teacache_stats().positive
    assert stats.computed_steps == (0, 3, 6) and stats.limit_forced_steps == (3, 6)


@SETTINGS
def test_branches_keep_their_own_forecast(setting):
    model = TinyModelWithoutFit()
    params = TeaCacheParams(teacache_thresh=0.03, **setting)
    positive_xs = [make_input(k) for k in range(8)]
    negative_xs = [make_input(100 + k) for k in range(8)]
    model.enable_teacache(params, len(TIMESTEPS))
    interleaved = {False: [], True: []}
    for step in range(len(TIMESTEPS)):
        for negative, xs in ((False, positive_xs), (True, negative_xs)):
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=negative):
                interleaved[negative].append(model(xs[step], torch.tensor([TIMESTEPS[step]])))
    both = model.teacache_stats()
    for negative, xs in ((False, positive_xs), (True, negative_xs)):
        model.enable_teacache(params, len(TIMESTEPS))
        alone = run_branch(model, xs, negative)
        assert getattr(model.teacache_stats(), "negative" if negative else "positive").skipped_steps
        assert getattr(model.teacache_stats(), "negative" if negative else "positive") == getattr(
            both, "negative" if negative else "positive"
        )
        assert all(torch.equal(a, b) for a, b in zip(interleaved[negative], alone, strict=True))


@SETTINGS
def test_a_new_generation_starts_without_the_last_ones_forecast(setting):
    params = TeaCacheParams(teacache_thresh=0.03, **setting)
    xs = [make_input(k) for k in range(len(TIMESTEPS))]
    fresh = TinyModelWithoutFit()
    expected = generate(fresh, params, xs)
    used = TinyModelWithoutFit()
    generate(used, params, [make_input(50 + k) for k in range(len(TIMESTEPS))], timesteps=TIMESTEPS[::-1])
    outputs = generate(used, params, xs)
    assert used.teacache_stats() == fresh.teacache_stats()
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))


def test_a_shape_change_restarts_the_forecast():
    model = TinyModelWithoutFit()
    xs = [make_input(0, tokens=5)] * 3 + [make_input(0, tokens=9)] * 5
    generate(model, TeaCacheParams(teacache_thresh=0.03, **FORECAST), xs)
    stats = model.teacache_stats().positive
    assert 3 in stats.computed_steps  # the new shape computes
    trace = model._branch_state(False).indicator_trace
    assert trace.value.shape[1] == 9 and (trace.older is None or trace.older.shape[1] == 9)


@SETTINGS
def test_per_sample_rows_each_follow_their_own_forecast(setting):
    # With the cadence, row 0's first gap is 2 steps at threshold .06 and row 1's one step, so each keeps its own.
    thresh = 0.06 if setting.get("forecast_cadence") else 0.03
    params = TeaCacheParams(teacache_thresh=thresh, per_sample=True, **setting)
    timesteps = [[1.0, 0.95, 0.90, 0.80, 0.75, 0.70, 0.50, 0.40], [1.0, 0.8, 0.75, 0.74, 0.5, 0.45, 0.44, 0.2]]
    xs = [make_input(k, batch=2) for k in range(8)]
    model = TinyModelWithoutFit()
    model.enable_teacache(params, 8)
    for step in range(8):
        with torch.no_grad(), model.teacache_step(step):
            model(xs[step], torch.tensor([timesteps[0][step], timesteps[1][step]]))
    rows = model.teacache_stats().rows
    for row, ts in zip(rows, timesteps, strict=True):
        assert list(row.positive.computed_steps) == replay(ts, thresh, 0.5, **rule_of(setting))
    assert rows[0].positive != rows[1].positive


@SETTINGS
def test_wan_experts_keep_their_own_forecast(setting):
    from tests.test_wan import LINEAR, NUM_STEPS, cfg_inputs, expert_pair, predict

    pair = expert_pair(boundary_ratio=0.7)  # steps 0-2 high noise, 3-7 low noise
    pair.enable_teacache(TeaCacheParams(teacache_thresh=1e9, coefficients=LINEAR, **setting), NUM_STEPS)
    steps, positive, negative = cfg_inputs(pair.transformer.config)
    for step in range(NUM_STEPS):
        for branch in (False, True):
            with torch.no_grad(), pair.teacache_step(step, is_cfg_negative=branch):
                predict(pair, steps[step], negative if branch else positive, step)
    stats = pair.teacache_stats()
    for branch in ("positive", "negative"):
        high, low = getattr(stats["transformer"], branch), getattr(stats["transformer_2"], branch)
        assert (high.computed_steps, high.skipped_steps) == ((0,), (1, 2))
        # The low-noise expert's first step computes: it has no forecast of its own yet.
        assert (low.computed_steps, low.skipped_steps) == ((3,), (4, 5, 6, 7))
    for negative in (False, True):
        trace = pair.transformer_2._branch_state(negative).indicator_trace
        assert (trace.step, trace.older_step) == (3, None)
        assert pair.transformer._branch_state(negative).indicator_trace.step == 0


def test_extrapolate_at_scale_one_is_the_linear_extrapolation_bit_for_bit():
    generator = torch.Generator().manual_seed(3)
    older, value = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    slope = (9 - 5) / (5 - 2)
    assert torch.equal(extrapolate(value, 5, older, 2, 9), value + slope * (value - older))
    assert extrapolate(value, 5, None, None, 9) is value
    trace = Trace()
    trace.record(older, 2, keep_older=True)
    trace.record(value.double(), 5, keep_older=True)  # another dtype: no slope across it
    assert trace.older is None and trace.forecast(9, 0.5) is trace.value


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="magcache"), r"method must be one of \['teacache', 'forecast'\], got 'magcache'"),
        (dict(method=None), "method must be one of"),
        (dict(extrapolation_scale=1.5, residual_order=1), r"extrapolation_scale must be in \[0, 1\], got 1.5"),
        (dict(extrapolation_scale=-0.1, residual_order=1), "extrapolation_scale must be >= 0.0"),
        (dict(extrapolation_scale=float("nan"), residual_order=1), "extrapolation_scale must be a finite"),
        (dict(extrapolation_scale="half", residual_order=1), "extrapolation_scale must be a finite"),
        (dict(extrapolation_scale=0.5), "residual_order is 0"),
        (dict(forecast_slope="output"), r"forecast_slope must be one of \['steps', 'indicator'\], got 'output'"),
        (dict(forecast_slope=None), "forecast_slope must be one of"),
        (dict(forecast_slope="indicator", residual_order=1), "but method is 'teacache'"),
        (dict(forecast_slope="indicator", method="forecast"), "and residual_order 0"),
        (dict(forecast_cadence=1, method="forecast"), "forecast_cadence must be True or False, got 1"),
        (dict(forecast_cadence=True), "forecast_cadence=True is a setting of the forecast method"),
        (dict(forecast_tail=2), "forecast_tail=2 is a setting of the forecast method, but method is 'teacache'"),
        (dict(forecast_tail=-1, method="forecast", end_skipping=0), "forecast_tail must be an integer >= 0"),
        (dict(forecast_tail=1.5, method="forecast", end_skipping=0), "forecast_tail must be an integer"),
        (dict(forecast_tail=2, method="forecast"), "end_skipping=1 makes the last steps compute"),
    ],
)
def test_bad_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TeaCacheParams(**kwargs)


def test_the_default_is_teacache_as_published():
    params = TeaCacheParams()
    assert (params.method, params.extrapolation_scale, params.forecast_slope) == ("teacache", 1.0, "steps")
    assert dataclasses.replace(params, method="forecast").method == "forecast"
