"""Image pipelines (Flux, Qwen-Image, Z-Image): equal to the diffusers pipelines with TeaCache off, and the
loop's TeaCache contract (step index, separate CFG branches, stats) with it on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from teacache_models import SamplingParams, TeaCacheParams
from teacache_models.pipelines import PipelineResult, load_pipeline
from tests.test_pipeline_fixtures import save_flux, save_qwen_image, save_z_image
from tests.utils import assert_parity

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT = "a red fox jumps over the lazy dog"
NEGATIVE = "blurry bad quality"
# y = x and a threshold no distance reaches: every step between the forced first and last one skips.
SKIP_ALL = TeaCacheParams(teacache_thresh=1e6, coefficients=(1.0, 0.0))


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return save_flux(tmp_path_factory.mktemp("flux"), guidance_embeds=True)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return save_qwen_image(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def z_image_folder(tmp_path_factory):
    return save_z_image(tmp_path_factory.mktemp("z_image"))


def reference(folder, class_name):
    import diffusers

    pipe = getattr(diffusers, class_name).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, seed, **kwargs):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(generator=generator, output_type="pt", **kwargs).images


# ---- fidelity: TeaCache off equals diffusers -------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(height=32, width=48, guidance_scale=3.5),
        dict(height=24, width=16, guidance_scale=2.0, true_cfg_scale=3.0, negative_prompt=NEGATIVE),
    ],
    ids=["embedded-guidance", "true-cfg-odd-size"],
)
def test_flux_matches_diffusers(flux_folder, settings):
    ours = load_pipeline(flux_folder)
    params = SamplingParams(num_inference_steps=3, seed=11, teacache_params=None, **settings)
    result = ours(PROMPT, params)
    expected = run_reference(
        reference(flux_folder, "FluxPipeline"), 11, prompt=PROMPT, num_inference_steps=3, **settings
    )
    assert_parity(result.images, expected, tol=1e-5)
    cfg = "negative_prompt" in settings
    assert result.teacache_stats.negative.num_computed == (3 if cfg else 0)


def test_qwen_image_true_cfg_with_norm_rescale_matches_diffusers(qwen_folder):
    ours = load_pipeline(qwen_folder)
    params = SamplingParams(
        num_inference_steps=3,
        guidance_scale=4.0,
        seed=5,
        height=32,
        width=48,
        negative_prompt=NEGATIVE,
        teacache_params=None,
    )
    result = ours(PROMPT, params)
    expected = run_reference(
        reference(qwen_folder, "QwenImagePipeline"),
        5,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        true_cfg_scale=4.0,
        num_inference_steps=3,
        height=32,
        width=48,
    )
    assert_parity(result.images, expected, tol=1e-5)
    assert result.teacache_stats.negative.computed_steps == (0, 1, 2)


def test_flux_batch_with_true_cfg_equals_diffusers_bit_for_bit(flux_folder):
    # diffusers encodes the negative prompt once and its transformer broadcasts it over the batch; a batch of copies
    # rounds differently (about 1e-6). With TeaCache at threshold 0 the negative branch still has its own state.
    ours = load_pipeline(flux_folder)
    prompts = [PROMPT, "a cat on the mat", ""]
    settings = dict(height=16, width=32, guidance_scale=2.0, true_cfg_scale=3.0, negative_prompt=NEGATIVE)
    params = SamplingParams(num_inference_steps=2, seed=5, teacache_params=None, **settings)
    result = ours(prompts, params)
    expected = run_reference(
        reference(flux_folder, "FluxPipeline"), 5, prompt=prompts, num_inference_steps=2, **settings
    )
    assert torch.equal(result.images, expected)
    zero = TeaCacheParams(teacache_thresh=0.0, coefficients=(1.0, 0.0))
    cached = ours(prompts, dataclasses.replace(params, teacache_params=zero))
    assert torch.equal(cached.images, expected) and cached.teacache_stats.negative.computed_steps == (0, 1)


def test_qwen_image_batch_with_cfg_equals_diffusers_bit_for_bit(qwen_folder):
    # As Flux's: diffusers encodes the negative prompt once and broadcasts it over the batch.
    ours = load_pipeline(qwen_folder)
    prompts = [PROMPT, "a cat on the mat"]
    params = SamplingParams(
        num_inference_steps=2, guidance_scale=4.0, negative_prompt=NEGATIVE, seed=3, height=16, width=32
    )
    result = ours(prompts, dataclasses.replace(params, teacache_params=None))
    expected = run_reference(
        reference(qwen_folder, "QwenImagePipeline"),
        3,
        prompt=prompts,
        negative_prompt=NEGATIVE,
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=16,
        width=32,
    )
    assert torch.equal(result.images, expected)


def test_qwen_image_batch_of_two_prompts_without_cfg(qwen_folder):
    ours = load_pipeline(qwen_folder)
    prompts = [PROMPT, "a cat on the mat"]
    params = SamplingParams(
        num_inference_steps=2, guidance_scale=1.0, seed=3, height=16, width=32, teacache_params=None
    )
    result = ours(prompts, params)
    expected = run_reference(
        reference(qwen_folder, "QwenImagePipeline"),
        3,
        prompt=prompts,
        true_cfg_scale=1.0,
        num_inference_steps=2,
        height=16,
        width=32,
    )
    assert_parity(result.images, expected, tol=1e-5)
    assert result.images.shape == (2, 3, 16, 32)


@pytest.mark.parametrize(
    "settings",
    [
        dict(guidance_scale=0.0),
        dict(guidance_scale=2.0, negative_prompt=NEGATIVE),
        dict(guidance_scale=1.5, negative_prompt=NEGATIVE, cfg_truncation=0.2, cfg_normalization=1.05),
    ],
    ids=["turbo-no-cfg", "cfg", "cfg-truncated-normalized"],
)
def test_z_image_matches_diffusers(z_image_folder, settings):
    ours = load_pipeline(z_image_folder)
    params = SamplingParams(num_inference_steps=4, seed=2, height=32, width=48, teacache_params=None, **settings)
    result = ours(PROMPT, params)
    kwargs = {k: v for k, v in settings.items()}
    expected = run_reference(
        reference(z_image_folder, "ZImagePipeline"),
        2,
        prompt=PROMPT,
        num_inference_steps=4,
        height=32,
        width=48,
        **kwargs,
    )
    # With the cache off both branches run in one call, as in diffusers: bit for bit.
    assert torch.equal(result.images, expected)
    negative_steps = result.teacache_stats.negative.computed_steps
    if settings["guidance_scale"] == 0:
        assert negative_steps == ()
    elif "cfg_truncation" in settings:
        assert 0 < len(negative_steps) < 4, "truncation drops CFG on the late steps"
    else:
        assert negative_steps == (0, 1, 2, 3)


def test_z_image_batch_with_cfg_runs_both_branches_in_one_call_as_diffusers(z_image_folder):
    # diffusers batches the positive and the negative branch in one transformer call (padded to the longest caption);
    # two calls round differently (1e-5 after a few steps). With the cache on each branch keeps its own call and state.
    ours = load_pipeline(z_image_folder)
    prompts = [PROMPT, "a cat"]
    params = SamplingParams(
        num_inference_steps=3, guidance_scale=3.0, negative_prompt=NEGATIVE, seed=4, height=32, width=48
    )
    calls = []
    original = type(ours.transformer).teacache_step

    def spy(model, step, is_cfg_negative=False, batched_cfg=False):
        calls.append((step, is_cfg_negative, batched_cfg))
        return original(model, step, is_cfg_negative, batched_cfg)

    type(ours.transformer).teacache_step = spy
    try:
        result = ours(prompts, dataclasses.replace(params, teacache_params=None))
        assert calls == [(0, False, True), (1, False, True), (2, False, True)]
        calls.clear()
        zero = TeaCacheParams(teacache_thresh=0.0, coefficients=(1.0, 0.0))
        cached = ours(prompts, dataclasses.replace(params, teacache_params=zero))
        assert calls == [(step, negative, False) for step in range(3) for negative in (False, True)]
    finally:
        type(ours.transformer).teacache_step = original
    expected = run_reference(
        reference(z_image_folder, "ZImagePipeline"),
        4,
        prompt=prompts,
        negative_prompt=[NEGATIVE] * 2,  # diffusers' Z-Image takes one negative prompt per prompt
        guidance_scale=3.0,
        num_inference_steps=3,
        height=32,
        width=48,
    )
    assert torch.equal(result.images, expected)
    assert result.teacache_stats.negative.computed_steps == (0, 1, 2)
    assert cached.teacache_stats.negative.computed_steps == (0, 1, 2)
    assert_parity(cached.images, expected, tol=1e-5)


@pytest.mark.parametrize(
    "folder_name, class_name, settings, reference_settings",
    [
        ("flux_folder", "FluxPipeline", dict(guidance_scale=3.5), dict(guidance_scale=3.5)),
        (
            "qwen_folder",
            "QwenImagePipeline",
            dict(guidance_scale=4.0, negative_prompt=NEGATIVE),
            dict(true_cfg_scale=4.0, negative_prompt=NEGATIVE),
        ),
    ],
    ids=["flux", "qwen-image"],
)
def test_a_size_off_the_multiple_is_rounded_down_with_a_warning_as_in_diffusers(
    request, folder_name, class_name, settings, reference_settings
):
    folder = request.getfixturevalue(folder_name)
    pipe = load_pipeline(folder)
    multiple = pipe.size_multiple()
    height, width = 2 * multiple + 1, 3 * multiple - 1
    params = SamplingParams(num_inference_steps=2, seed=3, height=height, width=width, teacache_params=None, **settings)
    with pytest.warns(UserWarning, match=rf"got {height} and {width}: generating {2 * multiple} x {2 * multiple}"):
        result = pipe(PROMPT, params)
    expected = run_reference(
        reference(folder, class_name),
        3,
        prompt=PROMPT,
        num_inference_steps=2,
        height=height,
        width=width,
        **reference_settings,
    )
    assert result.images.shape == (1, 3, 2 * multiple, 2 * multiple)
    assert torch.equal(result.images, expected)
    # Below one multiple there is nothing to round down to (diffusers fails deep inside): refused.
    with pytest.raises(ValueError, match=rf"width must be a multiple of {multiple} .* got 1; try {multiple}"):
        pipe(PROMPT, dataclasses.replace(params, height=2 * multiple, width=1))


def test_z_image_cfg_truncation_at_a_timestep_on_the_threshold(z_image_folder):
    # flow_shift 1 and 5 steps put the timesteps at 1000, 800, ..., 200. The third step's normalised time
    # is 0.4 in float64 but 0.40000001 in float32, the reference's precision: cfg_truncation=0.4 drops CFG
    # there.
    ours = load_pipeline(z_image_folder)
    settings = dict(guidance_scale=1.0, negative_prompt=NEGATIVE, cfg_truncation=0.4)
    params = SamplingParams(
        num_inference_steps=5, seed=6, height=16, width=16, flow_shift=1.0, teacache_params=None, **settings
    )
    result = ours(PROMPT, params)
    pipe = reference(z_image_folder, "ZImagePipeline")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=1.0)
    expected = run_reference(pipe, 6, prompt=PROMPT, num_inference_steps=5, height=16, width=16, **settings)
    assert_parity(result.images, expected, tol=1e-5)
    assert result.teacache_stats.negative.computed_steps == (0, 1)


# ---- TeaCache through the loop ---------------------------------------------------------------------


def test_threshold_zero_is_identical_to_teacache_off(flux_folder):
    pipe = load_pipeline(flux_folder)
    params = SamplingParams(
        num_inference_steps=4, guidance_scale=3.5, seed=1, height=16, width=16, teacache_params=None
    )
    off = pipe(PROMPT, params)
    zero = pipe(
        PROMPT,
        dataclasses.replace(params, teacache_params=TeaCacheParams(teacache_thresh=0.0, coefficients=[1.0, 0.0])),
    )
    assert torch.equal(off.images, zero.images)
    assert zero.teacache_stats.positive.skipped_steps == ()
    assert zero.teacache_stats.enabled


@pytest.mark.parametrize("folder_name", ["flux_folder", "qwen_folder", "z_image_folder"])
def test_teacache_skips_and_keeps_cfg_branches_apart(request, folder_name):
    pipe = load_pipeline(request.getfixturevalue(folder_name))
    settings = dict(num_inference_steps=5, seed=4, height=16, width=16, negative_prompt=NEGATIVE)
    if folder_name == "flux_folder":
        settings.update(guidance_scale=3.5, true_cfg_scale=2.0)
    else:
        settings.update(guidance_scale=2.0)
    params = SamplingParams(teacache_params=SKIP_ALL, **settings)
    cached = pipe(PROMPT, params)
    stats = cached.teacache_stats
    for branch in (stats.positive, stats.negative):
        assert branch.computed_steps == (0, 4) and branch.skipped_steps == (1, 2, 3)
    assert "positive: 2 computed, 3 skipped; negative: 2 computed, 3 skipped" in cached.summary()
    uncached = pipe(PROMPT, dataclasses.replace(params, teacache_params=None))
    assert not torch.equal(cached.images, uncached.images)
    assert torch.isfinite(cached.images).all()
    # Nothing is left switched on after a generation: the next one starts clean.
    assert not pipe.transformer.teacache_enabled


def test_steps_are_announced_to_the_transformer(flux_folder):
    pipe = load_pipeline(flux_folder)
    seen = []
    original = type(pipe.transformer).teacache_step

    def spy(model, step, is_cfg_negative=False, batched_cfg=False):
        seen.append((step, is_cfg_negative))
        return original(model, step, is_cfg_negative, batched_cfg)

    pipe.transformer.teacache_step = spy.__get__(pipe.transformer)
    params = SamplingParams(
        num_inference_steps=3,
        guidance_scale=3.5,
        true_cfg_scale=2.0,
        negative_prompt=NEGATIVE,
        seed=0,
        height=16,
        width=16,
        teacache_params=None,
    )
    pipe(PROMPT, params)
    assert seen == [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True)]


def test_result_has_seed_timings_and_progress(flux_folder):
    pipe = load_pipeline(flux_folder)
    calls = []
    params = SamplingParams(num_inference_steps=2, guidance_scale=3.5, height=16, width=16, teacache_params=None)
    result = pipe(PROMPT, params, progress=lambda done, total: calls.append((done, total)))
    assert isinstance(result, PipelineResult) and not result.is_video
    assert isinstance(result.seed, int) and calls == [(1, 2), (2, 2)]
    assert set(result.timings) == {"text_encoding", "denoising", "decoding", "total"}
    assert result.images.min() >= 0 and result.images.max() <= 1
    again = pipe(PROMPT, dataclasses.replace(params, seed=result.seed))
    assert torch.equal(again.images, result.images), "the reported seed reproduces the image"
    assert result.to_uint8().shape == (1, 16, 16, 3)


# ---- errors ----------------------------------------------------------------------------------------


def test_bad_inputs_are_rejected(flux_folder, z_image_folder, tmp_path):
    pipe = load_pipeline(flux_folder)
    with pytest.raises(ValueError, match=r"height must be a multiple of 4 .* got 3; try 4"):
        pipe(PROMPT, SamplingParams(height=3, width=16, teacache_params=None))
    with pytest.raises(ValueError, match="num_frames must be 1 for an image model, got 5"):
        pipe(PROMPT, SamplingParams(height=16, width=16, num_frames=5, teacache_params=None))
    with pytest.raises(ValueError, match=r"does not use sampling settings \['guidance_scale_2'\]"):
        pipe(PROMPT, SamplingParams(height=16, width=16, guidance_scale_2=2.0, teacache_params=None))
    with pytest.raises(TypeError, match="prompt must be a string"):
        pipe(3, SamplingParams(height=16, width=16, teacache_params=None))
    with pytest.raises(TypeError, match="takes no inputs"):
        pipe(PROMPT, SamplingParams(height=16, width=16, teacache_params=None), image=object())
    # diffusers' call keywords: a sampling setting, the generator and the text length are refused with where they
    # go; one our pipelines do not take at all is refused by name.
    params = SamplingParams(height=16, width=16, teacache_params=None)
    refused = {
        "height": r"takes no height=\.\.\.: it is a sampling setting, pass pipe\(prompt, SamplingParams\(height=",
        "negative_prompt": r"takes no negative_prompt=\.\.\.: it is a sampling setting",
        "true_cfg_scale": r"takes no true_cfg_scale=\.\.\.: SamplingParams\(true_cfg_scale=",
        "generator": r"takes no generator=\.\.\.: the noise is drawn from SamplingParams\(seed=",
        "max_sequence_length": r"takes no max_sequence_length=\.\.\.: set pipe\.max_sequence_length",
        "callback_on_step_end": r"takes no callback_on_step_end=\.\.\.: progress=",
        "latents": r"takes no inputs .*got \['latents'\]; prompt embeddings and latents are not inputs: the pipeline",
        "prompt_embeds": r"got \['prompt_embeds'\]; prompt embeddings and latents are not inputs",
    }
    for key, message in refused.items():
        with pytest.raises(TypeError, match=message):
            pipe(PROMPT, params, **{key: None})
    with pytest.raises(ValueError, match="Did you mean 'flux1-dev'"):
        load_pipeline("flux1-deb")
    with pytest.raises(FileNotFoundError, match=r"no model_index\.json"):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="is a z_image model"):
        from teacache_models.zoo import load_zoo_entry

        load_pipeline(flux_folder, zoo_entry=load_zoo_entry("z-image-turbo"))
    with pytest.raises(TypeError, match="transformer must be a ZImageTransformer2DModel"):
        z_pipe = load_pipeline(z_image_folder)
        type(z_pipe)(pipe.transformer, z_pipe.scheduler, z_pipe.vae, **z_pipe.text_components)


def test_bad_api_arguments_are_rejected_before_any_work(flux_folder, tmp_path):
    pipe = load_pipeline(flux_folder)
    params = SamplingParams(height=16, width=16, num_inference_steps=2, teacache_params=None)
    with pytest.raises(TypeError, match="progress must be None or a callable"):
        pipe(PROMPT, params, progress=3)
    with pytest.raises(TypeError, match=r"unknown sampling settings \['steps'\]"):
        pipe.default_sampling_params(steps=3)
    with pytest.raises(TypeError, match="teacache_params is chosen by teacache="):
        pipe.default_sampling_params(teacache_params=SKIP_ALL)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{oops")
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "model_index.json").write_text("[1, 2]")
    for kwargs, error, message in [
        (dict(name_or_path=flux_folder, device="gpu"), ValueError, "device must be 'cpu', 'cuda', 'cuda:N'"),
        (dict(name_or_path=flux_folder, device="meta"), ValueError, "device 'meta' holds no data"),
        (dict(name_or_path=flux_folder, device="cuda:99"), ValueError, "device 'cuda:99'"),
        (dict(name_or_path=flux_folder, torch_dtype="int8"), ValueError, r"torch_dtype must be None, one of \["),
        (dict(name_or_path=None), TypeError, "name_or_path must be a zoo name"),
        (dict(name_or_path=""), ValueError, "name_or_path is empty"),
        (dict(name_or_path=flux_folder, zoo_entry="flux1-dev"), TypeError, "zoo_entry must be a ZooEntry"),
        (dict(name_or_path=tmp_path / "broken"), ValueError, r"model_index\.json is not valid JSON"),
        (dict(name_or_path=tmp_path / "listed"), ValueError, r"model_index\.json must hold a JSON object, got list"),
        (dict(name_or_path=tmp_path / "absent"), FileNotFoundError, "absent' does not exist: a local pipeline is a"),
        (dict(name_or_path=tmp_path / "listed" / "model_index.json"), FileNotFoundError, "json' is not a folder"),
    ]:
        with pytest.raises(error, match=message):
            load_pipeline(**kwargs)


def test_qwen_image_terminal_shift_scheduler_needs_two_steps(qwen_folder):
    # Qwen-Image's released scheduler stretches its schedule to end at shift_terminal=0.02; with one step
    # the stretch divides 0 by 0 and the reference returns a NaN image.
    ours = load_pipeline(qwen_folder)
    ours.scheduler = type(ours.scheduler).from_config(ours.scheduler.config, shift_terminal=0.02)
    params = SamplingParams(
        num_inference_steps=1, guidance_scale=1.0, seed=8, height=16, width=16, teacache_params=None
    )
    with pytest.raises(ValueError, match=r"num_inference_steps must be >= 2 with this scheduler \(its shift_terminal"):
        ours(PROMPT, params)
    result = ours(PROMPT, dataclasses.replace(params, num_inference_steps=2))
    pipe = reference(qwen_folder, "QwenImagePipeline")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift_terminal=0.02)
    expected = run_reference(pipe, 8, prompt=PROMPT, true_cfg_scale=1.0, num_inference_steps=2, height=16, width=16)
    assert_parity(result.images, expected, tol=1e-5)


@pytest.mark.parametrize(
    "value, message",
    [
        (0, r"max_sequence_length must be an integer >= 1, got 0"),
        ("64", r"max_sequence_length must be an integer >= 1, got '64' \(str\)"),
        (513, r"max_sequence_length must be at most 512 for FluxTextToImagePipeline, got 513"),
    ],
    ids=["zero", "string", "above-t5-length"],
)
def test_flux_max_sequence_length_is_checked_before_the_text_encoder(flux_folder, value, message):
    pipe = load_pipeline(flux_folder)
    pipe.max_sequence_length = value
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, SamplingParams(height=16, width=16, num_inference_steps=1, teacache_params=None))


def test_qwen_image_max_sequence_length_limit(qwen_folder):
    pipe = load_pipeline(qwen_folder)
    pipe.max_sequence_length = 1025
    with pytest.raises(ValueError, match="max_sequence_length must be at most 1024 for QwenImage"):
        pipe(PROMPT, SamplingParams(height=16, width=16, num_inference_steps=1, teacache_params=None))


def test_z_image_flow_shift_on_a_dynamic_shifting_scheduler_is_refused(z_image_folder):
    pipe = load_pipeline(z_image_folder)
    # A scheduler that shifts by resolution never reads `shift`: the override would do nothing.
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    params = SamplingParams(
        height=16, width=16, num_inference_steps=1, guidance_scale=0.0, flow_shift=2.0, teacache_params=None
    )
    assert set(pipe.ignored_settings(params)) == {"flow_shift"}
    with pytest.raises(ValueError, match=r"flow_shift=2\.0 has no effect: .*use_dynamic_shifting=True"):
        pipe(PROMPT, params)
    assert pipe(PROMPT, dataclasses.replace(params, flow_shift=None)).images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(true_cfg_scale=4.0), r"true_cfg_scale=4\.0 has no effect: it needs a negative prompt"),
        (dict(negative_prompt=NEGATIVE), "negative_prompt='blurry bad quality' has no effect: no negative branch runs"),
        (dict(true_cfg_scale=1.0, negative_prompt=NEGATIVE), "negative_prompt=.* has no effect"),
    ],
    ids=["scale-without-negative", "negative-without-scale", "negative-with-scale-1"],
)
def test_flux_true_cfg_settings_go_together(flux_folder, settings, message):
    pipe = load_pipeline(flux_folder)
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, SamplingParams(height=16, width=16, num_inference_steps=2, teacache_params=None, **settings))


def test_ignored_settings_per_family(flux_folder, qwen_folder, z_image_folder):
    base = dict(height=16, width=16, teacache_params=None)
    qwen = load_pipeline(qwen_folder)
    assert set(qwen.ignored_settings(SamplingParams(guidance_scale=4.0, **base))) == {"guidance_scale"}
    assert qwen.ignored_settings(SamplingParams(guidance_scale=4.0, negative_prompt=" ", **base)) == {}
    z_image = load_pipeline(z_image_folder)
    turbo = SamplingParams(guidance_scale=0.0, negative_prompt="x", cfg_truncation=0.5, **base)
    assert set(z_image.ignored_settings(turbo)) == {"negative_prompt", "cfg_truncation"}
    flux = load_pipeline(flux_folder)
    assert flux.ignored_settings(SamplingParams(true_cfg_scale=2.0, negative_prompt="x", **base)) == {}


def test_zoo_defaults_and_presets_reach_the_pipeline(z_image_folder):
    from teacache_models.zoo import load_zoo_entry

    pipe = load_pipeline(z_image_folder, zoo_entry=load_zoo_entry("z-image-turbo"))
    # Z-Image-Turbo ships no preset: its default leaves TeaCache off.
    params = pipe.default_sampling_params(height=16, width=16, num_inference_steps=3, seed=0)
    assert params.guidance_scale == 0.0 and params.teacache_params is None
    assert pipe(PROMPT, params).teacache_stats.teacache_thresh is None
    params = dataclasses.replace(params, teacache_params=TeaCacheParams(teacache_thresh=1e6))
    result = pipe(PROMPT, params)
    assert result.teacache_stats.num_inference_steps == 3 and result.teacache_stats.negative.num_computed == 0
    assert result.teacache_stats.positive.skipped_steps == (1,)


@pytest.mark.parametrize(
    "folder_name, settings, message",
    [
        ("qwen_folder", dict(guidance_scale=1.0, negative_prompt=NEGATIVE), "negative_prompt=.* has no effect"),
        ("z_image_folder", dict(guidance_scale=0.0, negative_prompt=NEGATIVE), "negative_prompt=.* has no effect"),
        ("z_image_folder", dict(guidance_scale=0.0, cfg_truncation=0.5), "cfg_truncation=0.5 has no effect"),
    ],
)
def test_the_python_api_refuses_a_setting_the_generation_would_ignore(request, folder_name, settings, message):
    pipe = load_pipeline(request.getfixturevalue(folder_name))
    params = SamplingParams(height=16, width=16, num_inference_steps=2, teacache_params=None, **settings)
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, params)


def test_a_zoo_default_the_caller_turned_off_is_no_error(qwen_folder):
    from teacache_models.zoo import load_zoo_entry

    # qwen-image's entry sets negative_prompt " " (CFG on); guidance_scale 1 turns CFG off, which leaves the
    # entry's negative prompt unread: that is the caller's choice, not a setting silently dropped.
    pipe = load_pipeline(qwen_folder, zoo_entry=load_zoo_entry("qwen-image"))
    params = pipe.default_sampling_params("off", height=16, width=16, num_inference_steps=2, guidance_scale=1.0)
    assert params.negative_prompt == " "
    assert pipe(PROMPT, params).teacache_stats.negative.num_computed == 0


def test_sizes_beyond_any_latent_grid_are_refused_before_any_allocation(flux_folder):
    pipe = load_pipeline(flux_folder)
    params = SamplingParams(height=2**16, width=2**16, num_inference_steps=2, teacache_params=None)
    with pytest.raises(ValueError, match=r"height=65536, width=65536, num_frames=1 make 268,435,456 latent tokens"):
        pipe(PROMPT, params)


def test_a_generation_that_overflows_is_an_error_not_a_black_image(flux_folder):
    pipe = load_pipeline(flux_folder)
    params = SamplingParams(
        height=16, width=16, num_inference_steps=2, true_cfg_scale=1e38, negative_prompt=NEGATIVE, teacache_params=None
    )
    with pytest.raises(ValueError, match=r"non-finite latents .* 'true_cfg_scale': 1e\+38.*lower the guidance scale"):
        pipe(PROMPT, params)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("AutoencoderKL", r"entry 'vae' must be \[library, class name\] \(two strings\) or \[null, null\]"),
        (["diffusers"], r"entry 'vae' must be \[library, class name\]"),
        (["no_such_library", "AutoencoderKL"], "names library 'no_such_library', which cannot be imported"),
        (["diffusers", "NoSuchAutoencoder"], "names class 'NoSuchAutoencoder', which 'diffusers' does not have"),
    ],
)
def test_a_malformed_model_index_entry_names_the_component(flux_folder, tmp_path, entry, message):
    import json
    import shutil

    folder = shutil.copytree(flux_folder, tmp_path / "flux")
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = entry
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        load_pipeline(folder)
