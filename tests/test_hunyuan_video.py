"""Native HunyuanVideo against diffusers' HunyuanVideoTransformer3DModel, and TeaCache on HunyuanVideo."""

import inspect

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel as ReferenceHunyuanVideo

from teacache_models.models.hunyuan_video import HunyuanVideoTransformer3DModel
from teacache_models.params import TeaCacheParams
from tests.tiny_configs import HUNYUAN_VIDEO_TINY
from tests.utils import assert_identical, assert_parity, load_both_ways, randomize_, zoo_fit

# The fit of the released checkpoint, from its zoo entry.
FIT = zoo_fit("hunyuanvideo")

TINY = HUNYUAN_VIDEO_TINY

CONFIGS = {
    "tiny": TINY,
    "tiny-no-guidance": dict(TINY, guidance_embeds=False),
    "patch2-deeper": dict(
        TINY,
        in_channels=5,
        out_channels=3,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=2,
        mlp_ratio=2.5,
        patch_size=2,
        patch_size_t=2,
        num_attention_heads=3,
        attention_head_dim=8,
        text_embed_dim=12,
        rope_axes_dim=(4, 2, 2),
    ),
    "patch2-spatial-layer-norm-qk": dict(TINY, patch_size=2, qk_norm="layer_norm", rope_theta=100.0),
    "fp32-layer-norm-qk-no-guidance": dict(TINY, qk_norm="fp32_layer_norm", guidance_embeds=False),
    "no-qk-norm": dict(TINY, qk_norm=None),
    "single-stream-only": dict(TINY, num_layers=0, num_single_layers=2),
    "dual-stream-only": dict(TINY, num_layers=2, num_single_layers=0, num_refiner_layers=0),
    "i2v-latent-concat": dict(TINY, in_channels=9, image_condition_type="latent_concat", guidance_embeds=False),
    "i2v-token-replace": dict(TINY, num_layers=2, num_single_layers=2, image_condition_type="token_replace"),
    "i2v-token-replace-patch2": dict(TINY, patch_size=2, patch_size_t=2, image_condition_type="token_replace"),
}

# (batch, patch grid (F', H', W'), valid text tokens per sample, text length)
CASES = {
    "one-frame-no-padding": (1, (1, 4, 4), (5,), 5),
    "frames-odd-sizes-padding": (2, (3, 3, 5), (3, 7), 9),
    "batch2-one-full-one-single": (2, (2, 2, 3), (1, 6), 6),
}


def build_pair(config: dict, seed: int = 0) -> tuple[HunyuanVideoTransformer3DModel, ReferenceHunyuanVideo]:
    reference = randomize_(ReferenceHunyuanVideo(**config), seed).eval()
    ours = HunyuanVideoTransformer3DModel(**config).eval()
    load_both_ways(ours, reference)
    ours.set_teacache_fits({"modulated_input": FIT})  # what its zoo entry hands over
    return ours, reference


def text_mask(lengths: tuple[int, ...], text_len: int) -> torch.Tensor:
    return (torch.arange(text_len)[None, :] < torch.tensor(lengths)[:, None]).long()


def make_inputs(
    config: dict,
    batch: int,
    grid: tuple[int, int, int],
    lengths: tuple[int, ...],
    text_len: int,
    seed: int = 1,
) -> dict:
    generator = torch.Generator().manual_seed(seed)
    p, p_t = config.get("patch_size", 2), config.get("patch_size_t", 1)
    frames, height, width = grid[0] * p_t, grid[1] * p, grid[2] * p
    return dict(
        hidden_states=torch.randn(batch, config["in_channels"], frames, height, width, generator=generator),
        timestep=torch.rand(batch, generator=generator) * 1000,
        encoder_hidden_states=torch.randn(batch, text_len, config["text_embed_dim"], generator=generator),
        encoder_attention_mask=text_mask(lengths, text_len),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=generator),
        guidance=torch.full((batch,), 6000.0),
    )


def outputs(ours, reference, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(name, case):
    config = CONFIGS[name]
    ours, reference = build_pair(config, seed=sorted(CONFIGS).index(name))
    inputs = make_inputs(config, *CASES[case])
    actual, expected = outputs(ours, reference, inputs)
    assert actual.shape == inputs["hidden_states"][:, : config["out_channels"]].shape
    assert_identical(actual, expected)


def test_parity_with_other_mask_forms_and_broadcast_timestep():
    """Boolean / float masks, a non-contiguous mask, and one timestep and guidance for the whole batch."""
    config = CONFIGS["patch2-deeper"]
    ours, reference = build_pair(config, seed=3)
    inputs = make_inputs(config, 2, (2, 2, 3), (4, 2), 6)
    masks = {
        "bool": inputs["encoder_attention_mask"].bool(),
        "float": inputs["encoder_attention_mask"].float(),
        # The reference attends the first sum(mask) text tokens in the blocks but uses the mask itself in
        # the refiner; the native model follows it exactly.
        "holes": torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]]),
    }
    for mask in masks.values():
        assert_identical(*outputs(ours, reference, {**inputs, "encoder_attention_mask": mask}))
    shared = {**inputs, "timestep": torch.tensor([500]), "guidance": torch.tensor([4000.0])}
    assert_identical(*outputs(ours, reference, shared))


def test_no_mask_means_every_text_token_is_valid():
    config = CONFIGS["tiny"]
    ours, _ = build_pair(config, seed=4)
    inputs = make_inputs(config, 2, (1, 3, 3), (4, 4), 4)
    with torch.no_grad():
        full = ours(**inputs, return_dict=False)[0]
        unmasked = ours(**{**inputs, "encoder_attention_mask": None}, return_dict=False)[0]
    assert torch.equal(full, unmasked)


def test_token_refiner_matches_diffusers_with_and_without_mask():
    config = CONFIGS["patch2-deeper"]
    ours, reference = build_pair(config, seed=12)
    inputs = make_inputs(config, 2, (1, 1, 1), (2, 5), 6)
    args = (inputs["encoder_hidden_states"], inputs["timestep"])
    with torch.no_grad():
        for mask in (inputs["encoder_attention_mask"], None):
            assert torch.equal(ours.context_embedder(*args, mask), reference.context_embedder(*args, mask))


def test_guidance_is_ignored_without_guidance_embedding_as_in_diffusers():
    config = CONFIGS["tiny-no-guidance"]
    ours, reference = build_pair(config, seed=5)
    inputs = make_inputs(config, 1, (1, 2, 2), (3,), 4)
    with torch.no_grad():
        without = ours(**{**inputs, "guidance": None}, return_dict=False)[0]
    actual, expected = outputs(ours, reference, inputs)
    assert torch.equal(actual, without)
    assert_identical(actual, expected)


def test_bfloat16_matches_diffusers():
    config = CONFIGS["i2v-token-replace"]
    ours, reference = build_pair(config, seed=6)
    ours, reference = ours.to(torch.bfloat16), reference.to(torch.bfloat16)
    inputs = make_inputs(config, 2, (2, 3, 3), (2, 5), 5)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    actual, expected = outputs(ours, reference, inputs)
    assert actual.dtype == torch.bfloat16
    assert_parity(actual, expected, tol=2e-2)


@pytest.mark.parametrize("method", ["__init__", "forward"])
def test_signatures_equal_diffusers(method):
    def parameters(cls):
        return [(p.name, p.default, p.kind) for p in inspect.signature(getattr(cls, method)).parameters.values()]

    assert parameters(HunyuanVideoTransformer3DModel) == parameters(ReferenceHunyuanVideo)


def test_released_config_builds_on_meta_with_the_published_size():
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel()
        reference = ReferenceHunyuanVideo()
    assert set(model.state_dict()) == set(reference.state_dict())
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e9, 1) == 12.8


# ---- TeaCache on HunyuanVideo ------------------------------------------------------------------------


def condition(config: dict, seed: int) -> dict:
    inputs = make_inputs(config, 1, (2, 3, 3), (3,), 5, seed=seed)
    for key in ("hidden_states", "timestep"):
        inputs.pop(key)
    return inputs


def denoise(model, config, num_steps, params=None, negative_prompt=False, seed=1):
    """A flow-matching Euler loop; with `negative_prompt`, true CFG with a second (negative) call per step."""
    generator = torch.Generator().manual_seed(seed)
    p = config["patch_size"]
    latents = torch.randn(1, config["in_channels"], 2, 3 * p, 3 * p, generator=generator)
    positive, negative = condition(config, seed + 1), condition(config, seed + 2)
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    if params is not None:
        model.enable_teacache(params, num_steps)
    predictions = []
    for step in range(num_steps):
        timestep = (sigmas[step] * 1000).expand(1)
        with torch.no_grad(), model.teacache_step(step):
            prediction = model(latents, timestep, **positive, return_dict=False)[0]
        if negative_prompt:
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=True):
                uncond = model(latents, timestep, **negative, return_dict=False)[0]
            prediction = uncond + 3.0 * (prediction - uncond)
        predictions.append(prediction)
        latents = latents + (sigmas[step + 1] - sigmas[step]) * prediction
    return latents, predictions


@pytest.mark.parametrize("name", ["tiny", "i2v-token-replace"])
def test_indicator_is_diffusers_block0_modulated_image_input(name):
    config = CONFIGS[name]
    ours, reference = build_pair(config, seed=7)
    inputs = make_inputs(config, 2, (2, 2, 3), (2, 4), 4)
    captured = []
    hook = reference.transformer_blocks[0].norm1.register_forward_hook(lambda m, i, out: captured.append(out[0]))
    with torch.no_grad():
        reference(**inputs)
        hook.remove()
        hidden = ours.x_embedder(inputs["hidden_states"])
        token_replace = config.get("image_condition_type") == "token_replace"
        temb, replace = ours.time_text_embed(
            inputs["timestep"], inputs["pooled_projections"], inputs["guidance"], token_replace
        )
        # Under token replace the first latent frame (2 x 3 tokens here) has its own modulation.
        indicator = ours.teacache_indicator(hidden, temb=temb, token_replace=(replace, 6) if token_replace else None)
    assert torch.equal(indicator, captured[0])


# Random weights move far more per step than trained ones, hence thresholds far above the published ones.


@pytest.mark.parametrize("name", ["tiny", "i2v-token-replace-patch2"])
def test_skipped_step_adds_the_image_residual_before_the_head(name):
    config = CONFIGS[name]
    model, _ = build_pair(config, seed=10)
    inputs = make_inputs(config, 2, (2, 2, 3), (2, 4), 4)
    timesteps = (1000.0, 990.0, 980.0)
    model.enable_teacache(TeaCacheParams(teacache_thresh=1e6), len(timesteps))
    cached = []
    for step, t in enumerate(timesteps):
        with torch.no_grad(), model.teacache_step(step):
            cached.append(model(**{**inputs, "timestep": torch.tensor([t])}, return_dict=False)[0])
            if step == 0:
                residual = model.previous_residual.clone()
    assert model.teacache_stats().positive.skipped_steps == (1,)

    # The same model with its block stack replaced by "input + step 0's image residual".
    with torch.no_grad():
        model.disable_teacache()
        model.forward_blocks = lambda hidden_states, **_: hidden_states + residual
        expected = model(**{**inputs, "timestep": torch.tensor([990.0])}, return_dict=False)[0]
        del model.forward_blocks
        uncached = model(**{**inputs, "timestep": torch.tensor([990.0])}, return_dict=False)[0]
        last = model(**{**inputs, "timestep": torch.tensor([980.0])}, return_dict=False)[0]
    assert torch.equal(cached[1], expected)
    assert not torch.equal(cached[1], uncached)
    assert torch.equal(cached[2], last)


# ---- bad input ----------------------------------------------------------------------------------------


def bad_inputs():
    config = CONFIGS["patch2-spatial-layer-norm-qk"]
    good = make_inputs(config, 2, (2, 2, 2), (2, 3), 4)
    cases = {
        "latent rank": ({"hidden_states": torch.randn(2, 4, 4, 4)}, ValueError, r"hidden_states must have shape"),
        "latent channels": ({"hidden_states": torch.randn(2, 5, 2, 4, 4)}, ValueError, r"\(B, 4, F, H, W\)"),
        "latent type": ({"hidden_states": [[1.0]]}, TypeError, "hidden_states must be a tensor"),
        "integer latents": ({"hidden_states": torch.ones(2, 4, 2, 4, 4, dtype=torch.long)}, TypeError, "floating"),
        "latent dtype": (
            {"hidden_states": torch.randn(2, 4, 2, 4, 4, dtype=torch.float64)},
            TypeError,
            r"hidden_states must have the dtype of the model's weights .*\(torch.float32\), got torch.float64",
        ),
        "empty batch": ({"hidden_states": torch.randn(0, 4, 2, 4, 4)}, ValueError, "at least one sample"),
        "odd height": ({"hidden_states": torch.randn(2, 4, 2, 5, 4)}, ValueError, "height must be .* patch size 2"),
        "odd width": ({"hidden_states": torch.randn(2, 4, 2, 4, 3)}, ValueError, "width must be .* patch size 2"),
        "text width": (
            {"encoder_hidden_states": torch.randn(2, 4, 15)},
            ValueError,
            r"encoder_hidden_states must have shape \(1\|2, L, 16\)",
        ),
        "text batch": ({"encoder_hidden_states": torch.randn(3, 4, 16)}, ValueError, "encoder_hidden_states"),
        "text missing": ({"encoder_hidden_states": None}, TypeError, "encoder_hidden_states"),
        "text dtype": (
            {"encoder_hidden_states": torch.randn(2, 4, 16, dtype=torch.bfloat16)},
            TypeError,
            "encoder_hidden_states must have the dtype",
        ),
        "mask shape": ({"encoder_attention_mask": torch.ones(2, 5)}, ValueError, r"must have shape \(2, 4\)"),
        "mask rank": ({"encoder_attention_mask": torch.ones(2, 1, 4)}, ValueError, "encoder_attention_mask"),
        "mask values": ({"encoder_attention_mask": torch.full((2, 4), 0.5)}, ValueError, "only 0 and 1"),
        "empty mask row": ({"encoder_attention_mask": torch.tensor([[1, 1, 0, 0], [0] * 4])}, ValueError, "at least"),
        "mask type": ({"encoder_attention_mask": [[1, 1, 1, 1]] * 2}, TypeError, "encoder_attention_mask"),
        "pooled width": (
            {"pooled_projections": torch.randn(2, 7)},
            ValueError,
            r"pooled_projections must have shape \(1\|2, 8\)",
        ),
        "pooled dtype": (
            {"pooled_projections": torch.randn(2, 8, dtype=torch.float64)},
            TypeError,
            "pooled_projections must have the dtype",
        ),
        "guidance missing": ({"guidance": None}, ValueError, "guidance is required"),
        "complex guidance": ({"guidance": torch.ones(2, dtype=torch.complex64)}, TypeError, "guidance must be a real"),
        "guidance shape": ({"guidance": torch.ones(3)}, ValueError, r"guidance must have shape"),
        "timestep shape": ({"timestep": torch.rand(2, 1)}, ValueError, "timestep must have shape"),
        "timestep missing": ({"timestep": None}, TypeError, "timestep"),
        "boolean timestep": ({"timestep": torch.tensor([True, False])}, TypeError, "timestep must be a real tensor"),
        "attention kwargs": ({"attention_kwargs": {"ip_adapter_masks": None}}, ValueError, "attention_kwargs"),
        "attention kwargs type": ({"attention_kwargs": [("scale", 0.5)]}, TypeError, "attention_kwargs must be"),
    }
    return config, good, cases


def test_frames_not_divisible_by_the_temporal_patch():
    model = HunyuanVideoTransformer3DModel(**CONFIGS["i2v-token-replace-patch2"])
    inputs = make_inputs(CONFIGS["i2v-token-replace-patch2"], 1, (1, 2, 2), (2,), 3)
    with pytest.raises(ValueError, match=r"frames must be .* patch size 2"):
        model(**{**inputs, "hidden_states": torch.randn(1, 4, 3, 4, 4)})


# Constructor changes to the default config, each refused with a ValueError matching its pattern.
BAD_ARCHITECTURE = [
    ({"rope_axes_dim": (2, 4, 2)}, "must sum to attention_head_dim"),
    ({"rope_axes_dim": (2, 3, 5)}, "even"),
    ({"rope_axes_dim": (2, 8)}, "3 even integers"),
    ({"qk_norm": "rms_norm_across_heads"}, "qk_norm"),
    ({"image_condition_type": "concat"}, "image_condition_type"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"patch_size_t": 0}, "patch_size_t"),
    ({"in_channels": 2.5}, "in_channels"),
    ({"num_refiner_layers": -1}, "num_refiner_layers"),
    ({"out_channels": 0}, "out_channels"),
    ({"mlp_ratio": 0}, "mlp_ratio"),
    ({"guidance_embeds": "yes"}, "guidance_embeds"),
]


@torch.no_grad()
@pytest.mark.parametrize("kwargs", [{}, {"scale": 1.0}, {"scale": 0.5}])
def test_a_lora_scale_alone_is_accepted_and_has_no_effect(kwargs):
    config = CONFIGS["tiny"]
    ours, reference = build_pair(config, seed=6)
    inputs = make_inputs(config, 2, (1, 2, 2), (3, 2), 4)
    expected = reference(**inputs, attention_kwargs=dict(kwargs), return_dict=False)[0]
    actual = ours(**inputs, attention_kwargs=dict(kwargs), return_dict=False)[0]
    assert torch.equal(actual, ours(**inputs, return_dict=False)[0])
    assert_identical(actual, expected)
