"""The README's offline demo end to end: the shipped digit models through the zoo, the weights manifest
(sha256-checked), the pixel-space pipelines and scripts/generate.py (grid, --compare, sidecar).

The zoo defaults and one image per digit keep it quick; every generated digit is read back from the PNG and
checked by the logistic-regression reader of `teacache_models.demo`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from teacache_models import SamplingParams
from teacache_models.pipelines import load_pipeline
from teacache_models.pipelines.demo import FluxDigitsPipeline, WanDigitsPipeline
from teacache_models.weights import CheckpointError, resolve_weights
from teacache_models.zoo import load_zoo_entry

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "generate.py"
DIGITS = list(range(10))
PROMPTS = [f"a handwritten digit {d}" for d in DIGITS]
# The demo's 16x16 cells are enlarged 4x in the grid (64 px), with 2 px of padding around each.
CELL, SCALE, PAD = 16, 4, 2


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("generate_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digit_reader():
    from teacache_models.demo import fit_digit_classifier

    return fit_digit_classifier()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: the demo must never reach the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def read_grid(path: Path, rows: int, columns: int) -> torch.Tensor:
    """The grid PNG back as (rows * columns, 1, 16, 16) in [-1, 1], row-major."""
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image)
    step = CELL * SCALE + PAD
    assert pixels.shape == (rows * step + PAD, columns * step + PAD, 3) and pixels.dtype == np.uint8
    cells = []
    for r in range(rows):
        for c in range(columns):
            cell = pixels[PAD + r * step : (r + 1) * step, PAD + c * step : (c + 1) * step, 0]
            cells.append(cell[::SCALE, ::SCALE])  # nearest-neighbour enlargement: every 4th pixel is the original
    return torch.from_numpy(np.stack(cells)).float().div(127.5).sub(1).unsqueeze(1)


def entry_steps(name: str) -> int:
    return load_zoo_entry(name).sampling.num_inference_steps


@pytest.mark.parametrize("name", ["flux-digits", "wan-digits"])
def test_readme_command_writes_a_recognisable_grid_and_prints_the_speedup(name, cli, digit_reader, tmp_path, capsys):
    output = tmp_path / "demo" / f"{name}.png"
    args = [
        "--model", name, "--prompt", *PROMPTS, "--grid", "--compare", "--seed", "0",
        "--threads", "1", "--no-progress", "--output", str(output),
    ]  # fmt: skip
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    summary, speedup = out.strip().splitlines()[-2:]
    # The zoo default preset skips steps in each CFG branch, which keeps its own state.
    counts = re.search(r"positive: (\d+) computed, (\d+) skipped; negative: (\d+) computed, (\d+) skipped", summary)
    assert counts and int(counts.group(2)) > 0 and int(counts.group(4)) > 0, summary
    match = re.fullmatch(r"speedup (\d+\.\d+)x with TeaCache: .* PSNR (\d+\.\d) dB against uncached \(.*\)", speedup)
    assert match, speedup

    record = json.loads(output.with_suffix(".json").read_text())
    comparison = record["comparison"]
    assert comparison["speedup"] == pytest.approx(float(match.group(1)), abs=0.01) and comparison["speedup"] > 0
    assert comparison["psnr_db"] > 30
    computed = int(counts.group(1)) + int(counts.group(3))
    assert comparison["ideal_speedup"] == pytest.approx(2 * entry_steps(name) / computed)
    assert len(comparison["paired_speedups"]) == comparison["repeats"]
    assert record["zoo_entry"] == name and record["prompt"] == PROMPTS and record["grid"] is True
    entry = load_zoo_entry(name)
    assert (
        record["sampling_params"]["teacache_params"]["teacache_thresh"]
        == entry.presets[entry.default_preset].params.teacache_thresh
    )
    skipped = record["teacache_stats"]["branches"]["negative"]["skipped_steps"]
    steps = entry.sampling.num_inference_steps
    assert (
        len(skipped) == int(counts.group(4)) and 0 not in skipped and steps - 1 not in skipped
    )  # first, last computed
    assert f"positive: {steps} computed, 0 skipped" in comparison["uncached_summary"]

    uncached_path = output.with_name(f"{name}-uncached.png")
    assert comparison["uncached_outputs"] == [str(uncached_path)]
    cached, uncached = read_grid(output, 1, 10), read_grid(uncached_path, 1, 10)
    assert not torch.equal(cached, uncached), "skipped steps reuse a residual: close to, not equal to, uncached"
    for images in (uncached, cached):
        accuracy = np.mean(digit_reader(images) == np.array(DIGITS))
        assert accuracy >= 0.8, accuracy
    assert not list(output.parent.glob(".partial-*"))


def test_single_prompt_and_several_images_per_prompt(cli, tmp_path, capsys):
    output = tmp_path / "seven.png"
    base = ["--model", "flux-digits", "--steps", "4", "--seed", "1", "--no-progress", "--threads", "1"]
    assert cli.main([*base, "--prompt", "a handwritten digit 7", "--output", str(output)]) == 0
    from PIL import Image

    with Image.open(output) as image:
        assert np.asarray(image).shape == (16, 16, 3)
    assert "positive: " in capsys.readouterr().out
    # Without --grid, one file per image: prompt-major columns, a row per image index.
    assert cli.main([*base, "--prompt", "7", "1", "--num-images", "2", "--output", str(tmp_path / "b.png")]) == 0
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["outputs"] == [str(tmp_path / f"b-{i}.png") for i in range(4)]
    assert all((tmp_path / f"b-{i}.png").is_file() for i in range(4))


def test_pipeline_api_matches_the_cli_and_keeps_cfg_branches_apart(digit_reader):
    pipe = load_pipeline("flux-digits")
    assert isinstance(pipe, FluxDigitsPipeline) and pipe.zoo_entry.name == "flux-digits"
    assert isinstance(load_pipeline("wan-digits"), WanDigitsPipeline)
    params = pipe.default_sampling_params("off", seed=5, num_inference_steps=6)
    uncached = pipe(PROMPTS[:3], params)
    assert uncached.images.shape == (3, 3, 16, 16) and uncached.seed == 5
    assert uncached.images.min() >= 0 and uncached.images.max() <= 1
    # Threshold 0 never skips: bit-identical to the uncached run.
    never = dataclasses.replace(pipe.zoo_entry.presets["fast"].params, teacache_thresh=0.0)
    assert torch.equal(pipe(PROMPTS[:3], dataclasses.replace(params, teacache_params=never)).images, uncached.images)
    # guidance 1 runs the positive branch alone.
    alone = pipe(PROMPTS[:3], dataclasses.replace(params, guidance_scale=1.0))
    assert alone.teacache_stats.negative.num_computed == 0 and alone.teacache_stats.positive.num_computed == 6
    # The empty prompt is the unconditional model: it draws several kinds of digits, so CFG has something to steer.
    unconditional = pipe([""] * 12, pipe.default_sampling_params("off", seed=0, guidance_scale=1.0))
    assert len(set(digit_reader(unconditional.images[:, :1] * 2 - 1).tolist())) >= 4


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(height=15), "height must be a multiple of 2"),
        (dict(guidance_scale=0.5), "guidance_scale must be >= 1 for the demo"),
        (dict(true_cfg_scale=2.0), r"does not use sampling settings \['true_cfg_scale'\]"),
        (dict(num_frames=5), "num_frames must be 1 for an image model"),
    ],
)
def test_pipeline_rejects_bad_settings(change, match):
    pipe = load_pipeline("wan-digits")
    with pytest.raises(ValueError, match=match):
        pipe("a digit 3", SamplingParams(**{"height": 16, "width": 16, "num_inference_steps": 2, **change}))


def test_pipeline_construction_errors():
    pipe = load_pipeline("flux-digits")
    with pytest.raises(TypeError, match="text_encoder must be a DigitTextEncoder, got NoneType"):
        FluxDigitsPipeline(pipe.transformer)
    with pytest.raises(TypeError, match=r"transformer must be a WanTransformer3DModel .* got FluxTransformer2DModel"):
        WanDigitsPipeline(pipe.transformer, text_encoder=pipe.text_encoder)
    with pytest.raises(TypeError, match="vae must be None"):
        FluxDigitsPipeline(pipe.transformer, vae=torch.nn.Identity(), text_encoder=pipe.text_encoder)


def test_zoo_entries_point_at_the_shipped_weights():
    for name in ("flux-digits", "wan-digits"):
        entry = load_zoo_entry(name)
        assert entry.task == "t2i" and entry.sampling.height == entry.sampling.width == 16
        assert entry.manifest == name and entry.family == name.split("-")[0]
        assert resolve_weights(entry.manifest) == REPO / "demo_models" / name


def tampered_manifest(tmp_path: Path, change: str) -> Path:
    """A copy of flux-digits listed with the real digests, then tampered with, and a manifest for it."""
    manifest = yaml.safe_load((REPO / "weights_manifest.yaml").read_text())
    copy = tmp_path / "flux-digits"
    shutil.copytree(REPO / "demo_models" / "flux-digits", copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    if change == "flip a byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (copy / "transformer" / "extra.safetensors").write_bytes(b"")
    entry = {**manifest["flux-digits"], "local_path": "flux-digits"}
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"flux-digits": entry}))
    return path


def test_tampered_copy_fails_the_sha256_check(cli, tmp_path, monkeypatch, capsys):
    path = tampered_manifest(tmp_path, "flip a byte")
    pattern = r"does not match its manifest: transformer/diffusion_pytorch_model\.safetensors: sha256 [0-9a-f]{64}"
    with pytest.raises(CheckpointError, match=pattern):
        resolve_weights("flux-digits", manifest=path)
    # The CLI loads through the same check: a clear error, exit 2 (bad input), nothing written.
    monkeypatch.setattr("teacache_models.weights.manifest.MANIFEST_PATH", path)
    output = tmp_path / "out.png"
    assert cli.main(["--model", "flux-digits", "--prompt", "7", "--no-progress", "--output", str(output)]) == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert not output.exists() and not output.with_suffix(".json").exists()
    with pytest.raises(CheckpointError, match=r"files without a sha256 in the manifest: transformer/extra"):
        resolve_weights("flux-digits", manifest=tampered_manifest(tmp_path / "second", "add a file"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--compare", "--teacache", "off"], "--compare measures TeaCache against an uncached run"),
        (["--repeats", "3"], "--repeats times the runs of --compare"),
        (["--num-images", "0"], "--num-images must be at least 1, got 0"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--grid", "--output", "grid.jpg"], "an image model writes .png"),
        (["--prompt", "7", ""], "--prompt must not be blank for wan-digits: only a layered model"),
    ],
)
def test_bad_demo_flags_fail_cleanly(cli, tmp_path, capsys, extra, message):
    args = [
        "--model",
        "wan-digits",
        "--prompt",
        "7",
        "--steps",
        "2",
        "--no-progress",
        "--output",
        str(tmp_path / "x.png"),
    ]
    # A flag given again overrides its first value.
    args += [str(tmp_path / a) if a.endswith(".jpg") else a for a in extra]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_help_documents_the_batch_flags(cli, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--num-images", "--grid", "--compare", "--repeats", "--threads", "flux-digits"):
        assert flag in text
