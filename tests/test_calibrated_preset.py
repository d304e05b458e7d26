"""Calibrating an entry that ships no preset: `scripts/calibrate.py --write-config` adds one, `calibrated`, with
the new fit and a threshold chosen from the measured threshold table (the README's command for the FLUX.2
[klein] and newer Qwen entries), and writes a fit kept in `teacache.fits` there."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from teacache_models.calibration import (
    BranchFits,
    fit_polynomial,
)
from teacache_models.calibration_config import (
    add_preset,
    threshold_for_psnr,
    threshold_rule_note,
    write_coefficients,
    write_threshold_table,
)
from teacache_models.params import TeaCacheParams
from teacache_models.zoo import ZOO_DIR, load_zoo_entry
from tests.utils import REPO, load_script

ROWS = [(0.05, 1.0, 100.0), (0.1, 0.8, 41.0), (0.2, 0.6, 29.5), (0.3, 0.5, 31.0), (0.5, 0.4, 20.0)]


def _per_branch_fit() -> BranchFits:
    rng = np.random.default_rng(0)
    x = rng.uniform(0.05, 0.2, 50)
    positive = fit_polynomial(x, 3 * x**2 + 0.5 * x, 2)
    negative = fit_polynomial(x, -(x**2) + 2 * x + 0.01, 2)
    joint = fit_polynomial(np.concatenate([x, x]), np.concatenate([3 * x**2 + 0.5 * x, -(x**2) + 2 * x + 0.01]), 2)
    return BranchFits(joint, positive, negative, residual_share=0.01)


def _content_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---- the threshold rule -------------------------------------------------------------------------------


def test_the_rule_stops_at_the_first_threshold_below_the_floor():
    # 0.3 passes again (31 dB) but 0.2 failed before it: the rule keeps 0.1, in whatever order the rows come.
    assert threshold_for_psnr(ROWS[::-1], 30.0) == (0.1, 0.8, 41.0)
    assert threshold_for_psnr(ROWS, 29.0) == (0.3, 0.5, 31.0)
    assert threshold_for_psnr(ROWS, 10.0) == (0.5, 0.4, 20.0)
    with pytest.raises(ValueError, match=r"keeps a mean PSNR of 101 dB .* the smallest, 0\.05, gives 100\.00 dB"):
        threshold_for_psnr(ROWS, 101.0)
    with pytest.raises(ValueError, match="threshold table is empty"):
        threshold_for_psnr([], 30.0)
    note = threshold_rule_note(ROWS, (0.1, 0.8, 41.0), 30.0, 4)
    assert ">= 30 dB on 4 prompt/seed pairs: 0.1, 80.0% of the block-stack calls computed, 41.00 dB" in note
    assert "next measured, 0.2: 60.0% computed, 29.50 dB" in note


# ---- the zoo-config writers -----------------------------------------------------------------------------


def test_add_preset_writes_a_per_branch_fit_into_an_entry_without_presets(tmp_path):
    path = tmp_path / "qwen-image-2.1.yaml"
    shutil.copy(ZOO_DIR / "qwen-image-2.1.yaml", path)
    original = path.read_text()
    assert load_zoo_entry(path).default_preset == "off"
    fits = _per_branch_fit()
    params = TeaCacheParams(
        teacache_thresh=0.3,
        indicator="modulated_input",
        coefficients=fits.coefficients,
        coefficients_negative=fits.coefficients_negative,
        calibrated_range=fits.calibrated_range,
    )
    add_preset(path, "calibrated", params, 'fit "a"; threshold: rule', make_default=True)

    entry = load_zoo_entry(path)
    assert entry.default_preset == "calibrated" and list(entry.presets) == ["calibrated"]
    written = entry.presets["calibrated"]
    assert written.source == 'fit "a"; threshold: rule'
    assert written.params.coefficients == pytest.approx(fits.coefficients, rel=1e-8)
    assert written.params.coefficients_negative == pytest.approx(fits.coefficients_negative, rel=1e-8)
    assert written.params.calibrated_range == pytest.approx(fits.calibrated_range, rel=1e-5)
    assert dataclasses.replace(
        written.params, coefficients=None, coefficients_negative=None, calibrated_range=None
    ) == TeaCacheParams(teacache_thresh=0.3, indicator="modulated_input")
    assert entry.sampling_params("default").teacache_params == written.params
    # Every comment and key stays; only `default` and the empty `presets: {}` changed.
    kept = [line for line in _content_lines(original) if line.strip() not in ('default: "off"', "presets: {}")]
    text = path.read_text()
    assert all(line in text.splitlines() for line in kept)
    assert "  default: calibrated\n  presets:\n    # Added by scripts/calibrate.py --write-config.\n" in text
    assert "      indicator: modulated_input\n" in text


def test_add_preset_appends_keeps_the_default_and_refuses_what_does_not_load(tmp_path):
    path = tmp_path / "wan-digits.yaml"
    shutil.copy(ZOO_DIR / "wan-digits.yaml", path)
    params = TeaCacheParams(teacache_thresh=0.12, indicator="temb", coefficients=(2.0, 0.0), residual_order=1)
    add_preset(path, "calibrated", params, "test", make_default=False)
    entry = load_zoo_entry(path)
    assert entry.default_preset == "slow" and list(entry.presets) == ["slow", "fast", "forecast", "calibrated"]
    assert entry.presets["calibrated"].params == params
    assert entry.presets["forecast"] == load_zoo_entry(ZOO_DIR / "wan-digits.yaml").presets["forecast"]
    before = path.read_text()
    with pytest.raises(ValueError, match="already has a TeaCache preset 'calibrated'"):
        add_preset(path, "calibrated", params, "test")
    # An indicator the model does not compute: the loader's error, and the file as it was (no leftovers).
    with pytest.raises(ValueError, match=r"wan-digits\.yaml: teacache\.presets\.other: .*the file was left as it was"):
        add_preset(path, "other", dataclasses.replace(params, indicator="nonsense"), "test")
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["wan-digits.yaml"]
    # The other writers leave a file the loader would refuse as it was too.
    with pytest.raises(ValueError, match=r"preset 'nonsense' is not one of .*the file was left as it was"):
        write_threshold_table(path, "nonsense", [(0.1, 0.5, 30.0)], "test")
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["wan-digits.yaml"]
    # Per-expert fits: a preset's coefficients would override both experts'.
    experts = tmp_path / "experts.yaml"
    header = (
        "name: tiny\nmanifest: wan2.2-t2v-a14b\nfamily: wan\ntransformer: WanTransformer3DModel\n"
        "sampling: {num_inference_steps: 8, guidance_scale: 4.0}\nteacache:\n  default: slow\n  fits:\n"
        '    transformer:\n      temb: {coefficients: [0.0, 1.0], source: "a"}\n'
        '    transformer_2:\n      temb: {coefficients: [0.0, 2.0], source: "b"}\n  presets:\n'
    )
    experts.write_text(header + "    slow: {teacache_thresh: 0.2, indicator: temb, source: test}\n")
    with pytest.raises(ValueError, match=r"preset 'slow' is written in flow style"):
        write_coefficients(experts, "temb", _per_branch_fit(), "temb")
    experts.write_text(header + "    slow:\n      teacache_thresh: 0.2\n      indicator: temb\n      source: test\n")
    before = experts.read_text()
    with pytest.raises(ValueError, match=r"slow: coefficients: this entry has per-expert fits.*left as it was"):
        write_coefficients(experts, "temb", _per_branch_fit(), "temb")
    assert experts.read_text() == before and not list(tmp_path.glob(".*"))


def test_write_coefficients_replaces_a_fit_kept_in_teacache_fits(tmp_path):
    # qwen-image-edit keeps Qwen-Image's borrowed fit in teacache.fits and has no preset.
    path = tmp_path / "qwen-image-edit.yaml"
    shutil.copy(ZOO_DIR / "qwen-image-edit.yaml", path)
    fits = _per_branch_fit()
    assert write_coefficients(path, "modulated_input", fits, "modulated_input") == []
    fit = load_zoo_entry(path).fits["modulated_input"]
    assert fit.coefficients == pytest.approx(fits.coefficients, rel=1e-8)
    assert fit.coefficients_negative == pytest.approx(fits.coefficients_negative, rel=1e-8)
    assert fit.borrowed_from is None and fit.source.startswith("coefficients: scripts/calibrate.py fit per CFG branch")
    assert "# reuse FLUX.1's. Here the fit is BORROWED from qwen-image" in path.read_text()

    # wan2.2-ti2v-5b: presets without coefficients take the fit from teacache.fits; they stay as they are.
    path = tmp_path / "wan2.2-ti2v-5b.yaml"
    shutil.copy(ZOO_DIR / "wan2.2-ti2v-5b.yaml", path)
    assert write_coefficients(path, "temb", fits, "temb") == []
    entry, shipped = load_zoo_entry(path), load_zoo_entry(ZOO_DIR / "wan2.2-ti2v-5b.yaml")
    assert entry.presets["slow"].params.coefficients == pytest.approx(fits.coefficients, rel=1e-8)
    assert entry.presets["slow"].source == shipped.presets["slow"].source
    assert entry.fits["timestep_proj"] == shipped.fits["timestep_proj"]


# ---- scripts/calibrate.py on a tiny random FLUX.2 [klein] ---------------------------------------------


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tests.flux2_fixtures import save_flux2

    return save_flux2(tmp_path_factory.mktemp("klein"), "klein")


def _klein_entry(tmp_path):
    """The shipped flux2-klein-4b entry (no preset, TeaCache off), at a size the tiny model runs fast."""
    path = tmp_path / "flux2-klein-4b.yaml"
    text = (ZOO_DIR / "flux2-klein-4b.yaml").read_text()
    path.write_text(text.replace("height: 1024", "height: 32").replace("width: 1024", "width: 32"))
    return path


@pytest.mark.filterwarnings("ignore")
def test_calibrate_adds_a_preset_to_an_entry_without_one(tmp_path, klein_folder, capsys):
    from teacache_models.pipelines import load_pipeline

    config = _klein_entry(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na cat on a mat\n")
    args = ["--model", str(klein_folder), "--config", str(config), "--prompts-file", str(prompts), "--seeds", "2"]
    args += ["--steps", "8", "--degree", "2", "--json", str(tmp_path / "fit.json"), "--table-pairs", "2"]
    # The tiny random model's steps differ a lot (distances ~0.3-0.5), so skipping starts above 1.
    args += ["--table-thresholds", "1", "1.5", "3", "4", "6", "10", "--min-psnr", "46"]
    # --write-config without a YAML writes the entry's own (here the --config one).
    assert load_script("calibrate").main([*args, "--write-config"]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "fit.json").read_text())
    rows = [tuple(row) for row in record["threshold_table"]["rows"]]
    # The rule, by hand: the largest threshold before the first one under 46 dB.
    passing = [row for row in rows if all(r[2] >= 46 for r in rows if r[0] <= row[0])]
    assert passing, rows
    chosen = passing[-1]

    entry = load_zoo_entry(config)
    assert entry.default_preset == "calibrated" and list(entry.presets) == ["calibrated"]
    preset = entry.presets["calibrated"]
    assert preset.params.teacache_thresh == chosen[0] and preset.params.indicator == "modulated_input"
    assert preset.params.coefficients == pytest.approx(record["fit"]["coefficients"], rel=1e-7)
    assert preset.params.calibrated_range == pytest.approx(tuple(record["fit"]["x_range"]), rel=1e-5)
    assert preset.source.startswith(f"coefficients: scripts/calibrate.py fit on {record['fit']['num_points']} points")
    assert f">= 46 dB on 2 prompt/seed pairs of 8 steps: {chosen[0]:g}, {chosen[1]:.1%}" in preset.source
    assert entry.threshold_table.preset == "calibrated" and len(entry.threshold_table.rows) == len(rows)
    assert "TeaCache was off by default; preset 'calibrated' is now the default" in out
    assert "measured at 8 steps (--steps); the entry samples 4" in out
    assert "# No TeaCache fit is published for FLUX.2 [klein] 4B" in config.read_text()

    # The entry's default now runs TeaCache as measured: the two table pairs compute the row's fraction, at
    # the row's PSNR against uncached.
    pipe = load_pipeline(klein_folder, zoo_entry=entry)
    fractions, psnrs = [], []
    for seed in (1000, 1001):
        uncached = pipe("a red fox", pipe.default_sampling_params(teacache="off", seed=seed, num_inference_steps=8))
        cached = pipe("a red fox", pipe.default_sampling_params(seed=seed, num_inference_steps=8))
        stats = pipe.transformer.teacache_stats()
        fractions.append(stats.num_computed / (stats.num_computed + stats.num_skipped))
        mse = (cached.images.float() - uncached.images.float()).pow(2).mean().item()
        psnrs.append(min(100.0, -10 * np.log10(mse)) if mse else 100.0)
    assert np.mean(fractions) == pytest.approx(chosen[1], abs=1e-4)
    assert np.mean(psnrs) == pytest.approx(chosen[2], abs=0.01)


@pytest.mark.filterwarnings("ignore")
def test_calibrate_refuses_to_add_a_preset_without_a_threshold(tmp_path, klein_folder, capsys):
    config = _klein_entry(tmp_path)
    original = config.read_text()
    args = ["--model", str(klein_folder), "--config", str(config), "--seeds", "1", "--steps", "6", "--degree", "2"]
    # No table measured: refused before anything runs, naming the flag that measures it.
    with pytest.raises(SystemExit, match=r"no TeaCache preset using indicator 'modulated_input'.*--table-thresholds"):
        load_script("calibrate").main([*args, "--write-config", "--table-thresholds"])
    # No measured threshold reaches the floor: nothing written.
    with pytest.raises(SystemExit, match=r"no measured threshold keeps a mean PSNR of 1000 dB.*lower --min-psnr"):
        load_script("calibrate").main([*args, "--write-config", "--table-thresholds", "1.5", "--min-psnr", "1000"])
    assert config.read_text() == original
    # --write-config without a YAML needs a zoo entry.
    with pytest.raises(SystemExit, match="is not a zoo entry: give --config"):
        load_script("calibrate").main(["--model", str(klein_folder), "--write-config"])


def test_calibrate_adds_a_preset_beside_an_entrys_default(tmp_path, capsys):
    # wan-digits' presets all use block 0's modulated input; calibrating `temb` adds one that is not the default.
    config = tmp_path / "wan-digits.yaml"
    shutil.copy(ZOO_DIR / "wan-digits.yaml", config)
    shipped = load_zoo_entry(config)
    args = ["--model", str(REPO / "demo_models" / "wan-digits"), "--config", str(config), "--seeds", "1"]
    args += ["--indicator", "temb", "--steps", "6", "--degree", "2", "--write-config", str(config)]
    args += ["--table-thresholds", "0.05", "0.1", "--table-pairs", "1", "--min-psnr", "0"]
    assert load_script("calibrate").main(args) == 0
    out = capsys.readouterr().out
    entry = load_zoo_entry(config)
    assert entry.default_preset == "slow" and list(entry.presets) == ["slow", "fast", "forecast", "calibrated"]
    params = entry.presets["calibrated"].params
    assert (params.indicator, params.teacache_thresh, params.residual_order) == ("temb", 0.1, 0)
    assert entry.fits["temb"].coefficients == params.coefficients
    for name in shipped.presets:
        assert entry.presets[name] == shipped.presets[name]
    # The table of the default preset stays: --teacache-target-speedup keeps picking the default's threshold.
    assert entry.threshold_table == shipped.threshold_table
    assert "the default preset stays 'slow'" in out and "threshold table of preset 'slow' is kept" in out


# ---- scripts/calibrate.py on a tiny first-last-frame Wan -----------------------------------------------


@pytest.mark.filterwarnings("ignore")
def test_calibrate_gives_a_first_last_frame_model_both_frames(tmp_path, capsys):
    pytest.importorskip("diffusers")
    pytest.importorskip("ftfy")
    from PIL import Image

    from tests.test_pipeline_fixtures import save_wan

    flf2v, i2v = save_wan(tmp_path / "flf2v", "flf2v"), save_wan(tmp_path / "i2v", "i2v")
    config = tmp_path / "wan-i2v.yaml"
    text = (ZOO_DIR / "wan2.1-i2v-14b-480p.yaml").read_text()
    config.write_text(text.replace("height: 480", "height: 32").replace("width: 832", "width: 48").replace("81", "5"))
    first, last = tmp_path / "first.png", tmp_path / "last.png"
    for seed, path in enumerate((first, last)):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    args = ["--config", str(config), "--prompts-file", str(prompts), "--seeds", "2", "--steps", "5", "--degree", "1"]
    args += ["--image", str(first), "--table-thresholds", "0.1", "--table-pairs", "1", "--min-psnr", "0"]
    calibrate = load_script("calibrate")
    out = tmp_path / "fit.json"
    assert calibrate.main(["--model", str(flf2v), *args, "--last-image", str(last), "--json", str(out)]) == 0
    # Two seeds of one prompt, every step after the first of each branch: the runs went through.
    assert json.loads(out.read_text())["fit"]["num_points"] > 0
    with pytest.raises(SystemExit, match="pass last_image=<last frame> as well as image="):
        calibrate.main(["--model", str(flf2v), *args])  # FLF2V needs its last frame
    with pytest.raises(SystemExit, match="last_image needs a first-last-frame checkpoint"):
        calibrate.main(["--model", str(i2v), *args, "--last-image", str(last)])  # one image's CLIP tokens
    without_first = [a for a in args if a not in ("--image", str(first))]
    with pytest.raises(SystemExit, match="--last-image FILE is the last frame: give the first with --image FILE"):
        calibrate.main(["--model", str(flf2v), *without_first, "--last-image", str(last)])
    with pytest.raises(SystemExit, match=r"--last-image '.*missing\.png' does not exist"):
        calibrate.main(["--model", str(flf2v), *args, "--last-image", str(tmp_path / "missing.png")])
