"""Calibration: the distance recorder, the polynomial fit, the zoo-config writer, the quality metrics."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from teacache_models.cache.mixin import relative_l1_distance
from teacache_models.calibration import (
    DistanceRecorder,
    PolynomialFit,
    calibration_params,
    fit_polynomial,
    record_runs,
)
from teacache_models.calibration_config import (
    write_coefficients,
)
from teacache_models.metrics import psnr, ssim
from teacache_models.params import TeaCacheParams
from teacache_models.zoo import ZOO_DIR, load_zoo_entry
from tests.utils import REPO, load_script

STEPS = 4


@pytest.fixture(scope="module")
def wan_pipe():
    from teacache_models.pipelines import load_pipeline

    return load_pipeline(REPO / "demo_models" / "wan-digits", zoo_entry=load_zoo_entry("wan-digits"))


def _generate(pipe, params: TeaCacheParams | None, seeds=(0, 1), prompt: str = "a handwritten digit 3"):
    outputs = []
    for seed in seeds:
        sampling = pipe.default_sampling_params(teacache="off", seed=seed, num_inference_steps=STEPS)
        outputs.append(pipe(prompt, dataclasses.replace(sampling, teacache_params=params)).images)
    return torch.cat(outputs)


# ---- recorder --------------------------------------------------------------------------------------


@pytest.mark.parametrize("indicator", ["temb", "timestep_proj", "modulated_input"])
def test_recorder_counts_every_step_pair_per_branch_and_leaves_output_unchanged(wan_pipe, indicator):
    model = wan_pipe.transformer
    uncached = _generate(wan_pipe, None)
    with DistanceRecorder(model) as recorder:
        recorded = _generate(wan_pipe, calibration_params(indicator))
    torch.testing.assert_close(recorded, uncached, rtol=0, atol=0)
    for negative in (False, True):
        records = [r for r in recorder.records if r.is_cfg_negative == negative]
        # Two generations of STEPS steps: STEPS - 1 consecutive pairs each.
        assert len(records) == 2 * (STEPS - 1)
        assert sorted({r.generation for r in records}) == [0, 1]
        assert [r.step for r in records] == [1, 2, 3] * 2
        assert all(r.x > 0 and r.y > 0 for r in records)
    # Nothing on the model was replaced, and the observer is gone afterwards.
    assert not {"forward_blocks", "teacache_step", "teacache_indicator", "enable_teacache"} & set(vars(model))
    assert not model.__dict__.get("_teacache_observers")


def test_recorder_measures_the_indicator_and_the_block_stack(wan_pipe):
    model = wan_pipe.transformer
    seen = []
    original = type(model).forward_blocks

    def spy(self, hidden_states, **block_inputs):
        output = original(self, hidden_states, **block_inputs)
        seen.append((block_inputs["temb"].detach().clone(), hidden_states.clone(), output.clone()))
        return output

    type(model).forward_blocks = spy
    try:
        outputs = record_runs(model, lambda p: _generate(wan_pipe, p, seeds=(0,)), "temb", target="output")
        residuals = record_runs(model, lambda p: _generate(wan_pipe, p, seeds=(0,)), "temb", target="residual")
    finally:
        type(model).forward_blocks = original
    positive = [s for i, s in enumerate(seen[: 2 * STEPS]) if i % 2 == 0]  # positive, negative alternate
    first = next(r for r in outputs if not r.is_cfg_negative)
    assert math.isclose(first.x, relative_l1_distance(positive[1][0], positive[0][0]).item(), rel_tol=1e-6)
    assert math.isclose(first.y, relative_l1_distance(positive[1][2], positive[0][2]).item(), rel_tol=1e-6)
    residual = next(r for r in residuals if not r.is_cfg_negative)
    expected = relative_l1_distance(positive[1][2] - positive[1][1], positive[0][2] - positive[0][1]).item()
    assert math.isclose(residual.y, expected, rel_tol=1e-6)
    assert residual.x == first.x and residual.y != first.y


def test_recorder_refuses_a_run_that_skips(wan_pipe):
    params = TeaCacheParams(teacache_thresh=0.3, coefficients=(1.0, 0.0), indicator="temb")
    with pytest.raises(ValueError, match="must skip nothing"), DistanceRecorder(wan_pipe.transformer):
        _generate(wan_pipe, params, seeds=(0,))
    with pytest.raises(ValueError, match="target must be one of"):
        DistanceRecorder(wan_pipe.transformer, target="input")
    with pytest.raises(TypeError, match="TeaCacheMixin"):
        DistanceRecorder(torch.nn.Linear(2, 2))


# ---- fit -------------------------------------------------------------------------------------------


def test_fit_recovers_a_known_polynomial():
    rng = np.random.default_rng(0)
    truth = (-3.0e3, 5.0e2, -2.0e1, 1.5, 0.01)
    x = rng.uniform(0.01, 0.1, 400)
    fit = fit_polynomial(x, np.polyval(truth, x), degree=4)
    np.testing.assert_allclose(fit.coefficients, truth, rtol=1e-6)
    assert fit.num_points == 400 and fit.r_squared == pytest.approx(1.0)
    assert fit.x_min == pytest.approx(x.min()) and fit.x_max == pytest.approx(x.max())
    noisy = fit_polynomial(x, np.polyval(truth, x) + rng.normal(0, 0.01, 400), degree=2)
    assert noisy.degree == 2 and 0.5 < noisy.r_squared < 1


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="needs more than 4 points"):
        fit_polynomial([0.1, 0.2, 0.3], [1, 2, 3])
    with pytest.raises(ValueError, match="equal length"):
        fit_polynomial([0.1, 0.2], [1.0])
    with pytest.raises(ValueError, match="degree must be"):
        fit_polynomial([0.1, 0.2], [1.0, 2.0], degree=-1)
    with pytest.raises(ValueError, match="more than 2 distinct x values, got 1"):
        fit_polynomial([0.1] * 6, [1, 2, 3, 4, 5, 6], degree=2)
    with pytest.raises(ValueError, match="1 of 3 points are not"):
        fit_polynomial([0.1, float("nan"), 0.3], [1, 2, 3], degree=1)
    with pytest.raises(ValueError, match="sequences of real numbers"):
        fit_polynomial(["a", "b", "c"], [1, 2, 3], degree=1)
    assert fit_polynomial([0.1, 0.2, 0.3], [1, 2, 3], degree=np.int64(1)).degree == 1


def test_recorder_refuses_a_second_recorder_and_bad_params():
    from tests.test_teacache_core import TinyModel

    model = TinyModel()
    recorder = DistanceRecorder(model)
    with recorder:
        with pytest.raises(RuntimeError, match="already recording"), recorder:
            pass
        with pytest.raises(TypeError, match="params must be a TeaCacheParams"):
            model.enable_teacache({"teacache_thresh": 0.0}, 4)
    assert not {"enable_teacache", "forward_blocks"} & set(vars(model))


def test_two_recorders_watch_one_model_at_once():
    from tests.test_teacache_core import TinyModel

    model = TinyModel()
    x = torch.randn(1, 3, 8)
    with DistanceRecorder(model) as first, DistanceRecorder(model, target="residual") as second:
        model.enable_teacache(calibration_params(), 4)
        for step in range(4):
            with torch.no_grad(), model.teacache_step(step):
                model(x, torch.tensor([1.0 - 0.2 * step]))
    assert [r.step for r in first.records] == [r.step for r in second.records] == [1, 2, 3]
    assert [r.x for r in first.records] == [r.x for r in second.records]
    model.disable_teacache()  # detaches the generation's own observer, its coefficient fit monitor
    assert not model.__dict__.get("_teacache_observers")


# ---- zoo config writer -----------------------------------------------------------------------------

FIT = PolynomialFit((12.5, -3.25, 0.5), num_points=321, r_squared=0.9876, x_min=0.01, x_max=0.2)


def test_write_coefficients_updates_only_the_presets_of_that_indicator(tmp_path):
    path = tmp_path / "wan.yaml"
    shutil.copy(ZOO_DIR / "wan2.1-t2v-1.3b.yaml", path)
    before = path.read_text()
    assert write_coefficients(path, "temb", FIT, default_indicator="temb") == ["slow", "fast"]
    entry, original = load_zoo_entry(path), load_zoo_entry(ZOO_DIR / "wan2.1-t2v-1.3b.yaml")
    for name in ("slow", "fast"):
        assert entry.presets[name].params.coefficients == FIT.coefficients
        assert entry.presets[name].params.calibrated_range == (0.01, 0.2)  # the fit's x range
        assert entry.presets[name].params.teacache_thresh == original.presets[name].params.teacache_thresh
        assert entry.presets[name].source.startswith("coefficients: scripts/calibrate.py fit on 321 points")
        assert entry.presets[name].source.endswith(original.presets[name].source)
    for name in ("ret-slow", "ret-fast"):
        assert entry.presets[name] == original.presets[name]
    assert dataclasses.replace(entry.sampling, teacache_params=None) == dataclasses.replace(
        original.sampling, teacache_params=None
    )
    after = path.read_text()
    # Comments and every line outside the two presets' coefficients and sources are kept; each preset gains
    # one line, its calibrated range.
    changed = [line for line in before.splitlines() if line not in after.splitlines()]
    assert len(changed) == 4 and all("coefficients:" in line or "source:" in line for line in changed)
    assert len(after.splitlines()) == len(before.splitlines()) + 2
    assert [line for line in after.splitlines() if line.lstrip().startswith("#")] == [
        line for line in before.splitlines() if line.lstrip().startswith("#")
    ]
    # Writing again replaces the note instead of stacking notes.
    write_coefficients(path, "temb", FIT, default_indicator="temb")
    assert load_zoo_entry(path).presets["slow"].source.count("scripts/calibrate.py") == 1


def _preset_lines(text: str, name: str) -> list[str]:
    """The lines of preset `name` in a zoo YAML text (its header to the next line indented as far or less)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"{name}:")

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    after = (i for i in range(start + 1, len(lines)) if lines[i].strip() and indent(lines[i]) <= indent(lines[start]))
    return lines[start : next(after, len(lines))]


def test_write_coefficients_leaves_a_forecast_presets_source_alone(tmp_path):
    path = tmp_path / "flux-digits.yaml"
    shutil.copy(ZOO_DIR / "flux-digits.yaml", path)
    before = path.read_text()
    original = load_zoo_entry(path).presets["forecast"]
    assert write_coefficients(path, "modulated_input", FIT, default_indicator="modulated_input") == ["slow", "fast"]
    after = path.read_text()
    # The forecast preset carries no fit of its own: its lines stay as they were, its threshold's
    # justification included, and it takes the new fit from the presets that carry it.
    assert _preset_lines(after, "forecast") == _preset_lines(before, "forecast")
    forecast = load_zoo_entry(path).presets["forecast"]
    assert forecast.source == original.source
    assert forecast.params.coefficients == FIT.coefficients
    assert dataclasses.replace(forecast.params, coefficients=None, calibrated_range=None) == dataclasses.replace(
        original.params, coefficients=None, calibrated_range=None
    )
    # One that carries its own coefficients gets the new ones, and still keeps its source.
    coefficients = next(line for line in _preset_lines(before, "slow") if "coefficients:" in line)
    path.write_text(before.replace("      method: forecast\n", f"      method: forecast\n{coefficients}\n"))
    # (both forecast presets of the entry)
    written = write_coefficients(path, "modulated_input", FIT, "modulated_input")
    assert written == ["slow", "fast", "forecast", "forecast-cadence"]
    forecast = load_zoo_entry(path).presets["forecast"]
    assert forecast.source == original.source and forecast.params.calibrated_range == (0.01, 0.2)
    # Forecast presets alone have nowhere to keep a fit: a clear error instead of a silent no-op.
    only_forecast = tmp_path / "only-forecast.yaml"
    text = re.sub(r"    (slow|fast):\n(      .*\n)+|  threshold_table: .*\n", "", before)
    text = text.replace("default: slow", "default: forecast")
    only_forecast.write_text(text)
    with pytest.raises(ValueError, match="forecast presets without coefficients"):
        write_coefficients(only_forecast, "modulated_input", FIT, "modulated_input")


def test_write_coefficients_handles_ret_steps_and_missing_presets(tmp_path):
    path = tmp_path / "wan.yaml"
    shutil.copy(ZOO_DIR / "wan2.1-t2v-1.3b.yaml", path)
    assert write_coefficients(path, "timestep_proj", FIT, default_indicator="temb") == ["ret-slow", "ret-fast"]
    with pytest.raises(ValueError, match="no TeaCache preset using indicator 'modulated_input'"):
        write_coefficients(path, "modulated_input", FIT, default_indicator="temb")


# ---- scripts/calibrate.py --------------------------------------------------------------------------


def test_calibrate_script_end_to_end(tmp_path, capsys):
    config = tmp_path / "flux-digits.yaml"
    shutil.copy(ZOO_DIR / "flux-digits.yaml", config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 1\n\na handwritten digit 7\n")
    args = ["--model", str(REPO / "demo_models" / "flux-digits"), "--config", "flux-digits"]
    args += ["--prompts-file", str(prompts), "--seeds", "2", "--steps", "6", "--degree", "2"]
    args += ["--json", str(tmp_path / "fit.json"), "--write-config", str(config)]
    if importlib.util.find_spec("matplotlib") is not None:
        args += ["--plot", str(tmp_path / "fit.png")]
    assert load_script("calibrate").main(args) == 0
    record = json.loads((tmp_path / "fit.json").read_text())
    # 2 prompts x 2 seeds x 5 step pairs per branch.
    assert record["fit"]["num_points"] == 40 and len(record["points"]["negative"]) == 20
    assert record["indicator"] == "modulated_input" and len(record["fit"]["coefficients"]) == 3
    assert load_zoo_entry(config).presets["fast"].params.coefficients == pytest.approx(record["fit"]["coefficients"])
    if "--plot" in args:
        assert (tmp_path / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "40 points" in capsys.readouterr().out


# ---- metrics ---------------------------------------------------------------------------------------


def test_psnr_known_values():
    reference = torch.zeros(3, 1, 16, 16)
    images = reference.clone()
    images[1] += 0.1  # MSE 0.01
    images[2, :, :8] += 0.2  # MSE 0.02
    values = psnr(images, reference, data_range=2.0)
    assert values[0] == math.inf
    assert values[1].item() == pytest.approx(10 * math.log10(4 / 0.01))
    assert values[2].item() == pytest.approx(10 * math.log10(4 / 0.02))
    video = torch.rand(2, 1, 3, 16, 16)
    assert psnr(video * 0.5, video, 1.0, channel_dims=2).shape == (2,)


def test_ssim_known_values():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 16, 16, generator=generator) * 2 - 1
    assert torch.allclose(ssim(images, images, 2.0), torch.ones(4, dtype=torch.float64))
    noise = torch.randn(images.shape, generator=generator)
    small, large = ssim(images + 0.05 * noise, images, 2.0), ssim(images + 0.5 * noise, images, 2.0)
    assert (large < small).all() and (small < 1).all()
    # Symmetric in its two arguments; scaling the pixels and data_range alike changes nothing.
    assert torch.allclose(ssim(images, images + 0.1 * noise, 2.0), ssim(images + 0.1 * noise, images, 2.0))
    scaled = ssim((images + 0.1 * noise) * 127.5, images * 127.5, 255.0)
    assert torch.allclose(scaled, ssim(images + 0.1 * noise, images, 2.0))
    # Constant images: only the luminance term is left, (2 a b + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.2, -0.1, (0.01 * 2) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(torch.full((1, 16, 16), a), torch.full((1, 16, 16), b), 2.0).item() == pytest.approx(expected)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9), 1.0)
    with pytest.raises(ValueError, match="data_range"):
        ssim(torch.zeros(1, 16, 16), torch.zeros(1, 16, 16), 0)
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), 1.0)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        psnr(np.zeros((1, 8, 8)), torch.zeros(1, 8, 8), 1.0)
