"""Native Flux against diffusers' FluxTransformer2DModel, and TeaCache on Flux."""

import pytest
import torch
from diffusers import FluxTransformer2DModel as ReferenceFlux

from teacache_models import TeaCacheParams
from teacache_models.models import FluxTransformer2DModel
from tests.utils import assert_identical, assert_parity, load_both_ways, randomize_, zoo_fit

# The fit of the released checkpoint, from its zoo entry.
FIT = zoo_fit("flux1-dev")

TINY = dict(
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 4, 8),
)

CONFIGS = {
    "tiny-guidance": dict(TINY, guidance_embeds=True),
    "tiny-schnell": dict(TINY, guidance_embeds=False),
    "deeper-odd-heads": dict(
        in_channels=6,
        out_channels=3,
        patch_size=2,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=8,
        num_attention_heads=3,
        joint_attention_dim=20,
        pooled_projection_dim=12,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ),
    "single-stream-only": dict(TINY, num_layers=0, num_single_layers=2, guidance_embeds=False),
    "dual-stream-only": dict(TINY, num_layers=2, num_single_layers=0, guidance_embeds=True),
    # diffusers accepts a RoPE axis of 0 channels: its position ids then have no effect.
    "zero-channel-rope-axis": dict(TINY, axes_dims_rope=(0, 8, 8), guidance_embeds=True),
}


def build_pair(config: dict, seed: int = 0) -> tuple[FluxTransformer2DModel, ReferenceFlux]:
    reference = randomize_(ReferenceFlux(**config), seed).eval()
    ours = FluxTransformer2DModel(**config).eval()
    load_both_ways(ours, reference)
    ours.set_teacache_fits({"modulated_input": FIT})  # what its zoo entry hands over
    return ours, reference


def image_ids(height: int, width: int) -> torch.Tensor:
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def make_inputs(config: dict, batch: int, height: int, width: int, text_len: int, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(batch, height * width, config["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(batch, text_len, config["joint_attention_dim"], generator=generator),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=generator),
        timestep=torch.rand(batch, generator=generator),
        img_ids=image_ids(height, width),
        txt_ids=torch.zeros(text_len, 3),
    )
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(("batch", "height", "width", "text_len"), [(1, 4, 4, 5), (2, 3, 5, 7), (2, 1, 7, 1)])
def test_parity_with_diffusers(name, batch, height, width, text_len):
    config = CONFIGS[name]
    ours, reference = build_pair(config, seed=hash((name, batch, height)) % 1000)
    inputs = make_inputs(config, batch, height, width, text_len)
    expected = reference(**inputs, return_dict=False)[0]
    actual = ours(**inputs, return_dict=False)[0]
    assert_identical(actual, expected)


@torch.no_grad()
def test_parity_with_random_position_ids_and_broadcast_timestep():
    config = CONFIGS["tiny-guidance"]
    ours, reference = build_pair(config, seed=3)
    inputs = make_inputs(config, 2, 3, 3, 4)
    inputs["img_ids"] = torch.randn(9, 3) * 7
    inputs["txt_ids"] = torch.randn(4, 3)
    assert_identical(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])
    # A timestep and guidance of shape (1,) for a batch of 2: the embeddings' matrix products run on other
    # shapes than diffusers', so the output equals its to float32 rounding, not bit for bit.
    inputs["timestep"] = torch.tensor([0.37])
    inputs["guidance"] = torch.tensor([4.0])
    assert_parity(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0], tol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("form", ["lists", "stacked tensor", "broadcast shapes"])
def test_parity_with_controlnet_residuals(form):
    config = CONFIGS["deeper-odd-heads"]
    ours, reference = build_pair(config, seed=4)
    inputs = make_inputs(config, 2, 3, 4, 5)
    generator = torch.Generator().manual_seed(9)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if form == "lists":
        inputs["controlnet_block_samples"] = [torch.randn(2, 12, width, generator=generator)]
        inputs["controlnet_single_block_samples"] = [torch.randn(2, 12, width, generator=generator) for _ in range(2)]
    elif form == "stacked tensor":  # diffusers indexes it like a list
        inputs["controlnet_block_samples"] = torch.randn(2, 2, 12, width, generator=generator)
        inputs["controlnet_single_block_samples"] = torch.randn(3, 2, 12, width, generator=generator)
    else:
        inputs["controlnet_block_samples"] = [torch.randn(1, 12, width, generator=generator)]
        inputs["controlnet_single_block_samples"] = [torch.randn(12, 1, generator=generator)]
    for repeat in (False, True):
        expected = reference(**inputs, controlnet_blocks_repeat=repeat, return_dict=False)[0]
        assert_identical(ours(**inputs, controlnet_blocks_repeat=repeat, return_dict=False)[0], expected)


@torch.no_grad()
def test_controlnet_residuals_of_an_empty_block_stack_are_ignored():
    config = CONFIGS["single-stream-only"]
    ours, reference = build_pair(config, seed=4)
    inputs = make_inputs(config, 1, 2, 2, 3)
    inputs["controlnet_block_samples"] = []  # diffusers never reads it without dual-stream blocks
    assert_identical(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])


@torch.no_grad()
@pytest.mark.parametrize("kwargs", [{}, {"scale": 1.0}, {"scale": 0.5}])
def test_a_lora_scale_alone_is_accepted_and_has_no_effect(kwargs):
    config = CONFIGS["tiny-guidance"]
    ours, reference = build_pair(config, seed=6)
    inputs = make_inputs(config, 2, 2, 3, 4)
    expected = reference(**inputs, joint_attention_kwargs=dict(kwargs), return_dict=False)[0]
    actual = ours(**inputs, joint_attention_kwargs=dict(kwargs), return_dict=False)[0]
    assert torch.equal(actual, ours(**inputs, return_dict=False)[0])
    assert_identical(actual, expected)


@torch.no_grad()
def test_deprecated_batched_ids_are_accepted_with_a_warning():
    config = CONFIGS["tiny-schnell"]
    ours, reference = build_pair(config)
    inputs = make_inputs(config, 1, 2, 2, 3)
    inputs["img_ids"] = inputs["img_ids"][None]
    inputs["txt_ids"] = inputs["txt_ids"][None]
    with pytest.warns(FutureWarning) as caught:
        actual = ours(**inputs, return_dict=False)[0]
    assert sorted(str(w.message).split()[3] for w in caught) == ["img_ids", "txt_ids"]
    assert_identical(actual, reference(**inputs, return_dict=False)[0])


@torch.no_grad()
def test_bfloat16_matches_diffusers():
    config = CONFIGS["tiny-guidance"]
    ours, reference = build_pair(config, seed=5)
    ours, reference = ours.to(torch.bfloat16), reference.to(torch.bfloat16)
    inputs = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in make_inputs(config, 2, 3, 3, 4).items()
    }
    expected = reference(**inputs, return_dict=False)[0]
    actual = ours(**inputs, return_dict=False)[0]
    assert actual.dtype == torch.bfloat16
    assert_parity(actual, expected, tol=2e-2)


def test_released_configs_build_on_meta_with_the_published_size():
    dev = dict(guidance_embeds=True)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**dev)
        reference = ReferenceFlux(**dev)
    assert set(model.state_dict()) == set(reference.state_dict())
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e9, 1) == 11.9


def test_from_config_rejects_unknown_keys_and_other_classes():
    with pytest.raises(ValueError, match="does not accept: \\['num_blocks'\\]"):
        FluxTransformer2DModel.from_config({**TINY, "num_blocks": 3})
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        FluxTransformer2DModel.from_config({"_class_name": "WanTransformer3DModel", **TINY})


# ---- TeaCache on Flux ------------------------------------------------------------------------------


def denoise(model, config, num_steps, params=None, negative_prompt=False, seed=1):
    """A flow-matching Euler loop over random conditioning; optional true-CFG negative branch."""
    inputs = make_inputs(config, 1, 4, 4, 5, seed=seed)
    negative_inputs = make_inputs(config, 1, 4, 4, 5, seed=seed + 100)
    negative_inputs.pop("hidden_states")
    latents = inputs.pop("hidden_states")
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    if params is not None:
        model.enable_teacache(params, num_steps)
    predictions = []
    for step in range(num_steps):
        timestep = sigmas[step].expand(1)
        with torch.no_grad(), model.teacache_step(step):
            prediction = model(hidden_states=latents, **{**inputs, "timestep": timestep}, return_dict=False)[0]
        if negative_prompt:
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=True):
                negative = model(hidden_states=latents, **{**negative_inputs, "timestep": timestep}, return_dict=False)
            prediction = negative[0] + 2.0 * (prediction - negative[0])
        predictions.append(prediction)
        latents = latents + (sigmas[step + 1] - sigmas[step]) * prediction
    return latents, predictions


# Random weights move far more per step than trained ones, hence thresholds far above the published ones.


def test_flux_skipped_step_reuses_the_residual_through_the_head():
    config = CONFIGS["tiny-schnell"]
    model, _ = build_pair(config, seed=9)
    inputs = make_inputs(config, 1, 4, 4, 5)
    model.enable_teacache(TeaCacheParams(teacache_thresh=100.0), 3)
    outputs = []
    for step, sigma in enumerate((1.0, 0.9, 0.8)):
        with torch.no_grad(), model.teacache_step(step):
            outputs.append(model(**{**inputs, "timestep": torch.tensor([sigma])}, return_dict=False)[0])
            if step == 0:
                residual = model.previous_residual.clone()
    assert model.teacache_stats().positive.skipped_steps == (1,)
    with torch.no_grad():
        hidden = model.x_embedder(inputs["hidden_states"])
        temb = model.time_text_embed(torch.tensor([900.0]), None, inputs["pooled_projections"])
        expected = model.proj_out(model.norm_out(hidden + residual, temb))
    torch.testing.assert_close(outputs[1], expected, rtol=0, atol=0)


def test_flux_rejects_ret_steps():
    model = FluxTransformer2DModel(**CONFIGS["tiny-guidance"])
    with pytest.raises(ValueError, match="use_ret_steps"):
        model.enable_teacache(TeaCacheParams(use_ret_steps=True), 10)


# ---- bad input ------------------------------------------------------------------------------------


def bad_inputs():
    config = CONFIGS["tiny-guidance"]
    good = make_inputs(config, 2, 2, 3, 4)
    cases = {
        "hidden_states rank": (
            {"hidden_states": good["hidden_states"][0]},
            ValueError,
            "hidden_states must have shape",
        ),
        "hidden_states width": ({"hidden_states": torch.randn(2, 6, 5)}, ValueError, r"\(B, L, 4\)"),
        "hidden_states type": ({"hidden_states": [[1.0]]}, TypeError, "hidden_states must be a tensor"),
        "integer latents": ({"hidden_states": torch.ones(2, 6, 4, dtype=torch.long)}, TypeError, "floating"),
        "text width": ({"encoder_hidden_states": torch.randn(2, 4, 31)}, ValueError, "encoder_hidden_states"),
        "text batch": ({"encoder_hidden_states": torch.randn(3, 4, 32)}, ValueError, r"\(1\|2, L, 32\)"),
        "text missing": ({"encoder_hidden_states": None}, TypeError, "encoder_hidden_states"),
        "pooled shape": ({"pooled_projections": torch.randn(2, 31)}, ValueError, "pooled_projections"),
        "guidance missing": ({"guidance": None}, ValueError, "guidance is required"),
        "timestep shape": ({"timestep": torch.rand(3)}, ValueError, "timestep must have shape"),
        "timestep missing": ({"timestep": None}, TypeError, "timestep"),
        "img_ids length": ({"img_ids": torch.zeros(5, 3)}, ValueError, r"img_ids must have shape \(6, 3\)"),
        "txt_ids axes": ({"txt_ids": torch.zeros(4, 2)}, ValueError, r"txt_ids must have shape \(4, 3\)"),
        "ids missing": ({"img_ids": None}, TypeError, "img_ids"),
        "attention kwargs": (
            {"joint_attention_kwargs": {"scale": 0.5, "ip_adapter_image_embeds": torch.ones(1)}},
            ValueError,
            "joint_attention_kwargs",
        ),
        "attention kwargs type": ({"joint_attention_kwargs": [("scale", 1.0)]}, TypeError, "must be None or a dict"),
        "hidden_states dtype": ({"hidden_states": torch.randn(2, 6, 4).double()}, TypeError, "hidden_states.*float32"),
        "text dtype": ({"encoder_hidden_states": torch.randn(2, 4, 32).half()}, TypeError, "encoder_hidden_states"),
        "pooled dtype": ({"pooled_projections": torch.randn(2, 32).bfloat16()}, TypeError, "pooled_projections"),
        "controlnet empty": ({"controlnet_block_samples": []}, ValueError, "controlnet_block_samples must be None"),
        "controlnet single empty": ({"controlnet_single_block_samples": ()}, ValueError, "controlnet_single_block"),
        "controlnet shape": (
            {"controlnet_block_samples": [torch.randn(2, 7, 32)]},
            ValueError,
            r"controlnet_block_samples\[0\] must broadcast to \(2, 6, 32\), got \(2, 7, 32\)",
        ),
        "controlnet single batch": (
            {"controlnet_single_block_samples": [torch.randn(2, 6, 32), torch.randn(3, 6, 32)]},
            ValueError,
            r"controlnet_single_block_samples\[1\]",
        ),
        "controlnet item": ({"controlnet_block_samples": [0.5]}, TypeError, "must be a tensor"),
        "controlnet dtype": (
            {"controlnet_block_samples": [torch.randn(2, 6, 32).double()]},
            TypeError,
            "must not promote",
        ),
    }
    return config, good, cases


def test_guidance_on_a_model_without_guidance_embedding():
    config = CONFIGS["tiny-schnell"]
    model = FluxTransformer2DModel(**config)
    inputs = make_inputs(config, 1, 2, 2, 3)
    with pytest.raises(ValueError, match="guidance must be None"):
        model(**inputs, guidance=torch.tensor([3.5]))


# Constructor changes to the default config, each refused with a ValueError matching its pattern.
BAD_ARCHITECTURE = [
    ({"axes_dims_rope": (4, 4, 4)}, "must sum to attention_head_dim"),
    ({"axes_dims_rope": (3, 5, 8)}, "even"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"in_channels": 2.5}, "in_channels"),
    ({"num_layers": -1}, "num_layers"),
    ({"out_channels": 0}, "out_channels"),
]
