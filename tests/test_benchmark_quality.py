"""scripts/benchmark_quality.py on a tiny sweep: every method runs, the JSON is complete and consistent."""

from __future__ import annotations

import json
import math

import pytest

from tests.utils import REPO, load_script

pytest.importorskip("diffusers")


@pytest.mark.parametrize("model", ["wan-digits", "flux-digits"])
def test_benchmark_tiny_sweep_writes_valid_json(tmp_path, model):
    output = tmp_path / "bench.json"
    args = ["--model", str(REPO / "demo_models" / model), "--config", model, "--output", str(output)]
    args += ["--pairs", "2", "--steps", "6", "--rounds", "1", "--calibration-pairs", "1"]
    args += ["--teacache-thresholds", "60", "300", "--fbc-thresholds", "0.1", "0.5"]
    args += ["--magcache-thresholds", "0.1", "0.5", "--taylorseer-intervals", "2", "3"]
    args += ["--teacache-variants", "0", "1:1"]
    script = load_script("benchmark_quality")
    assert script.main(args) == 0
    report = json.loads(output.read_text())
    points = report["points"]
    methods = [p["method"] for p in points]
    assert methods[:2] == ["uncached", "uncached (diffusers)"]
    teacache = next(m for m in methods if m.startswith("TeaCache"))
    for name in (teacache, "FirstBlockCache", "MagCache", "TaylorSeer"):
        assert methods.count(name) == 2
    for point in points:
        assert 0 <= point["skipped_fraction"] <= 1 and point["speedup"] > 0
        assert len(point["seconds"]) == 1 and -1 <= point["ssim_mean"] <= 1
    # Baselines against themselves; the two implementations agree with each other.
    assert all(p["psnr_mean"] == report["psnr_cap_db"] for p in points[:2])
    assert report["uncached_native_vs_diffusers"]["psnr_mean"] > 60
    # TaylorSeer computes its 3 warm-up steps, then every `interval`-th step from step 4 on: with interval 2
    # it predicts steps 3 and 5 of 6, with interval 3 steps 3 and 5 too (step 4 computes, step 7 would).
    taylor = [p for p in points if p["method"] == "TaylorSeer"]
    assert [math.isclose(p["skipped_fraction"], 2 / 6) for p in taylor] == [True, True]
    # 300 skips at least as much as 60 (6 steps: large distances, far outside the fit; first and last compute).
    ours = [p for p in points if p["method"] == teacache]
    assert ours[1]["skipped_fraction"] >= ours[0]["skipped_fraction"] > 0
    assert len(report["magcache_ratios"]) == 6
    # The second variant: extrapolated residual, at most one skipped step in a row.
    limited = [p for p in points if p["method"].endswith("residual order 1, max 1 skips in a row)")]
    # Steps 1 and 3 of 0..5 at most: 2 and 4 must compute, 0 and 5 always do.
    assert limited[0]["skipped_fraction"] <= 2 / 6 + 1e-9 and math.isclose(limited[1]["skipped_fraction"], 2 / 6)
    curves = {teacache, limited[0]["method"], script.ANY_SETTING}
    assert set(report["summary"]["best_at_30db"]) == curves | {"FirstBlockCache", "MagCache", "TaylorSeer"}
    # The best of all settings, at a peer point: the best PSNR among our points at least as fast.
    rows = report["summary"]["comparisons"][script.ANY_SETTING]["equal_speedup_rows"]
    ours_all = [p for p in points if p["method"] in curves]
    for row in rows:
        faster = [p["psnr_mean"] for p in ours_all if p["skipped_fraction"] >= row["at_skipped_fraction"]]
        assert row["our_psnr_at_skipped_fraction"] == (max(faster) if faster else None)
