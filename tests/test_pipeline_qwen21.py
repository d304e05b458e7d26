"""Qwen-Image-2.1 text-to-image: equal to diffusers' QwenImage21Pipeline with the cache off (bit for bit, with and
without the prefix key/value cache, with CFG and a batch of prompts of different lengths), the checkpoint's
`sample_sigmas`, and TeaCache per CFG branch."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from teacache_models import SamplingParams, TeaCacheParams
from teacache_models.families import pipeline_classes
from teacache_models.pipelines.qwen_image21 import QwenImage21TextToImagePipeline
from tests.test_pipeline_fixtures import qwen_image21_pipelines

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

PROMPTS = ["a red fox jumps over the lazy dog", "a cat on a mat"]
NEGATIVE = "blurry"
SEED = 3


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return qwen_image21_pipelines(tmp_path_factory.mktemp("qwen21"))


def run_reference(pipe, prompts, height, width, steps, negative=None, scale=1.0, **settings):
    generator = torch.Generator("cpu").manual_seed(SEED)
    negative_prompt = None if negative is None else [negative] * len(prompts)
    return pipe(
        prompts,
        negative_prompt=negative_prompt,
        true_cfg_scale=scale,
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=generator,
        output_type="pt",
        **settings,
    ).images


CASES = {
    # (prompts, height, width, CFG)
    "one-prompt": (PROMPTS[:1], 32, 64, False),
    "batch-cfg": (PROMPTS, 64, 32, True),
}


@pytest.mark.parametrize("use_kv_cache", [True, False], ids=["prefix-cache", "no-prefix-cache"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_diffusers_with_the_cache_off(pipes, case, use_kv_cache):
    reference, ours = pipes
    prompts, height, width, cfg = CASES[case]
    ours.use_kv_cache = use_kv_cache
    settings = dict(guidance_scale=3.0, negative_prompt=NEGATIVE) if cfg else dict(guidance_scale=1.0)
    params = SamplingParams(num_inference_steps=3, seed=SEED, height=height, width=width, **settings)
    result = ours(prompts, dataclasses.replace(params, teacache_params=None))
    expected = run_reference(
        reference,
        prompts,
        height,
        width,
        3,
        negative=NEGATIVE if cfg else None,
        scale=params.guidance_scale,
        use_kv_cache=use_kv_cache,
    )
    assert result.images.shape == expected.shape == (len(prompts), 4, height, width)  # RGBA, as the VAE decodes
    assert torch.equal(result.images, expected), "with the cache off the image must equal diffusers bit for bit"
    assert result.teacache_stats.negative.num_computed == (3 if cfg else 0)


def test_the_checkpoints_sample_sigmas_set_the_schedule(pipes, tmp_path):
    reference, ours = pipes
    sigmas = [1.0, 0.8, 0.3]
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "QwenImage21Pipeline", "sample_sigmas": sigmas}))
    assert QwenImage21TextToImagePipeline.folder_settings(tmp_path) == {"sample_sigmas": sigmas}
    scheduled = QwenImage21TextToImagePipeline(
        transformer=ours.transformer,
        scheduler=ours.scheduler,
        vae=ours.vae,
        sample_sigmas=sigmas,
        **ours.text_components,
    )
    params = SamplingParams(num_inference_steps=3, guidance_scale=1.0, seed=SEED, height=32, width=32)
    result = scheduled(PROMPTS[:1], dataclasses.replace(params, teacache_params=None))
    reference.register_to_config(sample_sigmas=sigmas)
    try:
        expected = run_reference(reference, PROMPTS[:1], 32, 32, 50)  # the reference ignores the step count
    finally:
        reference.register_to_config(sample_sigmas=None)
    assert torch.equal(result.images, expected)
    with pytest.raises(ValueError, match="num_inference_steps must be 3 for this checkpoint"):
        scheduled(PROMPTS[:1], dataclasses.replace(params, num_inference_steps=4, teacache_params=None))


def test_teacache_skips_per_cfg_branch_over_the_whole_sequence(pipes):
    _, ours = pipes
    ours.use_kv_cache = True
    cache = TeaCacheParams(teacache_thresh=1e6, coefficients=(1.0, 0.0))
    params = SamplingParams(
        num_inference_steps=4, guidance_scale=3.0, negative_prompt=NEGATIVE, seed=1, height=32, width=32
    )
    cached = ours(PROMPTS, dataclasses.replace(params, teacache_params=cache))
    for branch in (cached.teacache_stats.positive, cached.teacache_stats.negative):
        assert branch.computed_steps == (0, 3) and branch.skipped_steps == (1, 2)
    uncached = ours(PROMPTS, dataclasses.replace(params, teacache_params=None))
    assert uncached.teacache_stats.positive.num_computed == 4
    assert cached.images.shape == uncached.images.shape
    assert not torch.equal(cached.images, uncached.images), "skipped steps reuse a residual: the image changes"
    # Nothing TeaCache decides may leak into the next uncached run.
    assert torch.equal(ours(PROMPTS, dataclasses.replace(params, teacache_params=None)).images, uncached.images)


def test_a_size_off_the_multiple_is_rounded_down_with_a_warning_as_in_diffusers(pipes):
    reference, ours = pipes
    params = SamplingParams(num_inference_steps=2, guidance_scale=1.0, seed=SEED, height=48, width=70)
    with pytest.warns(UserWarning, match="got 48 and 70: generating 32 x 64"):
        result = ours(PROMPTS[:1], dataclasses.replace(params, teacache_params=None))
    expected = run_reference(reference, PROMPTS[:1], 48, 70, 2)
    assert result.images.shape == expected.shape == (1, 4, 32, 64)
    assert torch.equal(result.images, expected)


def test_registered_for_the_diffusers_class_and_refuses_an_image(pipes, monkeypatch):
    _, ours = pipes
    assert pipeline_classes()["QwenImage21Pipeline"] is QwenImage21TextToImagePipeline
    params = SamplingParams(num_inference_steps=2, guidance_scale=1.0, seed=0, height=32, width=32)
    with pytest.raises(TypeError, match="takes no inputs"):
        ours(PROMPTS[:1], params, image=object())
    with pytest.raises(ValueError, match=r"height must be a multiple of 32 .* got 16; try 32"):
        ours(PROMPTS[:1], dataclasses.replace(params, height=16))
    # diffusers' QwenImage21Pipeline takes no max_sequence_length: a changed one would be ignored, so it is refused.
    monkeypatch.setattr(ours, "max_sequence_length", 64)
    with pytest.raises(ValueError, match="max_sequence_length=64 has no effect on QwenImage21TextToImagePipeline"):
        ours(PROMPTS[:1], params)


def test_the_cli_runs_a_released_folder_and_refuses_an_image(pipes, tmp_path, capsys):
    """The CLI loads the released layout (processor/ as the Hub holds it: its parts, no video processor, so no
    torchvision) and writes what diffusers generates in memory."""
    from PIL import Image
    from transformers import Qwen3VLProcessor

    from teacache_models.pipelines import load_pipeline
    from tests.test_pipeline_fixtures import png_pixels, save_with_processor
    from tests.utils import load_script

    reference, _ = pipes
    folder = save_with_processor(reference, tmp_path / "released", "Qwen3VLProcessor")
    processor = load_pipeline(folder).text_components["processor"]
    assert isinstance(processor, Qwen3VLProcessor) and not hasattr(processor, "video_processor")
    assert processor.chat_template == reference.processor.chat_template
    cli = load_script("generate")
    output = tmp_path / "t2i.png"
    args = ["--model", str(folder), "--config", "configs/qwen-image-2.1.yaml", "--prompt", PROMPTS[0]]
    args += ["--steps", "2", "--seed", "1", "--no-progress", "--device", "cpu", "--dtype", "float32"]
    args += ["--linear-kernel", "aten", "--height", "32", "--width", "64", "--output", str(output)]
    assert cli.main(args) == 0
    with Image.open(output) as image:
        assert image.mode == "RGBA"
        written = np.asarray(image)
    # The entry's defaults: no CFG, TeaCache off (so the prefix cache runs, as the reference's default).
    generator = torch.Generator("cpu").manual_seed(1)
    expected = reference(
        PROMPTS[0], height=32, width=64, num_inference_steps=2, generator=generator, output_type="pt"
    ).images
    assert np.array_equal(written, png_pixels(expected[0]))
    picture = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(picture)
    assert cli.main([*args, "--image", str(picture)]) == 2
    assert "--image has no effect on" in capsys.readouterr().err
