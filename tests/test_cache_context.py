"""diffusers' `cache_context` on the native models, and `apply_teacache`'s choices that need no pipeline run:
shared tensors in any dtype, coefficients from the zoo or the family, and its refusals."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import diffusers
import pytest
import torch

from teacache_models import TeaCacheParams, apply_teacache, remove_teacache
from teacache_models.integrations.diffusers import native_from_diffusers, pipeline_repository
from teacache_models.models import FluxTransformer2DModel
from teacache_models.zoo import load_zoo_entry
from tests import test_flux, test_flux2, test_wan

PARAMS = TeaCacheParams(teacache_thresh=1e6, coefficients=(1.0, 0.0))


def _flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**test_flux.TINY).eval()


def _call(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_cache_context_is_a_no_op_with_teacache_off():
    model = _flux()
    inputs = test_flux.make_inputs(test_flux.TINY, 1, 4, 4, 5)
    plain = _call(model, inputs)
    with model.cache_context("cond", step_index=3, sigma=0.5, timestep=torch.tensor(500.0), num_inference_steps=9):
        assert torch.equal(_call(model, inputs), plain)
    with model.cache_context("any name"):  # only a TeaCache generation reads the name
        _call(model, inputs)
    assert model.teacache_stats().num_inference_steps is None


def test_cache_context_declares_branch_and_step():
    model = _flux()
    inputs = test_flux.make_inputs(test_flux.TINY, 1, 4, 4, 5)
    model.enable_teacache(PARAMS, num_inference_steps=4)
    # No step_index: the count of calls in each context within the generation.
    for _ in range(4):
        for name in ("cond", "uncond"):
            with model.cache_context(name):
                _call(model, inputs)
    stats = model.teacache_stats()
    for branch in (stats.positive, stats.negative):
        assert branch.computed_steps == (0, 3) and branch.skipped_steps == (1, 2)
    # step_index where given; a new generation counts from 0 again.
    model.enable_teacache(PARAMS, num_inference_steps=4)
    for step in (0, 2, 3):
        with model.cache_context("cond", step_index=step, num_inference_steps=4):
            _call(model, inputs)
    with model.cache_context("uncond"):
        _call(model, inputs)
    stats = model.teacache_stats()
    assert stats.positive.computed_steps == (0, 3) and stats.positive.skipped_steps == (2,)
    assert stats.negative.computed_steps == (0,)


def test_cache_context_refusals_with_teacache_on():
    model = _flux()
    with pytest.raises(TypeError, match="unexpected fields \\['step'\\]"), model.cache_context("cond", step=1):
        pass
    model.enable_teacache(PARAMS, num_inference_steps=4)
    with pytest.raises(ValueError, match="'uncond_stg' is not a CFG branch"), model.cache_context("uncond_stg"):
        pass
    with pytest.raises(ValueError, match="num_inference_steps=5"), model.cache_context("cond", num_inference_steps=5):
        pass
    # Inside a teacache_step context the call is already declared: cache_context leaves it alone.
    with model.teacache_step(0), model.cache_context("uncond"):
        _call(model, test_flux.make_inputs(test_flux.TINY, 1, 4, 4, 5))
    assert model.teacache_stats().positive.computed_steps == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_model_shares_the_diffusers_tensors(dtype):
    torch.manual_seed(0)
    reference = diffusers.FluxTransformer2DModel(**test_flux.TINY).to(dtype).eval()
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    native = native_from_diffusers(reference)
    assert before is None or torch.cuda.memory_allocated() == before
    ours, theirs = native.state_dict(keep_vars=True), reference.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() and ours[k].dtype == dtype for k in ours)
    assert native.dtype == dtype and native.device == reference.device and not native.training
    inputs = test_flux.make_inputs(test_flux.TINY, 1, 4, 4, 5)
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        assert torch.equal(native(**inputs).sample, reference(**inputs).sample)


class _Pipeline(SimpleNamespace):
    """What apply_teacache reads of a diffusers pipeline: its components and its config."""

    __slots__ = ("__weakref__",)


def _pipe(transformer, name_or_path=None):
    return _Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        config={"_name_or_path": name_or_path} if name_or_path else {},
    )


def _tiny_wan():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(**test_wan.TINY).eval()


def test_coefficients_from_the_zoo_for_a_known_repository_else_the_family_default():
    repo = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    fits = load_zoo_entry("wan2.1-t2v-14b").teacache_fits()
    pipe = apply_teacache(_pipe(_tiny_wan(), repo), TeaCacheParams(teacache_thresh=0.2))
    assert pipe.transformer.teacache_fits == fits
    assert pipe.transformer.teacache_schedule(TeaCacheParams(teacache_thresh=0.2))[0] == fits["temb"]
    ret = TeaCacheParams(teacache_thresh=0.2, use_ret_steps=True, indicator="timestep_proj")
    pipe = apply_teacache(_pipe(_tiny_wan(), repo), ret)
    assert pipe.transformer.teacache_schedule(ret)[0] == fits["timestep_proj"]
    # A folder of the Hugging Face cache names its repository too.
    cached = f"/cache/models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers/snapshots/{'0' * 40}"
    assert pipeline_repository(_pipe(None, cached)) == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    # Explicit coefficients win; an unknown repository takes the family's fit (FLUX.1's releases share
    # one), and Wan, whose checkpoints each have their own, has none.
    pipe = apply_teacache(_pipe(_tiny_wan(), "someone/own-wan"), PARAMS)
    assert pipe.transformer.teacache_schedule(PARAMS)[0] == (1.0, 0.0)
    torch.manual_seed(0)
    flux = apply_teacache(_pipe(diffusers.FluxTransformer2DModel(**test_flux.TINY)), TeaCacheParams(0.2))
    assert flux.transformer.teacache_fits == load_zoo_entry("flux1-dev").teacache_fits()
    # FLUX.2: [dev]'s published fit is its own; [klein] has none, so the family has none to hand a folder.
    torch.manual_seed(0)
    dev = apply_teacache(
        _pipe(diffusers.Flux2Transformer2DModel(**test_flux2.TINY), "black-forest-labs/FLUX.2-dev"), TeaCacheParams(0.2)
    )
    assert dev.transformer.teacache_fits == load_zoo_entry("flux2-dev").teacache_fits()
    klein = _pipe(diffusers.Flux2Transformer2DModel(**test_flux2.TINY), "someone/own-klein")
    with pytest.raises(ValueError, match="no TeaCache coefficients"):
        apply_teacache(klein, TeaCacheParams(0.2))
    untouched = _tiny_wan()
    pipe = _pipe(untouched, "someone/own-wan")
    with pytest.raises(ValueError, match="coefficients"):
        apply_teacache(pipe, TeaCacheParams(teacache_thresh=0.2))
    assert pipe.transformer is untouched, "a refused apply leaves the pipeline unchanged"


def test_apply_and_remove_refuse_what_they_cannot_do():
    with pytest.raises(TypeError, match="TeaCacheParams"):
        apply_teacache(_pipe(_tiny_wan()), {"teacache_thresh": 0.2})
    with pytest.raises(TypeError, match="scheduler and a transformer"):
        apply_teacache(_Pipeline(unet=torch.nn.Linear(1, 1)), PARAMS)
    with pytest.raises(TypeError, match="no native class for Linear"):
        apply_teacache(_pipe(torch.nn.Linear(1, 1)), PARAMS)
    with pytest.raises(ValueError, match="not applied"):
        remove_teacache(_pipe(_tiny_wan()))
    pipe = apply_teacache(_pipe(_tiny_wan()), PARAMS)
    apply_teacache(pipe, TeaCacheParams(teacache_thresh=0.5, coefficients=(2.0, 0.0)))  # replaces the parameters
    assert pipe.transformer.step_source.params.teacache_thresh == 0.5
    remove_teacache(pipe)
    assert type(pipe.transformer) is diffusers.WanTransformer3DModel


def test_a_failed_call_is_forgotten_and_the_step_runs_again():
    pipe = apply_teacache(_pipe(_tiny_wan()), PARAMS)
    pipe.scheduler.set_timesteps(4)
    inputs = test_wan.make_inputs(test_wan.TINY, 1, (1, 4, 4))
    broken = dict(inputs, hidden_states=inputs["hidden_states"].double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is silenced or warned on the way
        with pytest.raises(TypeError, match="dtype"), torch.no_grad():
            pipe.transformer(**broken)
        with torch.no_grad():
            pipe.transformer(**inputs)
    stats = pipe.transformer.teacache_stats()
    assert stats.num_inference_steps == 4 and stats.positive.computed_steps == (0,)
