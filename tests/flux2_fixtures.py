"""Tiny FLUX.2 pipeline folders in the diffusers layout, built offline (random weights, word-level tokenizers).

FLUX.2 [dev] reads hidden layers 10, 20 and 30 of a Mistral-3 text encoder and [klein] layers 9, 18 and 27 of
a Qwen3, so the tiny encoders keep those depths at a width of 16. In memory, [dev]'s tokenizer is a plain fast
tokenizer with a chat template that reads list-of-parts messages and opens with the BOS token, as the released
PixtralProcessor's (transformers' PixtralProcessor needs torchvision, which the tests do not install);
`save_released_flux2` saves it as black-forest-labs/FLUX.2-dev's tokenizer/ folder holds the processor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.test_pipeline_fixtures import PROMPT_WORDS, TEMPLATE_WORDS, build_tokenizer, flow_scheduler
from tests.utils import randomize_

TEXT_WIDTH = 16
# Messages whose content is a list of {"type": "text", "text": ...} parts ([dev]).
PARTS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|> {{ message['role'] }} "
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }} {% endif %}{% endfor %}"
    "<|im_end|> {% endfor %}"
)
# Qwen3's template with its thinking switch ([klein] asks for enable_thinking=False).
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant "
    "{% if enable_thinking is defined and not enable_thinking %}<think> </think> {% endif %}{% endif %}"
)
KINDS = ("dev", "klein", "klein-base", "klein-kv")


def build_qwen2_tokenizer(max_length: int):
    """A byte-level BPE `Qwen2Tokenizer` as [klein]'s (Qwen3's): every byte a token, merges that make each prompt
    and template word (with and without its leading space) one token, and Qwen3's special tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(sorted(set(bytes_to_unicode().values())))}
    merges: list[tuple[str, str]] = []
    for word in sorted(set(PROMPT_WORDS.split()) | set(TEMPLATE_WORDS.split())):
        for form in (word, "\u0120" + word):  # \u0120 (Ġ): a space in byte-level BPE
            for end in range(2, len(form) + 1):
                pair = (form[: end - 1], form[end - 1])
                if form[:end] not in vocab:
                    merges.append(pair)
                    vocab[form[:end]] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    return tokenizer


def flux2_transformer(seed: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        in_channels=8,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
    return randomize_(transformer, seed).eval()


def flux2_vae(seed: int):
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=2,
        norm_num_groups=1,
        layers_per_block=1,
    )
    randomize_(vae, seed)
    with torch.no_grad():  # batch-norm statistics: a variance must be positive
        vae.bn.running_var.abs_().add_(0.5)
    return vae.eval()


def text_encoder(kind: str, vocab: int):
    if kind == "dev":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        text = dict(hidden_size=TEXT_WIDTH, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
        config = Mistral3Config(
            text_config=dict(model_type="mistral", num_hidden_layers=31, head_dim=8, vocab_size=vocab, **text),
            vision_config=dict(
                model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
            ),
            image_token_index=vocab - 1,
        )
        return Mistral3ForConditionalGeneration(config).eval()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        hidden_size=TEXT_WIDTH,
        intermediate_size=16,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=vocab,
    )
    return Qwen3ForCausalLM(config).eval()


def flux2_pipeline(kind: str = "dev", seed: int = 0):
    """An in-memory diffusers FLUX.2 [dev], [klein] (distilled), [klein] base or [klein] KV pipeline."""
    import diffusers

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    if kind == "dev":  # Mistral's tokenizer adds a BOS token to a text; its chat template writes one itself
        tokenizer = build_tokenizer(512, bos=True)
        tokenizer.chat_template = PARTS_TEMPLATE
    else:
        tokenizer = build_qwen2_tokenizer(512)
        tokenizer.chat_template = QWEN3_TEMPLATE
    components = dict(
        scheduler=flow_scheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
        vae=flux2_vae(seed),
        text_encoder=text_encoder(kind, len(tokenizer)),
        tokenizer=tokenizer,
        transformer=flux2_transformer(seed, guidance_embeds=kind == "dev"),
    )
    if kind == "dev":
        return diffusers.Flux2Pipeline(**components)
    if kind == "klein-kv":
        return diffusers.Flux2KleinKVPipeline(**components, is_distilled=True)
    return diffusers.Flux2KleinPipeline(**components, is_distilled=kind == "klein")


def save_flux2(folder: Path, kind: str = "dev", seed: int = 0) -> Path:
    """`flux2_pipeline(kind, seed)` saved so that diffusers loads it without torchvision: [dev]'s tokenizer as the
    plain tokenizer it is, [klein] in the released layout (`save_released_flux2`)."""
    pipe = flux2_pipeline(kind, seed)
    if kind == "dev":
        pipe.save_pretrained(folder)
        return folder
    return save_released_flux2(pipe, folder)


# The Pixtral settings of the released processor_config.json (Mistral Small 3.1's vision tower).
PIXTRAL_SETTINGS = {
    "image_break_token": "[IMG_BREAK]",
    "image_end_token": "[IMG_END]",
    "image_token": "[IMG]",
    "patch_size": 14,
    "processor_class": "PixtralProcessor",
    "spatial_merge_size": 2,
}


def save_pixtral_processor(folder: Path, tokenizer: Any) -> Path:
    """`tokenizer` (its chat template included) saved as the parts of a PixtralProcessor, the files of
    black-forest-labs/FLUX.2-dev's tokenizer/ folder: the tokenizer's own files, chat_template.jinja,
    preprocessor_config.json (a PixtralImageProcessor) and processor_config.json, each written by its own
    save_pretrained or as plain data; transformers saves a whole PixtralProcessor only with torchvision."""
    from transformers import PixtralImageProcessorPil

    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(tokenizer.chat_template)
    PixtralImageProcessorPil().save_pretrained(folder)
    config_path = folder / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config.update(image_processor_type="PixtralImageProcessor", processor_class="PixtralProcessor")
    config_path.write_text(json.dumps(config, indent=2))
    (folder / "processor_config.json").write_text(json.dumps(PIXTRAL_SETTINGS, indent=2))
    return folder


def save_released_flux2(pipe: Any, folder: Path) -> Path:
    """The in-memory diffusers FLUX.2 pipeline `pipe` saved in its released layout. [dev] as
    black-forest-labs/FLUX.2-dev: model_index.json names the tokenizer ["transformers", "PixtralProcessor"] and
    tokenizer/ holds the processor's parts. [klein] as black-forest-labs/FLUX.2-klein-4B: model_index.json names it
    ["transformers", "Qwen2TokenizerFast"]."""
    import diffusers

    if isinstance(pipe, diffusers.Flux2Pipeline):
        pipe.save_config(folder)
        for name, component in pipe.components.items():
            if name != "tokenizer":
                component.save_pretrained(folder / name)
        save_pixtral_processor(folder / "tokenizer", pipe.tokenizer)
        tokenizer_class = "PixtralProcessor"
    else:
        pipe.save_pretrained(folder)
        tokenizer_class = "Qwen2TokenizerFast"
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", tokenizer_class]
    index_path.write_text(json.dumps(index, indent=2))
    return folder


def reference_image(width: int, height: int, seed: int):
    """A random RGB PIL image."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())
