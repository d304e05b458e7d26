"""Wan2.2 A14B: one TeaCache fit per expert, in the zoo format, the pipeline and calibration (tiny random experts)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from teacache_models.calibration import fit_polynomial
from teacache_models.pipelines import load_pipeline
from teacache_models.zoo import load_zoo_entry
from tests.test_pipeline_fixtures import save_wan
from tests.utils import load_script

pytest.importorskip("ftfy")  # diffusers' Wan prompt cleaning needs it
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

STEPS = 8
HEADER = """name: tiny-a14b
manifest: wan2.2-t2v-a14b
family: wan
task: t2v
transformer: WanTransformer3DModel
sampling: {num_inference_steps: 8, guidance_scale: 4.0, guidance_scale_2: 3.0, height: 32, width: 48, num_frames: 5}
teacache:
  default: slow
"""
# The high-noise expert rescales every distance to ~0 (skips), the low-noise one to 10 (computes).
PER_EXPERT_FITS = """  fits:
    transformer:
      temb: {coefficients: [0.0, 0.001], source: "test: skip"}
    transformer_2:
      temb: {coefficients: [0.0, 10.0], source: "test: compute"}
"""
PRESETS = """  presets:
    slow: {teacache_thresh: 0.2, indicator: temb, source: test}
"""


@pytest.fixture(scope="module")
def a14b_folder(tmp_path_factory):
    return save_wan(tmp_path_factory.mktemp("wan-a14b"), "t2v-a14b")


def _write(path, fits: str = PER_EXPERT_FITS, presets: str = PRESETS):
    path.write_text(HEADER + fits + presets)
    return path


def _computed_steps(result) -> dict[str, tuple[int, ...]]:
    return {name: stats.positive.computed_steps for name, stats in result.expert_stats.items()}


# Made-up fits that do not match the random experts: the fit monitor says so.
@pytest.mark.filterwarnings("ignore:TeaCache's coefficients do not fit:RuntimeWarning")
def test_per_expert_fits_reach_each_expert_and_decide_its_steps(tmp_path, a14b_folder):
    entry = load_zoo_entry(_write(tmp_path / "tiny.yaml"))
    assert entry.fits == {} and entry.presets["slow"].params.coefficients is None
    assert entry.teacache_fits("transformer") == {"temb": (0.0, 0.001)}
    assert entry.teacache_fits("transformer_2") == {"temb": (0.0, 10.0)}
    pipe = load_pipeline(a14b_folder, zoo_entry=entry)
    assert pipe.transformer.teacache_fits == {"temb": (0.0, 0.001)}
    assert pipe.transformer_2.teacache_fits == {"temb": (0.0, 10.0)}
    params = pipe.default_sampling_params()
    steps = _computed_steps(pipe("a fox", params))
    switch = steps["transformer_2"][0]
    assert 1 < switch < STEPS - 1
    # High noise: only its first step computes; low noise: every step, as each expert's own fit decides.
    assert steps == {"transformer": (0,), "transformer_2": tuple(range(switch, STEPS))}
    # The same fits set by hand give the same decisions; the high-noise fit on both experts does not.
    pipe.transformer_2.set_teacache_fits({"temb": (0.0, 0.001)})
    joint = _computed_steps(pipe("a fox", params))
    assert joint["transformer_2"] == (switch, STEPS - 1)


def test_entry_without_per_expert_fits_gives_both_experts_the_same(a14b_folder):
    entry = load_zoo_entry("wan2.2-t2v-a14b")
    assert entry.expert_fits == {}
    assert entry.teacache_fits("transformer") == entry.teacache_fits("transformer_2") == entry.teacache_fits()


@pytest.mark.parametrize(
    ("fits", "presets", "message"),
    [
        (
            PER_EXPERT_FITS.replace("transformer_2:", "transformer_3:"),
            PRESETS,
            r"teacache\.fits: \['transformer_3'\] are not expert names",
        ),
        (
            PER_EXPERT_FITS + '    temb: {coefficients: [1.0, 0.0], source: "x"}\n',
            PRESETS,
            r"teacache\.fits: \['temb'\] are not expert names",
        ),
        (
            PER_EXPERT_FITS.replace(
                "      temb: {coefficients: [0.0, 10.0]", "      timestep_proj: {coefficients: [0.0, 10.0]"
            ),
            PRESETS,
            r"teacache\.fits\.transformer is missing indicator\(s\) \['timestep_proj'\] that .*transformer_2",
        ),
        (
            PER_EXPERT_FITS.split("    transformer_2:")[0],
            PRESETS,
            r"per-expert fits but none for \['transformer_2'\]",
        ),
        (
            PER_EXPERT_FITS.replace("temb: {coefficients: [0.0, 10.0]", "img_mod: {coefficients: [0.0, 10.0]"),
            PRESETS,
            r"teacache\.fits\.transformer_2: indicator 'img_mod' is not one of",
        ),
        (
            PER_EXPERT_FITS,
            PRESETS.replace("indicator: temb", "indicator: timestep_proj"),
            r"teacache\.presets\.slow: indicator 'timestep_proj' has no per-expert fit",
        ),
        (
            PER_EXPERT_FITS,
            PRESETS.replace("indicator: temb", "indicator: temb, coefficients: [1.0, 0.0]"),
            r"teacache\.presets\.slow: coefficients: this entry has per-expert fits",
        ),
    ],
)
def test_bad_per_expert_fits_are_clear_errors(tmp_path, fits, presets, message):
    path = _write(tmp_path / "bad.yaml", fits, presets)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        load_zoo_entry(path)


# The entry's other indicator is borrowed: its loader says so.
@pytest.mark.filterwarnings("ignore:no TeaCache coefficients have been fitted for tiny-a14b:UserWarning")
def test_calibrate_fits_one_polynomial_per_expert_and_writes_them(tmp_path, a14b_folder, capsys):
    config = _write(
        tmp_path / "tiny.yaml",
        "  # Shared fits, replaced by per-expert ones.\n  fits:\n"
        '    modulated_input: {coefficients: [1.0, 0.0], source: "shared"}\n'
        '    timestep_proj: {coefficients: [2.0, 0.0], source: "shared", borrowed_from: wan2.1-t2v-14b}\n',
        PRESETS.replace("indicator: temb", "indicator: modulated_input"),
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue bird\n")
    args = ["--model", str(a14b_folder), "--config", str(config), "--prompts-file", str(prompts), "--seeds", "2"]
    # The modulated input depends on the prompt and seed, so each expert gets distinct x values (temb does not).
    args += [
        "--indicator",
        "modulated_input",
        "--degree",
        "2",
        "--json",
        str(tmp_path / "fit.json"),
        "--write-config",
        str(config),
    ]
    args += ["--table-thresholds", "0.05", "0.5", "--table-pairs", "1"]
    assert load_script("calibrate").main(args) == 0
    record = json.loads((tmp_path / "fit.json").read_text())
    experts = record["experts"]
    assert set(experts) == {"transformer", "transformer_2"}
    points = {name: np.array(e["points"]["positive"] + e["points"]["negative"]) for name, e in experts.items()}
    # Each expert pairs only its own consecutive steps: per generation and branch, STEPS - 2 pairs in all.
    assert sum(len(p) for p in points.values()) == 2 * 2 * 2 * (STEPS - 2)
    by_hand = {name: np.polyfit(p[:, 0], p[:, 1], 2) for name, p in points.items()}
    for name, expert in experts.items():
        assert expert["fit"]["coefficients"] == pytest.approx(by_hand[name], rel=1e-9, abs=1e-12)
    joint = fit_polynomial(*np.concatenate(list(points.values())).T, degree=2).coefficients
    for name in experts:
        assert not np.allclose(joint, by_hand[name], rtol=1e-3)
    assert not np.allclose(by_hand["transformer"], by_hand["transformer_2"], rtol=1e-3)

    entry = load_zoo_entry(config)
    for name in experts:
        assert entry.teacache_fits(name)["modulated_input"] == pytest.approx(by_hand[name], rel=1e-7)
        # The other indicator's shared fit is kept for each expert, still marked as borrowed.
        assert entry.expert_fits[name]["timestep_proj"].borrowed_from == "wan2.1-t2v-14b"
        assert entry.expert_fits[name]["modulated_input"].source.startswith("coefficients: scripts/calibrate.py fit on")
        # Each expert's own calibrated range: the distances that expert saw.
        low, high = points[name][:, 0].min(), points[name][:, 0].max()
        assert entry.expert_fits[name]["modulated_input"].calibrated_range == pytest.approx((low, high), rel=1e-5)
    assert "# Shared fits, replaced by per-expert ones." in config.read_text()
    assert [row.teacache_thresh for row in entry.threshold_table.rows] == [0.05, 0.5]
    pipe = load_pipeline(a14b_folder, zoo_entry=entry)
    for name, model in pipe.teacache_models().items():
        assert model.teacache_fits["modulated_input"] == pytest.approx(by_hand[name], rel=1e-7)
    out = capsys.readouterr().out
    assert "transformer: " in out and "transformer_2: " in out and "per-expert fits of indicator modulated_input" in out


@pytest.mark.filterwarnings("ignore:TeaCache's coefficients do not fit:RuntimeWarning")
def test_calibrate_adds_a_preset_without_coefficients_to_an_expert_entry_with_none(tmp_path, a14b_folder, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(HEADER.replace("default: slow", 'default: "off"') + PER_EXPERT_FITS + "  presets: {}\n")
    args = ["--model", str(a14b_folder), "--config", str(config), "--seeds", "1", "--indicator", "modulated_input"]
    args += ["--prompts-file", str(_write_prompts(tmp_path)), "--degree", "2", "--write-config", str(config)]
    # PSNR of pixels in [0, 1] is never below 0 dB: the largest threshold passes.
    args += ["--table-thresholds", "0.05", "0.5", "--table-pairs", "1", "--min-psnr", "0"]
    assert load_script("calibrate").main(args) == 0
    entry = load_zoo_entry(config)
    assert entry.default_preset == "calibrated" and entry.threshold_table.preset == "calibrated"
    params = entry.presets["calibrated"].params
    # Each expert takes its own new fit from teacache.fits: the preset carries none.
    assert (params.teacache_thresh, params.indicator, params.coefficients) == (0.5, "modulated_input", None)
    assert entry.presets["calibrated"].source.startswith("coefficients: teacache.fits (each expert its own); threshold")
    for name in ("transformer", "transformer_2"):
        assert set(entry.expert_fits[name]) == {"temb", "modulated_input"}
    assert "preset 'calibrated' is now the default" in capsys.readouterr().out


def _write_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red fox\na blue bird\n")
    return path
