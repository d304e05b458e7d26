"""TeaCacheParams and SamplingParams: defaults, normalisation and every rejected value."""

import copy
import dataclasses
import math
import pickle

import numpy as np
import pytest

from teacache_models import SamplingParams, TeaCacheParams
from teacache_models.params import evaluate_polynomial


def test_teacache_defaults_and_frozen():
    params = TeaCacheParams()
    assert params.teacache_thresh == 0.1
    assert params.coefficients is None
    assert (params.start_skipping, params.end_skipping, params.use_ret_steps) == (1, 1, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.teacache_thresh = 0.2  # type: ignore[misc]


@pytest.mark.parametrize(
    "coefficients",
    [[1.0, 0.0, 0.0], (2, 1), np.array([0.5, -1.5, 3.0]), [7.0]],
)
def test_coefficients_accept_any_finite_polynomial(coefficients):
    params = TeaCacheParams(coefficients=coefficients)
    assert params.coefficients == tuple(float(c) for c in list(coefficients))
    assert all(type(c) is float for c in params.coefficients)
    hash(params)  # frozen and hashable: usable as a cache key


def test_polynomial_is_highest_degree_first_like_numpy():
    coefficients = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]
    for x in (0.0, 0.013, 0.07, 0.31):
        assert math.isclose(evaluate_polynomial(coefficients, x), float(np.poly1d(coefficients)(x)), rel_tol=1e-12)


def test_teacache_normalises_numpy_values_and_survives_copies():
    params = TeaCacheParams(teacache_thresh=np.float32(0.25), start_skipping=np.int64(2), indicator=np.str_("temb"))
    assert type(params.teacache_thresh) is float and type(params.start_skipping) is int
    assert type(params.indicator) is str and repr(params.indicator) == "'temb'"
    assert pickle.loads(pickle.dumps(params)) == params == copy.deepcopy(params)
    assert params == TeaCacheParams(teacache_thresh=0.25, start_skipping=2, indicator="temb")
    with pytest.raises(ValueError, match=r"teacache_thresh must be >= 0\.0"):
        dataclasses.replace(params, teacache_thresh=-1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"teacache_thresh": -0.01}, "teacache_thresh"),
        ({"teacache_thresh": float("nan")}, "teacache_thresh"),
        ({"teacache_thresh": float("inf")}, "teacache_thresh"),
        ({"teacache_thresh": "0.1"}, "teacache_thresh"),
        ({"teacache_thresh": True}, "teacache_thresh"),
        ({"teacache_thresh": None}, "teacache_thresh"),
        ({"coefficients": []}, "coefficients"),
        ({"coefficients": ()}, "coefficients"),
        ({"coefficients": [1.0, float("nan")]}, r"coefficients\[1\]"),
        ({"coefficients": [float("inf")]}, r"coefficients\[0\]"),
        ({"coefficients": [1.0, "a"]}, r"coefficients\[1\]"),
        ({"coefficients": "1.0"}, "coefficients"),
        ({"coefficients": 1.0}, "coefficients"),
        ({"coefficients": {"a": 1.0}}, "coefficients"),
        ({"start_skipping": -1}, "start_skipping"),
        ({"start_skipping": 1.5}, "start_skipping"),
        ({"end_skipping": -2}, "end_skipping"),
        ({"end_skipping": "1"}, "end_skipping"),
        ({"use_ret_steps": 1}, "use_ret_steps"),
        ({"use_ret_steps": "yes"}, "use_ret_steps"),
        ({"indicator": ""}, "indicator"),
        ({"indicator": 3}, "indicator"),
        ({"residual_order": 2}, r"residual_order must be one of \[0, 1\]"),
        ({"residual_order": -1}, "residual_order"),
        ({"residual_order": 1.0}, "residual_order"),
        ({"residual_order": True}, "residual_order"),
        ({"max_consecutive_skips": 0}, "max_consecutive_skips"),
        ({"max_consecutive_skips": 2.5}, "max_consecutive_skips"),
        ({"max_consecutive_skips": -1}, "max_consecutive_skips"),
        ({"max_consecutive_skips": True}, "max_consecutive_skips"),
        ({"coefficients": [[1.0, 2.0]]}, r"coefficients\[0\]"),
        ({"coefficients": [None]}, r"coefficients\[0\]"),
    ],
)
def test_teacache_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TeaCacheParams(**kwargs)


def test_sampling_defaults_cover_every_field():
    params = SamplingParams()
    for item in dataclasses.fields(SamplingParams):
        assert item.default is not dataclasses.MISSING or item.default_factory is not dataclasses.MISSING
    assert isinstance(params.teacache_params, TeaCacheParams)
    assert SamplingParams(teacache_params=None).teacache_params is None


def test_sampling_carries_teacache_params():
    cache = TeaCacheParams(teacache_thresh=0.25, coefficients=[1.0, 0.0])
    params = SamplingParams(num_inference_steps=28, guidance_scale=3.5, seed=42, teacache_params=cache)
    assert params.teacache_params is cache
    assert dataclasses.replace(params, seed=7).teacache_params is cache


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 2.0}, "num_inference_steps"),
        ({"num_inference_steps": True}, "num_inference_steps"),
        ({"num_inference_steps": 10_001}, r"num_inference_steps must be an integer in \[1, 10000\], got 10001"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": "7"}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"height": 0}, "height"),
        ({"width": -8}, "width"),
        ({"width": 512.0}, "width"),
        ({"num_frames": 0}, "num_frames"),
        ({"negative_prompt": 3}, "negative_prompt"),
        ({"teacache_params": {"teacache_thresh": 0.1}}, "teacache_params"),
        ({"teacache_params": 0.1}, "teacache_params"),
        ({"cfg_truncation": 1.5}, r"cfg_truncation must be None or in \[0, 1\]"),
    ],
)
def test_sampling_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_optional_family_fields():
    params = SamplingParams(true_cfg_scale=4, guidance_scale_2=3, flow_shift=5, fps=16, cfg_truncation=0.9)
    assert params.extras() == {
        "true_cfg_scale": 4.0,
        "guidance_scale_2": 3.0,
        "flow_shift": 5.0,
        "fps": 16,
        "cfg_truncation": 0.9,
    }
    assert SamplingParams().extras() == {}
    for kwargs, message in [
        (dict(flow_shift=0), "flow_shift must be None or a number > 0"),
        (dict(flow_shift=-1), "flow_shift must be None or a number > 0, got -1"),
        (dict(cfg_normalization=-1.0), "cfg_normalization must be None or a number > 0"),
        (dict(fps=2.5), "fps must be an integer"),
        (dict(true_cfg_scale=float("nan")), "true_cfg_scale must be a finite real number"),
        (dict(guidance_scale_2="3"), "guidance_scale_2 must be a finite real number"),
    ]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: SamplingParams(steps=4),
            r"SamplingParams has no fields \['steps'\]; its fields: \['num_inference_steps'",
        ),
        (
            lambda: TeaCacheParams(thresh=0.2),
            r"TeaCacheParams has no fields \['thresh'\]; its fields: \['teacache_thresh'",
        ),
        (
            lambda: dataclasses.replace(SamplingParams(), prompt="x"),
            r"SamplingParams has no fields \['prompt'\]; its fields: \[.*'negative_prompt'",
        ),
    ],
)
def test_an_unknown_field_names_itself_and_the_fields(make, message):
    with pytest.raises(TypeError, match=message):
        make()


def test_copies_of_params_survive_the_field_check():
    import copy
    import pickle

    params = SamplingParams(num_inference_steps=3, teacache_params=TeaCacheParams(teacache_thresh=0.2))
    assert copy.deepcopy(params) == params == pickle.loads(pickle.dumps(params))
    assert dataclasses.replace(params, seed=4).seed == 4
