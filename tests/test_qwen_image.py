"""Native Qwen-Image against diffusers' QwenImageTransformer2DModel, and TeaCache with separated true CFG."""

import math

import pytest
import torch
from diffusers import QwenImageTransformer2DModel as ReferenceQwenImage

from teacache_models import TeaCacheParams
from teacache_models.models.qwen_image import QwenImageTransformer2DModel
from tests.utils import assert_parity, load_both_ways, randomize_, zoo_fit

# The tiny config of models.md.
TINY = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=16,
    axes_dims_rope=(8, 4, 4),
)

# The fit of the released checkpoint, from its zoo entry.
FIT = zoo_fit("qwen-image")

CONFIGS = {
    "tiny": TINY,
    "odd-sizes": dict(
        patch_size=1,
        in_channels=6,
        out_channels=None,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=3,
        joint_attention_dim=12,
        axes_dims_rope=(2, 2, 4),
    ),
    "guidance-embeds": dict(TINY, guidance_embeds=True),
    "zero-cond-t": dict(TINY, zero_cond_t=True),
    "additional-t-cond": dict(TINY, use_additional_t_cond=True),
    "layer3d-rope": dict(TINY, use_layer3d_rope=True),
    "all-variants": dict(TINY, num_layers=1, zero_cond_t=True, use_additional_t_cond=True, use_layer3d_rope=True),
    # diffusers accepts a RoPE axis of 0 channels: that axis then has no effect.
    "zero-channel-rope-axis": dict(TINY, axes_dims_rope=(0, 8, 8)),
}

# (batch, img_shapes, text_len, text mask rows as strings of 1/0 or None)
CASES = {
    "square": (1, [[(1, 4, 4)]], 5, None),
    "non-square-padded": (2, [[(1, 3, 5)]] * 2, 7, ["1111100", "1111111"]),
    "tuple-per-sample-holes": (2, [(1, 5, 2)] * 2, 4, ["1011", "0110"]),
    "edit-two-images": (2, [[(1, 4, 4), (1, 2, 6)]] * 2, 6, ["111000", "111111"]),
    "three-images-odd": (1, [[(1, 3, 3), (1, 1, 5), (1, 5, 3)]], 3, ["110"]),
    "multi-frame": (2, [[(2, 3, 2)]] * 2, 3, None),
}


def build_pair(config: dict, seed: int = 0) -> tuple[QwenImageTransformer2DModel, ReferenceQwenImage]:
    reference = randomize_(ReferenceQwenImage(**config), seed).eval()
    ours = QwenImageTransformer2DModel(**config).eval()
    load_both_ways(ours, reference)
    ours.set_teacache_fits({"modulated_input": FIT})  # what its zoo entry hands over
    return ours, reference


def token_count(img_shapes: list) -> int:
    first = img_shapes[0]
    images = [first] if isinstance(first, tuple) else first
    return sum(math.prod(shape) for shape in images)


def make_inputs(config: dict, batch: int, img_shapes: list, text_len: int, mask=None, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randn(batch, token_count(img_shapes), config["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(batch, text_len, config["joint_attention_dim"], generator=generator),
        timestep=torch.rand(batch, generator=generator),
        img_shapes=img_shapes,
    )
    if mask is not None:
        inputs["encoder_hidden_states_mask"] = torch.tensor([[int(c) for c in row] for row in mask])
    if config.get("use_additional_t_cond"):
        rows = 2 * batch if config.get("zero_cond_t") else batch
        inputs["additional_t_cond"] = torch.arange(rows) % 2
    return inputs


def both(ours, reference, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0]


def _valid_for_diffusers(name: str, case: str) -> bool:
    config = CONFIGS[name]
    # Layered RoPE needs a single-frame condition image (tested as an error below); diffusers'
    # zero_cond_t needs per-sample lists (our wider format is tested separately).
    if config.get("use_layer3d_rope") and case == "multi-frame":
        return False
    return not (config.get("zero_cond_t") and case == "tuple-per-sample-holes")


@pytest.mark.parametrize(("name", "case"), [(n, c) for n in CONFIGS for c in CASES if _valid_for_diffusers(n, c)])
def test_parity_with_diffusers(name, case):
    config = CONFIGS[name]
    batch, img_shapes, text_len, mask = CASES[case]
    if config.get("use_additional_t_cond") and config.get("zero_cond_t") and batch > 1:
        batch, img_shapes = 1, img_shapes[:1]
        mask = None if mask is None else mask[:1]
    ours, reference = build_pair(config, seed=len(name) * 7 + len(case))
    inputs = make_inputs(config, batch, img_shapes, text_len, mask)
    actual, expected = both(ours, reference, inputs)
    assert_parity(actual, expected)
    assert torch.equal(actual, expected), "float32 output should be bit-identical to diffusers"


def test_parity_with_broadcast_timestep_and_shared_img_shapes():
    ours, reference = build_pair(CONFIGS["zero-cond-t"], seed=3)
    inputs = make_inputs(CONFIGS["zero-cond-t"], 2, [[(1, 2, 3), (1, 3, 3)]], 4, ["1100", "1111"])
    inputs["timestep"] = torch.tensor([0.37])
    assert torch.equal(*both(ours, reference, inputs))


def test_zero_cond_t_accepts_a_single_image_given_as_a_tuple():
    ours, reference = build_pair(CONFIGS["zero-cond-t"], seed=4)
    inputs = make_inputs(CONFIGS["zero-cond-t"], 2, [(1, 3, 3)] * 2, 4)
    with torch.no_grad():
        actual = ours(**inputs, return_dict=False)[0]
        expected = reference(**{**inputs, "img_shapes": [[(1, 3, 3)]] * 2}, return_dict=False)[0]
    assert torch.equal(actual, expected)


def test_parity_with_controlnet_residuals_and_lora_scale_kwarg():
    config = CONFIGS["odd-sizes"]
    ours, reference = build_pair(config, seed=5)
    inputs = make_inputs(config, 2, [[(1, 3, 4)]] * 2, 5, ["11110", "11111"])
    generator = torch.Generator().manual_seed(9)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    inputs["controlnet_block_samples"] = [torch.randn(2, 12, width, generator=generator) for _ in range(2)]
    inputs["attention_kwargs"] = {"scale": 1.0}
    assert torch.equal(*both(ours, reference, inputs))


@pytest.mark.parametrize("form", ["stacked tensor", "broadcast shapes"])
def test_parity_with_controlnet_residuals_in_other_forms(form):
    config = CONFIGS["odd-sizes"]
    ours, reference = build_pair(config, seed=5)
    inputs = make_inputs(config, 2, [[(1, 3, 4)]] * 2, 5, ["11110", "11111"])
    generator = torch.Generator().manual_seed(9)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if form == "stacked tensor":  # diffusers indexes it like a list
        inputs["controlnet_block_samples"] = torch.randn(2, 2, 12, width, generator=generator)
    else:
        inputs["controlnet_block_samples"] = [torch.randn(12, width, generator=generator), torch.randn(1, 1, width)]
    assert torch.equal(*both(ours, reference, inputs))


def test_half_precision_text_feeds_a_float32_model_as_in_diffusers():
    ours, reference = build_pair(TINY, seed=5)
    inputs = make_inputs(TINY, 1, [[(1, 2, 3)]], 4)
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].bfloat16()  # txt_norm promotes it
    assert torch.equal(*both(ours, reference, inputs))


def test_samples_with_different_layouts_warn_and_match_diffusers():
    ours, reference = build_pair(TINY, seed=6)
    inputs = make_inputs(TINY, 2, [[(1, 4, 4)], [(1, 2, 8)]], 5)
    with pytest.warns(UserWarning, match="img_shapes differ between samples"):
        actual, expected = both(ours, reference, inputs)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_diffusers(dtype):
    ours, reference = build_pair(CONFIGS["zero-cond-t"], seed=7)
    ours, reference = ours.to(dtype), reference.to(dtype)
    inputs = make_inputs(CONFIGS["zero-cond-t"], 2, [[(1, 3, 3), (1, 2, 2)]] * 2, 4, ["1110", "1111"])
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    actual, expected = both(ours, reference, inputs)
    assert actual.dtype == dtype
    assert_parity(actual, expected, tol=2e-2)


def test_fp16_clipping_matches_diffusers_when_a_residual_overflows():
    config = dict(TINY, num_layers=1)
    ours, reference = build_pair(config, seed=8)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    for model in (ours, reference):
        with torch.no_grad():  # MLP gates large enough that the residual update overflows float16
            model.transformer_blocks[0].img_mod[1].bias[5 * dim :].fill_(60000.0)
            model.transformer_blocks[0].txt_mod[1].bias[5 * dim :].fill_(60000.0)
    ours, reference = ours.half(), reference.half()
    inputs = make_inputs(config, 1, [[(1, 2, 2)]], 3)
    inputs = {k: v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    captured = []
    ours.transformer_blocks[0].register_forward_hook(lambda module, args, output: captured.append(output))
    reference.transformer_blocks[0].register_forward_hook(lambda module, args, output: captured.append(output))
    both(ours, reference, inputs)
    (image, text), (reference_text, reference_image) = captured
    assert image.abs().max() == 65504 and text.abs().max() == 65504
    assert torch.equal(image, reference_image) and torch.equal(text, reference_text)


def test_released_config_builds_on_meta_with_the_published_size():
    with torch.device("meta"):
        model = QwenImageTransformer2DModel()
        reference = ReferenceQwenImage()
    assert set(model.state_dict()) == set(reference.state_dict())
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e9, 1) == 20.4


# ---- TeaCache -----------------------------------------------------------------------------------------


def test_indicator_is_block0_modulated_image_input_as_diffusers_computes_it():
    config = CONFIGS["zero-cond-t"]
    ours, reference = build_pair(config, seed=11)
    inputs = make_inputs(config, 2, [[(1, 3, 3), (1, 2, 3)]] * 2, 4, ["1100", "1111"])
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("reference", kwargs["hidden_states"])

    reference.transformer_blocks[0].attn.register_forward_pre_hook(capture, with_kwargs=True)
    indicator = ours.teacache_indicator
    ours.teacache_indicator = lambda *a, **k: seen.setdefault("ours", indicator(*a, **k))
    ours.enable_teacache(TeaCacheParams(teacache_thresh=0.1), 1)
    with torch.no_grad(), ours.teacache_step(0):
        ours(**inputs)
        reference(**inputs)
    assert torch.equal(seen["ours"], seen["reference"])


def trajectory(config: dict, num_steps: int, seed: int = 1) -> list[dict]:
    """Per step: noisy latents on a fixed flow path and the sigma, independent of the model's predictions."""
    inputs = make_inputs(config, 1, [[(1, 4, 4)]], 5, seed=seed)
    noise = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(seed + 50))
    sigmas = torch.linspace(1.0, 0.05, num_steps)
    return [{"hidden_states": (1 - s) * inputs["hidden_states"] + s * noise, "timestep": s.expand(1)} for s in sigmas]


def conditions(config: dict) -> dict[bool, dict]:
    """Different text for the two CFG branches: other values, another length, padding in the negative."""
    positive = make_inputs(config, 1, [[(1, 4, 4)]], 5, seed=2)
    negative = make_inputs(config, 1, [[(1, 4, 4)]], 3, mask=["110"], seed=3)
    return {
        branch: {k: v for k, v in c.items() if k not in ("hidden_states", "timestep")}
        for branch, c in ((False, positive), (True, negative))
    }


def run(model, steps: list[dict], conds: dict[bool, dict], branches: tuple[bool, ...], params=None) -> dict:
    if params is not None:
        model.enable_teacache(params, len(steps))
    outputs = {b: [] for b in branches}
    for index, step in enumerate(steps):
        for negative in branches:
            with torch.no_grad(), model.teacache_step(index, is_cfg_negative=negative):
                outputs[negative].append(model(**step, **conds[negative], return_dict=False)[0])
    return outputs


def test_skipped_step_reuses_the_residual_through_the_head():
    config = CONFIGS["tiny"]
    model, _ = build_pair(config, seed=15)
    steps, conds = trajectory(config, 3), conditions(config)
    model.enable_teacache(TeaCacheParams(teacache_thresh=100.0), 3)
    outputs = []
    for index, step in enumerate(steps):
        with torch.no_grad(), model.teacache_step(index, is_cfg_negative=True):
            outputs.append(model(**step, **conds[True], return_dict=False)[0])
        if index == 0:
            residual = model.previous_residual_negative.clone()
    assert model.teacache_stats().negative.skipped_steps == (1,)
    assert model.previous_residual is None, "the positive branch was never run"
    with torch.no_grad():
        hidden = model.img_in(steps[1]["hidden_states"])
        temb = model.time_text_embed(steps[1]["timestep"], hidden.dtype)
        expected = model.proj_out(model.norm_out(hidden + residual, temb))
    assert torch.equal(outputs[1], expected)


def test_batched_cfg_is_refused_while_teacache_is_on():
    model = QwenImageTransformer2DModel(**TINY).eval()
    model.enable_teacache(TeaCacheParams(teacache_thresh=0.2, coefficients=FIT), 2)
    inputs = make_inputs(TINY, 2, [[(1, 2, 2)]] * 2, 3)
    with pytest.raises(ValueError, match="batches both CFG branches"), model.teacache_step(0, batched_cfg=True):
        model(**inputs)


# ---- bad input --------------------------------------------------------------------------------------------


def bad_inputs():
    good = make_inputs(TINY, 2, [[(1, 2, 3)]] * 2, 4, ["1100", "1111"])
    cases = {
        "hidden_states rank": ({"hidden_states": good["hidden_states"][0]}, ValueError, "hidden_states must have"),
        "hidden_states width": ({"hidden_states": torch.randn(2, 6, 5)}, ValueError, r"\(B, L, 16\)"),
        "integer latents": ({"hidden_states": torch.ones(2, 6, 16, dtype=torch.long)}, TypeError, "floating"),
        "text width": ({"encoder_hidden_states": torch.randn(2, 4, 15)}, ValueError, r"\(1\|2, L, 16\)"),
        "text rank": ({"encoder_hidden_states": torch.randn(2, 16)}, ValueError, "encoder_hidden_states must"),
        "text batch": ({"encoder_hidden_states": torch.randn(3, 4, 16)}, ValueError, r"\(1\|2, L, 16\)"),
        "text missing": ({"encoder_hidden_states": None}, TypeError, "encoder_hidden_states"),
        "text empty": ({"encoder_hidden_states": torch.randn(2, 0, 16)}, ValueError, "at least one text token"),
        "mask length": ({"encoder_hidden_states_mask": torch.ones(2, 5)}, ValueError, r"\(2, 4\).*got \(2, 5\)"),
        "mask rank": ({"encoder_hidden_states_mask": torch.ones(2, 4, 1)}, ValueError, "encoder_hidden_states_mask"),
        "mask type": ({"encoder_hidden_states_mask": [[1, 1, 1, 1]] * 2}, TypeError, "encoder_hidden_states_mask"),
        "img_shapes tokens": ({"img_shapes": [[(1, 2, 2)]] * 2}, ValueError, "4 image tokens, but hidden_states has 6"),
        "img_shapes missing": ({"img_shapes": None}, ValueError, "img_shapes is required"),
        "img_shapes batch": ({"img_shapes": [[(1, 2, 3)]] * 3}, ValueError, "3 entries for a batch of 2"),
        "img_shapes entry": ({"img_shapes": [[(1, 2)]] * 2}, ValueError, "img_shapes must be"),
        "img_shapes zero": ({"img_shapes": [[(1, 0, 3)]] * 2}, ValueError, "img_shapes must be"),
        "img_shapes float": ({"img_shapes": [[(1, 2.0, 3)]] * 2}, ValueError, "img_shapes must be"),
        "guidance": ({"guidance": torch.tensor([3.5, 3.5])}, ValueError, "guidance must be None"),
        "timestep shape": ({"timestep": torch.rand(3)}, ValueError, "timestep must have shape"),
        "timestep missing": ({"timestep": None}, TypeError, "timestep"),
        "additional_t_cond unused": ({"additional_t_cond": torch.tensor([0, 1])}, ValueError, "additional_t_cond"),
        "attention kwargs": ({"attention_kwargs": {"attention_mask": None, "x": 1}}, ValueError, "attention_kwargs"),
        "controlnet shape": ({"controlnet_block_samples": [torch.randn(2, 5, 64)]}, ValueError, "controlnet"),
        "controlnet empty": ({"controlnet_block_samples": []}, ValueError, "controlnet_block_samples"),
        "controlnet dtype": ({"controlnet_block_samples": [torch.randn(2, 6, 64).double()]}, TypeError, "promote"),
        "controlnet item": ({"controlnet_block_samples": [1.0]}, TypeError, r"controlnet_block_samples\[0\]"),
        "hidden_states dtype": ({"hidden_states": torch.randn(2, 6, 16).double()}, TypeError, "hidden_states"),
        "text dtype": ({"encoder_hidden_states": torch.randn(2, 4, 16).double()}, TypeError, "encoder_hidden_states"),
        "attention kwargs type": ({"attention_kwargs": [("scale", 1.0)]}, TypeError, "must be None or a dict"),
        "empty batch": (
            {
                "hidden_states": torch.randn(0, 6, 16),
                "encoder_hidden_states": torch.randn(0, 4, 16),
                "encoder_hidden_states_mask": None,
            },
            ValueError,
            "at least one sample",
        ),
    }
    return TINY, good, cases


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (None, TypeError, "additional_t_cond is required"),
        (torch.tensor([0.0, 1.0]), TypeError, "int64 or int32"),
        (torch.tensor([0, 2]), ValueError, "must be 0 or 1"),
        (torch.tensor([0, 1, 1]), ValueError, r"shape \(\), \(1,\) or \(2,\)"),
    ],
)
def test_bad_additional_t_cond(value, error, match):
    model = QwenImageTransformer2DModel(**CONFIGS["additional-t-cond"])
    inputs = make_inputs(CONFIGS["additional-t-cond"], 2, [[(1, 2, 2)]] * 2, 3)
    with pytest.raises(error, match=match), torch.no_grad():
        model(**{**inputs, "additional_t_cond": value})


def test_layered_condition_image_must_have_one_frame():
    model = QwenImageTransformer2DModel(**CONFIGS["layer3d-rope"])
    inputs = make_inputs(CONFIGS["layer3d-rope"], 1, [[(1, 2, 2), (2, 2, 2)]], 3)
    with pytest.raises(ValueError, match="condition image and must have exactly 1 frame, got 2"), torch.no_grad():
        model(**inputs)


def test_positions_beyond_the_rope_tables_are_rejected():
    model = QwenImageTransformer2DModel(**TINY)
    inputs = make_inputs(TINY, 1, [[(1, 1, 8194)]], 1)
    with pytest.raises(ValueError, match=r"rotary tables cover positions -4096\.\.4095"), torch.no_grad():
        model(**inputs)


# Constructor changes to the default config, each refused with a ValueError matching its pattern.
BAD_ARCHITECTURE = [
    ({"axes_dims_rope": (8, 4, 2)}, "must sum to attention_head_dim"),
    ({"axes_dims_rope": (8, 8)}, r"axes_dims_rope must be 3 even integers >= 0"),
    ({"axes_dims_rope": (7, 5, 4)}, "even"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"in_channels": 2.5}, "in_channels"),
    ({"num_layers": -1}, "num_layers"),
    ({"out_channels": 0}, "out_channels"),
    ({"zero_cond_t": 1}, "zero_cond_t must be True or False"),
]
