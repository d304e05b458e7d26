"""The coefficient fit monitor: every TeaCache generation checks its coefficients against the block stack.

On the shipped demo models their own coefficients pass at their presets, and the published coefficients of
another family warn once, at the presets' own thresholds (judged across the spans of skipped steps), naming
scripts/calibrate.py; the stats report the fit and the steps whose indicator distance fell outside the range
the coefficients were fitted on.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from teacache_models import TeaCacheParams
from teacache_models.cache.state import MISFIT_FACTOR
from teacache_models.pipelines import load_pipeline
from teacache_models.zoo import load_zoo_entry


def run(pipe, preset: str, **changes) -> tuple:
    """One demo generation (digit 3, seed 0) at `preset`, changed by `changes`: (stats, warnings raised)."""
    params = pipe.default_sampling_params(teacache=preset, seed=0)
    params = dataclasses.replace(params, teacache_params=dataclasses.replace(params.teacache_params, **changes))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = pipe(["a handwritten digit 3"], params).teacache_stats
    return stats, [w for w in caught if "coefficients do not fit" in str(w.message)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["flux-digits", "wan-digits"])
@pytest.mark.parametrize("preset", ["slow", "fast"])
def test_own_coefficients_pass(name, preset):
    stats, caught = run(load_pipeline(name), preset)
    assert not caught
    for branch in (stats.positive, stats.negative):
        fit = branch.coefficient_fit
        # Judged over the spans the preset skips: the prediction over a span is the accumulator scaled by
        # how straight the indicator moved, and a right fit reads close to 1.
        assert fit.points >= 3 and not fit.misfit and 1 / MISFIT_FACTOR < fit.mean_ratio < MISFIT_FACTOR
        assert fit.r_squared is not None
        assert fit.calibrated_range == load_zoo_entry(name).presets[preset].params.calibrated_range
        assert fit.outside_calibrated_range is False
    if preset == "fast":
        # The fast presets never compute two steps in a row here: every point spans skipped steps.
        assert stats.positive.coefficient_fit.consecutive_points == 0
    assert "do not fit" not in stats.summary()
    record = stats.as_dict()["branches"]["positive"]["coefficient_fit"]
    assert record["points"] == stats.positive.coefficient_fit.points and record["misfit"] is False
    assert record["outside_calibrated_range"] is False


@pytest.mark.parametrize(
    "name, other, preset",
    [
        # Another family's published fit, at the demo presets' own thresholds: Wan2.1-1.3B's and wan-digits'
        # on the Flux demo, FLUX.1-dev's on the Wan demo (and on the Flux demo: another checkpoint of the
        # family), each predicting 1.4-2x the change.
        ("flux-digits", "wan2.1-t2v-1.3b", "slow"),
        ("flux-digits", "wan2.1-t2v-1.3b", "fast"),
        ("flux-digits", "wan-digits", "slow"),
        ("flux-digits", "wan-digits", "fast"),
        ("flux-digits", "flux1-dev", "fast"),
        ("wan-digits", "flux1-dev", "slow"),
        ("wan-digits", "flux1-dev", "fast"),
        # Wan2.1-14B's fit is negative on the demo's distances: it would skip every step it may.
        ("wan-digits", "wan2.1-t2v-14b", "slow"),
    ],
)
def test_another_familys_coefficients_warn_once(name, other, preset):
    coefficients = load_zoo_entry(other).presets["slow"].params.coefficients
    pipe = load_pipeline(name)
    stats, caught = run(pipe, preset, coefficients=coefficients, calibrated_range=None)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "scripts/calibrate.py" in message and type(pipe.transformer).__name__ in message
    fit = stats.positive.coefficient_fit
    assert fit.misfit and fit.outside_calibrated_range is None
    assert "coefficients do not fit" in stats.summary()


def test_own_coefficients_pass_between_consecutive_steps():
    """At threshold 0 every step computes: the monitor sees the calibration's own quantity."""
    stats, caught = run(load_pipeline("wan-digits"), "slow", teacache_thresh=0.0)
    fit = stats.positive.coefficient_fit
    assert not caught and fit.consecutive_points == 18 and 0.9 < fit.mean_ratio < 1.1


def test_distances_outside_the_calibrated_range_are_listed():
    pipe = load_pipeline("flux-digits")
    params = load_zoo_entry("flux-digits").presets["slow"].params
    low, high = params.calibrated_range
    # A range narrower than the one fitted on: some steps of the generation fall outside it.
    stats, _ = run(pipe, "slow", calibrated_range=(low, (low + high) / 2))
    outside = stats.positive.coefficient_fit.outside_range_steps
    assert stats.positive.coefficient_fit.outside_calibrated_range is True
    assert outside and set(outside) <= set(range(1, 19))
    assert f"indicator outside the calibrated range at {len(outside)} steps" in stats.summary()
    assert stats.positive.coefficient_fit.indicator_range[1] > (low + high) / 2
    # With the range it was fitted on, the shipped preset runs inside it on a demo prompt.
    stats, _ = run(pipe, "slow")
    assert stats.positive.coefficient_fit.outside_range_steps == ()


def test_calibrated_range_is_checked():
    assert TeaCacheParams(calibrated_range=[0.01, 0.2]).calibrated_range == (0.01, 0.2)
    for bad in ((0.2, 0.1), (0.1,), "0.1,0.2", (0.1, float("nan"))):
        with pytest.raises(ValueError, match="calibrated_range"):
            TeaCacheParams(calibrated_range=bad)
