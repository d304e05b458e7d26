"""Qwen-Image-Layered: equal to diffusers' QwenImageLayeredPipeline with the cache off (bit for bit), its inputs,
and the CLI writing one RGBA PNG per layer."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from teacache_models import SamplingParams, TeaCacheParams
from tests.test_pipeline_fixtures import (
    native_qwen_edit_pipelines,
    png_pixels,
    qwen_image_edit_pipeline,
    save_qwen_image,
    save_with_processor,
)

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT = "a red fox in front of a blue house"
SEED = 6
# The reference sizes the input image to about 640 x 640 pixels (its only other bucket is 1024 x 1024): at the
# tiny fixture's scale 64 x 64 runs the same code.
AREA = 64 * 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_qwen_image(tmp_path_factory.mktemp("qwen-layered"), layered=True)


@pytest.fixture(scope="module")
def released(folder, tmp_path_factory):
    """The components `qwen_image_edit_pipeline` builds, saved in the released checkpoint's layout."""
    pipe = qwen_image_edit_pipeline(folder, "QwenImageLayeredPipeline")
    end_captions_early(pipe)
    return save_with_processor(pipe, tmp_path_factory.mktemp("released"), "Qwen2VLProcessor")


@pytest.fixture
def small_images(monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered

    from teacache_models.pipelines.qwen_image_layered import QwenImageLayeredPipeline

    resize = pipeline_qwenimage_layered.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_layered, "calculate_dimensions", lambda area, ratio: resize(AREA, ratio))
    monkeypatch.setattr(QwenImageLayeredPipeline, "vae_image_area", AREA)  # ours as loaded (by the CLI)


def rgba(height: int, width: int, seed: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGBA")


def end_captions_early(pipe) -> None:
    """The tiny random text encoder's greedy captions repeat words up to the 512-token limit (17 s here): ending
    them at their first "," (its end token, in its generation config) keeps them a few tokens long."""
    pipe.text_encoder.generation_config.eos_token_id = pipe.tokenizer.convert_tokens_to_ids(",")


def pipelines(folder):
    """diffusers' pipeline and ours on the same components (one text encoder, captions ended early)."""
    reference, ours = native_qwen_edit_pipelines(folder, "QwenImageLayeredPipeline")
    end_captions_early(reference)
    ours.vae_image_area = AREA
    return reference, ours


@pytest.mark.parametrize(
    "layers, normalize, negative",
    [(4, True, "low quality"), (2, False, "blurry"), (3, True, None)],
    ids=["4", "2", "3-no-cfg"],
)
def test_equals_diffusers_with_the_cache_off(folder, small_images, layers, normalize, negative):
    reference, ours = pipelines(folder)
    ours.cfg_normalize = normalize
    image = rgba(40, 56, seed=layers)
    height, width = ours.output_size(image)
    assert (height, width) == (64, 64)  # 56:40 at about 64 x 64 pixels, each side rounded to a multiple of 32
    params = SamplingParams(
        num_inference_steps=3,
        guidance_scale=4.0,
        negative_prompt=negative,
        seed=SEED,
        height=height,
        width=width,
        teacache_params=None,
    )
    result = ours(PROMPT, params, image=image, layers=layers)
    expected = reference(
        image=image,
        prompt=PROMPT,
        negative_prompt=negative,
        true_cfg_scale=4.0,
        layers=layers,
        num_inference_steps=3,
        cfg_normalize=normalize,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="pt",
    ).images[0]
    assert result.images.shape == (1, layers, 4, height, width) == (1, *expected.shape)
    assert torch.equal(result.images[0], expected), "with the cache off the layers must equal diffusers bit for bit"
    assert result.teacache_stats.negative.num_computed == (0 if negative is None else 3)


def test_a_batch_with_cfg_equals_diffusers_bit_for_bit(folder, small_images):
    # diffusers encodes the one negative prompt once and broadcasts it over the batch; the decoder inputs are compared
    # (diffusers' output of a batch cannot always stack its layers: it may fail after decoding).
    reference, ours = pipelines(folder)
    assert ours.vae is reference.vae  # one VAE: its decoder sees our latents, then the reference's
    image = rgba(40, 56, seed=1)
    seen = []
    decode = ours.vae.decode

    def spy(latents, *args, **kwargs):
        seen.append(latents.clone())
        return decode(latents, *args, **kwargs)

    ours.vae.decode = spy
    prompts = ["a much longer prompt about many things at night", PROMPT]  # of two lengths: a mask on the padding
    params = SamplingParams(
        num_inference_steps=3, guidance_scale=2.0, negative_prompt="low quality", seed=409, height=64, width=64
    )
    ours(prompts, dataclasses.replace(params, teacache_params=None), image=image, layers=2)
    generator = torch.Generator("cpu").manual_seed(params.seed)
    with contextlib.suppress(RuntimeError):
        reference(image=image, prompt=prompts, negative_prompt="low quality", true_cfg_scale=2.0, layers=2,
                  num_inference_steps=3, cfg_normalize=True, generator=generator, output_type="pt")  # fmt: skip
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("language", ["en", "zh"])
def test_a_blank_prompt_is_captioned_as_diffusers_does(folder, small_images, language):
    reference, ours = pipelines(folder)
    ours.caption_language = language
    image = rgba(40, 56, seed=2)
    params = SamplingParams(
        num_inference_steps=2,
        guidance_scale=4.0,
        negative_prompt="blurry",
        seed=SEED,
        height=64,
        width=64,
        teacache_params=None,
    )
    result = ours("", params, image=image, layers=2)
    english = language == "en"
    # The reference captions the input image as its VAE reads it (here 64 x 64).
    caption = reference.get_image_caption(reference.image_processor.resize(image, 64, 64), english, "cpu")
    assert caption and result.prompt == [caption]
    expected = reference(
        image=image,
        prompt=" ",
        negative_prompt="blurry",
        true_cfg_scale=4.0,
        layers=2,
        num_inference_steps=2,
        cfg_normalize=True,  # ours by default, as the model card
        use_en_prompt=english,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="pt",
    ).images[0]
    assert torch.equal(result.images[0], expected), "a captioned blank prompt must equal diffusers bit for bit"
    # In a batch every blank prompt gets the one caption; the others stay as they are.
    batch = ours(["", PROMPT, "\t"], dataclasses.replace(params, num_inference_steps=1), image=image, layers=1)
    assert batch.prompt == [caption, PROMPT, caption]


@pytest.mark.parametrize("as_list", [False, True], ids=["bare", "list"])
def test_a_blank_prompt_captions_the_image_diffusers_captions(folder, small_images, as_list):
    # diffusers captions a bare image resized to its VAE size but an image in a list at its own size.
    reference, ours = pipelines(folder)
    seen = {}
    for name, pipe, method in (("ours", ours, "caption"), ("reference", reference, "get_image_caption")):
        original = getattr(pipe, method)

        def spy(image, *args, name=name, original=original, **kwargs):
            seen[name] = image[0] if isinstance(image, list) else image
            return original(image, *args, **kwargs)

        setattr(pipe, method, spy)
    image = rgba(40, 56, seed=2)
    given = [image] if as_list else image
    params = SamplingParams(
        num_inference_steps=1, guidance_scale=1.0, seed=SEED, height=64, width=64, teacache_params=None
    )
    result = ours("", params, image=given, layers=1)
    expected = reference(
        image=given,
        prompt="",
        true_cfg_scale=1.0,
        layers=1,
        num_inference_steps=1,
        cfg_normalize=True,
        use_en_prompt=True,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="pt",
    ).images[0]
    assert torch.equal(result.images[0], expected)
    assert seen["ours"].size == seen["reference"].size == ((56, 40) if as_list else (64, 64))
    assert np.array_equal(np.asarray(seen["ours"]), np.asarray(seen["reference"]))


def test_a_blank_prompt_cannot_be_captioned_without_a_generating_text_encoder_and_processor(folder, small_images):
    reference, ours = pipelines(folder)
    params = SamplingParams(num_inference_steps=1, guidance_scale=1.0, height=32, width=32, teacache_params=None)
    image = rgba(32, 32, seed=0)
    ours.caption_language = "fr"
    with pytest.raises(ValueError, match=r"caption_language must be one of \('en', 'zh'\), got 'fr'"):
        ours("", params, image=image)
    ours.caption_language = "en"
    ours.text_components["text_encoder"] = reference.text_encoder.model  # the language model without its head
    with pytest.raises(TypeError, match=r"Qwen2_5_VLModel cannot generate text .*: give a prompt describing"):
        ours(" ", params, image=image)
    ours.text_components["processor"] = None
    with pytest.raises(ValueError, match="this pipeline has no processor: give a prompt describing the input image"):
        ours(" ", params, image=image)
    ours.text_components["text_encoder"] = reference.text_encoder
    assert ours(PROMPT, params, image=image, layers=1).prompt == [PROMPT]  # a prompt needs neither


def test_teacache_and_inputs(folder, small_images):
    _, ours = pipelines(folder)
    image = rgba(32, 32, seed=0)
    params = SamplingParams(
        num_inference_steps=4,
        guidance_scale=4.0,
        negative_prompt="blurry",
        seed=1,
        height=32,
        width=32,
        teacache_params=TeaCacheParams(teacache_thresh=1e6, coefficients=(1.0, 0.0)),
    )
    result = ours([PROMPT, "two cats"], params, image=image, layers=2)
    assert result.images.shape == (2, 2, 4, 32, 32)
    for branch in (result.teacache_stats.positive, result.teacache_stats.negative):
        assert branch.computed_steps == (0, 3) and branch.skipped_steps == (1, 2)
    with pytest.raises(ValueError, match="layers must be an integer >= 1, got 0"):
        ours(PROMPT, params, image=image, layers=0)
    with pytest.raises(ValueError, match="QwenImageLayeredPipeline edits an input image: pass image="):
        ours(PROMPT, params, layers=2)
    with pytest.raises(TypeError, match=r"takes only image=\.\.\., layers=\.\.\., got \['mask'\]"):
        ours(PROMPT, params, image=image, mask=image)
    # An RGB input is read as opaque RGBA.
    from PIL import Image

    opaque = ours(PROMPT, dataclasses.replace(params, teacache_params=None), image=image.convert("RGB"), layers=1)
    same = ours(
        PROMPT,
        dataclasses.replace(params, teacache_params=None),
        image=Image.fromarray(np.dstack([np.asarray(image)[..., :3], np.full((32, 32), 255, np.uint8)])),
        layers=1,
    )
    assert torch.equal(opaque.images, same.images)


def test_the_cli_writes_one_rgba_png_per_layer(folder, released, small_images, tmp_path, capsys):
    """The CLI loads the released layout (the processor from its parts: no torchvision) and writes diffusers'
    layers."""
    import json

    from PIL import Image

    from tests.utils import load_script

    reference, _ = pipelines(folder)
    cli = load_script("generate")
    source = tmp_path / "in.png"
    rgba(40, 56, seed=1).save(source)
    output = tmp_path / "layers.png"
    args = ["--model", str(released), "--config", "configs/qwen-image-layered.yaml", "--prompt", PROMPT]
    args += ["--steps", "2", "--seed", "1", "--no-progress", "--device", "cpu", "--dtype", "float32"]
    args += ["--linear-kernel", "aten", "--image", str(source), "--output", str(output)]
    assert cli.main([*args, "--layers", "2", "--negative-prompt", "blurry"]) == 0
    files = [tmp_path / "layers-layer0.png", tmp_path / "layers-layer1.png"]
    assert json.loads(output.with_suffix(".json").read_text())["outputs"] == [str(f) for f in files]
    expected = reference(
        image=Image.open(source),
        prompt=PROMPT,
        negative_prompt="blurry",
        true_cfg_scale=4.0,
        layers=2,
        num_inference_steps=2,
        cfg_normalize=True,  # the zoo entry's, from the model card
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="pt",
    ).images[0]
    for path, layer in zip(files, expected, strict=True):
        with Image.open(path) as image:
            assert image.mode == "RGBA" and image.size == (64, 64)
            assert np.array_equal(np.asarray(image), png_pixels(layer))

    # A blank --prompt: the caption of the input image, recorded in the sidecar.
    assert cli.main([*args[:5], "", *args[6:], "--layers", "1", "--negative-prompt", "blurry"]) == 0
    record = json.loads(output.with_suffix(".json").read_text())
    caption = reference.get_image_caption(reference.image_processor.resize(Image.open(source), 64, 64), True, "cpu")
    assert record["prompt"] == [""] and record["encoded_prompt"] == [caption]
    expected = reference(
        image=Image.open(source),
        prompt="",
        negative_prompt="blurry",
        true_cfg_scale=4.0,
        layers=1,
        num_inference_steps=2,
        cfg_normalize=True,
        use_en_prompt=True,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="pt",
    ).images[0]
    with Image.open(files[0]) as image:
        assert np.array_equal(np.asarray(image), png_pixels(expected[0]))

    assert cli.main([*args, "--grid"]) == 2
    assert "--grid writes one PNG: qwen-image-layered is a layered model" in capsys.readouterr().err
    assert cli.main([*args, "--layers", "0"]) == 2
    assert "--layers must be at least 1, got 0" in capsys.readouterr().err


def test_layers_is_refused_by_other_models(tmp_path, capsys):
    from tests.utils import load_script

    cli = load_script("generate")
    args = ["--model", "flux-digits", "--prompt", "a digit", "--layers", "3", "--output", str(tmp_path / "x.png")]
    assert cli.main(args) == 2
    assert "--layers 3 has no effect on flux-digits: it is for layered models" in capsys.readouterr().err
