"""Native Wan 2.1 / 2.2 against diffusers' WanTransformer3DModel, TeaCache on Wan, and the Wan2.2 expert pair."""

import inspect

import pytest
import torch
from diffusers import WanTransformer3DModel as ReferenceWan

from teacache_models import TeaCacheParams
from teacache_models.models.base import Transformer2DModelOutput
from teacache_models.models.wan import WanTransformer3DModel
from teacache_models.models.wan_experts import WanExpertPair
from teacache_models.zoo import load_zoo_entry
from tests.tiny_configs import WAN_I2V, WAN_TINY
from tests.utils import assert_parity, load_both_ways, randomize_

TINY, I2V = WAN_TINY, WAN_I2V

CONFIGS = {
    "t2v": TINY,
    "odd-widths-no-cross-norm": dict(
        TINY,
        num_attention_heads=3,
        attention_head_dim=10,
        in_channels=5,
        out_channels=6,
        text_dim=12,
        freq_dim=17,
        ffn_dim=20,
        num_layers=1,
        cross_attn_norm=False,
        qk_norm=None,
        eps=1e-5,
    ),
    "temporal-patch": dict(TINY, patch_size=(2, 1, 1), attention_head_dim=8, out_channels=None, num_layers=3),
    "i2v": I2V,
    "flf2v": dict(I2V, pos_embed_seq_len=6),
    "clip-tokens-in-text-context": dict(TINY, image_dim=20),
}
# (batch, post-patch frames, height, width): the models.md latents, then batch 2 with one frame and odd sizes.
GRIDS = [(1, 2, 8, 8), (2, 1, 3, 3), (2, 3, 2, 5)]
NO_LAYERS = dict(TINY, num_layers=0)


def build_pair(config: dict, seed: int = 0) -> tuple[WanTransformer3DModel, ReferenceWan]:
    """Random weights in the reference, copied into ours (the RoPE tables are derived, not randomised)."""
    reference = randomize_(ReferenceWan(**config), seed).eval()
    ours = WanTransformer3DModel(**config).eval()
    load_both_ways(ours, reference)
    return ours, reference


def build(config: dict, seed: int = 0) -> WanTransformer3DModel:
    return build_pair(config, seed)[0]


def make_inputs(config: dict, batch: int, grid: tuple[int, int, int], text_len: int = 7, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    patch = config.get("patch_size", (1, 2, 2))
    sizes = [g * p for g, p in zip(grid, patch, strict=True)]
    if config.get("added_kv_proj_dim") is not None:
        text_len = 512
    inputs = dict(
        hidden_states=torch.randn(batch, config["in_channels"], *sizes, generator=generator),
        timestep=torch.rand(batch, generator=generator) * 1000,
        encoder_hidden_states=torch.randn(batch, text_len, config["text_dim"], generator=generator),
    )
    if config.get("image_dim") is not None:
        pairs = config.get("pos_embed_seq_len") is not None
        image_batch, image_len = (2 * batch, config["pos_embed_seq_len"] // 2) if pairs else (batch, 5)
        inputs["encoder_hidden_states_image"] = torch.randn(
            image_batch, image_len, config["image_dim"], generator=generator
        )
    return inputs


def per_token_timestep(batch: int, grid: tuple[int, int, int], t: float = 700.0) -> torch.Tensor:
    """Wan2.2 TI2V: the first (conditioning) frame's tokens carry timestep 0, the others t."""
    frames, height, width = grid
    timestep = torch.full((batch, frames * height * width), t)
    timestep[:, : height * width] = 0.0
    return timestep


def keep_in_fp32_cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """What diffusers' loader does with torch_dtype: every parameter to dtype unless a name segment is kept."""
    keep = model._keep_in_fp32_modules
    for name, parameter in model.named_parameters():
        if not any(segment in keep for segment in name.split(".")):
            parameter.data = parameter.data.to(dtype)
    return model


# ---- parity with diffusers ---------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", GRIDS, ids=lambda s: "x".join(map(str, s)))
def test_parity_with_diffusers(name, shape):
    config = CONFIGS[name]
    ours, reference = build_pair(config, seed=sum(map(ord, name)) + shape[2])
    inputs = make_inputs(config, shape[0], shape[1:])
    expected = reference(**inputs, return_dict=False)[0]
    actual = ours(**inputs, return_dict=False)[0]
    assert actual.shape == inputs["hidden_states"].shape[:1] + expected.shape[1:]
    assert_parity(actual, expected)
    assert torch.equal(actual, expected)


@torch.no_grad()
@pytest.mark.parametrize("name", ["t2v", "temporal-patch", "i2v"])
def test_per_token_timesteps_match_diffusers(name):
    config = CONFIGS[name]
    ours, reference = build_pair(config, seed=11)
    grid = (3, 2, 3)
    inputs = make_inputs(config, 2, grid)
    num_tokens = 18
    for timestep in (
        per_token_timestep(2, grid),
        per_token_timestep(1, grid, t=450.0),  # one row for the whole batch
        torch.rand(2, num_tokens) * 1000,
        torch.tensor([[300.0], [20.0]]),  # one token-axis entry per sample
    ):
        inputs["timestep"] = timestep
        expected = reference(**inputs, return_dict=False)[0]
        assert torch.equal(ours(**inputs, return_dict=False)[0], expected)


@torch.no_grad()
def test_scalar_and_broadcast_timesteps_match_diffusers():
    ours, reference = build_pair(TINY, seed=12)
    inputs = make_inputs(TINY, 2, (2, 3, 3))
    inputs["timestep"] = torch.tensor([640.0])
    expected = reference(**inputs, return_dict=False)[0]
    assert torch.equal(ours(**inputs, return_dict=False)[0], expected)
    for scalar in (torch.tensor(640.0), 640.0, 640):
        assert torch.equal(ours(**{**inputs, "timestep": scalar}, return_dict=False)[0], expected)
    inputs["timestep"] = torch.tensor([999, 3])  # integer timesteps, as a LongTensor
    assert torch.equal(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])


@torch.no_grad()
@pytest.mark.parametrize("name", ["i2v", "flf2v", "odd-widths-no-cross-norm"])
@pytest.mark.parametrize("mode", ["keep-fp32", "all-bf16"])
def test_bfloat16_matches_diffusers_bit_for_bit(name, mode):
    config = CONFIGS[name]
    ours, reference = build_pair(config, seed=13)
    if mode == "keep-fp32":
        ours, reference = keep_in_fp32_cast(ours, torch.bfloat16), keep_in_fp32_cast(reference, torch.bfloat16)
        assert ours.blocks[0].scale_shift_table.dtype == torch.float32
        assert ours.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
        assert ours.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    else:
        ours, reference = ours.to(torch.bfloat16), reference.to(torch.bfloat16)
    inputs = make_inputs(config, 2, (2, 3, 2))
    inputs = {k: v.to(torch.bfloat16) if k != "timestep" else v for k, v in inputs.items()}
    for timestep in (inputs["timestep"], per_token_timestep(2, (2, 3, 2))):
        inputs["timestep"] = timestep
        expected = reference(**inputs, return_dict=False)[0]
        actual = ours(**inputs, return_dict=False)[0]
        assert actual.dtype == torch.bfloat16
        assert torch.equal(actual, expected)


def test_signature_keys_and_fp32_list_equal_diffusers():
    ours_init = inspect.signature(WanTransformer3DModel.__init__).parameters
    reference_init = inspect.signature(ReferenceWan.__init__).parameters
    assert [(p.name, p.default) for p in ours_init.values()] == [(p.name, p.default) for p in reference_init.values()]
    assert list(inspect.signature(WanTransformer3DModel.forward).parameters) == list(
        inspect.signature(ReferenceWan.forward).parameters
    )
    assert WanTransformer3DModel._keep_in_fp32_modules == ReferenceWan._keep_in_fp32_modules
    assert WanTransformer3DModel._keys_to_ignore_on_load_unexpected == ReferenceWan._keys_to_ignore_on_load_unexpected
    ours, reference = build_pair(CONFIGS["flf2v"])
    # Same parameter order: seeded random init of both models gives the same weights (and tables).
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in reference.named_buffers()]


def test_return_types_and_config_round_trip():
    ours, reference = build_pair(TINY)
    inputs = make_inputs(TINY, 1, (1, 2, 2))
    with torch.no_grad():
        as_tuple = ours(**inputs, return_dict=False)
        as_output = ours(**inputs)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert isinstance(as_output, Transformer2DModelOutput) and torch.equal(as_output.sample, as_tuple[0])
    rebuilt = WanTransformer3DModel.from_config(dict(reference.config))
    assert set(rebuilt.state_dict()) == set(reference.state_dict())
    assert rebuilt.config.patch_size == reference.config.patch_size


@pytest.mark.parametrize(
    ("config", "billions", "digits"),
    [
        (dict(num_attention_heads=12, num_layers=30, ffn_dim=8960), 1.42, 2),  # Wan2.1 T2V 1.3B
        (dict(), 14.3, 1),  # Wan2.1 T2V 14B (the defaults), and each Wan2.2 A14B expert
        (dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120), 16.4, 1),  # Wan2.1 I2V 14B
        (dict(num_attention_heads=24, num_layers=30, ffn_dim=14336, in_channels=48, out_channels=48), 5.0, 1),
    ],
)
def test_released_configs_build_on_meta_like_diffusers(config, billions, digits):
    with torch.device("meta"):
        ours = WanTransformer3DModel(**config)
        reference = ReferenceWan(**config)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e9, digits) == billions


@torch.no_grad()
def test_rope_tables_left_on_the_meta_device_are_rebuilt():
    ours, reference = build_pair(TINY, seed=14)
    inputs = make_inputs(TINY, 1, (2, 2, 2))
    ours.rope.freqs_cos = torch.empty_like(ours.rope.freqs_cos, device="meta")
    ours.rope.freqs_sin = torch.empty_like(ours.rope.freqs_sin, device="meta")
    assert torch.equal(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])
    assert not ours.rope.freqs_cos.is_meta


# ---- bad input --------------------------------------------------------------------------------------


@torch.no_grad()
def test_heads_narrower_than_6_take_any_height_and_width_as_diffusers():
    """With 4 channels per head the height and width axes get no RoPE channels, so diffusers runs grids wider than
    rope_max_seq_len there; the frame axis still has its limit."""
    config = dict(TINY, attention_head_dim=4)
    ours, reference = build_pair(config, seed=4)
    inputs = make_inputs(config, 2, (2, 3, 40))
    assert torch.equal(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])
    with pytest.raises(ValueError, match="rope_max_seq_len=32"):
        ours(**make_inputs(config, 1, (33, 1, 1)))


def bad_inputs():
    """The default config, a good call and {case: (change, error, match)}, for the contract's bad-input test."""
    cases = [
        (dict(hidden_states=torch.randn(1, 4, 4, 4)), ValueError, r"hidden_states must have shape \(B, 4, F, H, W\)"),
        (dict(hidden_states=torch.randn(1, 3, 1, 4, 4)), ValueError, r"\(B, 4, F, H, W\), got \(1, 3, 1, 4, 4\)"),
        (dict(hidden_states=torch.randn(1, 4, 1, 5, 4)), ValueError, r"\(1, 5, 4\) must be positive multiples"),
        (dict(hidden_states=torch.randn(1, 4, 1, 4, 66)), ValueError, "rope_max_seq_len=32"),
        (dict(hidden_states=torch.randn(1, 4, 1, 4, 4).double()), TypeError, "hidden_states must have the dtype"),
        (dict(hidden_states=[1.0]), TypeError, "hidden_states must be a tensor"),
        (dict(hidden_states=torch.randn(0, 4, 1, 4, 4)), ValueError, r"at least one sample, got shape \(0, 4,"),
        (dict(encoder_hidden_states=torch.randn(1, 7, 15)), ValueError, r"encoder_hidden_states must have shape"),
        (dict(encoder_hidden_states=torch.randn(2, 7, 16)), ValueError, r"\(1, L, 16\).*got \(2, 7, 16\)"),
        (dict(encoder_hidden_states=torch.randn(1, 7, 16).half()), TypeError, "encoder_hidden_states must have"),
        (dict(encoder_hidden_states_image=torch.randn(1, 5, 20)), ValueError, "encoder_hidden_states_image must be"),
        (dict(timestep=torch.rand(3)), ValueError, r"timestep must have shape .*got \(3,\)"),
        (dict(timestep=torch.rand(1, 5)), ValueError, r"\(1, 4\) .*got \(1, 5\)"),
        (dict(timestep=torch.rand(1, 1, 1)), ValueError, "timestep must have shape"),
        (dict(timestep="500"), TypeError, "timestep must be a tensor or a number"),
        (dict(timestep=torch.tensor([True])), TypeError, "timestep must be a real tensor"),
        (
            dict(attention_kwargs={"ip_adapter_masks": None}),
            ValueError,
            r"attention_kwargs \['ip_adapter_masks'\] are not",
        ),
        (dict(attention_kwargs=[("scale", 0.5)]), TypeError, "attention_kwargs must be None or a dict"),
    ]
    return TINY, make_inputs(TINY, 1, (1, 2, 2)), {match: (change, error, match) for change, error, match in cases}


@pytest.mark.parametrize(
    ("config", "change", "match"),
    [
        ("i2v", dict(encoder_hidden_states=torch.randn(1, 7, 16)), "must have 512 tokens"),
        ("i2v", dict(encoder_hidden_states_image=None), "encoder_hidden_states_image is required"),
        ("i2v", dict(encoder_hidden_states_image=torch.randn(1, 5, 21)), r"\(1, L, 20\)"),
        ("i2v", dict(encoder_hidden_states_image=torch.randn(2, 5, 20)), r"\(1, L, 20\)"),
        ("flf2v", dict(encoder_hidden_states_image=torch.randn(1, 3, 20)), r"\(2, L, 20\)"),
        ("flf2v", dict(encoder_hidden_states_image=torch.randn(2, 4, 20)), r"pos_embed_seq_len / 2 = 3 tokens"),
    ],
)
def test_bad_image_input_is_rejected_clearly(config, change, match):
    model = build(CONFIGS[config])
    inputs = {**make_inputs(CONFIGS[config], 1, (1, 2, 2)), **change}
    with pytest.raises(ValueError, match=match):
        model(**inputs)


# Constructor changes to the default config, each refused with a ValueError matching its pattern.
BAD_ARCHITECTURE = [
    (dict(patch_size=(1, 2)), "patch_size must be three positive integers"),
    (dict(patch_size=(1, 0, 2)), r"patch_size must be three positive integers \(t, h, w\), got \(1, 0, 2\)"),
    (dict(attention_head_dim=11), "attention_head_dim must be even"),
    (dict(num_layers=-1), "num_layers must be an integer >= 0"),
    (dict(text_dim=0), "text_dim must be a positive integer"),
    (dict(qk_norm="layer_norm"), "qk_norm must be 'rms_norm_across_heads' or None"),
    (dict(eps=0.0), r"eps must be a number in \(0, 1\)"),
    (dict(added_kv_proj_dim=24), "added_kv_proj_dim=24 needs image_dim"),
    (dict(image_dim=20, added_kv_proj_dim=16), "added_kv_proj_dim must equal .* = 24"),
    (dict(pos_embed_seq_len=8), "pos_embed_seq_len .* needs image_dim"),
]


# ---- TeaCache ---------------------------------------------------------------------------------------

NUM_STEPS = 8
LINEAR = (1.0, 0.0)  # rescaled distance = raw distance: decisions are easy to reason about


def cfg_inputs(config: dict, seed: int = 1) -> tuple[list[torch.Tensor], dict, dict]:
    """Latents for every step (independent of the outputs) and the positive / negative conditioning."""
    positive = make_inputs(config, 1, (2, 3, 3), seed=seed)
    negative = make_inputs(config, 1, (2, 3, 3), seed=seed + 50)
    latents = positive.pop("hidden_states")
    drift = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + 7))
    steps = [latents + 0.1 * step * drift for step in range(NUM_STEPS)]
    negative.pop("hidden_states")
    return steps, positive, negative


def timesteps() -> torch.Tensor:
    return torch.linspace(1000.0, 0.0, NUM_STEPS + 1)[:-1]


def predict(model, latents, conditioning, step):
    inputs = {k: v for k, v in conditioning.items() if k != "timestep"}
    return model(latents, timesteps()[step].reshape(1), return_dict=False, **inputs)[0]


def run(model, params, branches=(False, True), config=TINY, seed=1):
    """One generation; returns the outputs per branch (uncached when params is None)."""
    steps, positive, negative = cfg_inputs(config, seed)
    if params is not None:
        model.enable_teacache(params, NUM_STEPS)
    outputs = {branch: [] for branch in branches}
    for step in range(NUM_STEPS):
        for branch in branches:
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=branch):
                outputs[branch].append(predict(model, steps[step], negative if branch else positive, step))
    return outputs


@pytest.mark.parametrize(
    "params",
    [
        TeaCacheParams(teacache_thresh=0.0, coefficients=LINEAR),
        TeaCacheParams(teacache_thresh=0.0, coefficients=LINEAR, use_ret_steps=True),
        TeaCacheParams(teacache_thresh=0.0, coefficients=LINEAR, indicator="modulated_input"),
    ],
)
def test_threshold_zero_is_bit_identical_to_uncached(params):
    model = build(I2V, seed=20)
    plain = run(model, None, config=I2V)
    cached = run(model, params, config=I2V)
    for branch in (False, True):
        assert all(torch.equal(a, b) for a, b in zip(cached[branch], plain[branch], strict=True))
    stats = model.teacache_stats()
    assert stats.num_skipped == 0 and stats.num_computed == 2 * NUM_STEPS


def test_cfg_branches_keep_separate_state():
    model = build(TINY, seed=22)
    params = TeaCacheParams(teacache_thresh=1.6, coefficients=LINEAR, indicator="modulated_input")
    alone_positive = run(model, params, branches=(False,))[False]
    positive_stats = model.teacache_stats().positive
    alone_negative = run(model, params, branches=(True,))[True]
    negative_stats = model.teacache_stats().negative
    interleaved = run(model, params)
    assert all(torch.equal(a, b) for a, b in zip(interleaved[False], alone_positive, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(interleaved[True], alone_negative, strict=True))
    stats = model.teacache_stats()
    assert stats.positive == positive_stats and stats.negative == negative_stats
    assert stats.positive.num_skipped > 0 and stats.negative.num_skipped > 0
    assert not torch.equal(model.previous_residual, model.previous_residual_negative)


def test_temb_indicator_gives_both_branches_the_same_schedule():
    model = build(TINY, seed=23)
    run(model, TeaCacheParams(teacache_thresh=1.6, coefficients=LINEAR))
    stats = model.teacache_stats()
    assert stats.positive == stats.negative and stats.positive.num_skipped > 0


@pytest.mark.parametrize(
    ("params", "computed"),
    [
        (TeaCacheParams(teacache_thresh=1e9, coefficients=LINEAR), (0, 7)),
        (TeaCacheParams(teacache_thresh=1e9, coefficients=LINEAR, start_skipping=2, end_skipping=2), (0, 1, 6, 7)),
        (TeaCacheParams(teacache_thresh=1e9, coefficients=LINEAR, use_ret_steps=True), (0, 1, 2, 3, 4)),
        (
            TeaCacheParams(teacache_thresh=1e9, coefficients=LINEAR, use_ret_steps=True, start_skipping=6),
            (0, 1, 2, 3, 4, 5),
        ),
        (
            TeaCacheParams(teacache_thresh=1e9, coefficients=LINEAR, use_ret_steps=True, end_skipping=2),
            (0, 1, 2, 3, 4, 6, 7),
        ),
    ],
)
def test_forced_steps_of_default_and_ret_steps_modes(params, computed):
    model = build(NO_LAYERS, seed=24)
    run(model, params, branches=(False,), config=NO_LAYERS)
    stats = model.teacache_stats().positive
    assert stats.computed_steps == computed
    assert stats.skipped_steps == tuple(s for s in range(NUM_STEPS) if s not in computed)


@torch.no_grad()
def test_indicators_are_the_tensors_diffusers_computes(monkeypatch):
    ours, reference = build_pair(I2V, seed=25)
    captured = {}
    reference.condition_embedder.register_forward_hook(lambda m, i, o: captured.update(temb=o[0], proj=o[1]))
    reference.blocks[0].attn1.register_forward_hook(lambda m, i, o: captured.update(modulated=i[0]))
    original = ours.teacache_indicator

    def spy(*args, **kwargs):
        captured["ours"] = original(*args, **kwargs)
        return captured["ours"]

    monkeypatch.setattr(ours, "teacache_indicator", spy)
    grid = (2, 2, 3)
    inputs = make_inputs(I2V, 2, grid)
    for timestep in (inputs["timestep"], per_token_timestep(2, grid)):
        inputs["timestep"] = timestep
        reference(**inputs)
        per_token = timestep.ndim == 2
        proj = captured["proj"].unflatten(-1, (6, -1))
        for indicator, expected in (
            ("temb", captured["temb"] if per_token else captured["temb"][:, None]),
            ("timestep_proj", proj if per_token else proj[:, None]),
            ("modulated_input", captured["modulated"]),
        ):
            ours.enable_teacache(TeaCacheParams(teacache_thresh=0.0, coefficients=LINEAR, indicator=indicator), 1)
            assert ours.teacache_indicator_name == indicator
            with ours.teacache_step(0):
                ours(**inputs)
            assert captured["ours"].shape == expected.shape
            assert torch.equal(captured["ours"], expected)


def test_ret_steps_mode_uses_the_timestep_projection_and_its_coefficients():
    model = build(TINY)
    fits = load_zoo_entry("wan2.1-t2v-1.3b").teacache_fits()
    model.set_teacache_fits(fits)
    assert model.teacache_schedule(TeaCacheParams()) == (fits["temb"], 1, 1)
    assert model.teacache_schedule(TeaCacheParams(use_ret_steps=True)) == (fits["timestep_proj"], 5, 0)
    assert model.teacache_schedule(TeaCacheParams(use_ret_steps=True, end_skipping=2, start_skipping=7)) == (
        fits["timestep_proj"],
        7,
        2,
    )
    model.enable_teacache(TeaCacheParams(use_ret_steps=True), NUM_STEPS)
    assert model.teacache_indicator_name == "timestep_proj"
    run(model, TeaCacheParams(teacache_thresh=0.0, use_ret_steps=True), branches=(False,))
    assert model.previous_modulated_input.shape == (1, 1, 6, 24)
    model.enable_teacache(TeaCacheParams(), NUM_STEPS)
    assert model.teacache_indicator_name == "temb"
    model.disable_teacache()
    assert model.teacache_indicator_name == "temb"


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (TeaCacheParams(use_ret_steps=True, indicator="temb"), "use_ret_steps=True uses the 'timestep_proj'"),
        (TeaCacheParams(use_ret_steps=True, indicator="modulated_input"), "indicator='modulated_input' was given"),
        (TeaCacheParams(indicator="img_mod"), "indicator 'img_mod' is not offered"),
        (TeaCacheParams(), r"no TeaCache coefficients for indicator 'temb': pass"),
        (TeaCacheParams(use_ret_steps=True), r"no TeaCache coefficients for indicator 'timestep_proj': pass"),
        (TeaCacheParams(indicator="modulated_input"), r"'modulated_input' \(its fits are for \['temb'\]\)"),
        (TeaCacheParams(indicator="timestep_proj"), r"'timestep_proj' \(its fits are for \['temb'\]\)"),
    ],
)
def test_inconsistent_teacache_options_are_rejected(params, match):
    model = build(TINY)
    assert model.teacache_fits == {}
    if "its fits" in match:
        model.set_teacache_fits({"temb": load_zoo_entry("wan2.1-t2v-14b").fits["temb"].coefficients})
    with pytest.raises(ValueError, match=match):
        model.enable_teacache(params, NUM_STEPS)


# ---- Wan2.2 A14B: the expert pair --------------------------------------------------------------------


def expert_pair(boundary_ratio=0.7) -> WanExpertPair:
    return WanExpertPair(build(TINY, seed=30), build(TINY, seed=31), boundary_ratio=boundary_ratio)


def test_expert_routing_follows_the_pipeline_comparison():
    pair = expert_pair(boundary_ratio=0.875)
    assert pair.boundary_timestep == 875.0
    assert pair.expert_for(torch.tensor(875.0)) is pair.transformer
    assert pair.expert_for(torch.tensor([874.9])) is pair.transformer_2
    assert pair.expert_for(999) is pair.transformer and pair.expert_for(0.0) is pair.transformer_2
    assert pair.expert_for(per_token_timestep(2, (2, 2, 2), t=900.0)) is pair.transformer
    with pytest.raises(ValueError, match="both sides of the expert boundary 875"):
        pair.expert_for(torch.tensor([900.0, 100.0]))
    with pytest.raises(TypeError, match="timestep must be a tensor or a number"):
        pair.expert_for("900")
    inputs = make_inputs(TINY, 1, (1, 2, 2))
    for t, expert in ((900.0, pair.transformer), (100.0, pair.transformer_2)):
        inputs["timestep"] = torch.tensor([t])
        with torch.no_grad():
            assert torch.equal(pair(**inputs, return_dict=False)[0], expert(**inputs, return_dict=False)[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(boundary_ratio=-0.1), ValueError, r"boundary_ratio must be a number in \[0, 1\]"),
        (dict(boundary_ratio=1.5), ValueError, r"boundary_ratio must be a number in \[0, 1\]"),
        (dict(boundary_ratio=float("nan")), ValueError, r"boundary_ratio must be a number in \[0, 1\]"),
        (dict(boundary_ratio=True), ValueError, "boundary_ratio must be"),
        (dict(boundary_ratio=0.9, num_train_timesteps=0), ValueError, "num_train_timesteps must be"),
    ],
)
def test_expert_pair_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        WanExpertPair(build(TINY), build(TINY), **kwargs)


def test_expert_pair_rejects_bad_experts():
    model = build(TINY)
    with pytest.raises(ValueError, match="two models"):
        WanExpertPair(model, model, 0.9)
    with pytest.raises(ValueError, match="the experts disagree on in_channels"):
        WanExpertPair(model, build(dict(TINY, in_channels=8)), 0.9)
    with pytest.raises(TypeError, match="transformer_2 must be a WanTransformer3DModel"):
        WanExpertPair(model, torch.nn.Linear(2, 2), 0.9)


def test_expert_state_never_crosses_the_switch():
    pair = expert_pair(boundary_ratio=0.7)  # steps 0-2 (t = 1000, 875, 750) high noise, 3-7 low noise
    plain = run(pair, None)
    pair.enable_teacache(TeaCacheParams(teacache_thresh=1e9, coefficients=LINEAR), NUM_STEPS)
    steps, positive, negative = cfg_inputs(TINY)
    outputs = {False: [], True: []}
    for step in range(NUM_STEPS):
        for branch in (False, True):
            with torch.no_grad(), pair.teacache_step(step, is_cfg_negative=branch):
                outputs[branch].append(predict(pair, steps[step], negative if branch else positive, step))
        if step == 2:
            high_residuals = (pair.transformer.previous_residual, pair.transformer.previous_residual_negative)
            assert pair.transformer_2.previous_residual is None
    stats = pair.teacache_stats()
    for branch in ("positive", "negative"):
        high, low = getattr(stats["transformer"], branch), getattr(stats["transformer_2"], branch)
        assert (high.computed_steps, high.skipped_steps) == ((0,), (1, 2))
        # The low-noise expert's first step computes although the threshold would skip everything.
        assert (low.computed_steps, low.skipped_steps) == ((3, 7), (4, 5, 6))
    for branch in (False, True):
        for step in (0, 3, 7):
            assert torch.equal(outputs[branch][step], plain[branch][step])
    assert pair.transformer.previous_residual is high_residuals[0]
    assert pair.transformer.previous_residual_negative is high_residuals[1]
    assert not torch.equal(outputs[False][4], plain[False][4])
    pair.disable_teacache()
    assert not pair.transformer.teacache_enabled and not pair.transformer_2.teacache_enabled


def test_expert_pair_threshold_zero_is_bit_identical():
    pair = expert_pair()
    plain = run(pair, None)
    cached = run(pair, TeaCacheParams(teacache_thresh=0.0, coefficients=LINEAR))
    for branch in (False, True):
        assert all(torch.equal(a, b) for a, b in zip(cached[branch], plain[branch], strict=True))
    with pytest.raises(ValueError, match="step_index 8 is out of range"), pair.teacache_step(NUM_STEPS):
        pass


@torch.no_grad()
@pytest.mark.parametrize("kwargs", [{}, {"scale": 1.0}, {"scale": 0.5}])
def test_a_lora_scale_alone_is_accepted_and_has_no_effect(kwargs):
    ours, reference = build_pair(TINY, seed=6)
    inputs = make_inputs(TINY, 2, (1, 2, 2))
    expected = reference(**inputs, attention_kwargs=dict(kwargs), return_dict=False)[0]
    actual = ours(**inputs, attention_kwargs=dict(kwargs), return_dict=False)[0]
    assert torch.equal(actual, ours(**inputs, return_dict=False)[0])
    assert_parity(actual, expected)
