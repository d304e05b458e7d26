"""Native HunyuanVideo-1.5 against diffusers' HunyuanVideo15Transformer3DModel, and TeaCache on it."""

import inspect

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel as Reference

from teacache_models.models import HunyuanVideo15Transformer3DModel
from teacache_models.params import TeaCacheParams
from tests.tiny_configs import HUNYUAN_VIDEO15_TINY
from tests.tiny_configs import hunyuan_video15_inputs as make_inputs
from tests.utils import load_both_ways, randomize_

TINY = HUNYUAN_VIDEO15_TINY

CONFIGS = {
    "tiny": TINY,
    "patch2-layer-norm-qk-deeper": dict(
        TINY,
        in_channels=9,
        out_channels=4,
        num_layers=3,
        num_refiner_layers=2,
        mlp_ratio=2.5,
        patch_size=2,
        patch_size_t=2,
        num_attention_heads=3,
        attention_head_dim=8,
        qk_norm="layer_norm",
        rope_axes_dim=(4, 2, 2),
        rope_theta=100.0,
    ),
    "fp32-layer-norm-qk-t2v": dict(TINY, qk_norm="fp32_layer_norm", task_type="t2v", target_size=960),
    "meanflow-step-distilled": dict(TINY, use_meanflow=True),
    "no-refiner": dict(TINY, num_refiner_layers=0),
}

# (batch, patch grid (F', H', W'), valid text tokens, text length, valid glyph tokens, glyph length,
#  image tokens, image-to-video?)
CASES = {
    "one-frame-i2v-no-padding": (1, (1, 4, 4), (5,), 5, (2,), 2, 3, True),
    "batch2-odd-t2v-padding": (2, (3, 3, 5), (3, 7), 9, (0, 4), 6, 4, False),
    "batch2-i2v-glyph-padding": (2, (2, 2, 3), (1, 6), 6, (3, 0), 5, 2, True),
}


def build_pair(config: dict, seed: int = 0) -> tuple[HunyuanVideo15Transformer3DModel, Reference]:
    reference = randomize_(Reference(**config), seed).eval()
    ours = HunyuanVideo15Transformer3DModel(**config).eval()
    load_both_ways(ours, reference)
    return ours, reference


def outputs(ours, reference, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("case", list(CASES))
def test_bit_identical_to_diffusers(name, case):
    config = CONFIGS[name]
    ours, reference = build_pair(config, seed=sorted(CONFIGS).index(name))
    inputs = make_inputs(config, *CASES[case])
    actual, expected = outputs(ours, reference, inputs)
    assert actual.shape == inputs["hidden_states"][:, : config["out_channels"]].shape
    assert torch.isfinite(expected).all()
    assert torch.equal(actual, expected)


def test_bit_identical_with_other_mask_forms_and_one_timestep():
    """Boolean / float masks, masks with holes, one timestep for the whole batch, and no timestep_r on a
    MeanFlow model."""
    config = CONFIGS["meanflow-step-distilled"]
    ours, reference = build_pair(config, seed=3)
    inputs = make_inputs(config, *CASES["batch2-i2v-glyph-padding"])
    changes = [
        {"encoder_attention_mask": inputs["encoder_attention_mask"].bool()},
        {"encoder_attention_mask": inputs["encoder_attention_mask"].float()},
        {"encoder_attention_mask_2": inputs["encoder_attention_mask_2"].bool()},
        # The refiner reads the mask itself; the blocks see each sample's valid tokens first.
        {"encoder_attention_mask": torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]])},
        {"encoder_attention_mask_2": torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 1]])},
        {"timestep": torch.tensor([500.0]), "timestep_r": torch.tensor([450.0])},
        {"timestep_r": None},
        # No valid text token in a row (an empty prompt after the template crop): the stream is zeroed.
        {"encoder_attention_mask": torch.tensor([[0] * 6, [1, 1, 0, 0, 0, 0]])},
    ]
    for change in changes:
        actual, expected = outputs(ours, reference, {**inputs, **change})
        assert torch.equal(actual, expected), change


def test_padding_values_do_not_reach_the_output():
    config = CONFIGS["tiny"]
    ours, _ = build_pair(config, seed=4)
    inputs = make_inputs(config, *CASES["batch2-odd-t2v-padding"])
    text, glyph = inputs["encoder_hidden_states"].clone(), inputs["encoder_hidden_states_2"].clone()
    text[0, 3:] = 100.0
    glyph[0] = -50.0  # sample 0 has no glyph text
    with torch.no_grad():
        plain = ours(**inputs, return_dict=False)[0]
        changed = {**inputs, "encoder_hidden_states": text, "encoder_hidden_states_2": glyph}
        changed = ours(**changed, return_dict=False)[0]
    assert torch.equal(plain, changed)


@pytest.mark.parametrize("method", ["__init__", "forward"])
def test_signatures_equal_diffusers(method):
    def parameters(cls):
        signature = inspect.signature(getattr(cls, method))
        return [(p.name, p.default) for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]

    assert parameters(HunyuanVideo15Transformer3DModel) == parameters(Reference)


def test_released_config_builds_on_meta_with_the_published_size():
    """The diffusers defaults are the released 480p/720p configuration: 8.3B parameters (model card)."""
    with torch.device("meta"):
        ours = HunyuanVideo15Transformer3DModel()
        reference = Reference()
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e9, 1) == 8.3


def test_no_preset_coefficients():
    model = HunyuanVideo15Transformer3DModel(**TINY)
    assert model.teacache_fits == {}
    with pytest.raises(ValueError, match="no TeaCache coefficients for indicator 'modulated_input'"):
        model.enable_teacache(TeaCacheParams(teacache_thresh=0.1), 10)


# ---- TeaCache on HunyuanVideo-1.5 --------------------------------------------------------------------


def test_indicator_is_diffusers_block0_modulated_image_input():
    config = CONFIGS["patch2-layer-norm-qk-deeper"]
    ours, reference = build_pair(config, seed=7)
    inputs = make_inputs(config, *CASES["batch2-i2v-glyph-padding"])
    captured = []
    hook = reference.transformer_blocks[0].norm1.register_forward_hook(lambda m, i, out: captured.append(out[0]))
    with torch.no_grad():
        reference(**inputs)
        hook.remove()
        temb = ours.time_embed(inputs["timestep"])
        indicator = ours.teacache_indicator(ours.x_embedder(inputs["hidden_states"]), temb=temb)
    assert torch.equal(indicator, captured[0])


def denoise(model, config, num_steps, params=None, negative_prompt=False, seed=1):
    """A flow-matching Euler loop; with `negative_prompt`, CFG with a second (negative) call per step."""
    generator = torch.Generator().manual_seed(seed)
    positive = make_inputs(config, *CASES["batch2-i2v-glyph-padding"], seed=seed + 1)
    negative = make_inputs(config, *CASES["batch2-i2v-glyph-padding"], seed=seed + 2)
    latents = torch.randn(positive["hidden_states"].shape, generator=generator)
    for inputs in (positive, negative):
        for key in ("hidden_states", "timestep"):
            inputs.pop(key)
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    if params is not None:
        model.enable_teacache(params, num_steps)
    for step in range(num_steps):
        timestep = (sigmas[step] * 1000).expand(2)
        with torch.no_grad(), model.teacache_step(step):
            prediction = model(latents, timestep, **positive, return_dict=False)[0]
        if negative_prompt:
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=True):
                uncond = model(latents, timestep, **negative, return_dict=False)[0]
            prediction = uncond + 3.0 * (prediction - uncond)
        # The prediction covers the noisy channels only; the condition channels stay as they are.
        noisy = latents[:, : config["out_channels"]] + (sigmas[step + 1] - sigmas[step]) * prediction
        latents = torch.cat([noisy, latents[:, config["out_channels"] :]], dim=1)
    return latents


def test_skipped_step_adds_the_image_residual_and_branches_keep_their_own_state():
    config = CONFIGS["tiny"]
    model, _ = build_pair(config, seed=10)
    model.enable_teacache(TeaCacheParams(teacache_thresh=1e6, coefficients=[1.0, 0.0]), 3)
    inputs = make_inputs(config, *CASES["batch2-i2v-glyph-padding"])
    negative = {**inputs, "encoder_hidden_states": torch.randn_like(inputs["encoder_hidden_states"])}
    cached = {False: [], True: []}
    for step, t in enumerate((1000.0, 990.0, 980.0)):
        for branch, condition in ((False, inputs), (True, negative)):
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=branch):
                cached[branch].append(model(**{**condition, "timestep": torch.tensor([t])}, return_dict=False)[0])
        if step == 0:
            residual, residual_negative = model.previous_residual.clone(), model.previous_residual_negative.clone()
    stats = model.teacache_stats()
    assert stats.positive.skipped_steps == (1,) == stats.negative.skipped_steps
    assert not torch.equal(residual, residual_negative)
    model.disable_teacache()

    with torch.no_grad():
        model.forward_blocks = lambda hidden_states, **_: hidden_states + residual_negative
        expected = model(**{**negative, "timestep": torch.tensor([990.0])}, return_dict=False)[0]
        del model.forward_blocks
        uncached = model(**{**negative, "timestep": torch.tensor([990.0])}, return_dict=False)[0]
    assert torch.equal(cached[True][1], expected)
    assert not torch.equal(cached[True][1], uncached)


# ---- bad input ----------------------------------------------------------------------------------------


def bad_inputs():
    config = CONFIGS["tiny"]
    good = make_inputs(config, *CASES["batch2-i2v-glyph-padding"])
    cases = {
        "latent channels": ({"hidden_states": torch.randn(2, 4, 2, 2, 3)}, ValueError, r"\(B, 5, F, H, W\)"),
        "image missing": ({"image_embeds": None}, ValueError, "image_embeds is required"),
        "glyph missing": ({"encoder_hidden_states_2": None}, ValueError, "encoder_hidden_states_2 is required"),
        "glyph width": ({"encoder_hidden_states_2": torch.randn(2, 5, 7)}, ValueError, r"\(2, L, 8\)"),
        "glyph mask missing": ({"encoder_attention_mask_2": None}, TypeError, "encoder_attention_mask_2"),
        "glyph mask shape": ({"encoder_attention_mask_2": torch.ones(2, 4)}, ValueError, r"shape \(2, 5\)"),
        "glyph mask values": ({"encoder_attention_mask_2": torch.full((2, 5), 0.5)}, ValueError, "only 0 and 1"),
        "image width": ({"image_embeds": torch.randn(2, 2, 11)}, ValueError, r"image_embeds must have shape"),
        "image dtype": ({"image_embeds": torch.randn(2, 2, 12, dtype=torch.float64)}, TypeError, "image_embeds"),
        "text mask values": ({"encoder_attention_mask": torch.full((2, 6), 2)}, ValueError, "only 0 and 1"),
        "text mask shape": ({"encoder_attention_mask": torch.ones(2, 1, 6)}, ValueError, "encoder_attention_mask"),
        "timestep_r without meanflow": ({"timestep_r": torch.ones(2)}, ValueError, "use_meanflow"),
        "attention kwargs": ({"attention_kwargs": {"ip_adapter_masks": None}}, ValueError, "attention_kwargs"),
    }
    return config, good, cases


# Constructor changes to the default config, each refused with a ValueError matching its pattern.
BAD_ARCHITECTURE = [
    ({"rope_axes_dim": (2, 4, 2)}, "must sum to attention_head_dim"),
    ({"qk_norm": None}, "qk_norm"),
    ({"task_type": "ti2v"}, "task_type"),
    ({"use_meanflow": 1}, "use_meanflow"),
    ({"image_embed_dim": 0}, "image_embed_dim"),
    ({"num_layers": -1}, "num_layers"),
]


@torch.no_grad()
@pytest.mark.parametrize("kwargs", [{}, {"scale": 0.5}])
def test_a_lora_scale_alone_is_accepted_and_has_no_effect(kwargs):
    config = CONFIGS["tiny"]
    ours, reference = build_pair(config, seed=6)
    inputs = make_inputs(config, *CASES["one-frame-i2v-no-padding"])
    expected = reference(**inputs, attention_kwargs=dict(kwargs), return_dict=False)[0]
    assert torch.equal(ours(**inputs, attention_kwargs=dict(kwargs), return_dict=False)[0], expected)
