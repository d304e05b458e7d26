"""Step-level batching: on the demo pipelines (one timestep per sample) requests join and leave between
steps; on the other families (one timestep per call) requests at the same step share calls. Each output
equals its run alone."""

import pytest
import torch

from teacache_models.pipelines import load_pipeline
from teacache_models.server.batching import ContinuousBatcher

STEPS = 20  # the steps the demo presets were measured at


@pytest.fixture(scope="module", params=["flux-digits", "wan-digits"])
def pipe(request):
    return load_pipeline(request.param)


def params(pipe, teacache, seed, steps=STEPS, **overrides):
    """The demo's sampling settings with one of its TeaCache presets ("slow", "fast" or "off")."""
    settings = dict(height=16, width=16, num_inference_steps=steps, seed=seed) | overrides
    return pipe.default_sampling_params(teacache, **settings)


def assert_solo(pipe, request):
    solo = pipe(request.prompt, request.params)
    assert request.result.teacache_stats.positive == solo.teacache_stats.positive
    assert request.result.teacache_stats.negative == solo.teacache_stats.negative
    torch.testing.assert_close(request.result.images, solo.images, rtol=0, atol=1e-5)


def test_requests_join_and_leave_mid_generation_and_match_their_solo_runs(pipe):
    batcher = ContinuousBatcher(pipe, max_batch=3)
    first = batcher.submit("a digit 3", params(pipe, "slow", seed=1))
    for _ in range(3):
        batcher.step()
    second = batcher.submit("seven", params(pipe, "fast", seed=2, steps=14))  # joins at step 3 of the first
    third = batcher.submit("a digit 0", params(pipe, "off", seed=3))  # no cache: computes every step
    fourth = batcher.submit("the digit 5", params(pipe, "slow", seed=4))  # waits: the batch is full
    steps, widths = 3, []
    while not batcher.idle:
        batcher.step()
        steps += 1
        widths.append(len(batcher.running))
    # The second joined at step 3 and left after its 14 steps (17); the fourth took its row at the next step
    # boundary and ran its 20 steps (37); the first and the third left after their own 20.
    assert second.finished_at < first.finished_at < third.finished_at < fourth.finished_at
    assert steps == 37 and max(widths) == 3
    for request in (first, second, third, fourth):
        assert_solo(pipe, request)
    assert 0 < batcher.rows_computed < batcher.rows_total


def test_a_cancelled_request_leaves_at_once_and_the_others_are_unchanged(pipe):
    batcher = ContinuousBatcher(pipe, max_batch=4)
    kept = batcher.submit("a digit 2", params(pipe, "slow", seed=5))
    dropped = batcher.submit("nine", params(pipe, "slow", seed=6))
    batcher.step()
    batcher.step()
    batcher.cancel(dropped)
    assert batcher.running == [kept] and dropped.result is None and dropped.steps_done == 2
    batcher.run()
    assert_solo(pipe, kept)


def test_requests_of_other_shapes_are_kept_apart(pipe):
    batcher = ContinuousBatcher(pipe, max_batch=4)
    small = batcher.submit("a digit 1", params(pipe, "slow", seed=7))
    large = batcher.submit("a digit 1", params(pipe, "slow", seed=7, height=32, width=32))
    without_cfg = batcher.submit("a digit 1", params(pipe, "slow", seed=7, guidance_scale=1.0))
    batcher.step()
    assert batcher.running == [small]
    batcher.run()
    for request in (small, large, without_cfg):
        assert_solo(pipe, request)


def test_what_is_not_a_pipeline_is_refused():
    class OneTimestep:
        per_sample_timesteps = False

    assert not ContinuousBatcher.can_batch(OneTimestep())
    with pytest.raises(ValueError, match="OneTimestep cannot batch requests"):
        ContinuousBatcher(OneTimestep())


# ---- one timestep per call: the other families batch only requests at the same step -------------------------

FAMILIES = ("flux", "qwen_image", "wan", "hunyuan_video")


@pytest.fixture(scope="module", params=FAMILIES)
def family_pipe(request, tmp_path_factory):
    pytest.importorskip("diffusers")
    from tests import test_pipeline_fixtures as fixtures

    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "flux":
        fixtures.save_flux(folder)
    elif request.param == "qwen_image":
        fixtures.save_qwen_image(folder)
    elif request.param == "wan":
        fixtures.save_wan(folder, "t2v")
    else:
        fixtures.save_hunyuan_video(folder)
    return load_pipeline(folder)


def family_params(pipe, threshold, seed, steps=5, **overrides):
    """Per-family settings with CFG (a negative branch) and TeaCache at `threshold` (None: off)."""
    from teacache_models import SamplingParams, TeaCacheParams

    video = pipe.is_video
    settings = dict(height=16, width=16, num_frames=5 if video else 1, num_inference_steps=steps, seed=seed)
    if pipe.family in ("flux", "hunyuan_video"):
        settings.update(true_cfg_scale=2.0, negative_prompt="blurry")
    elif pipe.family == "qwen_image":
        settings.update(guidance_scale=2.0, negative_prompt="blurry")
    else:
        settings.update(guidance_scale=3.0)
    cache = None if threshold is None else TeaCacheParams(teacache_thresh=threshold, coefficients=(1.0, 0.0))
    return SamplingParams(teacache_params=cache, **(settings | overrides))


def assert_family_solo(pipe, request):
    solo = pipe(request.prompt, request.params)
    assert request.result.teacache_stats.positive.computed_steps == solo.teacache_stats.positive.computed_steps
    assert request.result.teacache_stats.negative.computed_steps == solo.teacache_stats.negative.computed_steps
    pixels = request.result.frames if pipe.is_video else request.result.images
    expected = solo.frames if pipe.is_video else solo.images
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-5)


def test_requests_at_the_same_step_share_calls_and_match_their_solo_runs(family_pipe):
    pipe = family_pipe
    batcher = ContinuousBatcher(pipe, max_batch=4)
    assert batcher.same_step
    prompts = ("a red fox", "a blue bird", "a green frog")  # one token count, so one conditioning shape
    requests = [
        batcher.submit(prompt, family_params(pipe, threshold, seed))
        for prompt, threshold, seed in zip(prompts, (None, 0.5, 10.0), (1, 2, 3), strict=True)
    ]
    batcher.step()
    assert batcher.last_batch == requests  # one call carried the three
    batcher.run()
    for request in requests:
        assert_family_solo(pipe, request)
    skipped = [r.result.teacache_stats.positive.skipped_steps for r in requests]
    assert skipped[0] == () and any(skipped[1:]), "the cached requests skip steps: the comparison covers them"


@pytest.mark.parametrize("family_pipe", ["flux"], indirect=True)  # the admission rule is every family's
def test_a_request_at_another_step_waits_for_the_next_batch(family_pipe):
    pipe = family_pipe
    batcher = ContinuousBatcher(pipe, max_batch=4)
    first = batcher.submit("a red fox", family_params(pipe, 0.2, 4))
    batcher.step()
    late = batcher.submit("a blue bird", family_params(pipe, 0.2, 5))  # its step 0 is not the batch's step 1
    other_schedule = batcher.submit("a blue bird", family_params(pipe, 0.2, 6, steps=4))
    batcher.step()
    assert batcher.running == [first] and list(batcher.waiting) == [late, other_schedule]
    while first.result is None:
        batcher.step()
    batcher.step()
    assert batcher.last_batch == [late]  # another schedule: not at the same step, so in a batch of its own
    batcher.cancel(late)
    batcher.run()
    assert late.result is None and late.steps_done == 1
    for request in (first, other_schedule):
        assert_family_solo(pipe, request)


def test_pipelines_that_cannot_batch_are_refused(tmp_path):
    pytest.importorskip("diffusers")
    from tests.test_pipeline_fixtures import save_wan, save_z_image

    z_image = load_pipeline(save_z_image(tmp_path / "z"))  # samples of different lengths: no per-row state
    experts = load_pipeline(save_wan(tmp_path / "a14b", "t2v-a14b"))  # the expert switches by timestep
    for pipe in (z_image, experts):
        assert not ContinuousBatcher.can_batch(pipe)
        with pytest.raises(ValueError, match=f"{type(pipe).__name__} cannot batch requests"):
            ContinuousBatcher(pipe)
