"""The tiny CPU configurations of the reference facts, shared by the test modules.

Kept apart from the modules that import diffusers, so spawned ranks can import them cheaply.
"""

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
