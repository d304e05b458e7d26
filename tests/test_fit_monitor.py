"""The coefficient fit monitor: every TeaCache generation checks its coefficients against the block stack.

On the shipped demo models their own coefficients pass at their presets, and the published coefficients of
another family warn once, naming scripts/calibrate.py; the stats report the fit and the steps whose
indicator distance fell outside the range the coefficients were fitted on.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from teacache_models import TeaCacheParams
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
        # Few computed steps follow each other at a preset: the ratio over gaps reads below 1 for a right fit.
        assert fit.points >= 3 and not fit.misfit and 0.7 < fit.mean_ratio_all < 1.1
        assert fit.calibrated_range == load_zoo_entry(name).presets[preset].params.calibrated_range
    assert "do not fit" not in stats.summary()
    record = stats.as_dict()["branches"]["positive"]["coefficient_fit"]
    assert record["points"] == stats.positive.coefficient_fit.points and record["misfit"] is False


@pytest.mark.parametrize(
    "name, other, preset, thresh",
    [
        # Wan2.1-1.3B's fit predicts about twice the change: seen between consecutive computed steps.
        ("flux-digits", "wan2.1-t2v-1.3b", "slow", None),
        # FLUX.1-dev's fit on another Flux checkpoint, in a run that computes every step (threshold 0).
        ("flux-digits", "flux1-dev", "slow", 0.0),
        # Wan2.1-14B's fit is negative on the demo's distances: it would skip every step it may.
        ("wan-digits", "wan2.1-t2v-14b", "slow", None),
        ("wan-digits", "wan2.1-t2v-14b", "fast", None),
    ],
)
def test_another_checkpoints_coefficients_warn_once(name, other, preset, thresh):
    coefficients = load_zoo_entry(other).presets["slow"].params.coefficients
    pipe = load_pipeline(name)
    changes = {"coefficients": coefficients, "calibrated_range": None}
    if thresh is not None:
        changes["teacache_thresh"] = thresh
    stats, caught = run(pipe, preset, **changes)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "scripts/calibrate.py" in message and type(pipe.transformer).__name__ in message
    assert stats.positive.coefficient_fit.misfit
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
