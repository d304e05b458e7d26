"""The contract every model family keeps, parametrized over the families of `tests/family_cases.py`.

Parity with diffusers (bit for bit in float32), the oneDNN linear kernel, the TeaCache rule replayed by
hand on every indicator of each family, what a skipped step computes, state kept apart between CFG
branches and between generations, clear errors for bad input and bad architecture, and diffusers'
output types. A new family gets all of it by adding one `FamilyCase`.
"""

from __future__ import annotations

import pytest
import torch

from teacache_models import TeaCacheParams
from teacache_models.cache import relative_l1_distance
from teacache_models.families import FAMILIES, transformer_class
from teacache_models.layers.linear import onednn_available
from teacache_models.params import evaluate_polynomial
from tests.family_cases import CASES
from tests.utils import assert_identical, check_linear_kernels

FAMILY_NAMES = list(CASES)
NUM_STEPS = 8
SIGMAS = torch.linspace(1.0, 0.05, NUM_STEPS).tolist()
LINEAR = (1.0, 0.0)  # rescaled distance = raw distance


def config_cases() -> list[tuple[str, str]]:
    return [(family, name) for family, case in CASES.items() for name in case.tests.CONFIGS]


def indicator_cases() -> list[tuple[str, str]]:
    return [(family, name) for family, case in CASES.items() for name in case.indicators]


def default_pair(family: str, seed: int = 0):
    case = CASES[family]
    config = next(iter(case.tests.CONFIGS.values()))
    ours, reference = case.tests.build_pair(config, seed)
    return case, config, ours, reference


def loop(model, case, paths: dict[bool, callable], params=None, order=("interleaved",)) -> dict[bool, list]:
    """Run every step of the given branches (interleaved per step), with TeaCache `params` (None: off)."""
    if params is not None:
        model.enable_teacache(params, NUM_STEPS)
    outputs = {branch: [] for branch in paths}
    for step, sigma in enumerate(SIGMAS):
        for branch, path in paths.items():
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=branch):
                outputs[branch].append(case.output(model(**path(sigma), return_dict=False)))
    return outputs


def test_every_registered_family_has_a_contract_entry():
    assert set(CASES) == set(FAMILIES)
    for family, case in CASES.items():
        assert case.family == family
        ours, _ = case.tests.build_pair(next(iter(case.tests.CONFIGS.values())))
        assert type(ours) is transformer_class(family)
        assert tuple(case.indicators) == type(ours).supported_teacache_indicators


@torch.no_grad()
@pytest.mark.parametrize(("family", "name"), config_cases())
def test_bit_identical_to_diffusers(family, name):
    case = CASES[family]
    config = case.tests.CONFIGS[name]
    ours, reference = case.tests.build_pair(config, seed=len(name))
    call = case.path(config, 1)(0.6)
    expected = case.output(reference(**call, return_dict=False))
    actual = case.output(ours(**call, return_dict=False))
    assert_identical(actual, expected)


@torch.no_grad()
@pytest.mark.parametrize(("family", "name"), config_cases())
def test_onednn_linear_kernel_matches_diffusers(family, name):
    case = CASES[family]
    config = case.tests.CONFIGS[name]
    ours, reference = case.tests.build_pair(config, seed=11)
    call = case.path(config, 1)(0.6)
    check_linear_kernels(ours, reference, lambda model: case.output(model(**call, return_dict=False)))


def _in_dtype(value, dtype: torch.dtype):
    """A floating tensor, or those of a list, in `dtype`."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return [_in_dtype(item, dtype) for item in value] if isinstance(value, list) else value


@torch.no_grad()
@pytest.mark.parametrize("precision", ["bfloat16", "float16", "autocast"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_half_precision_is_bit_identical_to_diffusers(family, precision):
    """`model.to(dtype)` on both sides with inputs in that dtype, or float32 models under CPU bfloat16 autocast
    (where the oneDNN linear kernel steps aside, as autocast runs PyTorch's products in bfloat16)."""
    case, config, ours, reference = default_pair(family, seed=4)
    call = case.path(config, 1)(0.6)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast")
    if precision != "autocast":
        dtype = getattr(torch, precision)
        ours, reference = ours.to(dtype), reference.to(dtype)
        call = {key: _in_dtype(value, dtype) for key, value in call.items()}
    with autocast:
        expected = case.output(reference(**call, return_dict=False))
        assert_identical(case.output(ours(**call, return_dict=False)), expected)
        if precision == "autocast" and onednn_available():
            assert_identical(case.output(ours.set_linear_kernel("onednn")(**call, return_dict=False)), expected)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_return_types_and_config_round_trip(family):
    case, config, ours, _ = default_pair(family)
    call = case.path(config, 1)(0.5)
    with torch.no_grad():
        as_tuple, as_output = ours(**call, return_dict=False), ours(**call)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert case.output((as_output.sample,)).equal(case.output(as_tuple))
    assert case.output((as_output[0],)).equal(case.output(as_tuple))
    rebuilt = type(ours).from_config({"_class_name": type(ours).__name__, **ours.config})
    assert rebuilt.config == ours.config
    with pytest.raises(ValueError, match="does not accept: \\['num_blocks'\\]"):
        type(ours).from_config({**config, "num_blocks": 3})


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradient_checkpointing_recomputes_every_block_with_the_same_gradients(family):
    case, config, model, _ = default_pair(family, seed=3)
    call = case.path(config, 1)(0.6)

    def gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        output = case.output(model(**call, return_dict=False))
        output.square().mean().backward()
        return output.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_output, plain_grads = gradients()
    calls = []

    def counting_checkpoint(block, *inputs):
        calls.append(block)
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)

    model.enable_gradient_checkpointing(counting_checkpoint)
    assert model.is_gradient_checkpointing
    checkpointed_output, checkpointed_grads = gradients()
    assert calls and all(isinstance(block, torch.nn.Module) for block in calls)
    assert len(calls) == len({id(block) for block in calls})  # each block once per forward
    torch.testing.assert_close(checkpointed_output, plain_output, rtol=0, atol=0)
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=name)
    with torch.no_grad():
        calls.clear()
        model(**call, return_dict=False)
    assert not calls  # nothing to recompute without gradients
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing
    with pytest.raises(TypeError, match="gradient_checkpointing_func must be callable"):
        model.enable_gradient_checkpointing(3)


# ---- TeaCache ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_threshold_zero_is_bit_identical_to_uncached_with_both_branches(family, dtype):
    case, config, model, _ = default_pair(family, seed=7)
    model.to(dtype)

    def path_in_dtype(seed: int):
        path = case.path(config, seed)
        return lambda sigma: {key: _in_dtype(value, dtype) for key, value in path(sigma).items()}

    paths = {False: path_in_dtype(1), True: path_in_dtype(2)}
    plain = loop(model, case, paths)
    cached = loop(model, case, paths, TeaCacheParams(teacache_thresh=0.0, coefficients=LINEAR))
    for branch in paths:
        assert all(torch.equal(a, b) for a, b in zip(plain[branch], cached[branch], strict=True))
    stats = model.teacache_stats()
    assert stats.positive.computed_steps == tuple(range(NUM_STEPS)) == stats.negative.computed_steps


def skipping_params(model, case, path, indicator: str) -> TeaCacheParams:
    """Settings on `indicator` whose threshold is above every single step's distance but below the sum of a few:
    some steps skip."""
    seen = []
    with model.add_teacache_observer(seen.append):
        loop(model, case, {False: path}, TeaCacheParams(teacache_thresh=1e9, coefficients=LINEAR, indicator=indicator))
    distances = sorted(s.distance for s in seen[1:-1])
    return TeaCacheParams(
        teacache_thresh=2.5 * distances[len(distances) // 2], coefficients=LINEAR, indicator=indicator
    )


@pytest.mark.parametrize(("family", "indicator"), indicator_cases())
def test_decisions_follow_the_rule_on_the_indicator(family, indicator):
    """The observer sees, at every step, the indicator computed by hand from the model's submodules, and the
    recorded decisions are the published rule applied to those indicators."""
    case, config, model, _ = default_pair(family, seed=8)
    path = case.path(config, 1)
    params = skipping_params(model, case, path, indicator)
    seen = []
    with model.add_teacache_observer(seen.append):
        loop(model, case, {False: path}, params)
    stats = model.teacache_stats().positive
    assert stats.skipped_steps and stats.computed_steps[0] == 0 and stats.computed_steps[-1] == NUM_STEPS - 1

    previous, accumulated, skipped = None, 0.0, []
    for step, (sigma, observed) in enumerate(zip(SIGMAS, seen, strict=True)):
        with torch.no_grad():
            by_hand = case.indicators[indicator](model, path(sigma))
        assert observed.indicator_name == indicator
        assert torch.equal(observed.indicator, by_hand), f"step {step}"
        if 0 < step < NUM_STEPS - 1:
            accumulated += evaluate_polynomial(LINEAR, relative_l1_distance(by_hand, previous).item())
            if accumulated < params.teacache_thresh:
                skipped.append(step)
            else:
                accumulated = 0.0
        previous = by_hand
    assert tuple(skipped) == stats.skipped_steps
    assert [s.step_index for s in seen if s.skipped] == skipped


@pytest.mark.parametrize(("family", "indicator"), indicator_cases())
def test_a_skipped_step_adds_the_cached_residual_to_the_stack_input(family, indicator, monkeypatch):
    """On a skipped step the embeddings and the head run on that step's inputs, and the cached stack is replaced
    by its input plus the residual of the branch's last computed step. A prelude the indicator is read after
    (Z-Image's refiners) runs too; one it is read before is skipped with the blocks."""
    case, config, model, _ = default_pair(family, seed=9)
    path = case.path(config, 1)
    params = skipping_params(model, case, path, indicator)
    before_prelude = model.teacache_indicator_for(params).before_prelude
    model.enable_teacache(params, NUM_STEPS)
    for step, sigma in enumerate(SIGMAS):
        residual = model.previous_residual
        with torch.no_grad(), model.teacache_step(step):
            output = case.output(model(**path(sigma), return_dict=False))
        if step not in model.teacache_stats().positive.skipped_steps:
            continue
        with monkeypatch.context() as patch, torch.no_grad():
            if before_prelude:
                layout = model.teacache_prelude_layout
                patch.setattr(
                    model,
                    "teacache_prelude",
                    lambda hidden_states, layout=layout, **inputs: (layout(hidden_states, **inputs), {}),
                )
            patch.setattr(model, "forward_blocks", lambda hidden_states, r=residual, **_: hidden_states + r)
            expected = case.output(model(**path(sigma), return_dict=False))  # outside a step: no cache state read
        assert torch.equal(output, expected), f"step {step}"
        with torch.no_grad():
            assert not torch.equal(output, case.output(model(**path(sigma), return_dict=False)))
    assert model.teacache_stats().positive.skipped_steps


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_branches_and_generations_keep_their_own_state(family):
    case, config, model, _ = default_pair(family, seed=10)
    paths = {False: case.path(config, 1), True: case.path(config, 2)}
    probe = []
    with model.add_teacache_observer(probe.append):
        loop(model, case, {False: paths[False]}, TeaCacheParams(teacache_thresh=1e9, coefficients=LINEAR))
    params = TeaCacheParams(teacache_thresh=3 * max(s.distance or 0.0 for s in probe), coefficients=LINEAR)

    interleaved = loop(model, case, paths, params)
    both = model.teacache_stats()
    assert both.positive.skipped_steps and both.negative.skipped_steps
    assert not torch.equal(model.previous_residual, model.previous_residual_negative)
    for branch, path in paths.items():
        alone = loop(model, case, {branch: path}, params)[branch]
        stats = model.teacache_stats()
        assert (stats.negative if branch else stats.positive) == (both.negative if branch else both.positive)
        assert all(torch.equal(a, b) for a, b in zip(alone, interleaved[branch], strict=True))
    # A new generation starts from nothing: the same loop gives the same outputs and decisions again.
    again = loop(model, case, paths, params)
    assert model.teacache_stats() == both
    for branch in paths:
        assert all(torch.equal(a, b) for a, b in zip(again[branch], interleaved[branch], strict=True))


# ---- bad input and bad architecture ------------------------------------------------------------------


def bad_input_cases() -> list[tuple[str, str]]:
    return [(family, name) for family, case in CASES.items() for name in case.tests.bad_inputs()[2]]


@pytest.mark.parametrize(("family", "case_name"), bad_input_cases())
def test_bad_input_gives_a_clear_error(family, case_name):
    config, good, cases = CASES[family].tests.bad_inputs()
    change, error, match = cases[case_name]
    model = transformer_class(family)(**config)
    with pytest.raises(error, match=match), torch.no_grad():
        model(**{**good, **change})


def bad_architecture_cases() -> list[tuple[str, int]]:
    return [(family, i) for family, case in CASES.items() for i in range(len(case.tests.BAD_ARCHITECTURE))]


@pytest.mark.parametrize(("family", "index"), bad_architecture_cases())
def test_bad_architecture_is_rejected(family, index):
    case = CASES[family]
    change, match = case.tests.BAD_ARCHITECTURE[index]
    config = case.tests.TINY
    with pytest.raises(ValueError, match=match):
        transformer_class(family)(**{**config, **change})
