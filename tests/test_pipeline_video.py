"""Video pipelines (Wan T2V / I2V / TI2V / two experts, HunyuanVideo): equal to the diffusers pipelines with
TeaCache off, and the loop's TeaCache contract (CFG branches and experts kept apart) with it on."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from teacache_models import SamplingParams, TeaCacheParams
from teacache_models.pipelines import load_pipeline
from teacache_models.zoo import load_zoo_entry
from tests.test_pipeline_fixtures import save_hunyuan_video, save_wan
from tests.utils import assert_parity

pytest.importorskip("diffusers")
pytest.importorskip("ftfy")  # diffusers' Wan I2V prompt cleaning needs it
pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT = "a red fox jumps over the lazy dog"
NEGATIVE = "blurry bad quality"
# y = x and a threshold no distance reaches: every step that is not forced skips.
SKIP_ALL = TeaCacheParams(teacache_thresh=1e6, coefficients=(1.0, 0.0))
WAN_KINDS = ("t2v", "t2v-a14b", "i2v", "flf2v", "i2v-a14b", "ti2v")


@pytest.fixture(scope="module")
def wan_folders(tmp_path_factory):
    return {kind: save_wan(tmp_path_factory.mktemp(f"wan-{kind}"), kind) for kind in WAN_KINDS}


@pytest.fixture(scope="module")
def hunyuan_folder(tmp_path_factory):
    return save_hunyuan_video(tmp_path_factory.mktemp("hunyuan_video"))


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def reference(folder, class_name, torch_dtype=None):
    """The diffusers pipeline of `folder`, in `torch_dtype` (None: as stored). Wan transformers are loaded here:
    diffusers' own loading of a model with fp32-kept modules needs `accelerate`, which the tests do not require;
    in another dtype they keep those modules in float32 as that loading does."""
    import diffusers
    from safetensors.torch import load_file

    preloaded = {}
    if class_name.startswith("Wan"):
        for name in ("transformer", "transformer_2"):
            subfolder = folder / name
            if subfolder.is_dir():
                model_class = diffusers.WanTransformer3DModel
                model = model_class.from_config(model_class.load_config(subfolder))
                model.load_state_dict(load_file(next(subfolder.glob("*.safetensors"))))
                for key, parameter in model.named_parameters():
                    if torch_dtype is not None and not any(m in key.split(".") for m in model._keep_in_fp32_modules):
                        parameter.data = parameter.data.to(torch_dtype)
                preloaded[name] = model.eval()
    dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    pipe = getattr(diffusers, class_name).from_pretrained(folder, **dtype, **preloaded)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class DecoderInputs:
    """Records what a pipeline hands its VAE decoder: the final latents, compared before the VAE blurs them."""

    def __init__(self, vae):
        self.seen = []
        original = vae.decode

        def spy(latents, *args, **kwargs):
            self.seen.append(latents.clone())
            return original(latents, *args, **kwargs)

        vae.decode = spy


def reference_settings(params):
    """The keyword arguments of a diffusers video pipeline for `params`: its settings, and its seed as a
    generator."""
    settings = dict(
        num_inference_steps=params.num_inference_steps,
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        guidance_scale=params.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="pt",
    )
    if params.negative_prompt is not None:
        settings["negative_prompt"] = params.negative_prompt
    return settings


def run_both(folder, class_name, params, image=None, **reference_kwargs):
    ours = load_pipeline(folder)
    ours_decoded = DecoderInputs(ours.vae)
    inputs = {} if image is None else {"image": image}
    result = ours(PROMPT, params, **inputs)
    pipe = reference(folder, class_name)
    theirs_decoded = DecoderInputs(pipe.vae)
    expected = pipe(prompt=PROMPT, **inputs, **reference_settings(params), **reference_kwargs).frames
    assert_parity(ours_decoded.seen[0], theirs_decoded.seen[0], tol=1e-5)
    assert_parity(result.frames, expected, tol=1e-5)
    return result


def wan_reference_frames(folder, prompt, params, torch_dtype=None):
    """diffusers' WanPipeline run on `params`' settings and seed."""
    return reference(folder, "WanPipeline", torch_dtype)(prompt=prompt, **reference_settings(params)).frames


def wan_params(**settings):
    defaults = dict(num_inference_steps=3, seed=7, height=32, width=48, num_frames=5, teacache_params=None)
    return SamplingParams(**{**defaults, **settings})


# ---- fidelity: TeaCache off equals diffusers -------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [dict(guidance_scale=5.0, negative_prompt=NEGATIVE), dict(guidance_scale=1.0, height=48, width=32, num_frames=9)],
    ids=["cfg", "no-cfg-portrait-9-frames"],
)
def test_wan_t2v_matches_diffusers(wan_folders, settings):
    result = run_both(wan_folders["t2v"], "WanPipeline", wan_params(**settings))
    frames = settings.get("num_frames", 5)
    assert result.frames.shape == (1, frames, 3, settings.get("height", 32), settings.get("width", 48))
    cfg = settings["guidance_scale"] > 1
    assert result.teacache_stats.negative.computed_steps == ((0, 1, 2) if cfg else ())
    assert result.expert_stats == {}


@pytest.mark.parametrize("kind", ["t2v-a14b", "i2v-a14b"])
def test_wan22_two_experts_match_diffusers(wan_folders, image, kind):
    i2v = kind.startswith("i2v")
    params = wan_params(num_inference_steps=4, guidance_scale=4.0, guidance_scale_2=2.0)
    class_name = "WanImageToVideoPipeline" if i2v else "WanPipeline"
    result = run_both(wan_folders[kind], class_name, params, image if i2v else None, guidance_scale_2=2.0)
    experts = result.expert_stats
    # The boundary (0.875 / 0.9 of 1000) falls after two of the four shifted steps.
    assert experts["transformer"].positive.computed_steps == (0, 1)
    assert experts["transformer_2"].positive.computed_steps == (2, 3)
    assert experts["transformer_2"].negative.computed_steps == (2, 3)
    assert result.teacache_stats.positive.computed_steps == (0, 1, 2, 3)


@pytest.mark.parametrize(
    ("kind", "boundary_ratio", "high_steps"),
    [("t2v-a14b", 0.0, (0, 1, 2)), ("i2v-a14b", 1.0, ())],
    ids=["t2v-0", "i2v-1"],
)
def test_wan22_boundary_edge_values_match_diffusers_bit_for_bit(
    wan_folders, image, tmp_path, kind, boundary_ratio, high_steps
):
    """diffusers runs boundary_ratio 0 (every step on the high-noise expert) and 1 (every step below t = 1000 on the
    low-noise one)."""
    folder = tmp_path / kind
    shutil.copytree(wan_folders[kind], folder)
    model_index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**model_index, "boundary_ratio": boundary_ratio}))
    i2v = kind.startswith("i2v")
    inputs = {"image": image} if i2v else {}
    params = wan_params(guidance_scale=4.0, guidance_scale_2=2.0, negative_prompt=NEGATIVE)
    ours = load_pipeline(folder)
    result = ours(PROMPT, params, **inputs)
    pipe = reference(folder, "WanImageToVideoPipeline" if i2v else "WanPipeline")
    expected = pipe(prompt=PROMPT, **inputs, **reference_settings(params), guidance_scale_2=2.0).frames
    assert torch.equal(result.frames, expected)
    assert result.expert_stats["transformer"].positive.computed_steps == high_steps


def test_wan22_second_scale_reaches_the_low_noise_expert(wan_folders):
    pipe = load_pipeline(wan_folders["t2v-a14b"])
    params = wan_params(num_inference_steps=4, guidance_scale=4.0)
    same = pipe(PROMPT, params)
    explicit = pipe(PROMPT, dataclasses.replace(params, guidance_scale_2=4.0))
    other = pipe(PROMPT, dataclasses.replace(params, guidance_scale_2=1.5))
    assert torch.equal(same.frames, explicit.frames), "guidance_scale_2 defaults to guidance_scale"
    assert not torch.equal(same.frames, other.frames)


def test_wan21_i2v_with_clip_image_tokens_matches_diffusers(wan_folders, image):
    result = run_both(wan_folders["i2v"], "WanImageToVideoPipeline", wan_params(guidance_scale=5.0), image)
    assert result.frames.shape == (1, 5, 3, 32, 48)


@pytest.mark.parametrize("with_image", [False, True], ids=["text-only", "first-frame"])
def test_wan22_ti2v_per_token_timesteps_match_diffusers(wan_folders, image, with_image):
    # TI2V-5B's folder is a WanPipeline; with an image, diffusers runs it as WanImageToVideoPipeline.
    class_name = "WanImageToVideoPipeline" if with_image else "WanPipeline"
    params = wan_params(guidance_scale=5.0, height=32, width=64)
    result = run_both(wan_folders["ti2v"], class_name, params, image if with_image else None)
    assert result.frames.shape == (1, 5, 3, 32, 64)


def test_wan_batch_of_two_prompts(wan_folders):
    pipe = load_pipeline(wan_folders["t2v"])
    params = wan_params(guidance_scale=3.0, num_inference_steps=2)
    prompts = [PROMPT, "a blue bird at night"]
    result = pipe(prompts, params)
    expected = wan_reference_frames(wan_folders["t2v"], prompts, params)
    assert_parity(result.frames, expected, tol=1e-5)
    assert result.to_uint8().shape == (2, 5, 32, 48, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_wan_half_precision_matches_diffusers(wan_folders, dtype):
    # Wan keeps its first parameter (scale_shift_table) in float32: the inputs must still be cast to the
    # half-precision weights, and the latents un-normalised with the reciprocal std rounded in the VAE's dtype.
    pipe = load_pipeline(wan_folders["t2v"], torch_dtype=dtype)
    assert pipe.dtype == dtype and pipe.transformer.scale_shift_table.dtype == torch.float32
    params = wan_params(guidance_scale=4.0, num_inference_steps=2)
    result = pipe(PROMPT, params)
    expected = wan_reference_frames(wan_folders["t2v"], PROMPT, params, dtype)
    assert torch.equal(result.frames, expected.float())


@pytest.mark.parametrize(
    "settings",
    [dict(guidance_scale=6.0), dict(guidance_scale=4.0, true_cfg_scale=3.0, negative_prompt=NEGATIVE)],
    ids=["embedded-guidance", "true-cfg"],
)
def test_hunyuan_video_matches_diffusers(hunyuan_folder, settings):
    true_cfg = settings.pop("true_cfg_scale", None)
    params = wan_params(true_cfg_scale=true_cfg, **settings)
    extra = {} if true_cfg is None else {"true_cfg_scale": true_cfg}
    result = run_both(hunyuan_folder, "HunyuanVideoPipeline", params, **extra)
    assert result.teacache_stats.negative.computed_steps == ((0, 1, 2) if true_cfg else ())


def test_hunyuan_video_batch_with_true_cfg_equals_diffusers_bit_for_bit(hunyuan_folder):
    # diffusers encodes the negative prompt once and its transformer broadcasts it over the batch.
    params = wan_params(guidance_scale=6.0, true_cfg_scale=3.0, negative_prompt=NEGATIVE, num_inference_steps=2)
    prompts = [PROMPT, "a blue bird at night"]
    result = load_pipeline(hunyuan_folder)(prompts, params)
    pipe = reference(hunyuan_folder, "HunyuanVideoPipeline")
    expected = pipe(prompt=prompts, true_cfg_scale=3.0, **reference_settings(params)).frames
    assert torch.equal(result.frames, expected)


# ---- TeaCache through the loop ---------------------------------------------------------------------


def test_wan_threshold_zero_is_identical_to_teacache_off(wan_folders):
    pipe = load_pipeline(wan_folders["t2v"])
    params = wan_params(guidance_scale=5.0, num_inference_steps=4)
    off = pipe(PROMPT, params)
    zero = pipe(PROMPT, dataclasses.replace(params, teacache_params=TeaCacheParams(0.0, coefficients=(1.0, 0.0))))
    assert torch.equal(off.frames, zero.frames)
    assert zero.teacache_stats.enabled and zero.teacache_stats.num_skipped == 0


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_teacache_skips_and_keeps_cfg_branches_apart(wan_folders, hunyuan_folder, family):
    folder = wan_folders["t2v"] if family == "wan" else hunyuan_folder
    pipe = load_pipeline(folder)
    extra = dict(guidance_scale=5.0) if family == "wan" else dict(guidance_scale=6.0, true_cfg_scale=2.0)
    params = wan_params(num_inference_steps=5, negative_prompt=NEGATIVE, teacache_params=SKIP_ALL, **extra)
    cached = pipe(PROMPT, params)
    for branch in (cached.teacache_stats.positive, cached.teacache_stats.negative):
        assert branch.computed_steps == (0, 4) and branch.skipped_steps == (1, 2, 3)
    uncached = pipe(PROMPT, dataclasses.replace(params, teacache_params=None))
    assert not torch.equal(cached.frames, uncached.frames)
    assert torch.isfinite(cached.frames).all()
    assert not pipe.transformer.teacache_enabled, "nothing stays switched on after a generation"


def test_wan22_experts_keep_their_own_cache(wan_folders):
    pipe = load_pipeline(wan_folders["t2v-a14b"])
    params = wan_params(num_inference_steps=8, guidance_scale=4.0, teacache_params=SKIP_ALL)
    result = pipe(PROMPT, params)
    high, low = result.expert_stats["transformer"], result.expert_stats["transformer_2"]
    for branch in ("positive", "negative"):
        high_steps, low_steps = getattr(high, branch), getattr(low, branch)
        switch = low_steps.computed_steps[0]
        # Each expert computes its own first step: no residual crosses the switch.
        assert high_steps.computed_steps == (0,) and high_steps.skipped_steps == tuple(range(1, switch))
        assert low_steps.computed_steps == (switch, 7) and low_steps.skipped_steps == tuple(range(switch + 1, 7))
        assert 1 < switch < 7
    assert result.teacache_stats.positive.num_computed + result.teacache_stats.positive.num_skipped == 8
    assert not any(model.teacache_enabled for model in pipe.teacache_models().values())


def test_wan_zoo_presets_reach_both_experts(wan_folders):
    entry = load_zoo_entry("wan2.2-t2v-a14b")
    with pytest.warns(UserWarning, match="no TeaCache coefficients have been fitted for wan2.2-t2v-a14b: using th"):
        pipe = load_pipeline(wan_folders["t2v-a14b"], zoo_entry=entry)
    borrowed = load_zoo_entry("wan2.1-t2v-14b").teacache_fits()
    for model in (pipe.transformer, pipe.transformer_2):
        assert model.teacache_fits == borrowed and set(borrowed) == {"temb", "timestep_proj"}
    small = dict(num_inference_steps=4, seed=7, height=32, width=48, num_frames=5)
    params = pipe.default_sampling_params("fast", **small)
    assert params.guidance_scale_2 == 3.0 and params.teacache_params.teacache_thresh == 0.2
    result = pipe(PROMPT, params)
    assert set(result.expert_stats) == {"transformer", "transformer_2"} and result.teacache_stats.enabled
    # Without a zoo entry a Wan model has no preset: the cache asks for coefficients instead of guessing.
    bare = load_pipeline(wan_folders["t2v"])
    with pytest.raises(ValueError, match="no TeaCache coefficients for indicator 'temb': pass"):
        bare(PROMPT, wan_params(teacache_params=TeaCacheParams(0.1)))
    preset = load_pipeline(wan_folders["t2v"], zoo_entry=load_zoo_entry("wan2.1-t2v-1.3b"))
    ret_steps = preset.default_sampling_params("ret-fast", **{**small, "num_inference_steps": 7})
    result = preset(
        PROMPT,
        dataclasses.replace(
            ret_steps,
            teacache_params=dataclasses.replace(ret_steps.teacache_params, teacache_thresh=1e6, coefficients=None),
        ),
    )
    positive = result.teacache_stats.positive
    assert positive.computed_steps == (0, 1, 2, 3, 4), "ret-steps mode computes 5 first steps, not the last"
    assert positive.skipped_steps == (5, 6)


@pytest.mark.parametrize("name, kind", [("hunyuanvideo", None), ("wan2.2-ti2v-5b", "ti2v")])
def test_zoo_defaults_and_presets_reach_video_pipelines(wan_folders, hunyuan_folder, name, kind):
    folder = hunyuan_folder if kind is None else wan_folders[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_pipeline(folder, zoo_entry=load_zoo_entry(name))
    small = dict(height=32, width=64, num_frames=5, num_inference_steps=3, seed=0)
    params = pipe.default_sampling_params("slow", **small)
    assert params.flow_shift is not None and params.fps is not None
    scheduler = pipe.make_scheduler(params)
    assert scheduler.config.get("flow_shift", scheduler.config.get("shift")) == params.flow_shift
    result = pipe(PROMPT, params)
    assert result.teacache_stats.enabled and result.frames.shape == (1, 5, 3, 32, 64)


# ---- errors ----------------------------------------------------------------------------------------


def test_bad_video_inputs_are_rejected(wan_folders, hunyuan_folder, image):
    t2v = load_pipeline(wan_folders["t2v"])
    with pytest.raises(ValueError, match="height must be a multiple of 16"):
        t2v(PROMPT, wan_params(height=40))
    with pytest.raises(ValueError, match="image is only for image-to-video models"):
        t2v(PROMPT, wan_params(), image=image)
    with pytest.raises(ValueError, match=r"guidance_scale_2 is the CFG scale of Wan2\.2's low-noise expert"):
        t2v(PROMPT, wan_params(guidance_scale_2=2.0))
    with pytest.raises(ValueError, match=r"does not use sampling settings \['true_cfg_scale'\]"):
        t2v(PROMPT, wan_params(true_cfg_scale=2.0))
    with pytest.raises(ValueError, match="width must be a multiple of 32"):
        load_pipeline(wan_folders["ti2v"])(PROMPT, wan_params(width=40))  # not even of 16, which diffusers refuses
    i2v = load_pipeline(wan_folders["i2v"])
    with pytest.raises(ValueError, match="is image-to-video: pass image="):
        i2v(PROMPT, wan_params())
    with pytest.raises(TypeError, match=r"image must be a PIL image .* got ndarray"):
        i2v(PROMPT, wan_params(), image=np.zeros((32, 32, 3)))
    with pytest.raises(TypeError, match=r"takes only image=\.\.\., last_image=\.\.\., got \['mask'\]"):
        i2v(PROMPT, wan_params(), image=image, mask=1)
    # Wan2.1 I2V's attention takes the last 512 context tokens as text: another length would split it wrongly.
    i2v.max_sequence_length = 8
    with pytest.raises(ValueError, match="max_sequence_length must be 512 for this model, got 8"):
        i2v(PROMPT, wan_params(), image=image)
    hunyuan = load_pipeline(hunyuan_folder)
    with pytest.raises(ValueError, match=r"4k\+1 for HunyuanVideo"):
        hunyuan(PROMPT, wan_params(num_frames=4))
    with pytest.raises(TypeError, match="takes no inputs"):
        hunyuan(PROMPT, wan_params(), image=image)
    assert (t2v.takes_image(), i2v.takes_image(), hunyuan.takes_image()) == ("no", "required", "no")
    assert load_pipeline(wan_folders["ti2v"]).takes_image() == "optional"


@pytest.mark.parametrize("kind", ["flf2v", "i2v-a14b"])
def test_wan_last_image_matches_diffusers(wan_folders, image, kind):
    # Wan2.1 FLF2V pairs the two images' CLIP tokens; Wan2.2 I2V A14B reads the last frame's latents only.
    last = image.transpose(0).convert("RGBA")  # another picture, in a mode the pipeline converts
    params = wan_params(guidance_scale=4.0, negative_prompt=NEGATIVE, num_frames=9)
    ours = load_pipeline(wan_folders[kind])
    assert ours.call_inputs == ("last_image",)
    result = ours([PROMPT, "a blue bird at night"], params, image=image, last_image=last)
    pipe = reference(wan_folders[kind], "WanImageToVideoPipeline")
    settings = {**reference_settings(params), "negative_prompt": [NEGATIVE] * 2}
    expected = pipe(prompt=[PROMPT, "a blue bird at night"], image=image, last_image=last.convert("RGB"), **settings)
    assert torch.equal(result.frames, expected.frames)
    assert not torch.equal(result.frames, ours(PROMPT, params, image=image, last_image=image).frames[:1])


def test_wan_last_image_rules(wan_folders, image):
    with pytest.raises(ValueError, match=r"first-last-frame \(FLF2V.*\): pass last_image="):
        load_pipeline(wan_folders["flf2v"])(PROMPT, wan_params(), image=image)
    with pytest.raises(ValueError, match="last_image needs a first-last-frame checkpoint"):
        load_pipeline(wan_folders["i2v"])(PROMPT, wan_params(), image=image, last_image=image)
    i2v = load_pipeline(wan_folders["i2v-a14b"])
    with pytest.raises(ValueError, match=r"last_image needs num_frames >= 5 \(a first and a last frame\), got 1"):
        i2v(PROMPT, wan_params(num_frames=1), image=image, last_image=image)
    with pytest.raises(TypeError, match="image must be a PIL image or a"):
        i2v(PROMPT, wan_params(), image=image, last_image="last.png")
    with pytest.raises(TypeError, match=r"last_image is for first-last-frame models .* TI2V, whose image is the first"):
        load_pipeline(wan_folders["ti2v"])(PROMPT, wan_params(height=32, width=64), image=image, last_image=image)
    with pytest.raises(TypeError, match=r"last_image is for first-last-frame models .* text-to-video"):
        load_pipeline(wan_folders["t2v"])(PROMPT, wan_params(), last_image=image)
    # diffusers runs no CFG at guidance_scale <= 1, so a low-noise expert's scale would be ignored.
    with pytest.raises(ValueError, match=r"guidance_scale_2=2\.0 has no effect: no negative branch runs"):
        i2v(PROMPT, wan_params(guidance_scale=1.0, guidance_scale_2=2.0), image=image)


def test_wan_ti2v_size_on_16_off_32_is_rounded_down_as_in_diffusers(wan_folders, image):
    # diffusers refuses a size off 16 and rounds one on 16 down to TI2V-5B's multiple of 32, with a warning.
    params = wan_params(guidance_scale=1.0, height=48, width=80)
    with pytest.warns(UserWarning, match=r"got 48 and 80: generating 32 x 64"):
        result = run_both(wan_folders["ti2v"], "WanImageToVideoPipeline", params, image)
    assert result.frames.shape[-2:] == (32, 64)


@pytest.mark.parametrize("frames, generated", [(6, 5), (8, 9)])
def test_wan_frame_count_off_4k_plus_1_is_rounded_with_a_warning_as_in_diffusers(wan_folders, frames, generated):
    with pytest.warns(UserWarning, match=rf"got {frames}: generating {generated} frames"):
        result = run_both(wan_folders["t2v"], "WanPipeline", wan_params(guidance_scale=1.0, num_frames=frames))
    assert result.frames.shape[1] == result.sampling_params.num_frames == generated


def test_wan_pil_image_of_any_mode_is_read_as_rgb(wan_folders, image):
    # Grayscale, palette and RGBA images have 1, 1 and 4 channels, which neither the VAE nor CLIP reads.
    pipe = load_pipeline(wan_folders["i2v"])
    params = wan_params(guidance_scale=1.0, num_inference_steps=1, num_frames=1)
    for mode in ("L", "P", "RGBA"):
        converted = image.convert(mode)
        result = pipe(PROMPT, params, image=converted).frames
        assert torch.equal(result, pipe(PROMPT, params, image=converted.convert("RGB")).frames), mode


def test_wan_bad_images_are_rejected_before_the_vae(wan_folders):
    from PIL import Image

    pipe = load_pipeline(wan_folders["i2v-a14b"])
    cases = [
        (torch.full((3, 8, 8), 255, dtype=torch.uint8), TypeError, r"dtype torch\.uint8; for 8-bit pixels pass"),
        (torch.zeros(3, 8, 8, dtype=torch.bool), TypeError, r"must be floating point with values in \[0, 1\]"),
        (torch.zeros(1, 3, 0, 8), ValueError, r"at least one pixel, got a tensor of shape \(1, 3, 0, 8\)"),
        (Image.new("RGB", (0, 8)), ValueError, r"at least one pixel, got a PIL image of size \(0, 8\)"),
        (torch.full((3, 8, 8), float("nan")), ValueError, r"must be finite and in \[0, 1\], got min nan"),
        (torch.full((3, 8, 8), -0.5), ValueError, r"max -0\.5; for a \[-1, 1\] tensor pass \(image \+ 1\) / 2"),
        (torch.full((3, 8, 8), 2.0), ValueError, r"in \[0, 1\], got min 2, max 2$"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            pipe(PROMPT, wan_params(), image=bad)
