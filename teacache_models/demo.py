"""The offline demo's own pieces: a text encoder that needs no download, the digits data set, a digit reader.

- `DigitTextEncoder`: a word-level tokenizer over a fixed vocabulary and learned embeddings; the
  empty prompt is the unconditional (negative) condition.
- `load_digits` / `fit_digit_classifier`: scikit-learn's 8x8 handwritten digits (the training data,
  upsampled) and a logistic-regression reader that checks generated digits.
- Pixel helpers (image <-> [-1, 1] tensors, a grid, a PNG writer on zlib alone) and the demo folders
  (`save_demo_model`, `load_demo_model`).

A demo folder has the diffusers layout: `model_index.json` naming the pipeline class and the parts,
`transformer/` and `text_encoder/`, each with `config.json` and `diffusion_pytorch_model.safetensors`.
The models are trained by `scripts/train_demo.py` and generate directly in pixel space (one grey
channel, no VAE). Generating is the pipelines' job: `load_pipeline("flux-digits")`
(`teacache_models.pipelines.demo`); sampling defaults and TeaCache presets are in `configs/*-digits.yaml`.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .models import FluxTransformer2DModel, WanTransformer3DModel
from .models.base import ConfiguredModel, register_config

__all__ = [
    "DEFAULT_VOCABULARY",
    "DemoModel",
    "DigitTextEncoder",
    "digit_prompt",
    "encode_png",
    "fit_digit_classifier",
    "images_to_tensor",
    "load_demo_model",
    "load_digits",
    "make_grid",
    "save_demo_model",
    "tensor_to_images",
    "write_png",
]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PAD, UNK = "[pad]", "[unk]"
DEFAULT_VOCABULARY: tuple[str, ...] = (
    PAD,
    UNK,
    *(str(d) for d in range(10)),
    *NUMBER_WORDS,
    "a",
    "an",
    "the",
    "of",
    "handwritten",
    "hand",
    "written",
    "drawn",
    "digit",
    "number",
    "numeral",
    "image",
    "picture",
    "photo",
)

_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_CONFIG_NAME = "config.json"
_INDEX_NAME = "model_index.json"
# Numerals are single-character tokens so that "17" reads as "1", "7" rather than one unknown word.
_WORD_PATTERN = re.compile(r"[a-z]+|\d|\[[a-z]+\]")


def digit_prompt(digit: int) -> str:
    """The demo's prompt for one digit."""
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
        raise ValueError(f"digit must be an integer in 0..9, got {digit!r}")
    return f"a handwritten digit {digit}"


# ---- text encoder ----------------------------------------------------------------------------------


class DigitTextEncoder(ConfiguredModel):
    """Word-level tokenizer over a fixed vocabulary + learned embeddings + projections.

    Lower-cased words and single numerals are looked up in `vocabulary`; unknown words map to
    "[unk]"; the sequence is cut or padded with "[pad]" to `max_length`. The empty prompt "" is all
    padding: it is the unconditional (negative) condition that training learns by condition dropout.

    Args:
        vocabulary: the tokens, "[pad]" first and "[unk]" second.
        max_length: tokens per prompt.
        embedding_dim: width of the token embeddings.
        hidden_dim: width of `encoder_hidden_states` (Flux `joint_attention_dim`, Wan `text_dim`).
        pooled_dim: width of the pooled embedding (Flux `pooled_projection_dim`), None for none (Wan).
    """

    @register_config
    def __init__(
        self,
        vocabulary: Sequence[str] = DEFAULT_VOCABULARY,
        max_length: int = 8,
        embedding_dim: int = 32,
        hidden_dim: int = 32,
        pooled_dim: int | None = None,
    ) -> None:
        super().__init__()
        vocabulary = tuple(vocabulary)
        if len(vocabulary) < 2 or vocabulary[:2] != (PAD, UNK) or len(set(vocabulary)) != len(vocabulary):
            raise ValueError(
                f"vocabulary must start with {PAD!r}, {UNK!r} and hold distinct tokens, got {list(vocabulary)[:4]}..."
            )
        self.token_ids = {token: index for index, token in enumerate(vocabulary)}
        self.max_length = max_length
        self.token_embedding = nn.Embedding(len(vocabulary), embedding_dim)
        self.position_embedding = nn.Parameter(torch.randn(max_length, embedding_dim) * 0.02)
        self.norm = nn.LayerNorm(embedding_dim)
        self.proj = nn.Linear(embedding_dim, hidden_dim)
        self.pooled_proj = nn.Linear(embedding_dim, pooled_dim) if pooled_dim is not None else None

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, max_length) token ids; words past `max_length` are dropped."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a sequence of strings, got {prompts!r}")
        unknown, pad = self.token_ids[UNK], self.token_ids[PAD]
        rows = []
        for prompt in prompts:
            ids = [self.token_ids.get(word, unknown) for word in _WORD_PATTERN.findall(prompt.lower())]
            ids = ids[: self.max_length]
            rows.append(ids + [pad] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.position_embedding.device).reshape(-1, self.max_length)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, max_length) ids -> encoder_hidden_states (B, max_length, hidden_dim), pooled (B, pooled_dim) or None."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long:
            raise TypeError(f"input_ids must be a long tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.ndim != 2 or input_ids.shape[1] != self.max_length:
            raise ValueError(f"input_ids must have shape (B, {self.max_length}), got {tuple(input_ids.shape)}")
        tokens = self.norm(self.token_embedding(input_ids) + self.position_embedding)  # (B, L, E)
        pooled = self.pooled_proj(tokens.mean(dim=1)) if self.pooled_proj is not None else None
        return self.proj(tokens), pooled

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts -> encoder_hidden_states (B, L, hidden_dim) and pooled (B, pooled_dim) or None."""
        return self(self.tokenize(prompts))


# ---- pixel space -----------------------------------------------------------------------------------


def images_to_tensor(images: np.ndarray | torch.Tensor, max_value: float = 255.0) -> torch.Tensor:
    """Grey images (N, H, W) with values in [0, max_value] -> float32 (N, 1, H, W) in [-1, 1]."""
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {tuple(images.shape)}")
    return (images / max_value * 2 - 1).unsqueeze(1)


def tensor_to_images(tensor: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> uint8 (N, H, W); values outside the range are clipped."""
    if tensor.ndim != 4 or tensor.shape[1] != 1:
        raise ValueError(f"tensor must have shape (N, 1, H, W), got {tuple(tensor.shape)}")
    pixels = ((tensor[:, 0].detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).cpu().numpy()


def make_grid(images: np.ndarray, columns: int, scale: int = 1, padding: int = 2, background: int = 128) -> np.ndarray:
    """uint8 (N, H, W) grey or (N, H, W, 3) RGB images -> one uint8 image with `columns` per row, each cell
    scaled up `scale` times (nearest neighbour).

    The cells are separated by `padding` pixels of the grey level `background`.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise ValueError(f"images must be uint8 of shape (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}")
    for name, value, least in (("columns", columns, 1), ("scale", scale, 1), ("padding", padding, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    n, h, w = images.shape[:3]
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    rows = -(-n // columns)
    cell_h, cell_w = h * scale + padding, w * scale + padding
    grid = np.full((rows * cell_h + padding, columns * cell_w + padding, *images.shape[3:]), background, np.uint8)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        grid[padding + r * cell_h : (r + 1) * cell_h, padding + c * cell_w : (c + 1) * cell_w] = image
    return grid


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 grey (H, W), RGB (H, W, 3) or RGBA (H, W, 4) image as PNG with zlib alone (no imaging
    library)."""
    Path(path).write_bytes(encode_png(image))


# PNG colour types by channel count: grey, RGB, RGBA.
_PNG_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 grey (H, W), RGB (H, W, 3) or RGBA (H, W, 4) image as the bytes of a PNG file (zlib alone)."""
    image = np.ascontiguousarray(image)
    channels = 1 if image.ndim == 2 else image.shape[-1]
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in _PNG_COLOUR_TYPES:
        raise ValueError(
            f"image must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} {image.shape}"
        )
    height, width = image.shape[:2]
    colour_type = _PNG_COLOUR_TYPES[channels]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    # Every scanline starts with filter type 0 (none).
    raw = b"".join(b"\x00" + row.tobytes() for row in image.reshape(height, -1))
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def load_digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten 8x8 digits, bilinearly upsampled.

    Returns images (N, 1, size, size) in [-1, 1] and labels (N,).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError("the digits data set needs scikit-learn: pip install 'teacache_models[demo]'") from error
    digits = sklearn_digits()
    images = images_to_tensor(digits.images, max_value=16.0)  # (N, 1, 8, 8)
    if size != 8:
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(-1, 1), torch.as_tensor(digits.target, dtype=torch.long)


def fit_digit_classifier() -> Callable[[torch.Tensor], np.ndarray]:
    """A logistic-regression reader of digits, fitted on scikit-learn's 8x8 digits.

    Returns a function: images (N, 1, H, W) or (N, 1, 1, H, W) in [-1, 1], H and W multiples of 8 ->
    predicted digits (N,). The images are average-pooled to 8x8, the resolution of the data set.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits
    except ImportError as error:
        raise ImportError("the digit classifier needs scikit-learn: pip install 'teacache_models[demo]'") from error
    digits = sklearn_digits()
    # One BLAS thread: on a small shared machine more threads make this tiny fit ~50x slower.
    with threadpool_limits(1):
        classifier = LogisticRegression(max_iter=1000).fit(digits.data / 16, digits.target)

    def read(images: torch.Tensor) -> np.ndarray:
        images = images.reshape(images.shape[0], 1, *images.shape[-2:]).float()
        if images.shape[-1] % 8 or images.shape[-2] % 8:
            raise ValueError(f"images must be a multiple of 8 pixels high and wide, got {tuple(images.shape)}")
        pooled = nn.functional.adaptive_avg_pool2d(images, 8)  # (N, 1, 8, 8)
        features = ((pooled + 1) / 2).reshape(images.shape[0], 64).cpu().numpy()  # the data set's scale / 16
        with threadpool_limits(1):
            return classifier.predict(features)

    return read


# ---- demo folders ----------------------------------------------------------------------------------

_TRANSFORMERS: dict[str, type[ConfiguredModel]] = {
    "FluxTransformer2DModel": FluxTransformer2DModel,
    "WanTransformer3DModel": WanTransformer3DModel,
}
# The `model_index.json` `_class_name` of each transformer's demo: the pipeline `load_pipeline` picks.
_PIPELINE_NAMES = {"FluxTransformer2DModel": "FluxDigitsPipeline", "WanTransformer3DModel": "WanDigitsPipeline"}


@dataclass
class DemoModel:
    """A loaded demo: the transformer, its text encoder and the folder's `model_index.json`."""

    transformer: FluxTransformer2DModel | WanTransformer3DModel
    text_encoder: DigitTextEncoder
    index: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.index["image_size"])

    @property
    def num_frames(self) -> int:
        return int(self.index.get("num_frames", 1))


def save_demo_model(
    folder: str | Path, transformer: ConfiguredModel, text_encoder: DigitTextEncoder, index: dict[str, Any]
) -> list[Path]:
    """Write a demo folder (diffusers layout); returns the files written. `index` adds training metadata to
    `model_index.json`."""
    from safetensors.torch import save_file

    if type(transformer).__name__ not in _PIPELINE_NAMES:
        raise TypeError(f"transformer must be one of {sorted(_PIPELINE_NAMES)}, got {type(transformer).__name__}")
    folder = Path(folder)
    written = []
    for part, model in (("transformer", transformer), ("text_encoder", text_encoder)):
        (folder / part).mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(model).__name__, **model.config.to_dict()}
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        (folder / part / _CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / part / _WEIGHTS_NAME))
        written += [folder / part / _CONFIG_NAME, folder / part / _WEIGHTS_NAME]
    index = {
        "_class_name": _PIPELINE_NAMES[type(transformer).__name__],
        "transformer": ["teacache_models.models", type(transformer).__name__],
        "text_encoder": ["teacache_models.demo", "DigitTextEncoder"],
        **index,
    }
    (folder / _INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [folder / _INDEX_NAME, *written]


def load_demo_model(folder: str | Path) -> DemoModel:
    """Load a demo folder written by `save_demo_model` (float32, CPU, eval mode) with the checked loader of
    `teacache_models.weights`. Loading by zoo name (`load_pipeline("flux-digits")`) also verifies every
    file's sha256 against the weights manifest."""
    from .weights import load_transformer

    folder = Path(folder)
    if not (folder / _INDEX_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a demo model folder: it has no {_INDEX_NAME}")
    index = json.loads((folder / _INDEX_NAME).read_text())
    config_path = folder / "transformer" / _CONFIG_NAME
    class_name = json.loads(config_path.read_text()).get("_class_name") if config_path.is_file() else None
    if class_name not in _TRANSFORMERS:
        raise ValueError(f"{config_path} names class {class_name!r}; expected one of {sorted(_TRANSFORMERS)}")
    transformer = load_transformer(folder, _TRANSFORMERS[class_name], subfolder="transformer")
    text_encoder = load_transformer(folder, DigitTextEncoder, subfolder="text_encoder")
    return DemoModel(transformer, text_encoder, index)  # type: ignore[arg-type]
