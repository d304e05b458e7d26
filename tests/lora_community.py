"""Tiny LoRAs in the community layouts, keyed by hand from those layouts' names; shapes read from the model."""

from __future__ import annotations

import torch
from torch import nn


class Writer:
    """Random LoRA pairs named in a community layout, sized from the diffusers-named module they adapt."""

    def __init__(self, model: nn.Module, seed: int) -> None:
        self.model, self.generator, self.state_dict = model, torch.Generator().manual_seed(seed), {}

    def pair(self, key: str, module: str, rank=4, down="lora_down", up="lora_up", alpha=None, fused=1) -> Writer:
        layer = self.model.get_submodule(module)
        d_in, d_out = layer.in_features, layer.out_features * fused
        self.state_dict[f"{key}.{down}.weight"] = torch.randn(rank, d_in, generator=self.generator) * 0.3
        self.state_dict[f"{key}.{up}.weight"] = torch.randn(d_out, rank, generator=self.generator) * 0.3
        if alpha is not None:
            self.state_dict[f"{key}.alpha"] = torch.tensor(float(alpha))
        return self


def flux_kohya(model: nn.Module) -> dict:
    """sd-scripts / Kohya: flattened BFL names, lora_down / lora_up, alpha; a fused QKV split by rows."""
    w = Writer(model, 1)
    w.pair("lora_unet_double_blocks_0_img_attn_proj", "transformer_blocks.0.attn.to_out.0", alpha=2)
    w.pair("lora_unet_double_blocks_0_img_attn_qkv", "transformer_blocks.0.attn.to_q", alpha=4, fused=3)
    w.pair("lora_unet_double_blocks_0_txt_mlp_0", "transformer_blocks.0.ff_context.net.0.proj", alpha=8)
    w.pair("lora_unet_single_blocks_0_linear2", "single_transformer_blocks.0.proj_out", alpha=4)
    return w.state_dict


def flux2_ai_toolkit(model: nn.Module, prefix: str = "diffusion_model.") -> dict:
    """ai-toolkit / BFL names of FLUX.2: lora_A / lora_B, a double block's fused QKV split by rows, the single
    blocks' fused projections as they are."""
    w = Writer(model, 4)
    w.pair(f"{prefix}double_blocks.0.img_attn.qkv", "transformer_blocks.0.attn.to_q", 4, "lora_A", "lora_B", fused=3)
    w.pair(f"{prefix}double_blocks.0.txt_attn.proj", "transformer_blocks.0.attn.to_add_out", 4, "lora_A", "lora_B")
    w.pair(
        f"{prefix}single_blocks.0.linear1", "single_transformer_blocks.0.attn.to_qkv_mlp_proj", 4, "lora_A", "lora_B"
    )
    w.pair(f"{prefix}single_blocks.0.linear2", "single_transformer_blocks.0.attn.to_out", 4, "lora_A", "lora_B")
    return w.state_dict


def flux2_peft_names(model: nn.Module) -> dict:
    """The same under PEFT's `base_model.model.`."""
    return flux2_ai_toolkit(model, "base_model.model.")


def flux2_kohya(model: nn.Module) -> dict:
    """sd-scripts / Kohya names of FLUX.2: flattened BFL names, lora_down / lora_up, alpha."""
    w = Writer(model, 5)
    w.pair("lora_unet_double_blocks_0_img_attn_qkv", "transformer_blocks.0.attn.to_q", alpha=2, fused=3)
    w.pair("lora_unet_single_blocks_0_linear2", "single_transformer_blocks.0.attn.to_out", alpha=8)
    return w.state_dict


def flux_xlabs(model: nn.Module) -> dict:
    """XLabs: attention-processor names, down / up, no alpha."""
    w = Writer(model, 2)
    w.pair("double_blocks.0.processor.proj_lora1", "transformer_blocks.0.attn.to_out.0", down="down", up="up")
    w.pair("double_blocks.0.processor.qkv_lora1", "transformer_blocks.0.attn.to_q", down="down", up="up", fused=3)
    w.pair("double_blocks.0.processor.proj_lora2", "transformer_blocks.0.attn.to_add_out", down="down", up="up")
    return w.state_dict


def wan_original(model: nn.Module) -> dict:
    """The original Wan names under diffusion_model., alpha, and the bias deltas (`diff_b`) that the distill
    LoRAs (lightx2v, CausVid) carry beside their low-rank pairs."""
    w = Writer(model, 3)
    for block in (0, 1):
        w.pair(f"diffusion_model.blocks.{block}.self_attn.q", f"blocks.{block}.attn1.to_q", alpha=2)
        w.pair(f"diffusion_model.blocks.{block}.cross_attn.k", f"blocks.{block}.attn2.to_k", alpha=4)
        w.pair(f"diffusion_model.blocks.{block}.ffn.0", f"blocks.{block}.ffn.net.0.proj", alpha=8)
        for key, module in (("self_attn.q", "attn1.to_q"), ("ffn.0", "ffn.net.0.proj")):
            width = model.get_submodule(f"blocks.{block}.{module}").out_features
            w.state_dict[f"diffusion_model.blocks.{block}.{key}.diff_b"] = torch.randn(width, generator=w.generator)
    return w.state_dict


def wan_musubi(model: nn.Module) -> dict:
    """musubi-tuner: flattened original names under lora_unet_, lora_down / lora_up, alpha; every block's
    attention and feed-forward layers (its converter expects them all)."""
    w = Writer(model, 4)
    for block in range(len(model.blocks)):
        for attention, ours in (("self_attn", "attn1"), ("cross_attn", "attn2")):
            for theirs, name in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"), strict=True):
                w.pair(f"lora_unet_blocks_{block}_{attention}_{theirs}", f"blocks.{block}.{ours}.{name}", alpha=2)
        w.pair(f"lora_unet_blocks_{block}_ffn_0", f"blocks.{block}.ffn.net.0.proj", alpha=8)
        w.pair(f"lora_unet_blocks_{block}_ffn_2", f"blocks.{block}.ffn.net.2", alpha=4)
    return w.state_dict


def _diffusers_names_with_alpha(model: nn.Module, seed: int, alphas: dict[str, float]) -> dict:
    """Community trainers of Qwen-Image and Z-Image: diffusers names under diffusion_model., lora_down /
    lora_up and an alpha per module."""
    w = Writer(model, seed)
    for module, alpha in alphas.items():
        w.pair(f"diffusion_model.{module}", module, alpha=alpha)
    return w.state_dict


def qwen_image_community(model: nn.Module) -> dict:
    return _diffusers_names_with_alpha(
        model, 5, {"transformer_blocks.0.attn.to_q": 2, "transformer_blocks.1.img_mlp.net.2": 4}
    )


def qwen_image21_community(model: nn.Module) -> dict:
    return _diffusers_names_with_alpha(
        model, 6, {"transformer_blocks.0.attn.to_v": 2, "transformer_blocks.1.img_mlp.gate_layer": 4}
    )


def hunyuan_video_original(model: nn.Module) -> dict:
    """The original HunyuanVideo names (a fused img_attn_qkv), lora_A / lora_B."""
    w = Writer(model, 6)
    ab = dict(down="lora_A", up="lora_B")
    w.pair("transformer.double_blocks.0.img_attn_qkv", "transformer_blocks.0.attn.to_q", fused=3, **ab)
    w.pair("transformer.double_blocks.0.img_attn_proj", "transformer_blocks.0.attn.to_out.0", **ab)
    return w.state_dict


def z_image_community(model: nn.Module) -> dict:
    return _diffusers_names_with_alpha(model, 7, {"layers.0.attention.to_q": 2, "noise_refiner.0.feed_forward.w1": 8})
