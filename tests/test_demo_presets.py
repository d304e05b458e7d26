"""The demo presets are points where TeaCache's own decision acts, not a fixed schedule.

On the shipped demo models, each preset's schedule (the steps each CFG branch computes) differs between
the demo prompts and seeds, and moving the threshold by 20% either way changes it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from teacache_models.pipelines import load_pipeline

PAIRS = [(f"a handwritten digit {digit}", 0) for digit in range(10)]  # the demo prompts, seed 0


def schedules(pipe, params) -> list[tuple]:
    """Per prompt/seed pair, generated alone: the steps each branch computed."""
    found = []
    for prompt, seed in PAIRS:
        stats = pipe([prompt], dataclasses.replace(params, seed=seed)).teacache_stats
        assert stats.enabled and stats.disabled_reason is None
        found.append((stats.positive.computed_steps, stats.negative.computed_steps))
    return found


@pytest.mark.parametrize(
    "name, preset",
    [(name, preset) for name in ("flux-digits", "wan-digits") for preset in ("slow", "fast", "forecast")]
    + [("flux-digits", "forecast-cadence")],
)
def test_preset_schedule_follows_prompt_seed_and_threshold(name, preset):
    torch.set_num_threads(1)
    pipe = load_pipeline(name)
    params = pipe.default_sampling_params(teacache=preset, seed=0)
    cache = params.teacache_params
    # Nothing caps the run of skipped steps: only the accumulated distance decides.
    assert cache.max_consecutive_skips is None
    at_preset = schedules(pipe, params)
    assert len(set(at_preset)) >= 2, f"{name} {preset}: one schedule for every prompt and seed: {at_preset[0]}"
    steps = params.num_inference_steps
    assert all(len(positive) < steps and len(negative) < steps for positive, negative in at_preset)
    for factor in (0.8, 1.2):
        moved = dataclasses.replace(cache, teacache_thresh=cache.teacache_thresh * factor)
        changed = schedules(pipe, dataclasses.replace(params, teacache_params=moved))
        assert changed != at_preset, f"{name} {preset}: threshold x{factor} leaves every schedule as it was"
