"""The TeaCache decision rule, its windows, per-branch state and lifecycle, on a small model.

The model below is built the way the README tells a user to add one: inherit `TeaCacheMixin`, provide
the indicator at block entry and the block stack, and call `run_blocks` between embedding and head.
Its indicator is the timestep broadcast over the tokens, so every distance is known by hand.
"""

import contextlib
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from teacache_models import TeaCacheMixin, TeaCacheParams
from teacache_models.cache import Deferred, relative_l1_distance
from teacache_models.params import evaluate_polynomial

WIDTH = 8


class TinyModel(nn.Module, TeaCacheMixin):
    def __init__(self) -> None:
        super().__init__()
        self.set_teacache_fits({"modulated_input": (1.0, 0.0)})  # rescaled distance = raw distance
        generator = torch.Generator().manual_seed(0)
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(2)])
        self.head = nn.Linear(WIDTH, WIDTH)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        self.block_calls = 0

    def teacache_indicator(self, hidden_states: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, 1, 1).expand_as(hidden_states)

    def forward_blocks(self, hidden_states: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.block_calls += 1
        for block in self.blocks:
            hidden_states = hidden_states + torch.tanh(block(hidden_states)) * t.reshape(-1, 1, 1)
        return hidden_states

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed(x)  # (B, L, D)
        hidden_states = self.run_blocks(hidden_states, t=t)
        return self.head(hidden_states)


class TinyModelWithoutSeparation(TinyModel):
    supports_cfg_separation = False


TIMESTEPS = [1.0, 0.95, 0.90, 0.80, 0.75, 0.70, 0.50, 0.40]


def make_input(seed: int, batch: int = 1, tokens: int = 5) -> torch.Tensor:
    return torch.randn(batch, tokens, WIDTH, generator=torch.Generator().manual_seed(seed))


def generate(model, params, xs, timesteps=TIMESTEPS, negative=False):
    """A denoising loop: step k computes model(xs[k], timesteps[k]) for one branch."""
    model.enable_teacache(params, num_inference_steps=len(timesteps))
    outputs = []
    for step, t in enumerate(timesteps):
        with torch.no_grad(), model.teacache_step(step, is_cfg_negative=negative):
            outputs.append(model(xs[step], torch.tensor([t])))
    return outputs


def test_decisions_match_hand_computed_sequence():
    # Distances |t_k - t_{k-1}| / t_{k-1}: .05, .0526, .1111, .0625, .0667, .2857, .2
    # Accumulated with thresh 0.15: skip, skip, compute (.2137), skip, skip, compute (.4152); 0 and 7 forced.
    model = TinyModel()
    xs = [make_input(0)] * len(TIMESTEPS)
    generate(model, TeaCacheParams(teacache_thresh=0.15), xs)
    stats = model.teacache_stats()
    assert stats.positive.computed_steps == (0, 3, 6, 7)
    assert stats.positive.skipped_steps == (1, 2, 4, 5)
    assert stats.negative.computed_steps == () and stats.negative.skipped_steps == ()
    assert model.block_calls == 4


def test_accumulator_follows_the_rule_step_by_step():
    model = TinyModel()
    model.enable_teacache(TeaCacheParams(teacache_thresh=0.15), num_inference_steps=len(TIMESTEPS))
    expected = [0.0, 0.05, 0.05 + 0.05 / 0.95, 0.0, 0.05 / 0.8, 0.05 / 0.8 + 0.05 / 0.75, 0.0, 0.0]
    for step, t in enumerate(TIMESTEPS):
        with torch.no_grad(), model.teacache_step(step):
            model(make_input(0), torch.tensor([t]))
        assert model.accumulated_rel_l1_distance == pytest.approx(expected[step], abs=1e-6)


def test_seed_example_quadratic_coefficients():
    # poly(x) = x**2: distances squared accumulate slowly: .0025, .0028, .0123 ... all below 0.05 until
    # the jump to 0.50 (.0816); the last step is forced.
    model = TinyModel()
    xs = [make_input(0)] * len(TIMESTEPS)
    generate(model, TeaCacheParams(teacache_thresh=0.05, coefficients=[1.0, 0.0, 0.0]), xs)
    distances = [abs(b - a) / a for a, b in itertools.pairwise(TIMESTEPS)]
    assert sum(d**2 for d in distances[:5]) < 0.05 < sum(d**2 for d in distances[:6])
    assert model.teacache_stats().positive.computed_steps == (0, 6, 7)


@pytest.mark.parametrize(
    ("start", "end", "timesteps", "computed"),
    [
        # Forced steps reset the accumulator, so the window shifts the later decisions too.
        (3, 1, TIMESTEPS, (0, 1, 2, 4, 6, 7)),
        (1, 4, TIMESTEPS, (0, 3, 4, 5, 6, 7)),
        (1, 1, [1.0, 0.95, 0.9], (0, 2)),
        (1, 0, [1.0, 0.95, 0.9], (0,)),
        (0, 0, [1.0, 0.95, 0.9], (0,)),
        (5, 5, TIMESTEPS, tuple(range(8))),
    ],
)
def test_start_and_end_windows(start, end, timesteps, computed):
    model = TinyModel()
    xs = [make_input(0)] * len(timesteps)
    generate(model, TeaCacheParams(teacache_thresh=0.15, start_skipping=start, end_skipping=end), xs, timesteps)
    assert model.teacache_stats().positive.computed_steps == computed


def test_first_step_always_computes_without_history_even_with_empty_windows():
    model = TinyModel()
    xs = [make_input(0)] * 3
    generate(model, TeaCacheParams(teacache_thresh=10.0, start_skipping=0, end_skipping=0), xs, TIMESTEPS[:3])
    stats = model.teacache_stats()
    assert stats.positive.computed_steps == (0,) and stats.positive.skipped_steps == (1, 2)


def test_skipped_step_adds_cached_residual_to_its_own_input():
    model = TinyModel()
    xs = [make_input(k) for k in range(len(TIMESTEPS))]
    outputs = generate(model, TeaCacheParams(teacache_thresh=0.15), xs)
    with torch.no_grad():
        hidden0 = model.embed(xs[0])
        residual0 = model.forward_blocks(hidden0, torch.tensor([TIMESTEPS[0]])) - hidden0
        expected_step1 = model.head(model.embed(xs[1]) + residual0)
        uncached_step1 = model(xs[1], torch.tensor([TIMESTEPS[1]]))
    torch.testing.assert_close(outputs[1], expected_step1, rtol=0, atol=0)
    assert not torch.equal(outputs[1], uncached_step1)


def computed_residual(model, x, t):
    with torch.no_grad():
        hidden = model.embed(x)
        return model.forward_blocks(hidden, torch.tensor([t])) - hidden


def test_residual_order_one_extrapolates_from_the_last_two_computed_steps():
    model = TinyModel()
    xs = [make_input(k) for k in range(len(TIMESTEPS))]
    outputs = generate(model, TeaCacheParams(teacache_thresh=0.15, residual_order=1), xs)
    assert model.teacache_stats().positive.computed_steps == (0, 3, 6, 7)  # the order does not change decisions
    r0, r3 = (computed_residual(model, xs[k], TIMESTEPS[k]) for k in (0, 3))
    expected = {
        1: r0,  # one computed step so far: its residual, as order 0
        2: r0,
        4: r3 + (4 - 3) / (3 - 0) * (r3 - r0),
        5: r3 + (5 - 3) / (3 - 0) * (r3 - r0),
    }
    with torch.no_grad():
        for step, residual in expected.items():
            torch.testing.assert_close(outputs[step], model.head(model.embed(xs[step]) + residual))
        assert not torch.allclose(outputs[4], model.head(model.embed(xs[4]) + r3))


def test_residual_order_one_restarts_after_a_shape_change():
    model = TinyModel()
    xs = [make_input(0, tokens=5)] * 2 + [make_input(0, tokens=9)] * 6
    outputs = generate(model, TeaCacheParams(teacache_thresh=0.15, residual_order=1), xs)
    stats = model.teacache_stats()
    assert stats.positive.computed_steps[:2] == (0, 2) and 3 in stats.positive.skipped_steps
    # Step 3 has one computed step of its shape (2): that residual, not an extrapolation across shapes.
    r2 = computed_residual(model, xs[2], TIMESTEPS[2])
    with torch.no_grad():
        torch.testing.assert_close(outputs[3], model.head(model.embed(xs[3]) + r2))


def test_residual_order_one_never_mixes_dtypes():
    model = TinyModel().double()
    xs = [make_input(0).double()] * 3 + [make_input(0).float()] * 5  # the weights follow from step 3 on
    outputs = []
    model.enable_teacache(TeaCacheParams(teacache_thresh=0.15, residual_order=1), len(TIMESTEPS))
    for step, t in enumerate(TIMESTEPS):
        if step == 3:
            model.float()
        with torch.no_grad(), model.teacache_step(step):
            outputs.append(model(xs[step], torch.tensor([t], dtype=xs[step].dtype)))
    assert 3 in model.teacache_stats().positive.computed_steps  # the dtype change forces a compute
    assert all(o.dtype == x.dtype for o, x in zip(outputs, xs, strict=True))


def test_max_consecutive_skips_forces_a_compute():
    # Without the limit: computed (0, 3, 6, 7) (see the hand-computed test above).
    model = TinyModel()
    xs = [make_input(0)] * len(TIMESTEPS)
    generate(model, TeaCacheParams(teacache_thresh=0.15, max_consecutive_skips=1), xs)
    stats = model.teacache_stats()
    assert stats.positive.computed_steps == (0, 2, 4, 6, 7)
    assert stats.positive.skipped_steps == (1, 3, 5)
    # Step 2 computes by the limit alone (the threshold, from the same state, skips it without the limit).
    assert stats.positive.limit_forced_steps == (2,)
    assert "positive: 5 computed (1 by max_consecutive_skips), 3 skipped" in stats.summary()
    generate(model, TeaCacheParams(teacache_thresh=0.15, max_consecutive_skips=2), xs)
    stats = model.teacache_stats()
    # The threshold computes after two skips anyway: the limit decides nothing.
    assert stats.positive.computed_steps == (0, 3, 6, 7) and stats.positive.limit_forced_steps == ()


class TinyModelWithDeferredInput(TinyModel):
    """The timestep scale of the blocks arrives as a `Deferred` input, computed only when they run."""

    def __init__(self) -> None:
        super().__init__()
        self.scale_computations = 0

    def teacache_indicator(self, hidden_states: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        return super().teacache_indicator(hidden_states, t)

    def forward_blocks(self, hidden_states: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return super().forward_blocks(hidden_states, t) * scale

    def forward(self, x: torch.Tensor, t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        def scale() -> torch.Tensor:
            self.scale_computations += 1
            return 1 + source.mean()

        hidden_states = self.run_blocks(self.embed(x), t=t, scale=Deferred(scale, (source,)))
        return self.head(hidden_states)


def test_deferred_inputs_are_computed_only_when_the_blocks_run():
    model, x, source = TinyModelWithDeferredInput(), make_input(0), torch.ones(3)
    with torch.no_grad():
        plain = model(x, torch.tensor([0.5]), source)
    assert model.scale_computations == 1  # outside a step: computed
    model.enable_teacache(TeaCacheParams(teacache_thresh=0.15), len(TIMESTEPS))
    outputs = []
    for step, t in enumerate(TIMESTEPS):
        with torch.no_grad(), model.teacache_step(step):
            outputs.append(model(x, torch.tensor([t]), source if step != 4 else torch.ones(5)))
    stats = model.teacache_stats().positive
    # Step 4's deferred input has a source of another shape (and step 5's changes back): both compute.
    assert stats.computed_steps == (0, 3, 4, 5, 6, 7)
    assert model.scale_computations == 1 + len(stats.computed_steps)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([0.5]), source), plain, rtol=0, atol=0)


def test_threshold_zero_is_bit_identical_even_with_negative_rescaled_distances():
    model = TinyModel()
    xs = [make_input(k) for k in range(len(TIMESTEPS))]
    with torch.no_grad():
        plain = [model(x, torch.tensor([t])) for x, t in zip(xs, TIMESTEPS, strict=True)]
    for coefficients in (None, [-1.0]):
        cached = generate(model, TeaCacheParams(teacache_thresh=0.0, coefficients=coefficients), xs)
        assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))
        assert model.teacache_stats().positive.skipped_steps == ()


def test_calls_outside_a_step_context_compute_and_touch_no_state():
    model = TinyModel()
    model.enable_teacache(TeaCacheParams(teacache_thresh=10.0), num_inference_steps=4)
    with torch.no_grad(), model.teacache_step(0):
        model(make_input(0), torch.tensor([1.0]))
    residual, indicator = model.previous_residual, model.previous_modulated_input
    with torch.no_grad():
        model(make_input(1), torch.tensor([0.9]))
    assert model.previous_residual is residual and model.previous_modulated_input is indicator
    assert model.teacache_stats().positive.computed_steps == (0,)


def test_reset_between_generations_gives_identical_results():
    model = TinyModel()
    xs = [make_input(k) for k in range(len(TIMESTEPS))]
    params = TeaCacheParams(teacache_thresh=0.15)
    first = generate(model, params, xs)
    first_stats = model.teacache_stats()
    second = generate(model, params, xs)
    assert model.teacache_stats() == first_stats
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_a_different_step_count_in_the_next_generation():
    model = TinyModel()
    generate(model, TeaCacheParams(teacache_thresh=0.15), [make_input(0)] * 8)
    short = TIMESTEPS[:4]
    generate(model, TeaCacheParams(teacache_thresh=0.15), [make_input(0)] * 4, short)
    assert model.teacache_stats().positive.computed_steps == (0, 3)
    assert model.teacache_stats().num_inference_steps == 4


def test_resolution_change_mid_generation_forces_a_compute():
    model = TinyModel()
    xs = [make_input(0, tokens=5)] * 2 + [make_input(0, tokens=9)] * 2 + [make_input(0, batch=2, tokens=9)] * 4
    outputs = generate(model, TeaCacheParams(teacache_thresh=0.15), xs)
    stats = model.teacache_stats()
    assert 2 in stats.positive.computed_steps and 4 in stats.positive.computed_steps
    assert outputs[2].shape == (1, 9, WIDTH) and outputs[4].shape == (2, 9, WIDTH)
    assert stats.positive.skipped_steps == (1, 3, 5)


def test_dtype_change_forces_a_compute():
    model = TinyModel().double()
    xs = [make_input(0).double()] * 2 + [make_input(0)] * 2
    model.float()
    outputs = generate(model, TeaCacheParams(teacache_thresh=0.15), [x.float() for x in xs[:2]] + xs[2:], TIMESTEPS[:4])
    assert len(outputs) == 4
    model.double()
    generate(model, TeaCacheParams(teacache_thresh=0.15), [make_input(0).double()] * 4, TIMESTEPS[:4])
    assert model.teacache_stats().positive.computed_steps == (0, 3)


def run_branch(model, xs, negative):
    outputs = []
    for step, t in enumerate(TIMESTEPS):
        with torch.no_grad(), model.teacache_step(step, is_cfg_negative=negative):
            outputs.append(model(xs[step], torch.tensor([t])))
    return outputs


def test_interleaved_branches_behave_as_if_alone():
    model = TinyModel()
    params = TeaCacheParams(teacache_thresh=0.15)
    positive_xs = [make_input(k) for k in range(8)]
    negative_xs = [make_input(100 + k) for k in range(8)]
    # The negative branch sees other timesteps, so its schedule differs from the positive one.
    negative_ts = [1.0, 0.8, 0.75, 0.74, 0.5, 0.45, 0.44, 0.2]

    model.enable_teacache(params, len(TIMESTEPS))
    interleaved = {False: [], True: []}
    for step in range(len(TIMESTEPS)):
        for negative, xs, ts in ((False, positive_xs, TIMESTEPS), (True, negative_xs, negative_ts)):
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=negative):
                interleaved[negative].append(model(xs[step], torch.tensor([ts[step]])))
    both = model.teacache_stats()
    assert model.previous_residual is not None and model.previous_residual_negative is not None
    assert model.previous_residual is not model.previous_residual_negative

    model.enable_teacache(params, len(TIMESTEPS))
    alone_positive = run_branch(model, positive_xs, False)
    assert model.teacache_stats().positive == both.positive
    model.enable_teacache(params, len(TIMESTEPS))
    alone_negative = []
    for step, t in enumerate(negative_ts):
        with torch.no_grad(), model.teacache_step(step, is_cfg_negative=True):
            alone_negative.append(model(negative_xs[step], torch.tensor([t])))
    assert model.teacache_stats().negative == both.negative
    assert both.positive.skipped_steps != both.negative.skipped_steps
    assert all(torch.equal(a, b) for a, b in zip(interleaved[False], alone_positive, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(interleaved[True], alone_negative, strict=True))


def test_model_without_separation_switches_off_once_under_cfg():
    model = TinyModelWithoutSeparation()
    xs = [make_input(k) for k in range(8)]
    with torch.no_grad():
        plain = [model(x, torch.tensor([t])) for x, t in zip(xs, TIMESTEPS, strict=True)]
    model.enable_teacache(TeaCacheParams(teacache_thresh=0.15), len(TIMESTEPS))
    outputs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, t in enumerate(TIMESTEPS):
            for negative in (False, True):
                with torch.no_grad(), model.teacache_step(step, is_cfg_negative=negative):
                    out = model(xs[step], torch.tensor([t]))
                if not negative:
                    outputs.append(out)
    messages = [str(w.message) for w in caught if "TeaCache disabled" in str(w.message)]
    assert len(messages) == 1 and "CFG" in messages[0]
    stats = model.teacache_stats()
    assert not stats.enabled and "negative" in stats.disabled_reason
    assert stats.positive.skipped_steps == () and stats.negative.skipped_steps == ()
    assert all(torch.equal(a, b) for a, b in zip(plain, outputs, strict=True))
    assert model.previous_residual is None


def test_model_without_separation_still_caches_without_cfg():
    model = TinyModelWithoutSeparation()
    generate(model, TeaCacheParams(teacache_thresh=0.15), [make_input(0)] * 8)
    assert model.teacache_stats().positive.skipped_steps == (1, 2, 4, 5)


def test_stats_survive_disable_until_next_enable():
    model = TinyModel()
    generate(model, TeaCacheParams(teacache_thresh=0.15), [make_input(0)] * 8)
    model.disable_teacache()
    stats = model.teacache_stats()
    assert not stats.enabled and stats.positive.skipped_steps == (1, 2, 4, 5)
    assert model.previous_residual is None
    with torch.no_grad(), model.teacache_step(9):  # no generation running: any step, computes
        model(make_input(0), torch.tensor([0.3]))
    assert model.teacache_stats() == stats
    model.enable_teacache(TeaCacheParams(), 8)
    assert model.teacache_stats().positive.computed_steps == ()
    assert model.teacache_stats().as_dict()["enabled"] is True


def test_stats_summary_and_dict():
    model = TinyModel()
    generate(model, TeaCacheParams(teacache_thresh=0.15), [make_input(0)] * 8)
    stats = model.teacache_stats()
    assert stats.summary() == "positive: 4 computed, 4 skipped"
    assert stats.as_dict()["branches"]["positive"]["skipped_steps"] == [1, 2, 4, 5]
    assert stats.num_skipped == 4 and stats.num_computed == 4


def test_relative_distance_is_float32_over_whole_tensor():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    b = torch.tensor([[1.5, 2.0], [3.0, 3.0]], dtype=torch.bfloat16)
    value = relative_l1_distance(a, b)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx((0.5 + 1.0) / (1.5 + 2.0 + 3.0 + 3.0))
    assert evaluate_polynomial((2.0, 1.0), value.item()) == pytest.approx(1 + 2 * 1.5 / 9.5)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: m.enable_teacache({"teacache_thresh": 0.1}, 8), TypeError, "TeaCacheParams"),
        (lambda m: m.enable_teacache(TeaCacheParams(), 0), ValueError, "num_inference_steps"),
        (lambda m: m.enable_teacache(TeaCacheParams(), 8.0), TypeError, "num_inference_steps"),
        (lambda m: m.enable_teacache(TeaCacheParams(use_ret_steps=True), 8), ValueError, "use_ret_steps"),
        (lambda m: m.enable_teacache(TeaCacheParams(indicator="temb"), 8), ValueError, "modulated_input"),
    ],
)
def test_enable_rejects_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call(TinyModel())


def test_model_without_a_fit_needs_coefficients():
    model = TinyModel()
    model.set_teacache_fits({})
    assert model.teacache_fits == {}
    with pytest.raises(ValueError, match="no TeaCache coefficients for indicator 'modulated_input': pass"):
        model.enable_teacache(TeaCacheParams(), 4)
    model.enable_teacache(TeaCacheParams(coefficients=[1.0]), 4)
    with pytest.raises(ValueError, match="fits names indicator 'temb', which TinyModel does not offer"):
        model.set_teacache_fits({"temb": (1.0,)})
    with pytest.raises(TypeError, match="fits must be a mapping"):
        model.set_teacache_fits([(1.0,)])
    with pytest.raises(ValueError, match="coefficients must be"):
        model.set_teacache_fits({"modulated_input": ()})


def test_step_context_misuse_is_reported():
    model = TinyModel()
    model.enable_teacache(TeaCacheParams(), 4)
    with pytest.raises(ValueError, match="step_index 4 is out of range"), model.teacache_step(4):
        pass
    with pytest.raises(ValueError, match="step_index"), model.teacache_step(-1):
        pass
    with pytest.raises(ValueError, match="is_cfg_negative"), model.teacache_step(0, is_cfg_negative=1):
        pass
    with model.teacache_step(0), pytest.raises(RuntimeError, match="nested"), model.teacache_step(1):
        pass
    with torch.no_grad(), model.teacache_step(0):
        model(make_input(0), torch.tensor([1.0]))
        with pytest.raises(RuntimeError, match="one forward call"):
            model(make_input(0), torch.tensor([1.0]))
    with model.teacache_step(1), pytest.raises(RuntimeError, match="inside a teacache_step"):
        model.enable_teacache(TeaCacheParams(), 4)


@pytest.mark.parametrize(
    ("step_index", "error", "match"),
    [
        (1.0, TypeError, r"step_index must be an integer >= 0, got 1.0 \(float\)"),
        (True, TypeError, r"step_index must be an integer >= 0, got True \(bool\)"),
        (torch.tensor(1), TypeError, r"step_index must be an integer >= 0, got tensor\(1\) \(Tensor\)"),
        (-1, ValueError, "step_index must be an integer >= 0, got -1"),
        (4, ValueError, r"step_index 4 is out of range: this generation has 4 steps \(0..3\)"),
    ],
)
def test_bad_step_index_is_refused(step_index, error, match):
    model = TinyModel()
    model.enable_teacache(TeaCacheParams(), 4)
    with pytest.raises(error, match=match), model.teacache_step(step_index):
        pass


def test_numpy_integers_are_accepted_as_step_and_step_count():
    model = TinyModel()
    model.enable_teacache(TeaCacheParams(), np.int64(4))
    with torch.no_grad(), model.teacache_step(np.int64(0)):
        model(make_input(0), torch.tensor([1.0]))
    assert model.teacache_stats().positive.computed_steps == (0,)
    assert type(model.teacache_stats().positive.computed_steps[0]) is int


def test_each_branch_steps_must_increase_within_a_generation():
    model = TinyModel()
    model.enable_teacache(TeaCacheParams(teacache_thresh=0.15), 8)
    for step in (0, 2):
        with torch.no_grad(), model.teacache_step(step):
            model(make_input(0), torch.tensor([TIMESTEPS[step]]))
    for step in (2, 1):  # repeated, backwards
        refused = pytest.raises(ValueError, match=f"step_index {step} is not after 2, the last step of the positive")
        with refused, model.teacache_step(step):
            pass
    with pytest.raises(ValueError, match="call enable_teacache"), model.teacache_step(0, batched_cfg=True):
        pass
    with torch.no_grad(), model.teacache_step(0, is_cfg_negative=True):  # the other branch has its own order
        model(make_input(0), torch.tensor([1.0]))
    with model.teacache_step(3):  # a context without a call records nothing
        pass
    with torch.no_grad(), model.teacache_step(3):
        model(make_input(0), torch.tensor([TIMESTEPS[3]]))
    generate(model, TeaCacheParams(teacache_thresh=0.15), [make_input(0)] * 8)  # a new generation restarts at 0
    assert model.teacache_stats().positive.computed_steps == (0, 3, 6, 7)


class FailingBlocks(TinyModel):
    """Its block stack raises at the steps listed in `fail_at`."""

    def __init__(self, fail_at: set[int]) -> None:
        super().__init__()
        self.fail_at, self.step = fail_at, None

    def forward_blocks(self, hidden_states, t):
        if self.step in self.fail_at:
            raise RuntimeError("out of memory")
        return super().forward_blocks(hidden_states, t)


def test_a_call_that_raises_leaves_no_stale_cache():
    # Step 2 brings a new batch size and fails inside the blocks, after the decision: step 3, of that batch
    # size too, must compute rather than add step 0's batch-1 residual to a batch of 2.
    model = FailingBlocks(fail_at={2})
    model.enable_teacache(TeaCacheParams(teacache_thresh=10.0), 8)
    xs = [make_input(0)] * 2 + [make_input(0, batch=2)] * 6
    for step in range(4):
        model.step = step
        context = model.teacache_step(step)
        if step == 2:
            with pytest.raises(RuntimeError, match="out of memory"), torch.no_grad(), context:
                model(xs[step], torch.tensor([TIMESTEPS[step]] * 2))
            continue
        with torch.no_grad(), context:
            out = model(xs[step], torch.tensor([TIMESTEPS[step]] * len(xs[step])))
    stats = model.teacache_stats().positive
    assert stats.computed_steps == (0, 3) and stats.skipped_steps == (1,)
    assert out.shape == (2, 5, WIDTH) and model.previous_residual.shape == (2, 5, WIDTH)


def test_a_step_that_raised_can_be_run_again_and_the_generation_goes_on():
    model = FailingBlocks(fail_at=set())
    xs = [make_input(0)] * len(TIMESTEPS)
    expected = generate(model, TeaCacheParams(teacache_thresh=0.15), xs)
    expected_stats = model.teacache_stats()
    model.enable_teacache(TeaCacheParams(teacache_thresh=0.15), len(TIMESTEPS))
    outputs = []
    for step, t in enumerate(TIMESTEPS):
        model.step = step
        if step == 3:  # the caller's own code fails after the call: the step is not recorded
            with pytest.raises(KeyError), torch.no_grad(), model.teacache_step(step):
                model(xs[step], torch.tensor([t]))
                raise KeyError("scheduler")
        with torch.no_grad(), model.teacache_step(step):
            outputs.append(model(xs[step], torch.tensor([t])))
    assert model.teacache_stats() == expected_stats  # step 3 computes on its second run, as it did alone
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected, strict=True))


class SplittingModel(FailingBlocks):
    """Splits a batched-CFG call per branch itself, as Z-Image does."""

    def forward(self, x, t):
        if not self.claim_batched_cfg_call():
            return super().forward(x, t)
        halves = []
        for negative, (x_half, t_half) in enumerate(zip(x.chunk(2), t.chunk(2), strict=True)):
            self.step = (self.step_index, bool(negative))
            with self.teacache_branch(bool(negative)):
                halves.append(super().forward(x_half, t_half))
        return torch.cat(halves)


def test_a_split_batched_call_that_fails_in_its_second_half_forgets_both_halves():
    model = SplittingModel(fail_at={(1, True)})
    model.enable_teacache(TeaCacheParams(teacache_thresh=0.0), 4)
    for step in range(2):
        model.step_index = step
        failure = pytest.raises(RuntimeError) if step == 1 else contextlib.nullcontext()
        with failure, torch.no_grad(), model.teacache_step(step, batched_cfg=True):
            model(make_input(step, batch=2), torch.tensor([TIMESTEPS[step]] * 2))
    stats = model.teacache_stats()
    assert stats.positive.computed_steps == (0,) and stats.negative.computed_steps == (0,)
    model.fail_at = set()
    with torch.no_grad(), model.teacache_step(1, batched_cfg=True):  # run again: both halves accepted
        model(make_input(1, batch=2), torch.tensor([TIMESTEPS[1]] * 2))
    assert model.teacache_stats().negative.computed_steps == (0, 1)


def test_skipped_steps_do_not_reach_into_an_earlier_steps_graph():
    model = TinyModel()
    model.enable_teacache(TeaCacheParams(teacache_thresh=10.0), 4)
    losses = []
    for step in range(3):
        with model.teacache_step(step):
            losses.append(model(make_input(step), torch.tensor([TIMESTEPS[step]])).sum())
    assert model.teacache_stats().positive.skipped_steps == (1, 2)
    for loss in reversed(losses):  # each backward frees only its own step's graph
        loss.backward()
    assert not model.previous_residual.requires_grad


def test_process_group_must_be_a_process_group():
    model = TinyModel()
    with pytest.raises(TypeError, match=r"group must be a torch.distributed.ProcessGroup or None, got 'world'"):
        model.set_teacache_process_group("world")
    with pytest.raises(TypeError, match="trim must be callable or None, got int"):
        model.set_teacache_process_group(None, trim=3)
    model.set_teacache_process_group(None)


def test_the_decision_reads_the_trimmed_indicator():
    """Under sequence parallelism a rank's indicator is trimmed to its real tokens before the decision."""
    model, seen = TinyModel(), []
    model.set_teacache_process_group(None, trim=lambda indicator: indicator[:, :2])
    with model.add_teacache_observer(seen.append):
        generate(model, TeaCacheParams(teacache_thresh=0.0), [make_input(step) for step in range(len(TIMESTEPS))])
    assert [tuple(s.indicator.shape) for s in seen] == [(1, 2, WIDTH)] * len(TIMESTEPS)
    assert model.previous_modulated_input.shape == (1, 2, WIDTH)
    model.set_teacache_process_group(None)
    generate(model, TeaCacheParams(teacache_thresh=0.0), [make_input(step) for step in range(len(TIMESTEPS))])
    assert model.previous_modulated_input.shape == (1, 5, WIDTH)


def test_a_changed_plain_block_input_forces_a_compute():
    class WithLayout(TinyModel):
        def forward_blocks(self, hidden_states, t, layout):
            return super().forward_blocks(hidden_states, t)

        def teacache_indicator(self, hidden_states, t, layout):
            return super().teacache_indicator(hidden_states, t)

        def forward(self, x, t, layout):
            rows = Deferred(lambda: layout, (layout,))
            return self.head(self.run_blocks(self.embed(x), t=t, layout=rows))

    model = WithLayout()
    model.enable_teacache(TeaCacheParams(teacache_thresh=10.0), 5)
    for step, layout in enumerate([(1, 5), (1, 5), (5, 1), (5, 1), (5, 1)]):
        with torch.no_grad(), model.teacache_step(step):
            model(make_input(0), torch.tensor([1.0 - step / 10]), layout)
    assert model.teacache_stats().positive.computed_steps == (0, 2, 4)


def test_batched_cfg_call_is_refused_while_caching():
    model = TinyModel()
    model.enable_teacache(TeaCacheParams(), 4)
    with torch.no_grad(), model.teacache_step(0, batched_cfg=True), pytest.raises(ValueError, match="separately"):
        model(make_input(0, batch=2), torch.tensor([1.0, 1.0]))
    model.disable_teacache()
    with torch.no_grad(), model.teacache_step(0, batched_cfg=True):
        model(make_input(0, batch=2), torch.tensor([1.0, 1.0]))


def test_state_lives_on_the_instance():
    first, second = TinyModel(), TinyModel()
    generate(first, TeaCacheParams(teacache_thresh=0.15), [make_input(0)] * 8)
    assert second.teacache_stats().positive.computed_steps == ()
    assert second.previous_residual is None and first.previous_residual is not None


def test_a_changed_block_input_forces_a_compute():
    class WithContext(TinyModel):
        def forward_blocks(self, hidden_states, t, context):
            return super().forward_blocks(hidden_states, t) + context.mean()

        def teacache_indicator(self, hidden_states, t, context):
            return super().teacache_indicator(hidden_states, t)

        def forward(self, x, t, context):
            return self.head(self.run_blocks(self.embed(x), t=t, context=context))

    model = WithContext()
    model.enable_teacache(TeaCacheParams(teacache_thresh=10.0), 4)
    for step, length in enumerate((3, 3, 5, 5)):
        with torch.no_grad(), model.teacache_step(step):
            model(make_input(0), torch.tensor([1.0 - step / 10]), torch.ones(1, length, WIDTH))
    assert model.teacache_stats().positive.computed_steps == (0, 2, 3)


def test_switch_off_warning_points_at_the_callers_line():
    model = TinyModelWithoutSeparation()
    model.enable_teacache(TeaCacheParams(), 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), model.teacache_step(0, is_cfg_negative=True):
            model(make_input(0), torch.tensor([1.0]))
    assert [w.filename for w in caught] == [__file__]


# ---- the same guarantees on native models ------------------------------------------------------------


def test_wan_expert_pair_enables_both_experts_or_neither():
    from teacache_models.models import WanExpertPair, WanTransformer3DModel
    from tests.tiny_configs import WAN_TINY

    high, low = WanTransformer3DModel(**WAN_TINY), WanTransformer3DModel(**WAN_TINY)
    high.set_teacache_fits({"temb": (1.0, 0.0)})  # the low-noise expert has none
    pair = WanExpertPair(high, low, boundary_ratio=0.9)
    with pytest.raises(ValueError, match="no TeaCache coefficients for indicator 'temb'"):
        pair.enable_teacache(TeaCacheParams(), 4)
    assert not high.teacache_enabled and not low.teacache_enabled
    pair.enable_teacache(TeaCacheParams(coefficients=[1.0, 0.0]), 4)
    assert high.teacache_enabled and low.teacache_enabled


def test_qwen_image_layout_of_as_many_tokens_forces_a_compute():
    from teacache_models.models import QwenImageTransformer2DModel

    config = dict(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    model = QwenImageTransformer2DModel(**config).eval()
    latents, text = torch.randn(1, 16, 16), torch.randn(1, 3, 16)
    model.enable_teacache(TeaCacheParams(teacache_thresh=1e9, coefficients=[1.0, 0.0], end_skipping=0), 4)
    for step, shape in enumerate([(1, 4, 4), (1, 4, 4), (1, 2, 8), (1, 2, 8)]):  # 16 tokens each
        with torch.no_grad(), model.teacache_step(step):
            model(latents, text, timestep=torch.tensor([1.0 - step / 10]), img_shapes=[[shape]])
    assert model.teacache_stats().positive.computed_steps == (0, 2)


def test_importing_the_package_leaves_the_compiler_unloaded():
    import subprocess
    import sys

    code = "import sys, teacache_models.models, teacache_models.pipelines; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"


# ---- step observer ---------------------------------------------------------------------------------


def test_step_observer_sees_every_step_of_every_branch_and_changes_nothing():
    model = TinyModel()
    xs = [make_input(k) for k in range(len(TIMESTEPS))]
    params = TeaCacheParams(teacache_thresh=0.15)
    plain = generate(model, params, xs)
    seen = []
    with model.add_teacache_observer(seen.append):
        observed = generate(model, params, xs)
        with torch.no_grad():
            model(xs[0], torch.tensor([1.0]))  # outside a step context: not a step, not observed
    assert all(torch.equal(a, b) for a, b in zip(plain, observed, strict=True))
    stats = model.teacache_stats()
    assert [s.step_index for s in seen] == list(range(len(TIMESTEPS)))
    assert tuple(s.step_index for s in seen if s.skipped) == stats.positive.skipped_steps
    assert {s.generation for s in seen} == {1} and not any(s.is_cfg_negative for s in seen)
    for step, (s, x, t) in enumerate(zip(seen, xs, TIMESTEPS, strict=True)):
        assert s.indicator_name == "modulated_input" and s.teacache_params is params
        hidden = model.embed(x).detach()
        assert torch.equal(s.hidden_states, hidden)
        assert torch.equal(s.indicator, torch.full_like(hidden, t))
        if s.skipped:
            computed = next(c for c in reversed(seen[:step]) if not c.skipped)
            assert torch.equal(s.output, hidden + (computed.output - computed.hidden_states))
        else:
            assert torch.equal(s.output, model.forward_blocks(hidden, torch.tensor([t])))
        if step in (0, len(TIMESTEPS) - 1):  # forced: no distance is computed
            assert s.distance is None and s.accumulated_rel_l1_distance == 0
        else:
            assert s.distance == pytest.approx(abs(t - TIMESTEPS[step - 1]) / TIMESTEPS[step - 1], rel=1e-6)
    # Removed: no more observations.
    generate(model, params, xs)
    assert len(seen) == len(TIMESTEPS)


def test_step_observer_without_a_decision_and_per_branch():
    model = TinyModel()
    seen = []
    handle = model.add_teacache_observer(seen.append)
    x = make_input(0)
    with torch.no_grad(), model.teacache_step(0):
        model(x, torch.tensor([1.0]))  # TeaCache never enabled: a step without a decision
    assert seen[-1].indicator is None and seen[-1].teacache_params is None and not seen[-1].skipped
    generate(model, TeaCacheParams(teacache_thresh=0.5), [x] * 3, [1.0, 0.9, 0.8], negative=True)
    assert [(s.step_index, s.is_cfg_negative) for s in seen[1:]] == [(0, True), (1, True), (2, True)]
    handle.remove()
    handle.remove()  # a second remove is harmless
    with pytest.raises(TypeError, match="observer must be callable"):
        model.add_teacache_observer("not a function")
