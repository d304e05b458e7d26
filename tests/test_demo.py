"""The offline demo: text encoder, pixel helpers, shipped digit models and their generations."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from teacache_models import TeaCacheParams
from teacache_models.demo import (
    DEFAULT_VOCABULARY,
    DigitTextEncoder,
    digit_prompt,
    flow_sigmas,
    image_ids,
    images_to_tensor,
    load_demo_model,
    make_grid,
    pack_patches,
    sample,
    tensor_to_images,
    unpack_patches,
    write_png,
)
from teacache_models.models import FluxTransformer2DModel, WanTransformer3DModel

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


# ---- pixel helpers against the diffusers pipeline and scheduler ------------------------------------


def test_pack_patches_and_image_ids_match_the_flux_pipeline():
    from diffusers import FluxPipeline

    images = torch.randn(2, 3, 6, 10)
    packed = pack_patches(images)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(images, 2, 3, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack_patches(packed, 6, 10), images, rtol=0, atol=0)
    reference_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    torch.testing.assert_close(image_ids(3, 5), reference_ids, rtol=0, atol=0)
    with pytest.raises(ValueError, match="divisible by 2"):
        pack_patches(torch.zeros(1, 1, 5, 4))
    with pytest.raises(ValueError, match="tokens must have shape"):
        unpack_patches(packed, 8, 10)


@pytest.mark.parametrize(("steps", "shift"), [(20, 1.0), (7, 3.0)])
def test_flow_sigmas_match_flow_match_euler_discrete(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(flow_sigmas(steps, shift), scheduler.sigmas.float())


def test_images_round_trip_and_png_reads_back(tmp_path):
    from PIL import Image

    pixels = np.arange(48, dtype=np.uint8).reshape(3, 4, 4) * 5
    tensor = images_to_tensor(pixels)
    assert tensor.shape == (3, 1, 4, 4) and tensor.min() >= -1 and tensor.max() <= 1
    np.testing.assert_array_equal(tensor_to_images(tensor), pixels)
    grid = make_grid(pixels, columns=2, scale=2, padding=1)
    assert grid.shape == (2 * 9 + 1, 2 * 9 + 1)
    np.testing.assert_array_equal(grid[1:9, 1:9], pixels[0].repeat(2, 0).repeat(2, 1))
    for image in (grid, np.stack([grid, 255 - grid, grid // 2], axis=-1)):
        write_png(tmp_path / "grid.png", image)
        with Image.open(tmp_path / "grid.png") as decoded:
            np.testing.assert_array_equal(np.asarray(decoded), image)
    with pytest.raises(ValueError, match="image must be uint8"):
        write_png(tmp_path / "bad.png", grid.astype(np.float32))


# ---- the shipped demo models -----------------------------------------------------------------------


def test_shipped_files_match_their_sha256():
    listed = {}
    for line in (DEMO_ROOT / "sha256sums.txt").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    shipped = sorted(str(p.relative_to(DEMO_ROOT)) for p in DEMO_ROOT.rglob("*") if p.is_file())
    assert sorted(listed) == sorted(set(shipped) - {"sha256sums.txt"})
    for name, digest in listed.items():
        assert hashlib.sha256((DEMO_ROOT / name).read_bytes()).hexdigest() == digest, name
    assert sum((DEMO_ROOT / name).stat().st_size for name in listed) < 10 * 2**20


@pytest.fixture(scope="module")
def digit_reader():
    from teacache_models.demo import fit_digit_classifier

    return fit_digit_classifier()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_demo_model_loads_and_draws_the_prompted_digits(name, digit_reader):
    demo = load_demo_model(DEMO_ROOT / name)
    assert isinstance(demo.transformer, FAMILIES[name])
    sampling = demo.index["sampling"]
    teacache = sampling["teacache"]
    params = TeaCacheParams(teacache_thresh=teacache["teacache_thresh"], coefficients=teacache["coefficients"])
    digits = list(range(10)) * 2
    prompts = [digit_prompt(d) for d in digits]
    seeds = [100 + i for i in range(len(digits))]
    steps = sampling["num_inference_steps"]
    guidance = sampling["guidance_scale"]
    shift = sampling["shift"]

    uncached = sample(demo, prompts, seeds, steps, guidance, shift=shift)
    cached = sample(demo, prompts, seeds, steps, guidance, teacache=params, shift=shift)
    stats = demo.transformer.teacache_stats()
    assert stats.positive.num_skipped > 0 and stats.negative.num_skipped > 0
    assert uncached.shape == (20, 1, 1, demo.image_size, demo.image_size)
    for images in (uncached, cached):
        accuracy = np.mean(digit_reader(images) == np.array(digits))
        assert accuracy >= 0.8, accuracy
    # Skipped steps reuse a residual, so the cached run is close to, not equal to, the uncached one.
    assert not torch.equal(uncached, cached)
    # The empty prompt is the unconditional model: it draws all kinds of digits, so CFG has something to steer.
    unconditional = sample(demo, [""] * len(seeds), seeds, steps, guidance_scale=1.0, shift=shift)
    assert len(set(digit_reader(unconditional).tolist())) >= 4


def test_load_demo_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no model_index\.json"):
        load_demo_model(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="names class 'UNet2DModel'"):
        load_demo_model(tmp_path)


def test_sample_rejects_mismatched_prompts_and_seeds():
    demo = load_demo_model(DEMO_ROOT / "flux-digits")
    with pytest.raises(ValueError, match="prompts and seeds must be non-empty and of equal length, got 2 and 1"):
        sample(demo, ["7", "8"], [0], 2)
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        sample(demo, ["7"], [0], 2, guidance_scale=0.5)
