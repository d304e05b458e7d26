"""Wan, HunyuanVideo and HunyuanVideo-1.5 on several CPU ranks (Gloo): sequence-parallel, CFG-parallel and both at once.

Every rank builds the same random model and computes the single-process result itself, then the
parallel one, and compares: outputs in float32 to a tight tolerance, TeaCache skip schedules exactly.
"""

from __future__ import annotations

import pytest
import torch

from teacache_models import TeaCacheParams
from teacache_models.distributed import ParallelState
from teacache_models.models import HunyuanVideo15Transformer3DModel, HunyuanVideoTransformer3DModel
from teacache_models.models.wan import WanTransformer3DModel
from tests import tiny_configs
from tests.test_distributed_primitives import spawn_ranks
from tests.utils import assert_parity, randomize_

TOL = 1e-5
NUM_STEPS = 6
LINEAR = (1.0, 0.0)  # rescaled distance = raw distance

WAN_TINY, WAN_I2V, HV_TINY = tiny_configs.WAN_TINY, tiny_configs.WAN_I2V, tiny_configs.HUNYUAN_VIDEO_TINY
HV15_TINY = tiny_configs.HUNYUAN_VIDEO15_TINY
HV_TOKEN_REPLACE = dict(HV_TINY, num_layers=2, num_single_layers=2, image_condition_type="token_replace")


def wan_inputs(config: dict, batch: int, grid: tuple[int, int, int], seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    sizes = [g * p for g, p in zip(grid, config["patch_size"], strict=True)]
    text_len = 512 if config.get("added_kv_proj_dim") else 7
    inputs = dict(
        hidden_states=torch.randn(batch, config["in_channels"], *sizes, generator=generator),
        timestep=torch.rand(batch, generator=generator) * 1000,
        encoder_hidden_states=torch.randn(batch, text_len, config["text_dim"], generator=generator),
    )
    if config.get("image_dim"):
        inputs["encoder_hidden_states_image"] = torch.randn(batch, 5, config["image_dim"], generator=generator)
    return inputs


def per_token_timestep(batch: int, grid: tuple[int, int, int], t: float = 700.0) -> torch.Tensor:
    """Wan2.2 TI2V: the first (conditioning) frame's tokens carry timestep 0, the others t."""
    frames, height, width = grid
    timestep = torch.full((batch, frames * height * width), t)
    timestep[:, : height * width] = 0.0
    return timestep


def hv_inputs(
    config: dict, batch: int, grid: tuple[int, int, int], lengths: tuple[int, ...], text_len: int, seed: int = 1
) -> dict:
    generator = torch.Generator().manual_seed(seed)
    p, p_t = config["patch_size"], config["patch_size_t"]
    return dict(
        hidden_states=torch.randn(
            batch, config["in_channels"], grid[0] * p_t, grid[1] * p, grid[2] * p, generator=generator
        ),
        timestep=torch.rand(batch, generator=generator) * 1000,
        encoder_hidden_states=torch.randn(batch, text_len, config["text_embed_dim"], generator=generator),
        encoder_attention_mask=(torch.arange(text_len)[None, :] < torch.tensor(lengths)[:, None]).long(),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=generator),
        guidance=torch.full((batch,), 6000.0),
    )


def wan(config: dict, seed: int) -> WanTransformer3DModel:
    return randomize_(WanTransformer3DModel(**config), seed).eval()


def hunyuan(config: dict, seed: int) -> HunyuanVideoTransformer3DModel:
    return randomize_(HunyuanVideoTransformer3DModel(**config), seed).eval()


def hunyuan15(config: dict, seed: int) -> HunyuanVideo15Transformer3DModel:
    return randomize_(HunyuanVideo15Transformer3DModel(**config), seed).eval()


def _forward(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


# ---- one forward ------------------------------------------------------------------------------------


def _sequence_parallel_forwards(state: ParallelState) -> int:
    cases = [
        # Wan T2V, 9 tokens over 2 ranks (one padded), batch 2.
        (wan(WAN_TINY, 0), wan_inputs(WAN_TINY, 2, (1, 3, 3))),
        # Wan2.2 TI2V: one timestep per token, so the modulation is sharded too.
        (wan(WAN_TINY, 1), {**wan_inputs(WAN_TINY, 2, (2, 3, 1)), "timestep": per_token_timestep(2, (2, 3, 1))}),
        # Wan2.1 I2V: cross-attention to CLIP image tokens through their own K/V projections.
        (wan(WAN_I2V, 2), wan_inputs(WAN_I2V, 1, (2, 2, 2))),
        # HunyuanVideo: 45 image tokens (odd), padded text masks, dual- and single-stream blocks.
        (hunyuan(HV_TINY, 3), hv_inputs(HV_TINY, 2, (3, 3, 5), (3, 7), 9)),
        # HunyuanVideo I2V token replace: the first frame's tokens (9 of 27) all live on rank 0.
        (
            hunyuan(HV_TOKEN_REPLACE, 4),
            hv_inputs(HV_TOKEN_REPLACE, 1, (3, 3, 3), (4,), 6),
        ),
        # HunyuanVideo-1.5 T2V: 45 image tokens (odd), padded text and glyph masks, masked image tokens.
        (
            hunyuan15(HV15_TINY, 5),
            tiny_configs.hunyuan_video15_inputs(HV15_TINY, 2, (3, 3, 5), (3, 7), 9, (0, 4), 6, 4, False),
        ),
        # HunyuanVideo-1.5 I2V, step-distilled (MeanFlow timestep_r).
        (
            hunyuan15(dict(HV15_TINY, use_meanflow=True), 6),
            tiny_configs.hunyuan_video15_inputs(
                dict(HV15_TINY, use_meanflow=True), 1, (3, 1, 3), (5,), 5, (2,), 3, 2, True
            ),
        ),
    ]
    for model, inputs in cases:
        expected = _forward(model, inputs)
        model.enable_sequence_parallel(state.sp_group)
        assert_parity(_forward(model, inputs), expected, tol=TOL)
        model.disable_sequence_parallel()
        assert torch.equal(_forward(model, inputs), expected)
    _check_refusals(state)
    return len(cases)


def test_sequence_parallel_forward_equals_one_process(tmp_path):
    assert spawn_ranks(_sequence_parallel_forwards, tmp_path) == [7, 7]


# ---- denoising loops with TeaCache -------------------------------------------------------------------


class Family:
    """A tiny model, its conditioning per CFG branch and a flow-matching Euler loop around it."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "wan":
            self.config = dict(WAN_TINY, num_layers=2)
            grid = (1, 3, 3)
            positive, negative = wan_inputs(self.config, 1, grid, seed=5), wan_inputs(self.config, 1, grid, seed=6)
            # Wan's published indicator (temb) is the same on every rank; the modulated input is per token.
            self.params = TeaCacheParams(teacache_thresh=0.9, coefficients=LINEAR, indicator="modulated_input")
        elif name == "hunyuan_video15":
            # Latent channels only (no condition channels), so the prediction updates all of them.
            self.config = dict(HV15_TINY, in_channels=HV15_TINY["out_channels"])
            case = (1, (3, 3, 3), (4,), 6, (2,), 3, 2, True)
            positive = tiny_configs.hunyuan_video15_inputs(self.config, *case, seed=5)
            negative = tiny_configs.hunyuan_video15_inputs(self.config, *case, seed=6)
            self.params = TeaCacheParams(teacache_thresh=0.7, coefficients=LINEAR)
        else:
            self.config = HV_TINY
            positive = hv_inputs(self.config, 1, (3, 3, 3), (4,), 6, seed=5)
            negative = hv_inputs(self.config, 1, (3, 3, 3), (2,), 6, seed=6)
            self.params = TeaCacheParams(teacache_thresh=0.7, coefficients=LINEAR)
        self.latents = positive.pop("hidden_states")
        for branch in (positive, negative):
            branch.pop("hidden_states", None)
            branch.pop("timestep")
        self.conditions = {False: positive, True: negative}

    def model(self) -> torch.nn.Module:
        build = {"wan": wan, "hunyuan": hunyuan, "hunyuan_video15": hunyuan15}[self.name]
        return build(self.config, 7)

    def denoise(self, model, branches: tuple[bool, ...], cfg=None) -> torch.Tensor:
        """Euler steps with CFG scale 4; `cfg` (a CFGParallel) computes this rank's branch only."""
        model.enable_teacache(self.params, NUM_STEPS)
        sigmas = torch.linspace(1.0, 0.0, NUM_STEPS + 1)
        latents = self.latents
        for step in range(NUM_STEPS):
            timestep = (sigmas[step] * 1000).reshape(1)
            predictions = {}
            for negative in (cfg.is_cfg_negative,) if cfg is not None else branches:
                with torch.no_grad(), model.teacache_step(step, is_cfg_negative=negative):
                    predictions[negative] = model(
                        latents, timestep=timestep, **self.conditions[negative], return_dict=False
                    )[0]
            if cfg is not None:
                predictions[False], predictions[True] = cfg.combine(predictions[cfg.is_cfg_negative])
            prediction = predictions[False]
            if True in predictions:
                prediction = predictions[True] + 4.0 * (prediction - predictions[True])
            latents = latents + (sigmas[step + 1] - sigmas[step]) * prediction
        return latents


def _check_loops(state: ParallelState, families: tuple[str, ...]) -> dict:
    """The parallel loop against the single-process one; returns this rank's skip schedules."""
    schedules = {}
    for name in families:
        family = Family(name)
        reference_model = family.model()
        expected = family.denoise(reference_model, (False, True))
        expected_stats = reference_model.teacache_stats()
        assert 0 < expected_stats.positive.num_skipped < NUM_STEPS - 1, expected_stats
        assert 0 < expected_stats.negative.num_skipped < NUM_STEPS - 1, expected_stats

        model = family.model()
        state.enable_sequence_parallel(model)
        latents = family.denoise(model, (False, True), cfg=state.cfg)
        stats = model.teacache_stats()
        mine = [True] if state.cfg is not None and state.cfg.is_cfg_negative else [False]
        if state.cfg is None:
            mine = [False, True]
        for negative in mine:
            branch = "negative" if negative else "positive"
            assert getattr(stats, branch) == getattr(expected_stats, branch), (name, branch, stats, expected_stats)
        if state.cfg is not None:
            # Each rank keeps only its own branch's state.
            other = "positive" if state.cfg.is_cfg_negative else "negative"
            assert getattr(stats, other).num_computed == 0 == getattr(stats, other).num_skipped
        if state.sp_group is None:
            assert torch.equal(latents, expected), name  # CFG parallelism alone changes no arithmetic
        else:
            assert_parity(latents, expected, tol=TOL)
        schedules[name] = [getattr(stats, "negative" if negative else "positive") for negative in mine]
    return schedules


def _wan_and_hunyuan_loops(state: ParallelState) -> dict:
    return _check_loops(state, ("wan", "hunyuan", "hunyuan_video15"))


def _combined_loops(state: ParallelState) -> dict:
    return _check_loops(state, ("wan",))


def test_sequence_parallel_teacache_skips_the_same_steps_on_every_rank(tmp_path):
    ranks = spawn_ranks(_wan_and_hunyuan_loops, tmp_path)
    assert ranks[0] == ranks[1]


def test_cfg_parallel_ranks_compute_one_branch_each_and_match_one_process(tmp_path):
    ranks = spawn_ranks(_wan_and_hunyuan_loops, tmp_path, cfg_parallel=True)
    assert ranks[0] != ranks[1]  # positive and negative schedules of these prompts differ


def test_cfg_and_sequence_parallel_combined_on_four_ranks(tmp_path):
    ranks = spawn_ranks(_combined_loops, tmp_path, world_size=4, cfg_parallel=True, sp_degree=2)
    # Ranks 0, 1 hold the positive branch's two shards, ranks 2, 3 the negative branch's.
    assert ranks[0] == ranks[1] and ranks[2] == ranks[3]


# ---- what cannot be split (checked by the forward test's ranks) -----------------------------------


def _check_refusals(state: ParallelState) -> None:
    model = hunyuan(dict(HV_TINY, num_attention_heads=3, attention_head_dim=10, rope_axes_dim=(2, 4, 4)), 0)
    with pytest.raises(ValueError, match="3 heads are not divisible by 2"):
        model.enable_sequence_parallel(state.sp_group)
    tiny = wan(WAN_TINY, 0)
    tiny.enable_sequence_parallel(state.sp_group)
    one_token = wan_inputs(WAN_TINY, 1, (1, 1, 1))
    with pytest.raises(ValueError, match="a sequence of 1 tokens cannot be split over 2 ranks"):
        _forward(tiny, one_token)
