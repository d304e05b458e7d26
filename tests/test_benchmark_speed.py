"""scripts/benchmark_speed.py on a tiny Z-Image: every measurement runs and reports consistent numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.utils import load_script

pytest.importorskip("diffusers")


def test_speed_measurements_on_a_tiny_model():
    script = load_script("benchmark_speed")
    medium = script.z_image_case("medium")
    tiny = dict(medium.config, dim=64, n_layers=2, n_heads=2, n_kv_heads=2, axes_dims=(8, 12, 12))
    case = dataclasses.replace(medium, config=tiny)
    result = script.measure_speed(case, torch.device("cpu"), torch.float32, repeats=1, steps=6)

    assert result["fast_linear_kernel"] in ("aten", "onednn")
    for key in (
        "forward_ratio",
        "forward_ratio_fast",
        "skipped_step_cost",
        "loop_efficiency",
        "loop_efficiency_paired",
    ):
        assert 0 < result[key] < 10, key
    # The threshold of the loop is chosen so that the middle steps alternate between computed and skipped.
    assert 3 <= result["loop_computed_steps"] < 6
    assert result["loop_ideal_speedup"] == 6 / result["loop_computed_steps"]
    assert result["loop_repeats"] == 6
    assert result["loop_realized_speedup"] == result["loop_uncached_s"] / result["loop_cached_s"]
    refiner = result["by_indicator"]["refiner_modulated_input"]
    assert 3 <= refiner["loop_computed_steps"] < 6
    assert refiner["skipped_step_s"] > 0 and refiner["computed_step_s"] > 0


def test_loop_time_is_the_sum_of_each_steps_median_over_repeats():
    script = load_script("benchmark_speed")
    # The second repeat's first step and the third repeat's second step were disturbed.
    runs = [[1.0, 2.0], [9.0, 2.5], [1.5, 8.0]]
    assert script._sum_of_step_medians(runs) == pytest.approx(1.5 + 2.5)
