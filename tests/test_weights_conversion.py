"""Original-release checkpoints (BFL Flux, Wan-AI Wan2.1): our rename tables against diffusers' converters."""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel as ReferenceFlux
from diffusers import WanTransformer3DModel as ReferenceWan
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_wan_transformer_to_diffusers,
)
from safetensors.torch import save_file

from teacache_models.models import FluxTransformer2DModel, WanTransformer3DModel
from teacache_models.weights import FLUX_ORIGINAL, WAN_ORIGINAL, CheckpointError, convert_state_dict, load_transformer
from tests import test_flux, test_wan
from tests.utils import assert_parity


def random_state(shapes: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def bfl_flux_shapes(
    layers: int,
    single: int,
    inner: int,
    head_dim: int,
    mlp: int,
    in_channels: int,
    text: int,
    pooled: int,
    guidance: bool,
    cols=None,
) -> dict:
    """The BFL release's keys and shapes (flux/model.py, flux/modules/layers.py); `cols` narrows every input width."""

    def linear(name, rows, inputs):
        return {f"{name}.weight": (rows, cols or inputs), f"{name}.bias": (rows,)}

    shapes = {**linear("img_in", inner, in_channels), **linear("txt_in", inner, text)}
    embedders = [("time_in", 256), ("vector_in", pooled)] + ([("guidance_in", 256)] if guidance else [])
    for name, width in embedders:
        shapes |= linear(f"{name}.in_layer", inner, width) | linear(f"{name}.out_layer", inner, inner)
    for i in range(layers):
        for stream in ("img", "txt"):
            block = f"double_blocks.{i}.{stream}"
            shapes |= linear(f"{block}_mod.lin", 6 * inner, inner) | linear(f"{block}_attn.qkv", 3 * inner, inner)
            shapes |= linear(f"{block}_attn.proj", inner, inner)
            shapes |= linear(f"{block}_mlp.0", mlp, inner) | linear(f"{block}_mlp.2", inner, mlp)
            shapes[f"{block}_attn.norm.query_norm.scale"] = (head_dim,)
            shapes[f"{block}_attn.norm.key_norm.scale"] = (head_dim,)
    for i in range(single):
        block = f"single_blocks.{i}"
        shapes |= linear(f"{block}.modulation.lin", 3 * inner, inner) | linear(
            f"{block}.linear1", 3 * inner + mlp, inner
        )
        shapes |= linear(f"{block}.linear2", inner, inner + mlp)
        shapes[f"{block}.norm.query_norm.scale"] = (head_dim,)
        shapes[f"{block}.norm.key_norm.scale"] = (head_dim,)
    return (
        shapes
        | linear("final_layer.linear", in_channels, inner)
        | linear("final_layer.adaLN_modulation.1", 2 * inner, inner)
    )


def wan_original_shapes(config: dict) -> dict:
    """The Wan-AI release's keys and shapes (wan/modules/model.py) for one of our configs."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    text, ffn, out = config["text_dim"], config["ffn_dim"], config["out_channels"]

    def linear(name, rows, inputs):
        return {f"{name}.weight": (rows, inputs), f"{name}.bias": (rows,)}

    shapes = {"patch_embedding.weight": (inner, config["in_channels"], 1, 2, 2), "patch_embedding.bias": (inner,)}
    shapes |= linear("text_embedding.0", inner, text) | linear("text_embedding.2", inner, inner)
    shapes |= linear("time_embedding.0", inner, 256) | linear("time_embedding.2", inner, inner)
    shapes |= linear("time_projection.1", 6 * inner, inner)
    for i in range(config["num_layers"]):
        for attention in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes |= linear(f"blocks.{i}.{attention}.{proj}", inner, inner)
            shapes[f"blocks.{i}.{attention}.norm_q.weight"] = (inner,)
            shapes[f"blocks.{i}.{attention}.norm_k.weight"] = (inner,)
        if config.get("added_kv_proj_dim"):
            shapes |= linear(f"blocks.{i}.cross_attn.k_img", inner, config["added_kv_proj_dim"])
            shapes |= linear(f"blocks.{i}.cross_attn.v_img", inner, config["added_kv_proj_dim"])
            shapes[f"blocks.{i}.cross_attn.norm_k_img.weight"] = (inner,)
        shapes[f"blocks.{i}.norm3.weight"] = shapes[f"blocks.{i}.norm3.bias"] = (inner,)
        shapes |= linear(f"blocks.{i}.ffn.0", ffn, inner) | linear(f"blocks.{i}.ffn.2", inner, ffn)
        shapes[f"blocks.{i}.modulation"] = (1, 6, inner)
    shapes |= linear("head.head", out * 4, inner)
    shapes["head.modulation"] = (1, 2, inner)
    if config.get("image_dim"):
        image = config["image_dim"]
        shapes["img_emb.proj.0.weight"] = shapes["img_emb.proj.0.bias"] = (image,)
        shapes |= linear("img_emb.proj.1", image, image) | linear("img_emb.proj.3", inner, image)
        shapes["img_emb.proj.4.weight"] = shapes["img_emb.proj.4.bias"] = (inner,)
    if config.get("pos_embed_seq_len"):
        shapes["img_emb.emb_pos"] = (1, config["pos_embed_seq_len"], config["image_dim"])
    return shapes


def assert_same_state(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


# ---- the oracle: diffusers' own single-file converters -------------------------------------------------


@pytest.mark.parametrize("guidance", [True, False])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux_rename_table_matches_diffusers_converter(guidance, prefix):
    # diffusers' converter hard-codes the released width (3072) when it splits the single blocks' fused
    # projection, so the rows are the released ones; every input width is cut to 2 to keep this cheap.
    shapes = bfl_flux_shapes(2, 3, 3072, 128, 12288, 64, 4096, 768, guidance, cols=2)
    state = {prefix + k: v for k, v in random_state(shapes, seed=1).items()}
    expected = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    ours = convert_state_dict(FLUX_ORIGINAL, state, config={"num_attention_heads": 24, "attention_head_dim": 128})
    assert_same_state(ours, expected)


WAN_CONFIGS = {
    "t2v": test_wan.TINY,
    "i2v": test_wan.I2V,
    "wide-i2v": dict(test_wan.I2V, num_attention_heads=3, attention_head_dim=8, ffn_dim=40, num_layers=3),
}


@pytest.mark.parametrize("name", list(WAN_CONFIGS))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_wan_rename_table_matches_diffusers_converter(name, prefix):
    shapes = wan_original_shapes(WAN_CONFIGS[name])
    state = {prefix + k: v for k, v in random_state(shapes, seed=2).items()}
    expected = convert_wan_transformer_to_diffusers(dict(state))
    ours = convert_state_dict(WAN_ORIGINAL, state, config=WAN_CONFIGS[name])
    assert_same_state(ours, expected)


# ---- coverage: every original key maps, and onto exactly our model's keys -----------------------------

FLUX_CONFIGS = {
    "dev": dict(test_flux.TINY, guidance_embeds=True),
    "schnell-deeper": dict(test_flux.TINY, num_layers=2, num_single_layers=3, guidance_embeds=False),
}


def flux_original_shapes(config: dict) -> dict:
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    return bfl_flux_shapes(
        config["num_layers"],
        config["num_single_layers"],
        inner,
        config["attention_head_dim"],
        4 * inner,
        config["in_channels"],
        config["joint_attention_dim"],
        config["pooled_projection_dim"],
        config["guidance_embeds"],
    )


@pytest.mark.parametrize(
    ("model_class", "config", "original", "shapes"),
    [(FluxTransformer2DModel, c, FLUX_ORIGINAL, flux_original_shapes(c)) for c in FLUX_CONFIGS.values()]
    + [(WanTransformer3DModel, c, WAN_ORIGINAL, wan_original_shapes(c)) for c in WAN_CONFIGS.values()]
    + [
        (WanTransformer3DModel, test_wan.CONFIGS["flf2v"], WAN_ORIGINAL, wan_original_shapes(test_wan.CONFIGS["flf2v"]))
    ],
)
def test_rename_tables_cover_every_key(model_class, config, original, shapes):
    state = random_state(shapes, seed=3)
    heads = {"num_heads": config["num_attention_heads"]}
    inferred = original.infer_config(shapes, None if original is FLUX_ORIGINAL else heads, {})
    for key, value in inferred.items():
        if key in config:
            expected = config[key]
            assert value == (tuple(expected) if isinstance(expected, list | tuple) else expected), key
    converted = convert_state_dict(original, state, config)
    model_shapes = {k: tuple(v.shape) for k, v in model_class(**config).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == model_shapes


@pytest.mark.parametrize("original", [FLUX_ORIGINAL, WAN_ORIGINAL])
def test_a_key_outside_the_table_is_an_error(original):
    shapes = (
        flux_original_shapes(FLUX_CONFIGS["dev"]) if original is FLUX_ORIGINAL else wan_original_shapes(test_wan.TINY)
    )
    state = random_state(shapes, seed=4) | {"blocks.0.mystery.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"rename table does not cover: blocks\.0\.mystery\.weight"):
        convert_state_dict(original, state, FLUX_CONFIGS["dev"] if original is FLUX_ORIGINAL else test_wan.TINY)


# ---- loading original checkpoints from disk ------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("name", list(WAN_CONFIGS))
def test_wan_original_folder_loads_as_diffusers_converts_it(name, tmp_path):
    config = WAN_CONFIGS[name]
    state = random_state(wan_original_shapes(config), seed=5)
    reference = ReferenceWan(**config).eval()
    reference.load_state_dict(convert_wan_transformer_to_diffusers(dict(state)), strict=True)
    # The Wan-AI layout: an original config.json and sharded safetensors with their index at the root.
    keys = list(state)
    halves = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2],
    }
    for file, part in halves.items():
        save_file({k: state[k] for k in part}, tmp_path / file)
    weight_map = {k: file for file, part in halves.items() for k in part}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    original_config = {"_class_name": "WanModel", "dim": inner, "num_heads": config["num_attention_heads"], "eps": 1e-6}
    (tmp_path / "config.json").write_text(json.dumps(original_config))
    model = load_transformer(tmp_path, WanTransformer3DModel, subfolder=None, config={"rope_max_seq_len": 32})
    inputs = test_wan.make_inputs(config, 2, (2, 2, 2))
    assert_parity(model(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0], tol=0.0)


@torch.no_grad()
@pytest.mark.parametrize("name", list(FLUX_CONFIGS))
def test_flux_single_file_loads(name, tmp_path):
    config = FLUX_CONFIGS[name]
    state = random_state(flux_original_shapes(config), seed=6)
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in state.items()}, path)
    reference = ReferenceFlux(**config).eval()
    reference.load_state_dict(convert_state_dict(FLUX_ORIGINAL, state), strict=True)
    with pytest.raises(CheckpointError, match="attention_head_dim"):
        load_transformer(path, FluxTransformer2DModel)  # the released RoPE split does not fit a tiny head
    model = load_transformer(path, FluxTransformer2DModel, config={"axes_dims_rope": config["axes_dims_rope"]})
    assert model.config["guidance_embeds"] == config["guidance_embeds"]
    inputs = test_flux.make_inputs(config, 2, 3, 4, 5)
    assert_parity(model(**inputs, return_dict=False)[0], reference(**inputs, return_dict=False)[0], tol=0.0)


def test_wan_without_config_assumes_128_channel_heads(tmp_path):
    state = random_state(wan_original_shapes(test_wan.TINY), seed=7)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"24 wide, not a multiple of 128-channel heads.*num_attention_heads"):
        load_transformer(tmp_path, WanTransformer3DModel)
    model = load_transformer(
        tmp_path, WanTransformer3DModel, config={"num_attention_heads": 2, "attention_head_dim": 12}
    )
    assert model.config["num_layers"] == test_wan.TINY["num_layers"]
