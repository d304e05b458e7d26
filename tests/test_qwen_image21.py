"""Native Qwen-Image-2.1 against diffusers' QwenImage21Transformer2DModel: bit-identical on random weights and
inputs (batch 2, odd sizes, several condition images, padded text, the prefix key/value cache), and TeaCache."""

import math

import pytest
import torch
from diffusers import QwenImage21Transformer2DModel as ReferenceQwenImage21
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache as ReferenceKVCache

from teacache_models import TeaCacheParams
from teacache_models.models import QwenImage21Transformer2DModel
from teacache_models.models.qwen_image21 import QwenImage21KVCache
from tests.utils import load_both_ways, randomize_

TINY = dict(
    patch_size=1,
    in_channels=8,
    out_channels=8,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    context_in_dim=12,
    mlp_ratio=3,
    axes_dims_rope=(4, 6, 6),
)

CONFIGS = {
    "tiny": TINY,
    "odd-sizes": dict(
        patch_size=1,
        in_channels=6,
        out_channels=None,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=3,
        context_in_dim=10,
        mlp_ratio=2,
        axes_dims_rope=(2, 2, 4),
        eps=1e-5,
    ),
    "not-causal-condition": dict(TINY, causal_condition=False),
    "patch-2": dict(TINY, patch_size=2, in_channels=4, out_channels=3),
}

# (batch, encoder slots as a string: t text, i a condition-image slot; condition image grids; generated grid;
# padded text per sample as a count of masked trailing text tokens, or None)
CASES = {
    "text-only": (1, "ttttt", [], (1, 2, 4), None),
    "one-condition-padded": (2, "tttiittt", [(1, 2, 4)], (1, 4, 2), [2, 0]),
    "two-adjacent-conditions": (2, "ttiiiitt", [(1, 2, 2), (1, 2, 6)], (1, 2, 6), [0, 1]),
    "odd-grid": (2, "tiiiiiiit", [(1, 7, 4)], (1, 6, 2), None),
}


def build_pair(config: dict, seed: int = 0) -> tuple[QwenImage21Transformer2DModel, ReferenceQwenImage21]:
    reference = randomize_(ReferenceQwenImage21(**config), seed).eval()
    ours = QwenImage21Transformer2DModel(**config).eval()
    load_both_ways(ours, reference)
    return ours, reference


def make_inputs(
    config: dict, batch: int, slots: str, conditions: list, target: tuple, padding=None, seed: int = 1
) -> dict:
    generator = torch.Generator().manual_seed(seed)
    shapes = [*conditions, target]
    tokens = sum(math.prod(shape) for shape in shapes)
    vlm = torch.tensor([c == "i" for c in slots])
    img_mask = torch.cat([vlm, torch.ones(math.prod(target) // 4, dtype=torch.bool)])[None].repeat(batch, 1)
    width = config["in_channels"] * config["patch_size"] ** 2
    inputs = dict(
        hidden_states=torch.randn(batch, tokens, width, generator=generator),
        encoder_hidden_states=torch.randn(batch, len(slots), config["context_in_dim"], generator=generator),
        timestep=torch.rand(batch, generator=generator),
        img_shapes=[shapes] * batch,
        img_mask=img_mask,
    )
    if padding is not None:
        mask = torch.ones(batch, len(slots), dtype=torch.bool)
        text_positions = [i for i, c in enumerate(slots) if c == "t"]
        for row, count in enumerate(padding):
            for position in text_positions[len(text_positions) - count :]:
                mask[row, position] = False
        inputs["encoder_hidden_states_mask"] = mask
    return inputs


def both(ours, reference, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0]


@pytest.mark.parametrize(("name", "case"), [(n, c) for n in CONFIGS for c in CASES])
def test_parity_with_diffusers(name, case):
    config = CONFIGS[name]
    ours, reference = build_pair(config, seed=len(name) + 3 * len(case))
    inputs = make_inputs(config, *CASES[case])
    actual, expected = both(ours, reference, inputs)
    assert torch.equal(actual, expected), "float32 output should be bit-identical to diffusers"


@pytest.mark.parametrize("case", list(CASES))
def test_the_prefix_cache_matches_diffusers_step_after_step(case):
    ours, reference = build_pair(TINY, seed=5)
    inputs = make_inputs(TINY, *CASES[case])
    ours_cache, reference_cache = QwenImage21KVCache(TINY["num_layers"]), ReferenceKVCache(TINY["num_layers"])
    generator = torch.Generator().manual_seed(9)
    for step, mode in enumerate(("extract", "cached", "cached")):
        call = dict(inputs, timestep=torch.rand(inputs["timestep"].shape[0], generator=generator))
        with torch.no_grad():
            actual = ours(**call, kv_cache=ours_cache, kv_cache_mode=mode, return_dict=False)[0]
            expected = reference(**call, kv_cache=reference_cache, kv_cache_mode=mode, return_dict=False)[0]
        assert torch.equal(actual, expected), f"step {step} ({mode})"
    # The cached steps return the generated image's tokens only, equal to the last tokens of a full call.
    target = math.prod(inputs["img_shapes"][0][-1])
    assert actual.shape[1] == target
    full, _ = both(ours, reference, call)
    torch.testing.assert_close(actual, full[:, -target:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_is_bit_identical_with_the_timestep_frequencies_cast_as_in_diffusers(dtype):
    """`model.to(dtype)` rounds the timestep frequencies (a non-persistent buffer in diffusers) with the weights."""
    ours, reference = build_pair(TINY, seed=4)
    ours, reference = ours.to(dtype), reference.to(dtype)
    assert ours.time_text_embed.time_proj.freqs.dtype == dtype
    inputs = make_inputs(TINY, *CASES["one-condition-padded"])
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    actual, expected = both(ours, reference, inputs)
    assert actual.dtype == dtype
    assert torch.equal(actual, expected)


def test_released_config_builds_on_meta_with_the_published_size():
    with torch.device("meta"):
        model = QwenImage21Transformer2DModel()
    count = sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        reference = ReferenceQwenImage21()
    assert count == sum(p.numel() for p in reference.parameters())


def test_teacache_skips_and_reuses_the_residual_per_branch():
    ours, _ = build_pair(TINY, seed=2)
    inputs = make_inputs(TINY, *CASES["one-condition-padded"])
    ours.enable_teacache(TeaCacheParams(teacache_thresh=1e6, coefficients=(1.0, 0.0)), 4)
    outputs = []
    try:
        for step in range(4):
            for negative in (False, True):
                with ours.teacache_step(step, is_cfg_negative=negative), torch.no_grad():
                    outputs.append(ours(**dict(inputs, timestep=torch.full((2,), 1 - step / 4)), return_dict=False)[0])
        stats = ours.teacache_stats()
    finally:
        ours.disable_teacache()
    for branch in (stats.positive, stats.negative):
        assert branch.computed_steps == (0, 3) and branch.skipped_steps == (1, 2)
    assert not torch.equal(outputs[2], outputs[4])  # a skipped step still follows its own timestep through the head


def test_the_indicator_reads_the_generated_images_tokens():
    ours, _ = build_pair(TINY, seed=2)
    inputs = make_inputs(TINY, *CASES["one-condition-padded"])
    seen = []
    original = ours.teacache_indicator

    def spy(hidden_states, **block_inputs):
        seen.append(original(hidden_states, **block_inputs))
        return seen[-1]

    ours.teacache_indicator = spy
    ours.enable_teacache(TeaCacheParams(teacache_thresh=0.0, coefficients=(1.0, 0.0)), 2)
    try:
        with ours.teacache_step(0, is_cfg_negative=False), torch.no_grad():
            ours(**inputs, return_dict=False)
    finally:
        ours.disable_teacache()
    assert seen[0].shape == (2, math.prod(CASES["one-condition-padded"][3]), ours.inner_dim)


def bad_inputs():
    good = make_inputs(TINY, *CASES["one-condition-padded"])
    batch, slots = 2, good["encoder_hidden_states"].shape[1]
    cases = {
        "hidden_states width": ({"hidden_states": torch.randn(2, 12, 5)}, ValueError, r"\(B, L, 8\)"),
        "integer latents": ({"hidden_states": torch.ones(2, 16, 8, dtype=torch.long)}, TypeError, "floating"),
        "text width": ({"encoder_hidden_states": torch.randn(2, slots, 11)}, ValueError, r"\(2, L, 12\)"),
        "text missing": ({"encoder_hidden_states": None}, TypeError, "encoder_hidden_states"),
        "timestep missing": ({"timestep": None}, TypeError, "timestep is required"),
        "timestep shape": ({"timestep": torch.rand(3)}, ValueError, "timestep must have shape"),
        "img_shapes tokens": ({"img_shapes": [[(1, 2, 4), (1, 2, 2)]] * 2}, ValueError, "describes 12 image tokens"),
        "img_shapes entry": ({"img_shapes": [[(1, 2)]] * 2}, ValueError, "img_shapes must be"),
        "img_mask type": ({"img_mask": good["img_mask"].long()}, TypeError, "img_mask must be a bool tensor"),
        "img_mask length": ({"img_mask": good["img_mask"][:, 1:]}, ValueError, "img_mask must have shape"),
        "img_mask slots": (
            {"img_mask": torch.cat([torch.zeros(batch, slots, dtype=torch.bool), good["img_mask"][:, slots:]], 1)},
            ValueError,
            "image slots",
        ),
        "text mask shape": ({"encoder_hidden_states_mask": torch.ones(2, 3)}, ValueError, "encoder_hidden_states_mask"),
        "cache mode alone": ({"kv_cache_mode": "cached"}, ValueError, "no kv_cache was given"),
        "cache mode": ({"kv_cache": QwenImage21KVCache(2), "kv_cache_mode": "read"}, ValueError, "kv_cache_mode must"),
        "attention kwargs": ({"attention_kwargs": {"x": 1}}, ValueError, "attention_kwargs"),
        "empty batch": (
            {
                "hidden_states": torch.randn(0, 16, 8),
                "encoder_hidden_states": torch.randn(0, slots, 12),
                "encoder_hidden_states_mask": None,
            },
            ValueError,
            "at least one sample",
        ),
    }
    return TINY, good, cases


BAD_ARCHITECTURE = [
    ({"axes_dims_rope": (4, 6, 4)}, "must sum to attention_head_dim"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"mlp_ratio": 0}, "mlp_ratio"),
    ({"eps": 0.0}, "eps must be a positive number"),
    ({"causal_condition": 1}, "causal_condition must be True or False"),
]


def test_a_cache_needs_causal_condition():
    ours, _ = build_pair(CONFIGS["not-causal-condition"])
    inputs = make_inputs(TINY, *CASES["text-only"])
    with pytest.raises(ValueError, match="kv_cache needs causal_condition=True"):
        ours(**inputs, kv_cache=QwenImage21KVCache(2), kv_cache_mode="extract")
