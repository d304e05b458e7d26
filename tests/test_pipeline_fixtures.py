"""Tiny diffusers-layout pipeline folders for the pipeline and CLI tests, built offline.

Each builder creates random tiny components from configs (our tests never touch the Hub), wraps them in
the diffusers pipeline of the family and saves it with `save_pretrained`, so a folder holds
`model_index.json` and one subfolder per component, exactly like a released checkpoint. Tokenizers are
`tokenizers` word-level models over a small vocabulary, wrapped in `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from tests.tiny_configs import HUNYUAN_VIDEO15_TINY, HUNYUAN_VIDEO_TINY
from tests.utils import randomize_

PROMPT_WORDS = (
    "a red fox jumps over the lazy dog in snow cat on mat blurry bad quality low detail sunset sea city "
    "at night blue bird painting of an old house"
)
# The chat templates of Qwen-Image and Z-Image, tokenized by our word-level model.
TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing color , shape size texture quantity text spatial "
    "relationships of objects and background : ."
)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The tiny Qwen3 language model of Z-Image's text encoder and Qwen-Image-2.1's Qwen3-VL.
TINY_QWEN3 = dict(
    hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8
)


def build_tokenizer(max_length: int, bos: bool = False):
    """A word-level tokenizer (vocabulary: special tokens, then the prompt and template words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(PROMPT_WORDS.split()) | set(TEMPLATE_WORDS.split()))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    if bos:  # CLIP-style: start and end tokens around every text
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        model_max_length=max_length,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def vocab_size() -> int:
    return len(build_tokenizer(8).get_vocab())


def flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def save_flux(folder: Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )
    randomize_(transformer, seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size(),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
            max_position_embeddings=77,
            eos_token_id=SPECIAL_TOKENS.index("</s>"),
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size(),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=1,
        norm_num_groups=1,
        layers_per_block=1,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=flow_scheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
        vae=vae,
        text_encoder=clip.eval(),
        tokenizer=build_tokenizer(77, bos=True),
        text_encoder_2=t5.eval(),
        tokenizer_2=build_tokenizer(512),
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(folder)
    return folder


def save_qwen_image(folder: Path, seed: int = 0, layered: bool = False) -> Path:
    """A tiny Qwen-Image folder; `layered`: Qwen-Image-Layered's variant (layered RoPE, the RGBA-mode embedding, a
    four-channel VAE with 6 latent channels: with 4, the reference would take an RGBA image for latents)."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    z_dim = 6 if layered else 4
    variant = dict(use_layer3d_rope=True, use_additional_t_cond=True) if layered else {}
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
        **variant,
    )
    randomize_(transformer, seed)
    vae = AutoencoderKLQwenImage(
        input_channels=4 if layered else 3,
        base_dim=24,
        z_dim=z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3, 0.05, -0.1][:z_dim],
        latents_std=[1.5, 0.8, 1.0, 2.0, 1.2, 0.9][:z_dim],
    )
    pipe = QwenImagePipeline(
        scheduler=flow_scheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9),
        vae=vae,
        text_encoder=qwen_vl_text_encoder(vocab_size()),
        tokenizer=build_tokenizer(1024),
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(folder)
    return folder


def qwen_vl_text_encoder(vocab: int, video_token_id: int | None = None):
    """A tiny Qwen2.5-VL (text and vision towers) whose last three tokens are vision start, end and image."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": vocab,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=vocab,
        vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 2,
        vision_token_id=vocab - 1,
        image_token_id=vocab - 1,
        video_token_id=vocab - 1 if video_token_id is None else video_token_id,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def vision_tokenizer():
    """`build_tokenizer(1024)` with the vision-language special tokens last: video, vision start and end, image."""
    tokenizer = build_tokenizer(1024)
    vision_tokens = ["<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": vision_tokens})
    return tokenizer


# The video processors the released Qwen-VL processor folders name (in video_preprocessor_config.json).
VIDEO_PROCESSOR_TYPES = {"Qwen2VLProcessor": "Qwen2VLVideoProcessor", "Qwen3VLProcessor": "Qwen3VLVideoProcessor"}


def save_qwen_vl_processor(folder: Path, processor: Any, processor_class: str) -> Path:
    """`processor` saved as the released checkpoints' processor/ folders hold it (Qwen/Qwen-Image-Edit-2509's:
    preprocessor_config.json, the tokenizer's files, chat_template.jinja, video_preprocessor_config.json), each part
    by its own save_pretrained: transformers saves a whole Qwen-VL processor only with its video processor, which
    needs torchvision. The video processor's config is written as plain data; image editing never reads it."""
    import json

    processor.image_processor.save_pretrained(folder)
    config_path = folder / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "processor_class": processor_class}, indent=2))
    processor.tokenizer.save_pretrained(folder)
    if processor.chat_template is not None:  # the processor's own over the tokenizer's, as transformers writes it
        (folder / "chat_template.jinja").write_text(processor.chat_template)
    image = processor.image_processor
    video = {
        "processor_class": processor_class,
        "video_processor_type": VIDEO_PROCESSOR_TYPES[processor_class],
        "patch_size": image.patch_size,
        "temporal_patch_size": image.temporal_patch_size,
        "merge_size": image.merge_size,
    }
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return folder


def save_with_processor(pipe: Any, folder: Path, processor_class: str) -> Path:
    """A diffusers pipeline with a Qwen-VL `processor` saved as a released folder, as its save_pretrained would:
    model_index.json by its save_config, naming the processor as the released ones do (["transformers",
    processor_class]); every other component by its own save_pretrained; the processor by
    `save_qwen_vl_processor`."""
    import json

    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if name != "processor" and component is not None:
            component.save_pretrained(folder / name)
    save_qwen_vl_processor(folder / "processor", pipe.processor, processor_class)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", processor_class]
    index_path.write_text(json.dumps(index, indent=2))
    return folder


def without_video(processor_class: type) -> type:
    """A Qwen-VL processor class that accepts no video processor: the real one's class needs torchvision, which
    the tests do not install; no video is read."""

    class TinyProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            return None

    return TinyProcessor


def pil_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil()


def qwen_image_edit_pipeline(folder: Path, class_name: str, seed: int = 0):
    """diffusers' QwenImageEditPipeline or QwenImageEditPlusPipeline on the tiny Qwen-Image folder's
    transformer, VAE and scheduler, with a Qwen2.5-VL that reads images and its processor."""
    import diffusers
    from transformers import Qwen2VLProcessor

    base = diffusers.QwenImagePipeline.from_pretrained(folder)
    tokenizer = vision_tokenizer()
    torch.manual_seed(seed)
    pipe = getattr(diffusers, class_name)(
        scheduler=base.scheduler,
        vae=base.vae,
        text_encoder=qwen_vl_text_encoder(len(tokenizer), video_token_id=len(tokenizer) - 4),
        tokenizer=tokenizer,
        processor=without_video(Qwen2VLProcessor)(image_processor=pil_image_processor(), tokenizer=tokenizer),
        transformer=base.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_qwen_edit_pipelines(folder: Path, class_name: str) -> tuple[Any, Any]:
    """diffusers' `class_name` (an edit or layered pipeline, `qwen_image_edit_pipeline`) and ours on the same
    components, our transformer loaded from the saved folder by our loader."""
    from teacache_models.families import pipeline_classes
    from teacache_models.models import QwenImageTransformer2DModel
    from teacache_models.weights import load_transformer

    reference = qwen_image_edit_pipeline(folder, class_name)
    # diffusers leaves the weights it reads where they lie in the safetensors file, some not 64-byte aligned, and
    # the CPU's matrix multiply rounds differently on unaligned memory (measured on the layered fixture: 1e-5
    # apart, 0 once copied). Our loader copies them; so does the reference here, to compare the same math.
    for parameter in reference.transformer.parameters():
        parameter.data = parameter.data.clone()
    ours = pipeline_classes()[class_name](
        transformer=load_transformer(folder, QwenImageTransformer2DModel, subfolder="transformer"),
        scheduler=reference.scheduler,
        vae=reference.vae,
        text_encoder=reference.text_encoder,
        tokenizer=reference.tokenizer,
        processor=reference.processor,
    )
    return reference, ours


def png_pixels(image: torch.Tensor):
    """A (C, H, W) image in [0, 1] as the (H, W, C) uint8 array a PNG of it holds."""
    return (image * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def save_z_image(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=16,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=1,
        n_kv_heads=1,
        cap_feat_dim=16,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    randomize_(transformer, seed)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=vocab_size(), max_position_embeddings=512, **TINY_QWEN3))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=1,
        layers_per_block=1,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    pipe = ZImagePipeline(
        scheduler=flow_scheduler(shift=3.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=build_tokenizer(512),
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(folder)
    return folder


def test_fixture_folders_have_the_diffusers_layout(tmp_path):
    folder = save_flux(tmp_path / "flux")
    assert (folder / "model_index.json").is_file()
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"):
        assert (folder / name).is_dir()
    tokenizer = build_tokenizer(16, bos=True)
    ids = tokenizer("a red fox", padding="max_length", max_length=8).input_ids
    assert ids[0] == SPECIAL_TOKENS.index("<s>") and len(ids) == 8


# ---- video families --------------------------------------------------------------------------------


def build_t5_tokenizer(max_length: int = 512):
    """A UMT5-style tokenizer: a unigram model over the prompt words (with the sentencepiece word marker)
    and single letters, so unknown words still split into pieces."""
    from transformers import T5Tokenizer

    words = sorted(set(PROMPT_WORDS.split()))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -15.0)]
    vocab += [("\u2581" + w, -float(i + 1)) for i, w in enumerate(words)]
    vocab += [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz,."]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


# Llama-3's pre-tokenizer pattern: with it the HunyuanVideo prompt template is exactly the 95 tokens the
# reference crops (`crop_start`), so the prompt's own tokens reach the transformer as in the release.
_LLAMA3_SPLIT = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def build_llama_tokenizer():
    """A Llama-3-style tokenizer (word level, Llama-3 splitting, begin-of-text token) knowing the
    HunyuanVideo prompt template and the prompt words."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaTokenizerFast

    split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
    text = DEFAULT_PROMPT_TEMPLATE["template"].replace("{}", " ") + " " + PROMPT_WORDS
    pieces = {piece for piece, _ in split.pre_tokenize_str(text)}
    pieces |= set(PROMPT_WORDS.split()) | {" " + w for w in PROMPT_WORDS.split()} | {"\n\n"}
    special = ("<unk>", *LLAMA_SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(special + tuple(sorted(pieces - set(special))))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = split
    tokenizer.add_special_tokens(list(special))
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return LlamaTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token="<|end_of_text|>", pad_token="<|end_of_text|>"
    )


def wan_vae(z_dim: int = 4, ti2v: bool = False, seed: int = 0):
    """A tiny Wan VAE: 8x spatial / 4x temporal (Wan2.1); TI2V's has a 2x2 pixel patch on top (16x)."""
    from diffusers import AutoencoderKLWan

    generator = torch.Generator().manual_seed(seed)
    extra = (
        dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16) if ti2v else {}
    )
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=(torch.randn(z_dim, generator=generator) * 0.3).tolist(),
        latents_std=(torch.rand(z_dim, generator=generator) + 0.5).tolist(),
        **extra,
    )
    return randomize_(vae, seed).eval()


def wan_transformer(in_channels: int, out_channels: int, seed: int, **extra):
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
        **extra,
    )
    return randomize_(transformer, seed).eval()


def save_wan(folder: Path, kind: str = "t2v", seed: int = 0) -> Path:
    """A tiny Wan folder. kind: "t2v" (2.1), "t2v-a14b" (two experts, boundary 0.875), "i2v" (2.1, CLIP
    image tokens), "flf2v" (2.1 first-last-frame: CLIP tokens of two images with a position table), "i2v-a14b" (two
    experts, no CLIP, boundary 0.9), "ti2v" (2.2 5B: expand_timesteps)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    kinds = ("t2v", "t2v-a14b", "i2v", "flf2v", "i2v-a14b", "ti2v")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    torch.manual_seed(seed)
    z_dim = 4
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(build_t5_tokenizer()),
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    ).eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    common = dict(tokenizer=build_t5_tokenizer(), text_encoder=text_encoder, scheduler=scheduler)
    image_to_video = kind.startswith("i2v") or kind == "flf2v"
    in_channels = 2 * z_dim + 4 if image_to_video else z_dim
    extra = {}
    image_components = {}
    if kind in ("i2v", "flf2v"):
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        extra = dict(image_dim=20, added_kv_proj_dim=24)
        if kind == "flf2v":  # two images of 4 x 4 patches and a class token each
            extra["pos_embed_seq_len"] = 2 * 17
        image_encoder = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=20,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
                projection_dim=20,
            )
        ).eval()
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        image_components = dict(image_encoder=image_encoder, image_processor=processor)
    transformer = wan_transformer(in_channels, z_dim, seed, **extra)
    experts = {}
    if kind.endswith("a14b"):
        experts = dict(
            transformer_2=wan_transformer(in_channels, z_dim, seed + 1), boundary_ratio=0.9 if image_to_video else 0.875
        )
    vae = wan_vae(z_dim, ti2v=kind == "ti2v", seed=seed)
    if image_to_video:
        pipe = WanImageToVideoPipeline(vae=vae, transformer=transformer, **common, **image_components, **experts)
    else:
        pipe = WanPipeline(vae=vae, transformer=transformer, expand_timesteps=kind == "ti2v", **common, **experts)
    pipe.save_pretrained(folder)
    return folder


def save_hunyuan_video(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(**HUNYUAN_VIDEO_TINY)
    randomize_(transformer, seed)
    llama_tokenizer = build_llama_tokenizer()
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(llama_tokenizer),
            hidden_size=16,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size(),
            hidden_size=8,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=8,
            max_position_embeddings=77,
            eos_token_id=SPECIAL_TOKENS.index("</s>"),
        )
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    randomize_(vae, seed)
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder.eval(),
        tokenizer=llama_tokenizer,
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=flow_scheduler(shift=7.0),
        text_encoder_2=clip.eval(),
        tokenizer_2=build_tokenizer(77, bos=True),
    )
    pipe.save_pretrained(folder)
    return folder


def _template_prefix_length(tokenizer) -> int:
    """Tokens of the HunyuanVideo-1.5 chat template before the prompt's first token."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    system = inspect.signature(_hunyuan_video15_class()._get_mllm_prompt_embeds).parameters["system_message"].default
    ids = tokenizer.apply_chat_template(format_text_input(["fox"], system)[0], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return ids.index(tokenizer.convert_tokens_to_ids("fox"))


def _hunyuan_video15_class():
    from diffusers import HunyuanVideo15Pipeline

    return HunyuanVideo15Pipeline


# The number of template tokens diffusers' HunyuanVideo-1.5 pipeline crops (`prompt_template_encode_start_idx`).
HUNYUAN_VIDEO15_CROP = 108


def build_qwen_chat_tokenizer():
    """The word-level tokenizer with a chat template whose system turn is padded with "." tokens so that the
    HunyuanVideo-1.5 template is exactly the 108 tokens the reference crops, as with the real Qwen tokenizer:
    the prompt's own tokens reach the transformer."""
    tokenizer = build_tokenizer(2048)
    filler = HUNYUAN_VIDEO15_CROP - _template_prefix_length(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "{{ message['content'] }}",
        "{{ message['content'] }}{% if message['role'] == 'system' %}" + " ." * filler + "{% endif %}",
    )
    assert _template_prefix_length(tokenizer) == HUNYUAN_VIDEO15_CROP
    return tokenizer


# HunyuanVideo-1.5 variants: (task, target size, scheduler shift, guidance scale, MeanFlow), as the diffusers
# conversion of each release sets them, except the target sizes: 48 and 64 pixels stand for 480p's 640 and
# 720p's 960, so that the reference's resolution buckets stay tiny.
HUNYUAN_VIDEO15_KINDS = {
    "t2v-480p": ("t2v", 48, 5.0, 6.0, False),
    "t2v-720p": ("t2v", 64, 9.0, 6.0, False),
    "i2v-480p": ("i2v", 48, 5.0, 6.0, False),
    "i2v-720p": ("i2v", 64, 7.0, 6.0, False),
    "i2v-480p-step-distilled": ("i2v", 48, 7.0, 1.0, True),
}


def save_hunyuan_video15(folder: Path, kind: str = "t2v-480p", seed: int = 0) -> Path:
    """A tiny HunyuanVideo-1.5 folder of one released variant (`HUNYUAN_VIDEO15_KINDS`): Qwen2.5-VL text model
    with the chat-template tokenizer, ByT5 glyph encoder, 16x / 4x causal VAE, CFG guider; I2V adds SigLIP."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        HunyuanVideo15ImageToVideoPipeline,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    task, target_size, shift, guidance_scale, meanflow = HUNYUAN_VIDEO15_KINDS[kind]
    torch.manual_seed(seed)
    config = dict(HUNYUAN_VIDEO15_TINY, task_type=task, target_size=target_size, use_meanflow=meanflow)
    transformer = randomize_(HunyuanVideo15Transformer3DModel(**config), seed).eval()
    tokenizer = build_qwen_chat_tokenizer()
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=vocab_size(),
            hidden_size=HUNYUAN_VIDEO15_TINY["text_embed_dim"],
            intermediate_size=16,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        )
    ).eval()
    byt5 = ByT5Tokenizer()
    glyph_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(byt5),
            d_model=HUNYUAN_VIDEO15_TINY["text_embed_2_dim"],
            d_kv=4,
            d_ff=16,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    ).eval()
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=HUNYUAN_VIDEO15_TINY["out_channels"],
        block_out_channels=(8, 8, 8, 8, 8),
        layers_per_block=1,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
    )
    randomize_(vae, seed, std=0.1)
    common = dict(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae.eval(),
        scheduler=flow_scheduler(shift=shift),
        text_encoder_2=glyph_encoder,
        tokenizer_2=byt5,
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )
    if task == "t2v":
        pipe = HunyuanVideo15Pipeline(**common)
    else:
        from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

        image_encoder = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=HUNYUAN_VIDEO15_TINY["image_embed_dim"],
                intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            )
        ).eval()
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
        pipe = HunyuanVideo15ImageToVideoPipeline(**common, image_encoder=image_encoder, feature_extractor=processor)
    pipe.save_pretrained(folder)
    return folder


def test_video_tokenizers_match_the_references_assumptions():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    llama = build_llama_tokenizer()
    prefix = llama(template.split("{}")[0]).input_ids
    assert len(prefix) == DEFAULT_PROMPT_TEMPLATE["crop_start"], "the template crop keeps exactly the prompt"
    ids = llama(template.format("a red fox")).input_ids
    assert llama.unk_token_id not in ids
    t5 = build_t5_tokenizer()
    encoded = t5("a red fox zebra", padding="max_length", max_length=12).input_ids
    assert t5.unk_token_id not in encoded and encoded[-1] == t5.pad_token_id


# Qwen3-VL's chat template, reduced to what the Qwen-Image-2.1 pipeline reads: text content, given as a string or
# as a list of {"type": "text"} parts.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen3_vl_components(seed: int = 0) -> dict[str, Any]:
    """A tiny Qwen3-VL (text and vision towers, interleaved multimodal RoPE) and its processor, offline."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tokenizer = vision_tokenizer()
    vocab = len(tokenizer)
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2], "mrope_interleaved": True}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=vocab, rope_parameters=rope, **TINY_QWEN3),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=16,
            deepstack_visual_indexes=[0],
            num_position_embeddings=16,
        ),
        video_token_id=vocab - 4,
        vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 2,
        image_token_id=vocab - 1,
    )
    torch.manual_seed(seed)
    processor = without_video(Qwen3VLProcessor)(
        image_processor=pil_image_processor(), tokenizer=tokenizer, chat_template=QWEN3_VL_CHAT_TEMPLATE
    )
    return {"text_encoder": Qwen3VLForConditionalGeneration(config).eval(), "processor": processor}


def qwen_image21_pipelines(folder: Path, seed: int = 0) -> tuple[Any, Any]:
    """diffusers' QwenImage21Pipeline on tiny random components (a 16x VAE with four output channels, as the
    released one), and ours on the same ones, our transformer loaded by our loader from the reference's saved
    weights in `folder`."""
    from diffusers import AutoencoderKLQwenImage21, QwenImage21Pipeline, QwenImage21Transformer2DModel

    from teacache_models.models import QwenImage21Transformer2DModel as Native
    from teacache_models.pipelines.qwen_image21 import QwenImage21TextToImagePipeline
    from teacache_models.weights import load_transformer
    from tests.test_qwen_image21 import TINY

    # The transformer reads the tiny Qwen3-VL's 16-wide states.
    transformer = randomize_(QwenImage21Transformer2DModel(**dict(TINY, context_in_dim=16)), seed).eval()
    transformer.save_pretrained(folder / "transformer")
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=8,
        dim_mult=[1, 1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3, 0.05, -0.1, 0.2, 0.0],
        latents_std=[1.5, 0.8, 1.0, 2.0, 1.2, 0.9, 1.1, 0.7],
    ).eval()
    text = qwen3_vl_components(seed)
    scheduler = flow_scheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9)
    reference = QwenImage21Pipeline(scheduler=scheduler, vae=vae, transformer=transformer, **text)
    reference.set_progress_bar_config(disable=True)
    ours = QwenImage21TextToImagePipeline(
        transformer=load_transformer(folder, Native, subfolder="transformer"), scheduler=scheduler, vae=vae, **text
    )
    return reference, ours
