"""Qwen-Image-Edit and Edit-2509: equal to diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline with the
cache off (bit for bit), the input-image rules, and TeaCache on the edit tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from teacache_models import SamplingParams, TeaCacheParams
from teacache_models.pipelines.qwen_image_edit import edit_image_size
from tests.test_pipeline_fixtures import (
    native_qwen_edit_pipelines,
    png_pixels,
    qwen_image_edit_pipeline,
    save_qwen_image,
    save_with_processor,
)

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT = "make the fox blue"
NEGATIVE = "blurry"
SEED = 4
# The reference resizes input images to about 1024 x 1024 pixels for the VAE and 384 x 384 for Edit-2509's vision
# tower: at the tiny fixture's scale, 64 x 64 and 32 x 32 run the same code.
VAE_AREA, CONDITION_AREA = 64 * 64, 32 * 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_qwen_image(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def released(folder, tmp_path_factory):
    """Per pipeline class, a folder in the released checkpoints' layout (processor/ included) of the components
    `qwen_image_edit_pipeline` builds."""
    names = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
    pipes = {name: qwen_image_edit_pipeline(folder, name) for name in names}
    return {
        name: save_with_processor(pipe, tmp_path_factory.mktemp(name), "Qwen2VLProcessor")
        for name, pipe in pipes.items()
    }


@pytest.fixture
def small_images(monkeypatch):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    from teacache_models.pipelines.qwen_image_edit import QwenImageEditPipeline, QwenImageEditPlusPipeline

    resize = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: resize(VAE_AREA, ratio))
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", VAE_AREA)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", CONDITION_AREA)
    # The same areas for our pipelines as loaded (from a folder, by the CLI).
    monkeypatch.setattr(QwenImageEditPipeline, "vae_image_area", VAE_AREA)
    monkeypatch.setattr(QwenImageEditPlusPipeline, "condition_image_area", CONDITION_AREA)


def picture(height: int, width: int, seed: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def pipelines(folder, class_name: str):
    """The diffusers pipeline and ours on the same components, at this test's small image areas."""
    reference, ours = native_qwen_edit_pipelines(folder, class_name)
    ours.vae_image_area = VAE_AREA
    if ours.condition_image_area is not None:
        ours.condition_image_area = CONDITION_AREA
    return reference, ours


def run_reference(pipe, image, **settings):
    generator = torch.Generator("cpu").manual_seed(SEED)
    return pipe(image=image, prompt=PROMPT, generator=generator, output_type="pt", **settings).images


CASES = {
    # Odd sizes: a 40 x 56 input (VAE size 64 x 64 at this area), a 32 x 48 output.
    "edit-cfg": ("QwenImageEditPipeline", [(40, 56)], dict(height=32, width=48, negative_prompt=NEGATIVE)),
    "edit-no-cfg": ("QwenImageEditPipeline", [(24, 72)], dict(height=48, width=16, guidance_scale=1.0)),
    "plus-one": ("QwenImageEditPlusPipeline", [(40, 56)], dict(height=32, width=32, negative_prompt=NEGATIVE)),
    "plus-three": (
        "QwenImageEditPlusPipeline",
        [(40, 56), (64, 24), (30, 30)],
        dict(height=16, width=48, negative_prompt=NEGATIVE),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_diffusers_with_the_cache_off(folder, small_images, case):
    class_name, sizes, settings = CASES[case]
    reference, ours = pipelines(folder, class_name)
    images = [picture(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    image = images if len(images) > 1 else images[0]
    params = SamplingParams(
        num_inference_steps=3, seed=SEED, teacache_params=None, **{"guidance_scale": 4.0, **settings}
    )
    result = ours(PROMPT, params, image=image)
    reference_settings = dict(
        num_inference_steps=3,
        height=settings["height"],
        width=settings["width"],
        true_cfg_scale=params.guidance_scale,
        negative_prompt=settings.get("negative_prompt"),
    )
    expected = run_reference(reference, image, **reference_settings)
    assert result.images.shape == expected.shape
    assert torch.equal(result.images, expected), "with the cache off the edit must equal diffusers bit for bit"
    assert result.teacache_stats.negative.num_computed == (3 if "negative_prompt" in settings else 0)


def test_one_image_in_a_list_reaches_the_vision_tower_as_in_diffusers(folder, small_images):
    # diffusers' Edit pipeline resizes a bare image for the vision tower but leaves an image in a list at its own
    # size there (the VAE reads it resized either way): the two calls differ, and each equals its reference.
    reference, ours = pipelines(folder, "QwenImageEditPipeline")
    image = picture(40, 56, seed=0)
    params = SamplingParams(
        num_inference_steps=2, guidance_scale=1.0, seed=SEED, height=16, width=16, teacache_params=None
    )
    settings = dict(num_inference_steps=2, height=16, width=16, true_cfg_scale=1.0)
    bare, listed = (ours(PROMPT, params, image=given).images for given in (image, [image]))
    assert torch.equal(listed, run_reference(reference, [image], **settings))
    assert torch.equal(bare, run_reference(reference, image, **settings))
    assert not torch.equal(bare, listed)


def test_a_batch_edits_each_prompt_as_the_reference_does_alone(folder, small_images):
    reference, ours = pipelines(folder, "QwenImageEditPlusPipeline")
    images = [picture(40, 56, seed=0), picture(32, 32, seed=1)]
    prompts = [PROMPT, "a cat on a much longer mat, at night"]
    params = SamplingParams(num_inference_steps=2, guidance_scale=1.0, seed=SEED, height=32, width=32)
    batch = ours(prompts, dataclasses.replace(params, teacache_params=None), image=images).images
    assert batch.shape == (2, 3, 32, 32)
    # diffusers' pipelines take one prompt per call; the batch's first sample draws the same noise as a call alone.
    alone = run_reference(reference, images, num_inference_steps=2, height=32, width=32, true_cfg_scale=1.0)
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=0)


def test_teacache_skips_on_the_edit_tokens_per_branch(folder, small_images):
    _, ours = pipelines(folder, "QwenImageEditPipeline")
    cache = TeaCacheParams(teacache_thresh=1e6, coefficients=(1.0, 0.0))
    params = SamplingParams(
        num_inference_steps=4, guidance_scale=4.0, negative_prompt=NEGATIVE, seed=1, height=32, width=32
    )
    image = picture(40, 56, seed=0)
    cached = ours(PROMPT, dataclasses.replace(params, teacache_params=cache), image=image)
    for branch in (cached.teacache_stats.positive, cached.teacache_stats.negative):
        assert branch.computed_steps == (0, 3) and branch.skipped_steps == (1, 2)
    uncached = ours(PROMPT, dataclasses.replace(params, teacache_params=None), image=image)
    assert not torch.equal(cached.images, uncached.images)


def test_input_image_rules(folder):
    _, edit = pipelines(folder, "QwenImageEditPipeline")
    _, plus = pipelines(folder, "QwenImageEditPlusPipeline")
    params = SamplingParams(num_inference_steps=2, guidance_scale=1.0, height=32, width=32, teacache_params=None)
    image = picture(8, 8, seed=0)
    assert edit.takes_image() == plus.takes_image() == "required"
    assert (edit.max_images, plus.max_images) == (1, 3)
    with pytest.raises(ValueError, match="QwenImageEditPipeline edits an input image: pass image="):
        edit(PROMPT, params)
    with pytest.raises(ValueError, match="QwenImageEditPipeline takes 1 to 1 input images, got 2"):
        edit(PROMPT, params, image=[image, image])
    with pytest.raises(ValueError, match="QwenImageEditPlusPipeline takes 1 to 3 input images, got 4"):
        plus(PROMPT, params, image=[image] * 4)
    with pytest.raises(TypeError, match=r"image\[1\] must be a PIL image"):
        plus(PROMPT, params, image=[image, torch.zeros(3, 8, 8)])
    with pytest.raises(TypeError, match=r"takes only image=\.\.\., got \['mask'\]"):
        plus(PROMPT, params, image=image, mask=image)
    # A side that rounds to 0 at the resize area is refused by name (diffusers fails in its image processor).
    narrow = picture(1, 200, seed=0)
    with pytest.raises(ValueError, match=r"image\[1\] of 200 x 1 pixels is too narrow: .* it would be \d+ x 0"):
        plus(PROMPT, params, image=[image, narrow])
    with pytest.raises(ValueError, match=r"image\[0\] of 200 x 1 pixels is too narrow"):
        edit.output_size(narrow)


def test_output_size_is_the_reference_default():
    # diffusers' default: about 1024 x 1024 pixels at the (last) input image's aspect ratio, multiples of 32.
    assert edit_image_size(1024 * 1024, 1.0) == (1024, 1024)
    assert edit_image_size(1024 * 1024, 16 / 9) == (1376, 768)
    assert edit_image_size(384 * 384, 3 / 4) == (320, 448)


@pytest.mark.parametrize("class_name", ["QwenImageEditPipeline", "QwenImageEditPlusPipeline"])
def test_a_released_folder_loads_without_torchvision_and_equals_diffusers(folder, released, small_images, class_name):
    """`load_pipeline` on the released layout builds the processor from its saved parts (no video processor, so no
    torchvision) and the edit equals the in-memory diffusers pipeline bit for bit."""
    from transformers import Qwen2VLProcessor

    from teacache_models.pipelines import load_pipeline

    reference, _ = pipelines(folder, class_name)
    ours = load_pipeline(released[class_name])
    processor = ours.text_components["processor"]
    assert isinstance(processor, Qwen2VLProcessor) and not hasattr(processor, "video_processor")
    assert (released[class_name] / "processor" / "video_preprocessor_config.json").is_file()
    images = [picture(40, 56, seed=0), picture(24, 72, seed=1)][: ours.max_images]
    image = images if len(images) > 1 else images[0]
    settings = dict(height=32, width=48, negative_prompt=NEGATIVE)
    params = SamplingParams(num_inference_steps=2, guidance_scale=4.0, seed=SEED, teacache_params=None, **settings)
    result = ours(PROMPT, params, image=image)
    expected = run_reference(reference, image, num_inference_steps=2, true_cfg_scale=4.0, **settings)
    assert torch.equal(result.images, expected), "loaded from its folder, the edit must equal diffusers bit for bit"


def test_the_cli_edits_a_released_folder_at_the_last_images_aspect_ratio(
    folder, released, small_images, tmp_path, capsys
):
    import json

    from PIL import Image

    from tests.utils import load_script

    reference, _ = pipelines(folder, "QwenImageEditPlusPipeline")
    cli = load_script("generate")
    paths = []
    for i, (height, width) in enumerate([(40, 56), (30, 90)]):
        paths.append(tmp_path / f"in{i}.png")
        picture(height, width, seed=i).save(paths[-1])
    output = tmp_path / "edit.png"
    args = ["--model", str(released["QwenImageEditPlusPipeline"]), "--config", "configs/qwen-image-edit-2509.yaml"]
    args += ["--prompt", PROMPT, "--steps", "2", "--seed", "1", "--no-progress", "--teacache", "off"]
    args += ["--device", "cpu", "--dtype", "float32", "--linear-kernel", "aten", "--output", str(output)]
    assert cli.main([*args, "--image", str(paths[0]), "--image", str(paths[1])]) == 0
    with Image.open(output) as image:
        written = np.asarray(image)
    # The reference's default size: the last image's 1:3 at about 64 x 64 pixels, in multiples of 32.
    assert written.shape == (32, 96, 3)
    images = [Image.open(p).convert("RGB") for p in paths]
    expected = reference(
        image=images,
        prompt=PROMPT,
        negative_prompt=" ",  # the zoo entry's, from the model card
        height=32,
        width=96,
        num_inference_steps=2,
        true_cfg_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="pt",
    ).images
    assert np.array_equal(written, png_pixels(expected[0]))
    assert json.loads(output.with_suffix(".json").read_text())["images"] == [str(p) for p in paths]

    assert cli.main([*args, *[flag for p in paths * 2 for flag in ("--image", str(p))]]) == 2
    assert "--image given 4 times, but" in capsys.readouterr().err
    assert cli.main(args) == 2
    assert "needs an input image: --image FILE is required" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "class_name"), [("qwen-image-edit", "QwenImageEditPipeline")])
def test_the_borrowed_fit_is_announced_and_judged_at_demo_size(folder, small_images, name, class_name):
    """The README's record: the edit entries borrow Qwen-Image's fit; at demo size (the tiny random model, 64 x 64,
    20 steps, every step computed) the fit monitor finds it does not fit."""
    import warnings

    from teacache_models.zoo import load_zoo_entry

    _, ours = pipelines(folder, class_name)
    entry = load_zoo_entry(name)
    assert entry.default_preset == "off" and entry.fits["modulated_input"].borrowed_from == "qwen-image"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entry.install_teacache_fits({"transformer": ours.transformer})
        params = SamplingParams(
            num_inference_steps=20,
            guidance_scale=4.0,
            negative_prompt=" ",
            seed=0,
            height=64,
            width=64,
            teacache_params=TeaCacheParams(teacache_thresh=0.0),
        )
        result = ours(PROMPT, params, image=picture(48, 64, 0))
    messages = [str(w.message) for w in caught]
    assert any(
        f"no TeaCache coefficients have been fitted for {name}: using those of qwen-image" in m for m in messages
    )
    assert any("TeaCache's coefficients do not fit QwenImageTransformer2DModel" in m for m in messages)
    fit = result.teacache_stats.as_dict()["branches"]["positive"]["coefficient_fit"]
    assert fit["misfit"] and fit["nonpositive_predictions"] == fit["points"] == 18
