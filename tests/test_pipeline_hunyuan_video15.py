"""HunyuanVideo-1.5 pipelines (T2V and I2V, 480p and 720p, the step-distilled I2V): bit-identical to diffusers'
HunyuanVideo15Pipeline / HunyuanVideo15ImageToVideoPipeline with TeaCache off, and TeaCache through the loop."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from teacache_models import SamplingParams, TeaCacheParams
from teacache_models.pipelines import load_pipeline
from teacache_models.pipelines.hunyuan_video15 import (
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15TextToVideoPipeline,
)
from tests.test_pipeline_fixtures import HUNYUAN_VIDEO15_KINDS, save_hunyuan_video15

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

# Quoted words are the glyph text: the ByT5 stream carries them.
PROMPT = 'a red fox holds a sign saying "hello" in the snow'
NEGATIVE = "blurry bad quality"
SKIP_ALL = TeaCacheParams(teacache_thresh=1e6, coefficients=(1.0, 0.0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: save_hunyuan_video15(tmp_path_factory.mktemp(kind), kind) for kind in HUNYUAN_VIDEO15_KINDS}


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def reference(folder, class_name):
    """diffusers' pipeline of `folder`. Its `from_pretrained` leaves the transformer's weights in the memory-mapped
    file at addresses that are not 64-byte aligned, where the CPU matrix kernels round some sums differently
    (by one ulp); copied to fresh memory, as ours are, the weights give diffusers' transformer our results
    exactly."""
    import diffusers

    pipe = getattr(diffusers, class_name).from_pretrained(folder)
    with torch.no_grad():
        for parameter in pipe.transformer.parameters():
            parameter.data = parameter.data.clone()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class DecoderInputs:
    """Records the latents a pipeline hands its VAE decoder."""

    def __init__(self, vae):
        self.seen = []
        original = vae.decode

        def spy(latents, *args, **kwargs):
            self.seen.append(latents.clone())
            return original(latents, *args, **kwargs)

        vae.decode = spy


def small_params(**changes) -> SamplingParams:
    settings = dict(num_inference_steps=3, height=32, width=48, num_frames=5, seed=4, teacache_params=None)
    return SamplingParams(**{**settings, **changes})


def run_both(folder, params: SamplingParams, image=None):
    ours = load_pipeline(folder)
    is_i2v = isinstance(ours, HunyuanVideo15ImageToVideoPipeline)
    assert isinstance(ours, HunyuanVideo15TextToVideoPipeline) and is_i2v == (image is not None)
    ours_seen = DecoderInputs(ours.vae)
    result = ours(PROMPT, params, **({} if image is None else {"image": image}))
    pipe = reference(folder, "HunyuanVideo15ImageToVideoPipeline" if is_i2v else "HunyuanVideo15Pipeline")
    assert pipe.guider.guidance_scale == params.guidance_scale
    theirs_seen = DecoderInputs(pipe.vae)
    settings = dict(
        prompt=PROMPT,
        num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="pt",
    )
    if params.negative_prompt is not None:
        settings["negative_prompt"] = params.negative_prompt
    # The I2V reference chooses its size from the image; the T2V one takes it.
    settings.update(image=image) if is_i2v else settings.update(height=params.height, width=params.width)
    expected = pipe(**settings).frames
    assert torch.equal(ours_seen.seen[0], theirs_seen.seen[0])
    assert torch.equal(result.frames, expected)
    return result


@pytest.mark.parametrize("kind", ["t2v-480p", "t2v-720p"])
def test_text_to_video_equals_diffusers(folders, kind):
    params = small_params(guidance_scale=6.0, negative_prompt=NEGATIVE)
    result = run_both(folders[kind], params)
    assert result.frames.shape == (1, 5, 3, 32, 48)
    assert result.teacache_stats.negative.computed_steps == (0, 1, 2)


@pytest.mark.parametrize("kind", ["i2v-480p", "i2v-720p", "i2v-480p-step-distilled"])
def test_image_to_video_equals_diffusers(folders, image, kind):
    pipe = load_pipeline(folders[kind])
    height, width = pipe.bucket_size(image.height, image.width)
    guidance = HUNYUAN_VIDEO15_KINDS[kind][3]
    result = run_both(folders[kind], small_params(height=height, width=width, guidance_scale=guidance), image)
    assert result.frames.shape[-2:] == (height, width)
    # The step-distilled model is also guidance-distilled: one call per step.
    assert result.teacache_stats.negative.computed_steps == (() if guidance == 1.0 else (0, 1, 2))


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA"])
def test_an_image_of_another_mode_is_resized_in_it_as_diffusers_does(folders, image, mode):
    # diffusers resizes the image in its own mode (an RGBA image with its alpha premultiplied) and converts it to RGB
    # only in the SigLIP and VAE processors: converting it first changes the pixels those read.
    from PIL import Image

    pipe = load_pipeline(folders["i2v-480p"])
    alpha = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56), dtype=np.uint8))
    picture = image.copy()
    picture.putalpha(alpha)
    picture = picture.convert(mode)
    height, width = pipe.bucket_size(picture.height, picture.width)
    run_both(folders["i2v-480p"], small_params(height=height, width=width, guidance_scale=6.0), picture)


def test_a_batch_of_prompts_denoises_as_diffusers_and_decodes_each_sample(folders):
    # diffusers' VAE decoder fails on a batch (its attention mask is built for one sample): ours decodes each alone.
    pipe = load_pipeline(folders["t2v-480p"])
    decoded = DecoderInputs(pipe.vae)
    prompts = [PROMPT, "a cat on a mat"]
    params = small_params(guidance_scale=6.0, negative_prompt=NEGATIVE, num_inference_steps=2)
    frames = pipe(prompts, params).frames
    assert frames.shape == (2, 5, 3, 32, 48) and torch.isfinite(frames).all()
    assert [latents.shape[0] for latents in decoded.seen] == [1, 1]
    reference_pipe = reference(folders["t2v-480p"], "HunyuanVideo15Pipeline")
    latents = reference_pipe(
        prompt=prompts,
        negative_prompt=[NEGATIVE] * 2,
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="latent",
    ).frames
    assert torch.equal(torch.cat(decoded.seen), latents / reference_pipe.vae.config.scaling_factor)


def test_the_buckets_follow_the_target_size(folders):
    small, large = load_pipeline(folders["i2v-480p"]), load_pipeline(folders["i2v-720p"])
    assert small.bucket_size(40, 56) != large.bucket_size(40, 56)
    # Without a zoo entry the defaults are the reference's: 16:9 bucket, 121 frames, the guider's scale.
    defaults = load_pipeline(folders["t2v-720p"]).default_sampling_params()
    assert (defaults.num_frames, defaults.guidance_scale, defaults.teacache_params) == (121, 6.0, None)
    assert defaults.width > defaults.height
    assert load_pipeline(folders["i2v-480p-step-distilled"]).default_sampling_params().guidance_scale == 1.0


def test_teacache_skips_and_keeps_cfg_branches_apart(folders, image):
    pipe = load_pipeline(folders["i2v-480p"])
    height, width = pipe.bucket_size(image.height, image.width)
    params = small_params(num_inference_steps=5, guidance_scale=6.0, height=height, width=width)
    cached = pipe(PROMPT, dataclasses.replace(params, teacache_params=SKIP_ALL), image=image)
    for branch in (cached.teacache_stats.positive, cached.teacache_stats.negative):
        assert branch.computed_steps == (0, 4) and branch.skipped_steps == (1, 2, 3)
    uncached = pipe(PROMPT, params, image=image)
    assert not torch.equal(cached.frames, uncached.frames) and torch.isfinite(cached.frames).all()
    zero = TeaCacheParams(0.0, coefficients=(1.0, 0.0))
    zero = pipe(PROMPT, dataclasses.replace(params, teacache_params=zero), image=image)
    assert torch.equal(zero.frames, uncached.frames)
    assert not pipe.transformer.teacache_enabled
    # No preset: the cache asks for coefficients rather than guessing.
    with pytest.raises(ValueError, match="no TeaCache coefficients for indicator 'modulated_input'"):
        pipe(PROMPT, dataclasses.replace(params, teacache_params=TeaCacheParams(0.1)), image=image)


def test_bad_inputs_are_rejected(folders, image):
    t2v, i2v = load_pipeline(folders["t2v-480p"]), load_pipeline(folders["i2v-480p"])
    with pytest.raises(ValueError, match=r"4k\+1 for HunyuanVideo-1.5"):
        t2v(PROMPT, small_params(num_frames=4))
    with pytest.raises(ValueError, match="multiple of 16"):
        t2v(PROMPT, small_params(height=40))
    with pytest.raises(TypeError, match="takes no inputs"):
        t2v(PROMPT, small_params(), image=image)
    with pytest.raises(ValueError, match="image-to-video: pass image="):
        i2v(PROMPT, small_params())
    with pytest.raises(TypeError, match="PIL image"):
        i2v(PROMPT, small_params(), image=torch.rand(3, 32, 48))
    with pytest.raises(ValueError, match="does not use sampling settings"):
        t2v(PROMPT, small_params(true_cfg_scale=2.0))
    assert (t2v.takes_image(), i2v.takes_image()) == ("no", "required")
    # diffusers' pipeline takes no max_sequence_length (its encoders' lengths are fixed): a changed one is refused.
    for pipe in (t2v, i2v):
        pipe.max_sequence_length = 8
        with pytest.raises(ValueError, match="max_sequence_length=8 has no effect on HunyuanVideo15"):
            pipe(PROMPT, small_params(), **({"image": image} if pipe is i2v else {}))


# ---- zoo, CLI and calibration ---------------------------------------------------------------------


def test_zoo_defaults_reach_the_pipeline(folders, image):
    from teacache_models.zoo import load_zoo_entry

    entry = load_zoo_entry("hunyuanvideo1.5-480p-i2v-step-distilled")
    pipe = load_pipeline(folders["i2v-480p-step-distilled"], zoo_entry=entry)
    params = pipe.default_sampling_params(height=32, width=48, num_frames=5, seed=0)
    assert (params.num_inference_steps, params.guidance_scale, params.flow_shift) == (8, 1.0, 7.0)
    assert params.teacache_params is None and entry.default_preset == "off" and not entry.presets
    result = pipe(PROMPT, params, image=image)
    assert result.teacache_stats.positive.computed_steps == tuple(range(8))
    assert result.teacache_stats.negative.computed_steps == ()
    for name in ("480p-t2v", "720p-t2v", "480p-i2v", "720p-i2v"):
        sampling = load_zoo_entry(f"hunyuanvideo1.5-{name}").sampling
        assert (sampling.num_frames, sampling.guidance_scale, sampling.fps) == (121, 6.0, 24)
        assert (sampling.height, sampling.width) == ((480, 848) if name.startswith("480") else (720, 1280))


def test_cli_writes_an_mp4(folders, image, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    from tests.test_generate_cli import load_cli, read_video

    picture = tmp_path / "first.png"
    image.save(picture)
    output = tmp_path / "fox.mp4"
    height, width = load_pipeline(folders["i2v-720p"]).bucket_size(image.height, image.width)
    args = [
        "--model", str(folders["i2v-720p"]), "--config", "hunyuanvideo1.5-720p-i2v", "--prompt", PROMPT,
        "--image", str(picture), "--height", str(height), "--width", str(width), "--num-frames", "5",
        "--steps", "2", "--seed", "1", "--no-progress", "--output", str(output),
    ]  # fmt: skip
    assert load_cli().main(args) == 0
    frames, fps = read_video(output)
    assert frames.shape == (5, height, width, 3) and fps == 24


def test_calibrate_script_fits_an_image_to_video_model(folders, image, tmp_path):
    from teacache_models.zoo import load_zoo_entry
    from tests.utils import load_script

    picture = tmp_path / "first.png"
    image.save(picture)
    height, width = load_pipeline(folders["i2v-480p"]).bucket_size(image.height, image.width)
    config = tmp_path / "hv15-tiny.yaml"
    config.write_text(
        "name: hv15-tiny\nmanifest: hunyuanvideo1.5-480p-i2v\nfamily: hunyuan_video15\ntask: i2v\n"
        "transformer: HunyuanVideo15Transformer3DModel\n"
        f"sampling: {{num_inference_steps: 5, guidance_scale: 6.0, height: {height}, width: {width}, num_frames: 5}}\n"
        "teacache:\n  default: calibrated\n  presets:\n    calibrated:\n      teacache_thresh: 0.1\n"
        "      coefficients: [1.0, 0.0]\n      source: to be calibrated\n"
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na blue bird on a house\n")
    args = ["--model", str(folders["i2v-480p"]), "--config", str(config), "--prompts-file", str(prompts)]
    args += ["--seeds", "1", "--degree", "2", "--json", str(tmp_path / "fit.json"), "--write-config", str(config)]
    calibrate = load_script("calibrate")
    with pytest.raises(SystemExit, match="--image FILE"):
        calibrate.main(args)
    assert calibrate.main([*args, "--image", str(picture)]) == 0
    record = json.loads((tmp_path / "fit.json").read_text())
    # 2 prompts x 1 seed x 4 step pairs, per CFG branch; the default indicator, block 0's modulated input.
    assert record["fit"]["num_points"] == 16 and len(record["points"]["negative"]) == 8
    assert record["indicator"] == "modulated_input"
    preset = load_zoo_entry(config).presets["calibrated"]
    assert preset.params.coefficients == pytest.approx(record["fit"]["coefficients"])
