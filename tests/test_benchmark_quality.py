"""scripts/benchmark_quality.py: work counted per block, timing beside it, frontiers per method."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from tests.utils import REPO, load_script

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def script():
    return load_script("benchmark_quality")


def test_tiny_sweep_counts_the_block_work_each_method_ran(tmp_path, script):
    output = tmp_path / "bench.json"
    args = ["--model", str(REPO / "demo_models" / "wan-digits"), "--config", "wan-digits", "--output", str(output)]
    args += ["--pairs", "2", "--timing-pairs", "1", "--steps", "6", "--rounds", "2", "--calibration-pairs", "1"]
    args += ["--teacache-thresholds", "60", "300", "--teacache-variants", "0", "1:1"]
    args += ["--forecast-thresholds", "0.0", "0.3", "--forecast-variants", "1:0.5"]
    args += ["--fbc-thresholds", "0.1", "0.5", "--magcache-thresholds", "0.1", "--magcache-retention", "0.2"]
    args += ["--magcache-max-skips", "2", "4", "--taylorseer-intervals", "2", "3", "--taylorseer-orders", "1"]
    args += ["--taylorseer-warmup", "3"]
    assert script.main(args) == 0
    report = json.loads(output.read_text())
    points = report["points"]
    curves = {}
    for point in points:
        curves.setdefault(point["method"], []).append(point)
    limited = "TeaCache (extrapolated residual, at most 1 skipped in a row)"
    assert list(curves) == [
        "uncached",
        "uncached (diffusers)",
        "TeaCache",
        limited,
        "Forecast (extrapolation x0.5)",
        "FirstBlockCache",
        "MagCache",
        "TaylorSeer",
    ]
    assert all(len(curve) == 2 for name, curve in curves.items() if not name.startswith("uncached"))
    assert [p["knobs"] for p in curves["MagCache"]] == [
        {"threshold": 0.1, "retention_ratio": 0.2, "max_skip_steps": k} for k in (2, 4)
    ]
    for point in points:
        assert 0 < point["work_fraction"] <= 1 and len(point["seconds"]) == 2
        assert point["speedup_min"] <= point["speedup"] <= point["speedup_max"]
        assert point["above_ideal"] == (point["speedup"] > point["ideal_speedup"] * 1.0001)
    # The uncached runs ran every block; the two implementations agree.
    assert [p["work_fraction"] for p in points[:2]] == [1.0, 1.0]
    assert report["uncached_native_vs_diffusers"]["psnr_mean"] > 60
    # Wan-digits' 4 blocks weigh the same. TaylorSeer computes its 3 warm-up steps, then predicts every block at
    # steps 3 and 5 of 6 (interval 2: 4 computes, 3 and 5 predict; interval 3: 4 computes, 5 predicts, 6 would).
    assert len(set(report["block_flops"].values())) == 1
    assert [p["work_fraction"] for p in curves["TaylorSeer"]] == pytest.approx([4 / 6, 4 / 6])
    # At these thresholds the distance never reaches them: the limit of one skip in a row alone sets the schedule
    # (0, 2, 4, 5 computed: first and last always), and the block stack is skipped whole.
    assert [p["work_fraction"] for p in curves[limited]] == pytest.approx([4 / 6, 4 / 6])
    # The forecast method at threshold 0 computes every step, bit-identical to uncached (PSNR at its cap).
    forecast = curves["Forecast (extrapolation x0.5)"]
    assert (forecast[0]["work_fraction"], forecast[0]["psnr_mean"]) == (1.0, script.PSNR_CAP_DB)
    assert forecast[1]["work_fraction"] < 1
    # FirstBlockCache runs the first of the 4 blocks at every call.
    assert all(p["work_fraction"] >= 1 / 4 for p in curves["FirstBlockCache"])
    summary = report["summary"]
    assert set(summary) == set(curves) - {"uncached", "uncached (diffusers)"}
    for name, row in summary.items():
        for goal in (30, 35):
            good = [p for p in curves[name] if p["psnr_mean"] >= goal]
            best = row[f"at_{goal}db"]
            assert (best is None) == (not good)
            if best is not None:
                assert math.isclose(best["work_fraction"], min(p["work_fraction"] for p in good))
                assert best["setting"] in row["frontier"]


def point(work: float, db: float, setting: str = "") -> dict:
    return {"work_fraction": work, "psnr_mean": db, "setting": setting or f"{work}/{db}"}


def test_frontier_and_least_work_at_a_goal(script):
    curve = [point(0.5, 40), point(0.3, 31), point(0.4, 30.5), point(0.6, 38), point(0.2, 25), point(0.3, 33)]
    # Dominated: (0.4, 30.5) by (0.3, 33); (0.6, 38) by (0.5, 40); (0.3, 31) by (0.3, 33).
    assert [(p["work_fraction"], p["psnr_mean"]) for p in script.frontier(curve)] == [(0.2, 25), (0.3, 33), (0.5, 40)]
    assert script.least_work_at(curve, 30)["work_fraction"] == 0.3
    assert script.least_work_at(curve, 35)["work_fraction"] == 0.5
    assert script.least_work_at(curve, 45) is None


def test_timing_flags_a_point_faster_than_its_ideal(script):
    baseline = script.Method("uncached", {}, "native", seconds=[2.0, 2.2, 1.8])
    method = script.Method("TeaCache", {"thresh": 1}, "native", seconds=[0.8, 1.0, 0.6], timed_work=[0.5] * 3)
    timing = script.timing(method, baseline)
    assert timing["speedup"] == pytest.approx(2.5) and timing["ideal_speedup"] == pytest.approx(2.0)
    assert timing["speedup_min"] == pytest.approx(2.2) and timing["speedup_max"] == pytest.approx(3.0)
    assert timing["above_ideal"]
    method.seconds = [1.25, 1.2, 1.0]
    assert not script.timing(method, baseline)["above_ideal"]


def test_forecast_variants_are_parsed_and_bad_ones_refused(script):
    assert script._forecast_variant("1:0.5") == (1, 0.5, "steps", False, 0)
    assert script._forecast_variant("1:0.5:indicator") == (1, 0.5, "indicator", False, 0)
    assert script._forecast_variant("0") == (0, 1.0, "steps", False, 0)
    assert script._forecast_variant("1:0.5:indicator:cadence:2") == (1, 0.5, "indicator", True, 2)
    assert script._forecast_variant("1:0.5:steps:cadence") == (1, 0.5, "steps", True, 0)
    assert script._forecast_variant("1:0.5:steps::3") == (1, 0.5, "steps", False, 3)
    label = script.forecast_label("modulated_input", (1, 0.5, "indicator", True, 2), False)
    assert label == "Forecast (extrapolation x0.5, slope from the indicator, cadence, last 2 steps forecast)"
    bad_ones = ("2", "1:1.5", "0:0.5", "one", "1:0.5:output", "0:1:indicator", "1:0.5:steps:rhythm", "1:0.5:steps::-1")
    for bad in (*bad_ones, "1:0.5:steps:cadence:x", "1:0.5:steps:cadence:2:3"):
        with pytest.raises(argparse.ArgumentTypeError, match="ORDER"):
            script._forecast_variant(bad)
