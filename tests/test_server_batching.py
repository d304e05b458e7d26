"""The server's engine batching jobs step by step on the demo pipeline: joining, leaving, cancelling, timeouts
and faults, each job's output equal to its run alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from teacache_models.pipelines import load_pipeline
from teacache_models.server.engine import Engine, Job

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("flux-digits")


def params(pipe, teacache: str, seed: int, steps: int = 12, **overrides):
    settings = dict(height=16, width=16, num_inference_steps=steps, seed=seed) | overrides
    return pipe.default_sampling_params(teacache, **settings)


class Recorder:
    """Engine callbacks: the size of every batched step, and the order jobs finished in."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.finished: list[Job] = []

    def step(self, size: int) -> None:
        self.sizes.append(size)

    def job(self, job: Job) -> None:
        self.finished.append(job)


def engine_for(pipe, recorder: Recorder, max_batch: int = 4, **kwargs) -> Engine:
    engine = Engine(
        pipe, max_queue=16, max_batch=max_batch, observer=recorder.job, step_observer=recorder.step, **kwargs
    )
    engine.start()
    return engine


def assert_solo(pipe, job: Job) -> None:
    solo = pipe(job.prompts, job.params, **job.inputs)
    assert job.status == "completed", job.error
    assert job.result.teacache_stats.positive.computed_steps == solo.teacache_stats.positive.computed_steps
    assert job.result.teacache_stats.negative.computed_steps == solo.teacache_stats.negative.computed_steps
    torch.testing.assert_close(job.result.images, solo.images, rtol=0, atol=1e-5)


def test_jobs_share_steps_and_each_equals_its_solo_run(pipe):
    recorder = Recorder()
    engine = engine_for(pipe, recorder)
    try:
        jobs = [
            engine.submit(Job("image", [prompt], params(pipe, teacache, seed)))
            for prompt, teacache, seed in [("a digit 3", "slow", 1), ("seven", "fast", 2), ("nine", "off", 3)]
        ]
        late = engine.submit(Job("image", ["a digit 0"], params(pipe, "fast", 4, steps=6)))
        for job in [*jobs, late]:
            assert job.done.wait(60)
    finally:
        assert engine.stop(5)
    assert max(recorder.sizes) > 1 and engine.max_batch == 4
    for job in [*jobs, late]:
        assert_solo(pipe, job)
        assert job.step == job.num_steps
        assert set(job.result.timings) >= {"text_encoding", "denoising", "decoding", "total"}


def test_a_job_of_several_images_runs_alone_after_the_batch_in_arrival_order(pipe):
    recorder = Recorder()
    engine = engine_for(pipe, recorder)
    try:
        first = engine.submit(Job("image", ["a digit 1"], params(pipe, "slow", 5)))
        several = engine.submit(Job("image", ["two"] * 2, params(pipe, "slow", 6)))
        after = engine.submit(Job("image", ["an 8"], params(pipe, "slow", 7)))
        for job in (first, several, after):
            assert job.done.wait(60)
    finally:
        assert engine.stop(5)
    # `after` may not overtake the job of two images, which runs by itself, as the CLI runs it.
    assert recorder.finished == [first, several, after]
    for job in (first, several, after):
        assert_solo(pipe, job)
    torch.testing.assert_close(several.result.images, pipe(["two"] * 2, several.params).images, rtol=0, atol=0)


def test_a_cancelled_job_leaves_its_batch_at_the_next_step_and_the_others_are_unchanged(pipe):
    recorder = Recorder()
    engine = engine_for(pipe, recorder)
    try:
        kept = engine.submit(Job("image", ["a digit 2"], params(pipe, "slow", 8, steps=40)))
        dropped = engine.submit(Job("image", ["nine"], params(pipe, "slow", 9, steps=1000)))
        deadline = time.monotonic() + 30
        while dropped.step < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert engine.cancel(dropped)
        assert dropped.done.wait(5)
        stopped_at = dropped.step
        assert kept.done.wait(60)
    finally:
        assert engine.stop(5)
    assert dropped.status == "cancelled" and 2 <= stopped_at < 1000 and dropped.result is None
    assert_solo(pipe, kept)


def test_a_batched_job_past_its_deadline_fails_and_frees_its_row(pipe):
    recorder = Recorder()
    engine = engine_for(pipe, recorder, request_timeout_s=0.5)
    try:
        slow = engine.submit(Job("image", ["seven"], params(pipe, "off", 10, steps=1000)))
        assert slow.done.wait(10)
        engine.request_timeout_s = None
        quick = engine.submit(Job("image", ["seven"], params(pipe, "off", 10, steps=4)))
        assert quick.done.wait(30)
    finally:
        assert engine.stop(5)
    assert slow.status == "failed" and slow.error_code == "timeout" and 0 < slow.step < 1000
    assert_solo(pipe, quick)


def test_an_error_inside_a_batched_step_fails_its_jobs_and_the_server_goes_on(pipe, monkeypatch):
    recorder = Recorder()
    engine = engine_for(pipe, recorder)
    original = pipe.predict
    fail = threading.Event()

    def predict(*args, **kwargs):
        if fail.is_set():
            fail.clear()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "predict", predict)
    try:
        jobs = [
            engine.submit(Job("image", [p], params(pipe, "slow", s, steps=200))) for p, s in [("one", 1), ("two", 2)]
        ]
        deadline = time.monotonic() + 30
        while min(job.step for job in jobs) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        fail.set()
        for job in jobs:
            assert job.done.wait(30)
        after = engine.submit(Job("image", ["three"], params(pipe, "slow", 3)))
        assert after.done.wait(30)
    finally:
        assert engine.stop(5)
    for job in jobs:
        assert job.status == "failed" and job.error_code == "server_error"
        assert job.error.startswith("out of memory on the device")
    monkeypatch.undo()
    assert_solo(pipe, after)


def test_bad_input_found_when_a_job_joins_fails_that_job_only(pipe):
    recorder = Recorder()
    engine = engine_for(pipe, recorder)
    try:
        bad = engine.submit(Job("image", ["seven"], params(pipe, "slow", 1, height=15)))
        good = engine.submit(Job("image", ["seven"], params(pipe, "slow", 1)))
        assert good.done.wait(30)
    finally:
        assert engine.stop(5)
    assert bad.status == "failed" and bad.error_code == "invalid_request" and "height must be a multiple" in bad.error
    assert_solo(pipe, good)


def test_a_batched_job_whose_latents_overflow_fails_alone_and_its_batch_goes_on(pipe):
    recorder = Recorder()
    engine = engine_for(pipe, recorder)
    try:
        jobs = [
            engine.submit(Job("image", ["seven"], params(pipe, "off", 1, steps=4, guidance_scale=1e300))),
            engine.submit(Job("image", ["seven"], params(pipe, "off", 1, steps=4))),
        ]
        for job in jobs:
            assert job.done.wait(30)
    finally:
        assert engine.stop(5)
    overflowed, good = jobs
    assert max(recorder.sizes) == 2, "the two jobs computed their steps together"
    assert overflowed.status == "failed" and overflowed.error_code == "invalid_request" and overflowed.result is None
    assert "non-finite latents" in overflowed.error and "'guidance_scale': 1e+300" in overflowed.error
    assert_solo(pipe, good)


def test_max_batch_one_and_pipelines_that_cannot_batch_run_one_job_at_a_time(pipe):
    assert Engine(pipe, max_queue=1, max_batch=1).batcher is None

    class OneTimestep:
        per_sample_timesteps = False

    engine = Engine(OneTimestep(), max_queue=1, max_batch=8)
    assert engine.batcher is None and engine.max_batch == 1
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        Engine(pipe, max_queue=1, max_batch=0)


def test_one_timestep_per_call_jobs_batch_at_the_same_step_and_later_ones_wait_queued(tmp_path):
    """Flux's pipeline gives a call one timestep: jobs that start together share calls; one that arrives
    during their generation stays queued (and is cancelled at once) until the batch has finished."""
    pytest.importorskip("diffusers")
    from teacache_models import SamplingParams, TeaCacheParams
    from tests.test_pipeline_fixtures import save_flux

    flux = load_pipeline(save_flux(tmp_path / "flux"))

    def flux_params(seed: int, steps: int) -> SamplingParams:
        cache = TeaCacheParams(teacache_thresh=0.5, coefficients=(1.0, 0.0))
        return SamplingParams(teacache_params=cache, height=16, width=16, num_inference_steps=steps, seed=seed)

    recorder = Recorder()
    engine = Engine(flux, max_queue=8, max_batch=4, observer=recorder.job, step_observer=recorder.step)
    together = [engine.submit(Job("image", [p], flux_params(s, 6))) for p, s in [("a red fox", 1), ("a cat", 2)]]
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while together[0].step < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        later = engine.submit(Job("image", ["a dog"], flux_params(3, 6)))
        dropped = engine.submit(Job("image", ["a cow"], flux_params(4, 200)))
        assert later.status == "queued" and engine.queue_depth == 2
        assert engine.cancel(dropped) and dropped.status == "cancelled"  # queued: at once
        assert later.done.wait(60)
    finally:
        assert engine.stop(5)
    assert recorder.sizes[0] == 2 and recorder.finished[-1] is later  # the two shared calls, then `later` alone
    assert later.started_at >= max(job.completed_at for job in together) - 1e-3
    for job in [*together, later]:
        assert_solo(flux, job)
