"""Per-CFG-branch fits and per-expert calibrated ranges: calibration, the zoo format and the cache.

Calibration fits one polynomial per branch where the branches differ (and says so); the zoo holds a fit's
`coefficients_negative` and `calibrated_range` (per expert for Wan2.2 A14B); each branch then rescales with
its own polynomial, and the fit monitor judges each expert against its own range.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from teacache_models import TeaCacheParams
from teacache_models.calibration import (
    BRANCHES_DIFFER_GAIN,
    BranchFits,
    DistanceRecord,
    fit_branches,
    fit_polynomial,
)
from teacache_models.calibration_config import (
    write_coefficients,
    write_expert_fits,
)
from teacache_models.params import RescalingFit
from teacache_models.pipelines import load_pipeline
from teacache_models.zoo import ZOO_DIR, load_zoo_entry
from tests.test_calibration_experts import HEADER, PRESETS, _write
from tests.test_pipeline_fixtures import save_wan
from tests.utils import REPO, load_script

# Made-up polynomials: a rescaled distance of ~0 skips every step it may, one of ~1 computes every step.
SKIP, COMPUTE = (0.0, 0.001), (0.0, 10.0)


def _records(negative_slope: float, noise: float = 0.01, seed: int = 0) -> list[DistanceRecord]:
    """200 points per branch on y = 2x + 0.1 (positive) and y = negative_slope * x + 0.1 (negative)."""
    rng = np.random.default_rng(seed)
    records = []
    for negative, slope in ((False, 2.0), (True, negative_slope)):
        for index, x in enumerate(rng.uniform(0.05, 0.3, 200)):
            y = slope * x + 0.1 + rng.normal(0, noise)
            records.append(DistanceRecord(0, negative, index + 1, float(x), float(y)))
    return records


# ---- fitting per branch ------------------------------------------------------------------------------


def test_branches_that_differ_get_one_fit_each():
    fits = fit_branches(_records(negative_slope=3.0), degree=1)
    assert fits.per_branch and fits.residual_share < 1 - BRANCHES_DIFFER_GAIN
    assert fits.coefficients == pytest.approx((2.0, 0.1), abs=0.02)
    assert fits.coefficients_negative == pytest.approx((3.0, 0.1), abs=0.02)
    assert "one fit per CFG branch (the branches differ" in fits.describe()
    # The range covers both branches' distances.
    xs = [r.x for r in _records(3.0)]
    assert fits.calibrated_range == (min(xs), max(xs))


def test_branches_that_agree_share_one_fit_unless_asked():
    records = _records(negative_slope=2.0)
    fits = fit_branches(records, degree=1)
    assert not fits.per_branch and fits.coefficients_negative is None and fits.residual_share > 0.9
    assert fits.coefficients == fit_polynomial([r.x for r in records], [r.y for r in records], 1).coefficients
    assert "one fit for both branches" in fits.describe()
    assert fit_branches(records, degree=1, branch_fits="separate").per_branch
    assert not fit_branches(_records(negative_slope=3.0), degree=1, branch_fits="joint").per_branch
    positive_only = [r for r in records if not r.is_cfg_negative]
    assert not fit_branches(positive_only, degree=1, branch_fits="separate").per_branch
    with pytest.raises(ValueError, match=r"branch_fits must be one of \['auto', 'joint', 'separate'\], got 'both'"):
        fit_branches(records, branch_fits="both")


def test_write_coefficients_writes_and_removes_the_negative_branchs_polynomial(tmp_path):
    path = tmp_path / "flux-digits.yaml"
    path.write_text((ZOO_DIR / "flux-digits.yaml").read_text())
    fits = fit_branches(_records(negative_slope=3.0), degree=1)
    # The presets that carry the fit are written; the forecast ones, which carry none, take it from them.
    assert write_coefficients(path, "modulated_input", fits, "modulated_input") == ["slow", "fast"]
    entry = load_zoo_entry(path)
    for name, preset in entry.presets.items():
        assert preset.params.coefficients == pytest.approx(fits.coefficients, rel=1e-7)
        assert preset.params.coefficients_negative == pytest.approx(fits.coefficients_negative, rel=1e-7)
        assert preset.params.calibrated_range == pytest.approx(fits.calibrated_range, rel=1e-5)
        note = "coefficients: scripts/calibrate.py fit per CFG branch on 200 + 200 points"
        assert preset.source.startswith(note) == (preset.params.method != "forecast"), name
    assert entry.rescaling_fits()["modulated_input"].coefficients_negative == pytest.approx(fits.coefficients_negative)
    # A later joint fit takes the negative branch's polynomial away again.
    write_coefficients(path, "modulated_input", fit_branches(_records(2.0), degree=1), "modulated_input")
    assert "coefficients_negative" not in path.read_text()
    assert load_zoo_entry(path).presets["slow"].params.coefficients_negative is None


# ---- the zoo format and the cache ----------------------------------------------------------------------


def _flux_entry(tmp_path, fit: str):
    text = (ZOO_DIR / "flux-digits.yaml").read_text()
    text = re.sub(r"      coefficients: \[.*\]\n", "", text)
    text = re.sub(r"      calibrated_range: \[.*\]\n", "", text)
    text = text.replace("  default: slow\n", f"  default: slow\n  fits:\n    modulated_input: {fit}\n")
    path = tmp_path / "flux-digits.yaml"
    path.write_text(text)
    return load_zoo_entry(path)


@pytest.mark.filterwarnings("ignore:TeaCache's coefficients do not fit:RuntimeWarning")  # made-up polynomials
def test_each_branch_rescales_with_its_own_polynomial(tmp_path):
    entry = _flux_entry(
        tmp_path,
        f"{{coefficients: {list(SKIP)}, coefficients_negative: {list(COMPUTE)}, calibrated_range: [0.05, 0.2], "
        'source: "test"}',
    )
    params = entry.presets["slow"].params
    assert (params.coefficients, params.coefficients_negative, params.calibrated_range) == (SKIP, COMPUTE, (0.05, 0.2))
    pipe = load_pipeline(REPO / "demo_models" / "flux-digits", zoo_entry=entry)
    assert pipe.transformer.teacache_rescaling_fits["modulated_input"] == RescalingFit(SKIP, COMPUTE, (0.05, 0.2))
    assert pipe.transformer.teacache_fits == {"modulated_input": SKIP}
    sampling = pipe.default_sampling_params(seed=0)
    steps = sampling.num_inference_steps
    stats = pipe("a handwritten digit 3", sampling).teacache_stats
    # The positive branch computes only its forced first and last steps, the negative one every step.
    assert stats.positive.computed_steps == (0, steps - 1)
    assert stats.negative.computed_steps == tuple(range(steps))
    assert stats.positive.coefficient_fit.calibrated_range == (0.05, 0.2)
    # The same polynomials given in TeaCacheParams decide the same; without the negative one both branches skip.
    by_hand = TeaCacheParams(teacache_thresh=params.teacache_thresh, coefficients=SKIP, coefficients_negative=COMPUTE)
    pipe.transformer.set_teacache_fits({})
    again = pipe("a handwritten digit 3", dataclasses.replace(sampling, teacache_params=by_hand)).teacache_stats
    assert again == stats
    one = dataclasses.replace(by_hand, coefficients_negative=None)
    joint = pipe("a handwritten digit 3", dataclasses.replace(sampling, teacache_params=one)).teacache_stats
    assert joint.negative.computed_steps == (0, steps - 1)


@pytest.mark.parametrize(
    ("fit", "message"),
    [
        ('{coefficients: [1.0, 0.0], coefficients_negative: "x", source: "t"}', r"coefficients_negative must be"),
        ('{coefficients: [1.0, 0.0], calibrated_range: [0.3, 0.1], source: "t"}', r"calibrated_range must be"),
        ('{coefficients: [1.0, 0.0], calibrated_range: [0.1], source: "t"}', r"calibrated_range must be"),
    ],
)
def test_bad_branch_fits_and_ranges_are_clear_errors(tmp_path, fit, message):
    with pytest.raises(ValueError, match=r"teacache\.fits\.modulated_input: " + message):
        _flux_entry(tmp_path, fit)


def test_negative_coefficients_need_positive_ones():
    with pytest.raises(ValueError, match="coefficients_negative needs coefficients"):
        TeaCacheParams(coefficients_negative=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"coefficients_negative\[1\] must be a finite real number"):
        TeaCacheParams(coefficients=(1.0,), coefficients_negative=(1.0, float("nan")))
    assert RescalingFit((1.0, 0.0)).for_branch(True) == (1.0, 0.0)
    assert RescalingFit((1.0, 0.0), (2.0, 0.0)).for_branch(True) == (2.0, 0.0)


# ---- Wan2.2 A14B: each expert's calibrated range -------------------------------------------------------


@pytest.fixture(scope="module")
def a14b_folder(tmp_path_factory):
    return save_wan(tmp_path_factory.mktemp("wan-a14b-ranges"), "t2v-a14b")


RANGED_FITS = """  fits:
    transformer:
      temb: {coefficients: [0.0, 0.001], calibrated_range: [0.0, 0.001], source: "test"}
    transformer_2:
      temb: {coefficients: [0.0, 10.0], coefficients_negative: [0.0, 0.001], calibrated_range: [0.0, 100.0],
             source: "test"}
"""


@pytest.mark.filterwarnings("ignore:TeaCache's coefficients do not fit:RuntimeWarning")
def test_each_expert_is_judged_against_its_own_calibrated_range(tmp_path, a14b_folder):
    entry = load_zoo_entry(_write(tmp_path / "tiny.yaml", RANGED_FITS))
    assert entry.expert_fits["transformer"]["temb"].calibrated_range == (0.0, 0.001)
    assert entry.expert_fits["transformer_2"]["temb"].calibrated_range == (0.0, 100.0)
    assert entry.presets["slow"].params.calibrated_range is None
    pipe = load_pipeline(a14b_folder, zoo_entry=entry)
    result = pipe("a fox", pipe.default_sampling_params())
    high, low = result.expert_stats["transformer"], result.expert_stats["transformer_2"]
    # The high-noise expert's distances leave its narrow range; the low-noise one's stay inside its wide one.
    assert high.positive.coefficient_fit.calibrated_range == (0.0, 0.001)
    assert high.positive.coefficient_fit.outside_calibrated_range is True
    assert low.positive.coefficient_fit.calibrated_range == (0.0, 100.0)
    assert low.positive.coefficient_fit.outside_calibrated_range is False
    # The low-noise expert's negative branch has its own polynomial: it skips where the positive one computes.
    switch = low.positive.computed_steps[0]
    assert low.positive.computed_steps == tuple(range(switch, 8))
    assert low.negative.computed_steps == (switch, 7)


def test_a_preset_range_would_override_both_experts_and_is_refused(tmp_path):
    presets = PRESETS.replace("indicator: temb", "indicator: temb, calibrated_range: [0.0, 1.0]")
    path = _write(tmp_path / "bad.yaml", RANGED_FITS, presets)
    with pytest.raises(ValueError, match=r"presets\.slow: calibrated_range: this entry has per-expert fits"):
        load_zoo_entry(path)


def test_write_expert_fits_records_each_experts_range_and_branches(tmp_path):
    path = _write(tmp_path / "tiny.yaml", RANGED_FITS)
    differ = fit_branches(_records(negative_slope=3.0), degree=1)
    agree = fit_branches(_records(negative_slope=2.0, seed=1), degree=1)
    assert isinstance(differ, BranchFits) and differ.per_branch and not agree.per_branch
    write_expert_fits(path, "temb", {"transformer": agree, "transformer_2": differ})
    entry = load_zoo_entry(path)
    for name, fits in (("transformer", agree), ("transformer_2", differ)):
        fit = entry.expert_fits[name]["temb"]
        assert fit.calibrated_range == pytest.approx(fits.calibrated_range, rel=1e-5)
        assert fit.coefficients == pytest.approx(fits.coefficients, rel=1e-7)
    assert entry.expert_fits["transformer"]["temb"].coefficients_negative is None
    assert entry.expert_fits["transformer_2"]["temb"].coefficients_negative == pytest.approx(
        differ.coefficients_negative, rel=1e-7
    )
    assert HEADER.splitlines()[0] in path.read_text()


# ---- scripts/calibrate.py ------------------------------------------------------------------------------


def test_calibrate_says_whether_it_fits_per_branch_and_writes_it(tmp_path, capsys):
    config = tmp_path / "wan-digits.yaml"
    config.write_text((ZOO_DIR / "wan-digits.yaml").read_text())
    args = ["--model", str(REPO / "demo_models" / "wan-digits"), "--config", "wan-digits", "--seeds", "1"]
    args += ["--indicator", "modulated_input", "--steps", "6", "--degree", "2", "--table-thresholds"]
    args += ["--json", str(tmp_path / "fit.json")]
    assert load_script("calibrate").main([*args, "--write-config", str(config)]) == 0
    # The demo's branches agree: one polynomial for both.
    assert "one fit for both branches" in capsys.readouterr().out
    assert load_zoo_entry(config).presets["slow"].params.coefficients_negative is None

    assert load_script("calibrate").main([*args, "--branch-fits", "separate", "--write-config", str(config)]) == 0
    assert "one fit per CFG branch" in capsys.readouterr().out
    record = json.loads((tmp_path / "fit.json").read_text())
    assert record["branch_fits"]["per_branch"] is True
    by_hand = {branch: np.polyfit(*np.array(record["points"][branch]).T, 2) for branch in ("positive", "negative")}
    params = load_zoo_entry(config).presets["slow"].params
    assert params.coefficients == pytest.approx(by_hand["positive"], rel=1e-7)
    assert params.coefficients_negative == pytest.approx(by_hand["negative"], rel=1e-7)
    xs = [x for branch in ("positive", "negative") for x, _ in record["points"][branch]]
    assert params.calibrated_range == pytest.approx((min(xs), max(xs)), rel=1e-5)
