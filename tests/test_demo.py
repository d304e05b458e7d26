"""The offline demo's pieces: text encoder, pixel helpers, the flow schedule, the shipped digit models.

Generation through the pipelines and the CLI is tested in test_demo_cli.py.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from teacache_models.demo import (
    DEFAULT_VOCABULARY,
    DigitTextEncoder,
    digit_prompt,
    images_to_tensor,
    load_demo_model,
    make_grid,
    tensor_to_images,
    write_png,
)
from teacache_models.models import FluxTransformer2DModel, WanTransformer3DModel
from teacache_models.pipelines.demo import FlowMatchEuler, flow_sigmas, predict_flow

DEMO_ROOT = Path(__file__).resolve().parents[1] / "demo_models"
FAMILIES = {"flux-digits": FluxTransformer2DModel, "wan-digits": WanTransformer3DModel}


# ---- text encoder ----------------------------------------------------------------------------------


def test_tokenizer_maps_words_numerals_unknowns_and_padding():
    encoder = DigitTextEncoder(max_length=6)
    ids = encoder.tokenize(["A handwritten digit 7", "seventeen 17", "", "a a a a a a a a"])
    vocab = {token: i for i, token in enumerate(DEFAULT_VOCABULARY)}
    pad, unk = vocab["[pad]"], vocab["[unk]"]
    assert ids.shape == (4, 6) and ids.dtype == torch.long
    assert ids[0].tolist() == [vocab["a"], vocab["handwritten"], vocab["digit"], vocab["7"], pad, pad]
    assert ids[1].tolist() == [unk, vocab["1"], vocab["7"], pad, pad, pad]  # numerals are single tokens
    assert ids[2].tolist() == [pad] * 6  # the empty prompt: the unconditional condition
    assert ids[3].tolist() == [vocab["a"]] * 6  # cut at max_length


def test_text_encoder_widths_and_the_empty_prompt():
    encoder = DigitTextEncoder(max_length=5, embedding_dim=12, hidden_dim=20, pooled_dim=7)
    hidden, pooled = encoder.encode(["the number nine", "", "9"])
    assert hidden.shape == (3, 5, 20) and pooled.shape == (3, 7)
    empty_again, _ = encoder.encode([""])
    torch.testing.assert_close(empty_again[0], hidden[1])
    assert DigitTextEncoder(hidden_dim=20).encode(["7"])[1] is None


def test_text_encoder_rejects_bad_input():
    encoder = DigitTextEncoder(max_length=4)
    with pytest.raises(TypeError, match="prompts must be a sequence of strings"):
        encoder.tokenize("a digit 7")
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, 4\), got \(2, 5\)"):
        encoder(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids must be a long tensor"):
        encoder(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="vocabulary must start with"):
        DigitTextEncoder(vocabulary=("a", "b"))
    with pytest.raises(ValueError, match="pooled_dim must be None or a positive integer, got 0"):
        DigitTextEncoder(pooled_dim=0)
    with pytest.raises(ValueError, match=r"digit must be an integer in 0\.\.9, got 10"):
        digit_prompt(10)


# ---- pixel helpers and the schedule against diffusers -----------------------------------------------


@pytest.mark.parametrize(("steps", "shift"), [(20, 1.0), (7, 3.0)])
def test_flow_sigmas_match_flow_match_euler_discrete(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(flow_sigmas(steps, shift), scheduler.sigmas.float())
    # Our Euler steps are the scheduler's, given the same velocities.
    ours = FlowMatchEuler(shift)
    ours.set_timesteps(steps)
    x_ours = x_ref = torch.randn(2, 1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in scheduler.timesteps:
        velocity = torch.randn(x_ours.shape)
        x_ours = ours.step(velocity, x_ours)
        x_ref = scheduler.step(velocity, t, x_ref, return_dict=False)[0]
    torch.testing.assert_close(x_ours, x_ref)
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        ours.step(velocity, x_ours)
    with pytest.raises(ValueError, match="shift must be a number > 0, got 0"):
        FlowMatchEuler(0)


def test_images_round_trip_and_png_reads_back(tmp_path):
    from PIL import Image

    pixels = np.arange(48, dtype=np.uint8).reshape(3, 4, 4) * 5
    tensor = images_to_tensor(pixels)
    assert tensor.shape == (3, 1, 4, 4) and tensor.min() >= -1 and tensor.max() <= 1
    np.testing.assert_array_equal(tensor_to_images(tensor), pixels)
    grid = make_grid(pixels, columns=2, scale=2, padding=1)
    assert grid.shape == (2 * 9 + 1, 2 * 9 + 1)
    np.testing.assert_array_equal(grid[1:9, 1:9], pixels[0].repeat(2, 0).repeat(2, 1))
    rgb = make_grid(np.stack([pixels] * 3, axis=-1), columns=3, scale=1, padding=0)
    assert rgb.shape == (4, 12, 3)
    np.testing.assert_array_equal(rgb[:, 4:8, 1], pixels[1])
    with pytest.raises(ValueError, match="columns must be an integer >= 1, got 0"):
        make_grid(pixels, columns=0)
    for image in (grid, np.stack([grid, 255 - grid, grid // 2], axis=-1)):
        write_png(tmp_path / "grid.png", image)
        with Image.open(tmp_path / "grid.png") as decoded:
            np.testing.assert_array_equal(np.asarray(decoded), image)
    with pytest.raises(ValueError, match="image must be uint8"):
        write_png(tmp_path / "bad.png", grid.astype(np.float32))


# ---- the shipped demo models -----------------------------------------------------------------------


def test_shipped_files_match_their_sha256_in_both_lists():
    listed = {}
    for line in (DEMO_ROOT / "sha256sums.txt").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    shipped = sorted(str(p.relative_to(DEMO_ROOT)) for p in DEMO_ROOT.rglob("*") if p.is_file())
    assert sorted(listed) == sorted(set(shipped) - {"sha256sums.txt"})
    for name, digest in listed.items():
        assert hashlib.sha256((DEMO_ROOT / name).read_bytes()).hexdigest() == digest, name
    assert sum((DEMO_ROOT / name).stat().st_size for name in listed) < 10 * 2**20
    # The weights manifest (what the loader checks) lists the same digests.
    manifest = yaml.safe_load((DEMO_ROOT.parent / "weights_manifest.yaml").read_text())
    from_manifest = {f"{name}/{file}": digest for name in FAMILIES for file, digest in manifest[name]["sha256"].items()}
    # wan-digits-deep, the deeper model of the forecast benchmark, is no zoo model: it has no manifest entry.
    assert from_manifest == {name: digest for name, digest in listed.items() if name.split("/")[0] in FAMILIES}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_demo_model_loads_with_the_checked_loader(name):
    demo = load_demo_model(DEMO_ROOT / name)
    assert isinstance(demo.transformer, FAMILIES[name]) and isinstance(demo.text_encoder, DigitTextEncoder)
    assert not demo.transformer.training and demo.image_size == 16 and demo.num_frames == 1
    assert demo.index["_class_name"] == {"flux-digits": "FluxDigitsPipeline", "wan-digits": "WanDigitsPipeline"}[name]
    # The training forward: noise - clean image for pixels (B, C, F, H, W).
    text, pooled = demo.text_encoder.encode(["a handwritten digit 3", ""])
    with torch.no_grad():
        velocity = predict_flow(demo.transformer, torch.randn(2, 1, 1, 16, 16), torch.tensor([0.3, 0.9]), text, pooled)
    assert velocity.shape == (2, 1, 1, 16, 16) and torch.isfinite(velocity).all()


def test_save_demo_model_round_trips(tmp_path):
    from teacache_models.demo import save_demo_model

    demo = load_demo_model(DEMO_ROOT / "wan-digits")
    files = save_demo_model(tmp_path / "copy", demo.transformer, demo.text_encoder, {"image_size": 16})
    assert {f.name for f in files} >= {"model_index.json", "config.json", "diffusion_pytorch_model.safetensors"}
    copy = load_demo_model(tmp_path / "copy")
    assert copy.index["_class_name"] == "WanDigitsPipeline"
    for ours, theirs in zip(
        copy.transformer.state_dict().values(), demo.transformer.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs)
    with pytest.raises(TypeError, match="transformer must be one of"):
        save_demo_model(tmp_path / "bad", demo.text_encoder, demo.text_encoder, {})


def test_load_demo_model_and_predict_flow_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no model_index\.json"):
        load_demo_model(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="names class 'UNet2DModel'"):
        load_demo_model(tmp_path)
    demo = load_demo_model(DEMO_ROOT / "flux-digits")
    text, pooled = demo.text_encoder.encode(["7"])
    with pytest.raises(ValueError, match=r"pixels must have shape \(B, C, F, H, W\), got \(1, 1, 16, 16\)"):
        predict_flow(demo.transformer, torch.zeros(1, 1, 16, 16), torch.ones(1), text, pooled)
    with pytest.raises(ValueError, match="must have F = 1, got 2"):
        predict_flow(demo.transformer, torch.zeros(1, 1, 2, 16, 16), torch.ones(1), text, pooled)
    with pytest.raises(ValueError, match="needs pooled_projections"):
        predict_flow(demo.transformer, torch.zeros(1, 1, 1, 16, 16), torch.ones(1), text, None)
    with pytest.raises(TypeError, match="transformer must be a FluxTransformer2DModel or WanTransformer3DModel"):
        predict_flow(demo.text_encoder, torch.zeros(1, 1, 1, 16, 16), torch.ones(1), text, pooled)


@pytest.mark.parametrize("family, num_layers, suffix", [("flux", None, ""), ("wan", None, ""), ("wan", 5, "-deep")])
def test_training_script_writes_a_folder_the_pipeline_loads(family, num_layers, suffix, tmp_path):
    import argparse
    import importlib.util

    from teacache_models.pipelines import load_pipeline

    spec = importlib.util.spec_from_file_location("train_demo", DEMO_ROOT.parent / "scripts" / "train_demo.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = argparse.Namespace(
        steps=2, batch_size=4, seed=0, threads=1, out=tmp_path, num_layers=num_layers, suffix=suffix
    )
    files = script.train_and_save(family, args)
    assert {path.relative_to(tmp_path / f"{family}-digits{suffix}").as_posix() for _, _, path in files} == {
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/diffusion_pytorch_model.safetensors",
    }
    assert script.write_sha256sums(tmp_path).read_text().count("\n") == 5
    pipe = load_pipeline(tmp_path / f"{family}-digits{suffix}")
    assert pipe.family == family
    shipped_depth = {"flux": script.FLUX_CONFIG["num_layers"], "wan": script.WAN_CONFIG["num_layers"]}[family]
    assert pipe.transformer.config.num_layers == (num_layers or shipped_depth)
    result = pipe("a digit 4", pipe.default_sampling_params("off", height=16, width=16, num_inference_steps=2))
    assert result.images.shape == (1, 3, 16, 16)
