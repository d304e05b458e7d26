"""Step-level continuous batching on the demo pipelines: requests join and leave between steps, and each
output equals its run alone."""

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


def test_a_pipeline_without_per_sample_timesteps_is_refused():
    class OneTimestep:
        per_sample_timesteps = False

    with pytest.raises(ValueError, match="OneTimestep cannot be batched step by step"):
        ContinuousBatcher(OneTimestep())
