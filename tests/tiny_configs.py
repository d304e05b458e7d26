"""The tiny CPU configurations of the reference facts, shared by the test modules.

Kept apart from the modules that import diffusers, so spawned ranks can import them cheaply.
"""

import torch

WAN_TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)
# I2V: CLIP image tokens through the added K/V projections (the text part is then 512 tokens).
WAN_I2V = dict(WAN_TINY, in_channels=8, image_dim=20, added_kv_proj_dim=24)

# HunyuanVideo: heads 2 x 10, rope (2, 4, 4), one block of each kind.
HUNYUAN_VIDEO_TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=10,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    patch_size=1,
    patch_size_t=1,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(2, 4, 4),
)

# HunyuanVideo-1.5: heads 2 x 10, rope (2, 4, 4), two dual-stream blocks; 5 latent channels in (noisy 2 +
# condition 2 + mask 1), glyph (ByT5) and image (SigLIP) widths of their own.
HUNYUAN_VIDEO15_TINY = dict(
    in_channels=5,
    out_channels=2,
    num_attention_heads=2,
    attention_head_dim=10,
    num_layers=2,
    num_refiner_layers=1,
    text_embed_dim=16,
    text_embed_2_dim=8,
    image_embed_dim=12,
    rope_axes_dim=(2, 4, 4),
)


def _lengths_mask(lengths: tuple[int, ...], length: int) -> torch.Tensor:
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()


def hunyuan_video15_inputs(
    config: dict,
    batch: int,
    grid: tuple[int, int, int],
    text: tuple[int, ...],
    text_len: int,
    glyph: tuple[int, ...],
    glyph_len: int,
    image_len: int,
    i2v: bool,
    seed: int = 1,
) -> dict:
    """Forward keywords of a HunyuanVideo-1.5 model: `text` / `glyph` valid tokens per sample, right-padded
    to `text_len` / `glyph_len`; SigLIP tokens for image-to-video, zeros (as the T2V pipeline) otherwise."""
    generator = torch.Generator().manual_seed(seed)
    p, p_t = config.get("patch_size", 1), config.get("patch_size_t", 1)
    sizes = (grid[0] * p_t, grid[1] * p, grid[2] * p)
    image = torch.randn(batch, image_len, config["image_embed_dim"], generator=generator)
    inputs = dict(
        hidden_states=torch.randn(batch, config["in_channels"], *sizes, generator=generator),
        timestep=torch.rand(batch, generator=generator) * 1000,
        encoder_hidden_states=torch.randn(batch, text_len, config["text_embed_dim"], generator=generator),
        encoder_attention_mask=_lengths_mask(text, text_len),
        encoder_hidden_states_2=torch.randn(batch, glyph_len, config["text_embed_2_dim"], generator=generator),
        encoder_attention_mask_2=_lengths_mask(glyph, glyph_len),
        image_embeds=image if i2v else torch.zeros_like(image),
    )
    if config.get("use_meanflow"):
        inputs["timestep_r"] = inputs["timestep"] * 0.9
    return inputs
