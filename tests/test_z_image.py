"""Native Z-Image against diffusers' ZImageTransformer2DModel, and TeaCache on Z-Image."""

import pytest
import torch
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel as ReferenceZImage

from teacache_models.models.z_image import ZImageTransformer2DModel
from teacache_models.params import TeaCacheParams
from tests.utils import assert_parity, load_both_ways, randomize_, zoo_fit

# The fit of the released checkpoint, from its zoo entry.
FIT = zoo_fit("z-image-turbo")

TINY = dict(
    in_channels=4,
    dim=16,
    n_layers=1,
    n_refiner_layers=1,
    n_heads=1,
    n_kv_heads=1,
    cap_feat_dim=16,
    axes_dims=(8, 4, 4),
    axes_lens=(256, 32, 32),
)

CONFIGS = {
    "tiny": TINY,
    "two-heads-two-patchings": dict(
        all_patch_size=(2, 1),
        all_f_patch_size=(1, 2),
        in_channels=3,
        dim=24,
        n_layers=2,
        n_refiner_layers=2,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=10,
        axes_dims=(4, 4, 4),
        axes_lens=(300, 40, 40),
    ),
    # dim not divisible by n_heads, no qk norm, SigLIP weights, another theta and t_scale.
    "odd-width-no-qk-norm": dict(
        in_channels=2,
        dim=25,
        n_layers=3,
        n_refiner_layers=0,
        n_heads=2,
        n_kv_heads=1,
        qk_norm=False,
        cap_feat_dim=7,
        siglip_feat_dim=5,
        rope_theta=10000.0,
        t_scale=500.0,
        norm_eps=1e-6,
        axes_dims=(6, 4, 2),
        axes_lens=(128, 16, 16),
    ),
    "no-main-layers": dict(TINY, n_layers=0),
    # 16 channels in 2 x 2 patches: the 64-wide tokens an Omni missing latent (None) stands for.
    "omni": dict(TINY, in_channels=16, n_refiner_layers=2, siglip_feat_dim=6),
}

# (latent F, H, W per sample, caption length per sample)
CASES = {
    "batch1": ([(1, 4, 4)], [5]),
    "batch2-captions-differ": ([(1, 4, 6), (1, 4, 6)], [7, 40]),
    "batch2-sizes-differ": ([(2, 2, 2), (2, 8, 6)], [33, 3]),
    "batch2-equal-multiples-of-32": ([(2, 6, 6), (2, 4, 4)], [32, 32]),
    # A sample may be empty where another one is not: its tokens are all padding of the batch.
    "batch2-one-empty-caption": ([(2, 4, 4), (2, 2, 2)], [0, 5]),
    "batch2-one-empty-latent": ([(2, 4, 0), (2, 2, 2)], [3, 36]),
}


def build_pair(config: dict, seed: int = 0) -> tuple[ZImageTransformer2DModel, ReferenceZImage]:
    reference = randomize_(ReferenceZImage(**config), seed).eval()
    ours = ZImageTransformer2DModel(**config).eval()
    load_both_ways(ours, reference)
    ours.set_teacache_fits({"modulated_input": FIT})  # what its zoo entry hands over
    return ours, reference


def make_inputs(config: dict, sizes: list, caption_lengths: list, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        x=[torch.randn(config["in_channels"], *size, generator=generator) for size in sizes],
        t=torch.rand(len(sizes), generator=generator),
        cap_feats=[torch.randn(n, config["cap_feat_dim"], generator=generator) for n in caption_lengths],
    )


def assert_samples_equal(actual: list, expected: list, tol: float = 1e-5) -> None:
    assert isinstance(actual, list) and len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        if e.numel() == 0:
            assert a.shape == e.shape
            continue
        assert_parity(a, e, tol)


@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(name, case):
    config = CONFIGS[name]
    ours, reference = build_pair(config, seed=len(name) + len(case))
    inputs = make_inputs(config, *CASES[case])
    patchings = zip(config.get("all_patch_size", (2,)), config.get("all_f_patch_size", (1,)), strict=True)
    for patch_size, f_patch_size in patchings:
        if any(size[0] % f_patch_size for size, *_ in zip(*CASES[case], strict=True)):
            continue
        kwargs = dict(inputs, patch_size=patch_size, f_patch_size=f_patch_size, return_dict=False)
        expected = reference(**kwargs)[0]
        actual = ours(**kwargs)[0]
        assert [a.shape for a in actual] == [tuple(img.shape) for img in inputs["x"]]
        assert_samples_equal(actual, expected, tol=0.0)


# Omni mode, per sample: latent (F, H, W) sizes (None: missing), caption lengths, noise flags, SigLIP (H, W)
# grids (None: missing) or None for no SigLIP features.
OMNI_CASES = {
    "target-only": ([[(1, 4, 4)]], [[5]], [[1]], [[(2, 3)]]),
    "conditions-and-batch": (
        [[(1, 4, 4), (1, 2, 6)], [(1, 2, 2)]],
        [[5, 40], [3]],
        [[0, 1], [1]],
        [[(3, 2), (2, 2)], [(1, 1)]],
    ),
    "missing-latent-and-grid-extra-caption": ([[None, (1, 4, 4)]], [[7, 33, 2]], [[0, 1]], [[None, (2, 2)]]),
    "no-siglip-features": ([[(1, 2, 2), (1, 4, 4)], [(1, 4, 2)]], [[32, 1], [64]], [[0, 1], [1]], [None, None]),
    # As released, the SigLIP stream runs only when the first sample has features.
    "siglip-off-without-first-sample-features": ([[(1, 2, 2)], [(1, 4, 2)]], [[4], [9]], [[1], [1]], [None, [(2, 2)]]),
    "fewer-siglip-grids-than-latents": ([[(2, 2, 2), (1, 4, 4), (1, 2, 4)]], [[3, 4, 5]], [[0, 0, 1]], [[(4, 1)]]),
}


def make_omni_inputs(config: dict, case: str, seed: int = 1) -> dict:
    sizes, caption_lengths, flags, grids = OMNI_CASES[case]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    siglip_width = config.get("siglip_feat_dim") or 3
    return dict(
        x=[[None if s is None else randn(config["in_channels"], *s) for s in sample] for sample in sizes],
        t=torch.rand(len(sizes), generator=generator),
        cap_feats=[[randn(n, config["cap_feat_dim"]) for n in sample] for sample in caption_lengths],
        image_noise_mask=flags,
        siglip_feats=[
            None if sample is None else [None if g is None else randn(*g, siglip_width) for g in sample]
            for sample in grids
        ],
    )


@torch.no_grad()
@pytest.mark.parametrize("name", ["omni", "tiny", "odd-width-no-qk-norm"])
@pytest.mark.parametrize("case", list(OMNI_CASES))
def test_omni_parity_with_diffusers(name, case):
    config = CONFIGS[name]
    has_missing = any(s is None for sample in OMNI_CASES[case][0] for s in sample)
    has_missing |= any(g is None for sample in OMNI_CASES[case][3] for g in (sample or ()))
    if has_missing and name != "omni":
        pytest.skip("missing latents need 64-wide patches and missing SigLIP grids a SigLIP stream")
    ours, reference = build_pair(config, seed=len(case))
    inputs = make_omni_inputs(config, case)
    expected = reference(**inputs, return_dict=False)[0]
    actual = ours(**inputs, return_dict=False)[0]
    assert [a.shape for a in actual] == [tuple(sample[-1].shape) for sample in inputs["x"]]
    assert_samples_equal(actual, expected, tol=0.0)


@torch.no_grad()
def test_omni_bfloat16_and_controlnet_residuals_match_diffusers():
    config = CONFIGS["omni"]
    ours, reference = build_pair(config, seed=4)
    ours, reference = ours.to(torch.bfloat16), reference.to(torch.bfloat16)
    inputs = make_omni_inputs(config, "conditions-and-batch")
    inputs["x"] = [[image.bfloat16() for image in sample] for sample in inputs["x"]]
    inputs["siglip_feats"] = [[g.bfloat16() for g in sample] for sample in inputs["siglip_feats"]]
    # Unified lengths: captions 32 + 64, latents 32 + 32, SigLIP 32 + 32 and 32 + 32 + 32.
    generator = torch.Generator().manual_seed(6)
    inputs["controlnet_block_samples"] = {0: torch.randn(2, 224, config["dim"], generator=generator).bfloat16()}
    actual = ours(**inputs, return_dict=False)[0]
    assert all(a.dtype == torch.bfloat16 for a in actual)
    assert_samples_equal(actual, reference(**inputs, return_dict=False)[0], tol=0.0)


@torch.no_grad()
def test_parity_with_broadcast_timestep_and_controlnet_residuals():
    config = CONFIGS["two-heads-two-patchings"]
    ours, reference = build_pair(config, seed=3)
    inputs = make_inputs(config, [(1, 4, 2), (1, 2, 2)], [3, 35])
    inputs["t"] = torch.tensor([0.3])
    # Unified lengths: 32 + 32 and 32 + 64 -> the batch is padded to 96 tokens.
    generator = torch.Generator().manual_seed(5)
    inputs["controlnet_block_samples"] = {1: torch.randn(2, 96, config["dim"], generator=generator)}
    assert_samples_equal(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0], tol=0.0)


@torch.no_grad()
@pytest.mark.parametrize("axes_dims", [(0, 8, 8), (16, 0, 0)])
def test_rope_axis_of_zero_channels_is_accepted_and_bit_identical(axes_dims):
    """diffusers builds and runs a model whose RoPE gives an axis no channels (that axis then rotates nothing)."""
    config = dict(TINY, axes_dims=axes_dims)
    ours, reference = build_pair(config, seed=7)
    inputs = make_inputs(config, [(1, 4, 4), (1, 2, 6)], [5, 3])
    assert_samples_equal(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0], tol=0.0)
    # Positions beyond an axis's table are no error where that axis has no channels: its captions push the time
    # axis past 8 rows.
    config = dict(config, axes_lens=(8, 32, 32) if axes_dims[0] == 0 else (256, 32, 32))
    ours, reference = build_pair(config, seed=7)
    inputs = make_inputs(config, [(1, 4, 4), (1, 2, 6)], [40, 3])
    assert_samples_equal(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0], tol=0.0)


@torch.no_grad()
def test_bfloat16_matches_diffusers():
    ours, reference = build_pair(TINY, seed=5)
    ours, reference = ours.to(torch.bfloat16), reference.to(torch.bfloat16)
    inputs = make_inputs(TINY, [(1, 4, 4), (1, 2, 6)], [9, 4])
    inputs = {k: [v.bfloat16() for v in vs] if isinstance(vs, list) else vs for k, vs in inputs.items()}
    actual = ours(**inputs, return_dict=False)[0]
    assert all(a.dtype == torch.bfloat16 for a in actual)
    assert_samples_equal(actual, reference(**inputs, return_dict=False)[0], tol=0.0)


def test_released_turbo_config_builds_on_meta_with_the_published_size():
    turbo = dict(
        all_patch_size=[2],
        all_f_patch_size=[1],
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512],
    )
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config({"_class_name": "ZImageTransformer2DModel", **turbo})
        reference = ReferenceZImage(**turbo)
    assert set(model.state_dict()) == set(reference.state_dict())
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e9, 1) == 6.2


# ---- TeaCache on Z-Image ---------------------------------------------------------------------------


def denoise(model, num_steps, params=None, seed=1, sizes=((1, 4, 4),), caption_lengths=(5,)):
    """A flow-matching Euler loop (t = 1 - sigma, prediction negated as the pipeline does)."""
    inputs = make_inputs(TINY, list(sizes), list(caption_lengths), seed=seed)
    latents = inputs["x"]
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    if params is not None:
        model.enable_teacache(params, num_steps)
    trajectory = [latents]
    for step in range(num_steps):
        t = (1 - sigmas[step]).expand(len(latents))
        with torch.no_grad(), model.teacache_step(step):
            predictions = model(latents, t, inputs["cap_feats"], return_dict=False)[0]
        latents = [x - (sigmas[step + 1] - sigmas[step]) * p for x, p in zip(latents, predictions, strict=True)]
        trajectory.append(latents)
    return trajectory, inputs["cap_feats"]


def three_steps_skipping_one(model, inputs, params):
    """Steps at t = 0, 0.1, 0.2 with a threshold that skips step 1 (first and last are forced): the outputs
    and the residual step 0 cached."""
    model.enable_teacache(params, 3)
    outputs = []
    for step, t in enumerate((0.0, 0.1, 0.2)):
        with torch.no_grad(), model.teacache_step(step):
            outputs.append(model(**{**inputs, "t": torch.tensor([t, t])}, return_dict=False)[0])
            if step == 0:
                residual = model.previous_residual.clone()
    assert model.teacache_stats().positive.skipped_steps == (1,)
    return outputs, residual


REFINER_INDICATOR = dict(indicator="refiner_modulated_input", coefficients=[1.0, 0.0])


def test_refiner_indicator_at_threshold_zero_is_bit_identical_to_uncached():
    model, _ = build_pair(TINY, seed=7)
    kwargs = dict(sizes=((1, 4, 4), (1, 2, 6)), caption_lengths=(5, 40))
    plain, _ = denoise(model, 6, **kwargs)
    cached, _ = denoise(model, 6, TeaCacheParams(teacache_thresh=0.0, **REFINER_INDICATOR), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(plain[-1], cached[-1], strict=True))
    assert model.teacache_stats().positive.computed_steps == tuple(range(6))


@pytest.mark.parametrize(
    ("params", "skipped_runs"),
    [
        (TeaCacheParams(teacache_thresh=100.0), {"noise_refiner", "context_refiner"}),
        (TeaCacheParams(teacache_thresh=100.0, **REFINER_INDICATOR), set()),
    ],
)
def test_a_skipped_step_runs_the_refiners_unless_the_indicator_is_read_before_them(params, skipped_runs):
    model, _ = build_pair(TINY, seed=9)
    inputs = make_inputs(TINY, [(1, 4, 4), (1, 2, 2)], [5, 36])
    calls = []  # per model call, the blocks that ran
    model.register_forward_pre_hook(lambda *_: calls.append(set()))
    for name in ("noise_refiner", "context_refiner", "layers"):
        getattr(model, name)[0].register_forward_hook(lambda *_, name=name: calls[-1].add(name))
    _, residual = three_steps_skipping_one(model, inputs, params)
    assert calls[1] == skipped_runs
    assert calls[0] == calls[2] == {"noise_refiner", "context_refiner", "layers"}
    assert residual.shape[:2] == (2, 32 + 64)  # the joint padded stream (B, L, D), whatever the indicator


def test_refiner_indicator_needs_its_own_coefficients():
    model, _ = build_pair(TINY)
    with pytest.raises(ValueError, match=r"'refiner_modulated_input' \(its fits are for \['modulated_input'\]\): pass"):
        model.enable_teacache(TeaCacheParams(teacache_thresh=0.1, indicator="refiner_modulated_input"), 4)
    with pytest.raises(ValueError, match=r"choose one of \['modulated_input', 'refiner_modulated_input'\]"):
        model.enable_teacache(TeaCacheParams(teacache_thresh=0.1, indicator="temb"), 4)


def test_teacache_in_the_omni_mode_reads_the_per_token_modulation():
    config = CONFIGS["omni"]
    model, _ = build_pair(config, seed=14)
    inputs = make_omni_inputs(config, "conditions-and-batch")

    def three_steps(params):
        if params is not None:
            model.enable_teacache(params, 3)
        outputs = []
        for step, t in enumerate((0.0, 0.1, 0.2)):
            with torch.no_grad(), model.teacache_step(step):
                outputs.append(model(**{**inputs, "t": torch.tensor([t, t])}, return_dict=False)[0])
        return outputs

    plain = three_steps(None)
    exact = three_steps(TeaCacheParams(teacache_thresh=0.0))
    assert all(torch.equal(a, b) for p, e in zip(plain, exact, strict=True) for a, b in zip(p, e, strict=True))
    three_steps(TeaCacheParams(teacache_thresh=100.0))
    assert model.teacache_stats().positive.skipped_steps == (1,)

    # The indicator: noisy tokens scaled with t's modulation, clean condition tokens with t = 1's.
    captured = {}

    def capture(hidden_states, **block_inputs):
        captured.update(block_inputs, hidden_states=hidden_states)
        return type(model).forward_blocks(model, hidden_states, **block_inputs)

    model.disable_teacache()
    model.forward_blocks = capture
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        del model.forward_blocks
    first, mask = model.layers[0], captured["noise_mask"]
    assert mask.shape == captured["hidden_states"].shape[:2] and set(mask.unique().tolist()) == {0, 1}
    with torch.no_grad():
        noisy = 1.0 + first.adaLN_modulation(model.t_embedder(inputs["t"] * 1000.0)).chunk(4, dim=1)[0]
        clean = 1.0 + first.adaLN_modulation(model.t_embedder(torch.ones(2) * 1000.0)).chunk(4, dim=1)[0]
        scale = torch.where(mask[..., None] == 1, noisy[:, None], clean[:, None])
        expected = first.attention_norm1(captured["hidden_states"]) * scale
        indicator = model.teacache_indicator(**captured)
    assert torch.equal(indicator, expected)

    model.enable_teacache(TeaCacheParams(teacache_thresh=0.1, **REFINER_INDICATOR), 3)
    with pytest.raises(ValueError, match="does not support the Omni mode"), model.teacache_step(0):
        model(**inputs)


def cfg_loop(model, num_steps, mode, trajectory=None):
    """CFG with a positive and a negative caption, calling the branches 'interleaved' or 'batched'.

    With `trajectory` (the latents of an earlier loop), `mode` False / True replays that branch alone.
    Returns the predictions per branch and the latents of every step.
    """
    inputs = make_inputs(TINY, [(1, 4, 4)], [5], seed=1)
    captions = {False: inputs["cap_feats"], True: make_inputs(TINY, [(1, 4, 4)], [11], seed=2)["cap_feats"]}
    latents = [inputs["x"][0]]
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    outputs = {False: [], True: []}
    for step in range(num_steps):
        t = (1 - sigmas[step]).expand(1)
        if trajectory is not None:
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=mode):
                outputs[mode].append(model([trajectory[step]], t, captions[mode])[0][0])
            continue
        if mode == "batched":
            with torch.no_grad(), model.teacache_step(step, batched_cfg=True):
                prediction = model([latents[step]] * 2, t.expand(2), captions[False] + captions[True])[0]
        else:
            prediction = []
            for branch in (False, True):
                with torch.no_grad(), model.teacache_step(step, is_cfg_negative=branch):
                    prediction += model([latents[step]], t, captions[branch])[0]
        positive, negative = prediction
        outputs[False].append(positive)
        outputs[True].append(negative)
        guided = negative + 2.0 * (positive - negative)
        latents.append(latents[step] - (sigmas[step + 1] - sigmas[step]) * guided)
    return outputs, latents


def test_interleaved_and_batched_cfg_branches_match_each_branch_alone():
    model, _ = build_pair(TINY, seed=10)
    params = TeaCacheParams(teacache_thresh=1.0, coefficients=[1.0, 0.0])
    num_steps = 8
    model.enable_teacache(params, num_steps)
    interleaved, trajectory = cfg_loop(model, num_steps, "interleaved")
    both = model.teacache_stats()
    assert both.positive.skipped_steps and both.negative.skipped_steps
    assert not torch.equal(model.previous_residual, model.previous_residual_negative)

    # One batched call per step, split by the model: the same decisions and outputs, branch by branch.
    model.enable_teacache(params, num_steps)
    batched, _ = cfg_loop(model, num_steps, "batched")
    assert model.teacache_stats() == both
    for branch in (False, True):
        assert all(torch.equal(a, b) for a, b in zip(batched[branch], interleaved[branch], strict=True))

    # Each branch replayed alone on the same latents gets exactly what it got beside the other one.
    for branch in (False, True):
        model.enable_teacache(params, num_steps)
        alone, _ = cfg_loop(model, num_steps, branch, trajectory)
        stats = model.teacache_stats()
        assert (stats.negative if branch else stats.positive) == (both.negative if branch else both.positive)
        assert all(torch.equal(a, b) for a, b in zip(alone[branch], interleaved[branch], strict=True))


def test_batched_cfg_without_teacache_is_one_plain_call():
    model, _ = build_pair(TINY, seed=11)
    inputs = make_inputs(TINY, [(1, 4, 4), (1, 4, 4)], [5, 9])
    with torch.no_grad():
        plain = model(**inputs, return_dict=False)[0]
        with model.teacache_step(0, batched_cfg=True):
            batched = model(**inputs, return_dict=False)[0]
    assert all(torch.equal(a, b) for a, b in zip(plain, batched, strict=True))


def test_batched_cfg_with_teacache_rejects_what_it_cannot_split():
    model, _ = build_pair(TINY, seed=12)
    model.enable_teacache(TeaCacheParams(teacache_thresh=0.5), 4)
    odd = make_inputs(TINY, [(1, 2, 2)] * 3, [4, 4, 4])
    with pytest.raises(ValueError, match="must be even"), model.teacache_step(0, batched_cfg=True):
        model(**odd)
    even = make_inputs(TINY, [(1, 2, 2)] * 2, [4, 4])
    controlnet = {0: torch.zeros(2, 64, 16)}
    with pytest.raises(ValueError, match="controlnet_block_samples"), model.teacache_step(0, batched_cfg=True):
        model(**even, controlnet_block_samples=controlnet)
    with torch.no_grad(), model.teacache_step(0, batched_cfg=True):
        model(**even)
        with pytest.raises(RuntimeError, match="one forward call"):
            model(**even)
    assert model.__dict__["_teacache_context"] is None


# ---- bad input ------------------------------------------------------------------------------------


def bad_inputs():
    good = make_inputs(TINY, [(1, 4, 4), (1, 2, 2)], [5, 3])
    x, caps = good["x"], good["cap_feats"]
    cases = {
        "x not a list": ({"x": torch.randn(2, 4, 1, 4, 4)}, TypeError, "x must be a non-empty list"),
        "x empty": ({"x": []}, TypeError, "x must be a non-empty list"),
        "x rank": ({"x": [x[0][:, 0], x[1]]}, ValueError, r"x\[0\] must have shape \(4, F, H, W\)"),
        "x channels": ({"x": [x[0], torch.randn(3, 1, 2, 2)]}, ValueError, r"x\[1\] must have shape \(4,"),
        "x not divisible": ({"x": [torch.randn(4, 1, 3, 4), x[1]]}, ValueError, "multiple of its patch size"),
        "x integer": ({"x": [x[0].long(), x[1]]}, TypeError, "floating"),
        "nested x without noise mask": ({"x": [[x[0]], [x[1]]]}, ValueError, r"Omni mode\), image_noise_mask must"),
        "flat x with siglip": ({"siglip_feats": [[None], [None]]}, ValueError, "siglip_feats must be None"),
        "flat x with noise mask": ({"image_noise_mask": [[1], [1]]}, ValueError, "image_noise_mask must be None"),
        "mixed nesting": (
            {
                "x": [[x[0]], x[1]],
                "cap_feats": [[caps[0]], [caps[1]]],
                "image_noise_mask": [[1], [1]],
                "siglip_feats": [None, None],
            },
            ValueError,
            r"x\[1\] must be a non-empty list",
        ),
        "captions count": ({"cap_feats": caps[:1]}, ValueError, r"one entry per sample of x \(2\), got 1"),
        "caption width": ({"cap_feats": [caps[0], torch.randn(3, 15)]}, ValueError, r"cap_feats\[1\] .*\(L, 16\)"),
        "caption rank": ({"cap_feats": [caps[0][None], caps[1]]}, ValueError, r"cap_feats\[0\] must have shape"),
        "every caption empty": (
            {"cap_feats": [torch.randn(0, 16), torch.randn(0, 16)]},
            ValueError,
            "cap_feats: every caption has 0 tokens",
        ),
        "every latent empty": (
            {"x": [torch.randn(4, 0, 4, 4), torch.randn(4, 1, 0, 2)]},
            ValueError,
            "x: every latent is empty",
        ),
        "x dtype": ({"x": [x[0].double(), x[1]]}, TypeError, r"x\[0\] has dtype torch.float64"),
        "caption dtype": ({"cap_feats": [caps[0], caps[1].double()]}, TypeError, r"cap_feats\[1\] has dtype"),
        "caption type": ({"cap_feats": torch.randn(2, 5, 16)}, TypeError, "cap_feats must be a list"),
        "caption too long": ({"cap_feats": [torch.randn(250, 16), caps[1]]}, ValueError, r"axes_lens\[0\] is 256"),
        "image too wide": ({"x": [torch.randn(4, 1, 2, 66), x[1]]}, ValueError, r"axes_lens\[2\] is 32"),
        "t shape": ({"t": torch.rand(3)}, ValueError, r"t must have shape \(2,\) or \(1,\)"),
        "t rank": ({"t": torch.tensor(0.5)}, ValueError, "t must have shape"),
        "t float": ({"t": 0.5}, TypeError, "t must be a tensor"),
        "patch pair": ({"patch_size": 1}, ValueError, r"\(patch_size, f_patch_size\) = \(1, 1\) is not configured"),
        "attention kwargs": ({"joint_attention_kwargs": {"foo": 1}}, ValueError, "joint_attention_kwargs"),
        "attention kwargs type": ({"joint_attention_kwargs": [("scale", 1.0)]}, TypeError, "joint_attention_kwargs"),
        "controlnet type": ({"controlnet_block_samples": [torch.zeros(1)]}, TypeError, "controlnet_block_samples"),
    }
    return TINY, good, cases


def bad_omni_inputs():
    config = CONFIGS["omni"]
    good = make_omni_inputs(config, "conditions-and-batch")
    x, caps, sig = good["x"], good["cap_feats"], good["siglip_feats"]
    cases = {
        "no siglip list": ({"siglip_feats": None}, ValueError, r"Omni mode\), siglip_feats must be a list"),
        "first target missing": ({"x": [[x[0][0], None], x[1]]}, ValueError, r"x\[0\]\[-1\].*must be a tensor"),
        "fewer captions": ({"cap_feats": [caps[0][:1], caps[1]]}, ValueError, r"cap_feats\[0\] must be a list with"),
        "fewer flags": ({"image_noise_mask": [[1], [1]]}, ValueError, r"image_noise_mask\[0\] must be a list"),
        "float flags": ({"image_noise_mask": [[0.0, 1.0], [1]]}, TypeError, "must hold integers"),
        "latent channels": ({"x": [[x[0][0], torch.randn(4, 1, 2, 2)], x[1]]}, ValueError, r"x\[0\]\[1\] must"),
        "siglip width": ({"siglip_feats": [[torch.randn(2, 2, 5)], sig[1]]}, ValueError, r"siglip_feats\[0\]\[0\]"),
        "siglip after first missing": ({"siglip_feats": [sig[0], None]}, ValueError, r"siglip_feats\[1\] are None"),
        "siglip without latent": (
            {
                "siglip_feats": [sig[0], [sig[1][0], torch.randn(2, 2, 6)]],
                "cap_feats": [caps[0], caps[1] * 2],
                "image_noise_mask": [[0, 1], [1, 0]],
            },
            ValueError,
            r"siglip_feats\[1\]\[1\] has no latent",
        ),
        "caption too long": (
            {"cap_feats": [caps[0], [torch.randn(250, 16)]]},
            ValueError,
            r"cap_feats\[1\] needs RoPE position 256 .* axes_lens\[0\] is 256",
        ),
    }
    return good, cases


@pytest.mark.parametrize("case", list(bad_omni_inputs()[1]))
def test_bad_omni_input_gives_a_clear_error(case):
    good, cases = bad_omni_inputs()
    change, error, match = cases[case]
    model = ZImageTransformer2DModel(**CONFIGS["omni"])
    with pytest.raises(error, match=match), torch.no_grad():
        model(**{**good, **change})


def test_missing_omni_latent_needs_64_wide_patches():
    inputs = make_omni_inputs(TINY, "no-siglip-features")
    inputs["x"][0][0] = None
    with pytest.raises(ValueError, match=r"needs f_patch_size \* patch_size \*\* 2 \* in_channels == 64, got 16"):
        ZImageTransformer2DModel(**TINY)(**inputs)


def test_lora_scale_is_accepted_and_ignored():
    model, _ = build_pair(TINY, seed=13)
    inputs = make_inputs(TINY, [(1, 2, 2)], [3])
    with torch.no_grad():
        plain = model(**inputs, return_dict=False)[0][0]
        scaled = model(**inputs, joint_attention_kwargs={"scale": 1.0}, return_dict=False)[0][0]
    assert torch.equal(plain, scaled)


# Constructor changes to the default config, each refused with a ValueError matching its pattern.
BAD_ARCHITECTURE = [
    ({"axes_dims": (8, 4, 2)}, "must sum to the head width"),
    ({"axes_dims": (7, 5, 4)}, "even"),
    ({"axes_dims": (8, 8), "axes_lens": (256, 32)}, "3 entries"),
    ({"all_patch_size": (2, 1)}, "same length"),
    ({"all_patch_size": (0,)}, "all_patch_size"),
    ({"n_heads": 0}, "n_heads"),
    ({"dim": 16.0}, "dim"),
    ({"n_layers": -1}, "n_layers"),
    ({"siglip_feat_dim": 0}, "siglip_feat_dim"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"qk_norm": "yes"}, "qk_norm"),
]


def test_refiner_indicator_can_be_calibrated():
    from teacache_models.calibration import DistanceRecorder, calibration_params

    model, _ = build_pair(TINY, seed=5)
    plain, _ = denoise(model, 5)
    with DistanceRecorder(model, target="residual") as recorder:
        recorded, _ = denoise(model, 5, calibration_params("refiner_modulated_input"))
    assert all(torch.equal(a, b) for a, b in zip(plain[-1], recorded[-1], strict=True))
    assert [r.step for r in recorder.records] == [1, 2, 3, 4]
    assert all(r.x > 0 and r.y > 0 for r in recorder.records)
