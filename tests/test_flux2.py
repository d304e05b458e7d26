"""Native FLUX.2 against diffusers' Flux2Transformer2DModel: reference images, the klein KV cache, TeaCache."""

import pytest
import torch
from diffusers import Flux2Transformer2DModel as ReferenceFlux2
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

from teacache_models import TeaCacheParams
from teacache_models.models import Flux2Transformer2DModel
from teacache_models.models.flux2 import Flux2KVCache
from tests.utils import assert_identical, assert_parity, load_both_ways, randomize_

TINY = dict(
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),
)

CONFIGS = {
    "tiny-dev": dict(TINY, guidance_embeds=True),
    "tiny-klein": dict(TINY, guidance_embeds=False),
    "deeper-odd-heads": dict(
        in_channels=6,
        out_channels=3,
        patch_size=2,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=8,
        num_attention_heads=3,
        joint_attention_dim=20,
        timestep_guidance_channels=18,
        mlp_ratio=2.5,
        axes_dims_rope=(2, 2, 2, 2),
        rope_theta=500,
        eps=1e-5,
        guidance_embeds=True,
    ),
    "single-stream-only": dict(TINY, num_layers=0, num_single_layers=2, guidance_embeds=False),
    "dual-stream-only": dict(TINY, num_layers=2, num_single_layers=0, guidance_embeds=True),
}


def build_pair(config: dict, seed: int = 0) -> tuple[Flux2Transformer2DModel, ReferenceFlux2]:
    """Ours and diffusers' with the same random weights; diffusers' with the KV-cache processors that its klein KV
    pipeline installs (which, without a KV mode, compute what the default ones do)."""
    reference = ReferenceFlux2(**config)
    for block in reference.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in reference.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    randomize_(reference, seed).eval()
    ours = Flux2Transformer2DModel(**config).eval()
    load_both_ways(ours, reference)
    return ours, reference


def image_ids(height: int, width: int, t: int = 0) -> torch.Tensor:
    """(T, H, W, L) ids of one image's tokens, as the FLUX.2 pipelines make them (T = 10 * (i + 1) for reference i)."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(height), torch.arange(width), torch.tensor([0]))


def make_inputs(
    config: dict,
    batch: int,
    height: int,
    width: int,
    text_len: int,
    refs: tuple[tuple[int, int], ...] = (),
    seed: int = 1,
) -> dict:
    """One call's keyword arguments: the noisy image's tokens, then each reference image's (`refs`: sizes)."""
    generator = torch.Generator().manual_seed(seed)
    ids = [image_ids(height, width)] + [image_ids(h, w, 10 * (i + 1)) for i, (h, w) in enumerate(refs)]
    img_ids = torch.cat(ids)
    inputs = dict(
        hidden_states=torch.randn(batch, len(img_ids), config["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(batch, text_len, config["joint_attention_dim"], generator=generator),
        timestep=torch.rand(batch, generator=generator),
        img_ids=img_ids.unsqueeze(0).expand(batch, -1, -1),  # (B, L, 4), as the pipelines pass them
        txt_ids=torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_len)),
    )
    if config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 4.0)
    return inputs


@torch.no_grad()
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    ("batch", "height", "width", "text_len", "refs"),
    [(1, 4, 4, 5, ()), (2, 3, 5, 7, ((2, 3),)), (2, 1, 7, 1, ((3, 3), (1, 5), (2, 2)))],
)
def test_parity_with_diffusers(name, batch, height, width, text_len, refs):
    config = CONFIGS[name]
    ours, reference = build_pair(config, seed=hash((name, batch, height)) % 1000)
    inputs = make_inputs(config, batch, height, width, text_len, refs)
    assert_identical(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])


@torch.no_grad()
def test_parity_with_2d_ids_random_positions_and_broadcast_timestep():
    config = CONFIGS["deeper-odd-heads"]
    ours, reference = build_pair(config, seed=3)
    inputs = make_inputs(config, 2, 3, 3, 4, refs=((2, 2),))
    inputs["img_ids"] = torch.randn(13, 4) * 7
    inputs["txt_ids"] = torch.randn(4, 4)
    assert_identical(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])
    # diffusers broadcasts a (1,) timestep and guidance over the batch without expanding them; so do we.
    inputs["timestep"], inputs["guidance"] = torch.tensor([0.37]), torch.tensor([2.5])
    assert_identical(ours(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0])


@torch.no_grad()
@pytest.mark.parametrize("name", ["tiny-klein", "deeper-odd-heads", "single-stream-only", "dual-stream-only"])
def test_kv_cache_extract_then_cached_matches_diffusers(name):
    """The klein KV flow: step 0 with the reference tokens first fills the cache; later steps read it."""
    config = CONFIGS[name]
    ours, reference = build_pair(config, seed=5)
    refs = ((2, 3), (3, 1))
    full = make_inputs(config, 2, 3, 4, 5, refs)
    num_ref = 9
    # The reference tokens lead in an extract call.
    order = torch.cat([torch.arange(12, 21), torch.arange(12)])
    extract = dict(full, hidden_states=full["hidden_states"][:, order], img_ids=full["img_ids"][:, order])
    kv = dict(kv_cache_mode="extract", num_ref_tokens=num_ref, ref_fixed_timestep=0.0)
    expected, reference_cache = reference(**extract, **kv, return_dict=False)
    actual, cache = ours(**extract, **kv, return_dict=False)
    assert_identical(actual, expected)
    assert actual.shape[1] == 12 and isinstance(cache, Flux2KVCache) and cache.num_ref_tokens == num_ref
    layers = zip(
        cache.double_block_caches + cache.single_block_caches,
        reference_cache.double_block_caches + reference_cache.single_block_caches,
        strict=True,
    )
    for mine, theirs in layers:
        assert torch.equal(mine.k_ref, theirs.k_ref) and torch.equal(mine.v_ref, theirs.v_ref)

    later = make_inputs(config, 2, 3, 4, 5, seed=7)
    later["encoder_hidden_states"] = full["encoder_hidden_states"]
    expected = reference(**later, kv_cache=reference_cache, kv_cache_mode="cached", return_dict=False)[0]
    output = ours(**later, kv_cache=cache, kv_cache_mode="cached")
    assert output.kv_cache is None
    assert_identical(output.sample, expected)
    # The output object of an extract call carries the cache.
    returned = ours(**extract, **kv)
    assert isinstance(returned.kv_cache, Flux2KVCache) and torch.equal(returned.sample, actual)


@torch.no_grad()
def test_reference_tokens_change_the_prediction_and_the_cache_stands_for_them():
    """Reference tokens are attended to (the image's prediction depends on them), and a cached call equals an
    extract call's image prediction when the noisy tokens and timestep are the same."""
    config = CONFIGS["tiny-klein"]
    ours, _ = build_pair(config, seed=6)
    plain = make_inputs(config, 2, 3, 3, 4)
    edited = make_inputs(config, 2, 3, 3, 4, refs=((2, 2),))
    edited["hidden_states"][:, :9] = plain["hidden_states"]
    edited["encoder_hidden_states"], edited["timestep"] = plain["encoder_hidden_states"], plain["timestep"]
    without = ours(**plain, return_dict=False)[0]
    with_refs = ours(**edited, return_dict=False)[0][:, :9]
    assert not torch.allclose(without, with_refs, atol=1e-3)

    order = torch.cat([torch.arange(9, 13), torch.arange(9)])
    extract = dict(edited, hidden_states=edited["hidden_states"][:, order], img_ids=edited["img_ids"][:, order])
    first, cache = ours(**extract, kv_cache_mode="extract", num_ref_tokens=4, return_dict=False)
    again = ours(**plain, kv_cache=cache, kv_cache_mode="cached", return_dict=False)[0]
    # Same queries and keys, one attention call instead of two: equal to float32 rounding.
    assert_parity(again, first, tol=1e-5)
    cache.clear()
    with pytest.raises(RuntimeError, match="KV cache layer is empty"):
        ours(**plain, kv_cache=cache, kv_cache_mode="cached")


def test_teacache_with_the_kv_cache_at_threshold_zero_is_bit_identical():
    config = CONFIGS["tiny-klein"]
    ours, _ = build_pair(config, seed=9)
    edited = make_inputs(config, 1, 3, 3, 4, refs=((2, 2),))
    order = torch.cat([torch.arange(9, 13), torch.arange(9)])
    extract = dict(edited, hidden_states=edited["hidden_states"][:, order], img_ids=edited["img_ids"][:, order])
    plain = make_inputs(config, 1, 3, 3, 4)

    def run(params):
        if params is not None:
            ours.enable_teacache(params, 4)
        outputs, cache = [], None
        for step, sigma in enumerate((1.0, 0.75, 0.5, 0.25)):
            timestep = torch.tensor([sigma])
            with torch.no_grad(), ours.teacache_step(step):
                if step == 0:
                    out, cache = ours(
                        **dict(extract, timestep=timestep), kv_cache_mode="extract", num_ref_tokens=4, return_dict=False
                    )
                else:
                    out = ours(**dict(plain, timestep=timestep), kv_cache=cache, kv_cache_mode="cached").sample
                outputs.append(out)
        return outputs

    uncached = run(None)
    cached = run(TeaCacheParams(teacache_thresh=0.0, coefficients=(1.0, 0.0)))
    assert all(torch.equal(a, b) for a, b in zip(uncached, cached, strict=True))
    assert ours.teacache_stats().positive.computed_steps == (0, 1, 2, 3)
    # A real threshold skips cached steps; the extract step and the first step after it compute (their block
    # inputs differ in shape, so the extract step's residual cannot stand in).
    ours.enable_teacache(TeaCacheParams(teacache_thresh=10.0, coefficients=(1.0, 0.0)), 4)
    run(None)
    stats = ours.teacache_stats().positive
    assert stats.computed_steps[:2] == (0, 1) and stats.skipped_steps == (2,)


# ---- the contract's bad input and architecture ------------------------------------------------------


def bad_inputs():
    config = CONFIGS["tiny-dev"]
    good = make_inputs(config, 2, 2, 3, 4)
    cases = {
        "hidden_states rank": ({"hidden_states": good["hidden_states"][0]}, ValueError, "hidden_states must have"),
        "hidden_states width": ({"hidden_states": torch.randn(2, 6, 5)}, ValueError, r"\(B, L, 4\)"),
        "no image tokens": ({"hidden_states": torch.randn(2, 0, 4)}, ValueError, "at least 1 token"),
        "hidden_states type": ({"hidden_states": [[1.0]]}, TypeError, "hidden_states must be a tensor"),
        "text batch": ({"encoder_hidden_states": torch.randn(3, 4, 24)}, ValueError, r"\(2, L, 24\)"),
        "text missing": ({"encoder_hidden_states": None}, TypeError, "encoder_hidden_states"),
        "guidance missing": ({"guidance": None}, ValueError, "guidance is required"),
        "timestep shape": ({"timestep": torch.rand(3)}, ValueError, "timestep must have shape"),
        "timestep missing": ({"timestep": None}, TypeError, "timestep"),
        "reference ids too few": (
            {"img_ids": torch.zeros(5, 4)},
            ValueError,
            r"img_ids must have shape \(6, 4\) or \(2, 6, 4\)",
        ),
        "ids differ per row": ({"img_ids": torch.randn(2, 6, 4)}, ValueError, "img_ids differs between batch rows"),
        "txt_ids axes": ({"txt_ids": torch.zeros(4, 3)}, ValueError, r"txt_ids must have shape \(4, 4\)"),
        "ids missing": ({"img_ids": None}, TypeError, "img_ids"),
        "attention kwargs": ({"joint_attention_kwargs": {"kv_cache": None}}, ValueError, "joint_attention_kwargs"),
        "hidden_states dtype": ({"hidden_states": torch.randn(2, 6, 4).double()}, TypeError, "float32"),
        "unknown kv mode": ({"kv_cache_mode": "reuse"}, ValueError, "kv_cache_mode must be None or one of"),
        "cached without cache": ({"kv_cache_mode": "cached"}, TypeError, "needs the Flux2KVCache"),
        "cache without mode": ({"kv_cache": Flux2KVCache(1, 1)}, ValueError, "kv_cache is read only with"),
        "cache of another model": (
            {"kv_cache": Flux2KVCache(2, 1), "kv_cache_mode": "cached"},
            ValueError,
            r"holds \(2, 1\) \(double, single\) layers",
        ),
        "extract without reference tokens": ({"kv_cache_mode": "extract"}, ValueError, "0 < num_ref_tokens < the 6"),
        "extract with every token a reference": (
            {"kv_cache_mode": "extract", "num_ref_tokens": 6},
            ValueError,
            "num_ref_tokens",
        ),
        "reference count without extract": ({"num_ref_tokens": 3}, ValueError, "read only with kv_cache_mode"),
        "negative reference count": ({"num_ref_tokens": -1}, ValueError, "integer >= 0"),
        "unknown keyword": ({"pooled_projections": torch.randn(2, 8)}, TypeError, "pooled_projections"),
    }
    return config, good, cases


def test_guidance_given_to_klein_is_refused():
    config = CONFIGS["tiny-klein"]
    model = Flux2Transformer2DModel(**config)
    with pytest.raises(ValueError, match="guidance must be None"):
        model(**make_inputs(config, 1, 2, 2, 3), guidance=torch.tensor([4.0]))


BAD_ARCHITECTURE = [
    ({"axes_dims_rope": (4, 4, 4)}, "must sum to attention_head_dim"),
    ({"axes_dims_rope": (3, 5, 4, 4)}, "even"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"mlp_ratio": 0}, "mlp_ratio"),
    ({"num_single_layers": -1}, "num_single_layers"),
    ({"rope_theta": -2}, "rope_theta"),
]
