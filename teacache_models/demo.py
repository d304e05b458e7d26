"""The offline demo: small pixel-space digit models of the native Flux and Wan architectures.

Everything here runs without a download: a word-level text encoder over a fixed vocabulary, the
pixel-space helpers (patch packing, position ids, image <-> [-1, 1] tensors, a PNG writer on zlib),
the loader of a demo folder and a flow-matching Euler sampler with classifier-free guidance that
tells the transformer each step and CFG branch, so TeaCache keeps one state per branch.

A demo folder has the diffusers layout: `model_index.json` naming the parts, `transformer/` and
`text_encoder/`, each with `config.json` and `diffusion_pytorch_model.safetensors`. The models are
trained by `scripts/train_demo.py` on scikit-learn's 8x8 handwritten digits, upsampled; images are
generated directly in pixel space (one grey channel, no VAE).
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
from .params import TeaCacheParams

__all__ = [
    "DEFAULT_VOCABULARY",
    "DemoModel",
    "DigitTextEncoder",
    "digit_prompt",
    "fit_digit_classifier",
    "flow_sigmas",
    "image_ids",
    "images_to_tensor",
    "load_demo_model",
    "load_digits",
    "make_grid",
    "pack_patches",
    "sample",
    "save_demo_model",
    "tensor_to_images",
    "unpack_patches",
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
        for name, value in (("max_length", max_length), ("embedding_dim", embedding_dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if pooled_dim is not None and (
            isinstance(pooled_dim, bool) or not isinstance(pooled_dim, int) or pooled_dim < 1
        ):
            raise ValueError(f"pooled_dim must be None or a positive integer, got {pooled_dim!r}")
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


def pack_patches(images: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> Flux tokens (B, H/p * W/p, C * p * p), channels then patch rows then columns."""
    if images.ndim != 4 or images.shape[2] % patch or images.shape[3] % patch:
        raise ValueError(
            f"images must have shape (B, C, H, W) with H, W divisible by {patch}, got {tuple(images.shape)}"
        )
    b, c, h, w = images.shape
    tokens = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_patches(tokens: torch.Tensor, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """Flux tokens (B, H/p * W/p, C * p * p) -> (B, C, H, W); the inverse of `pack_patches`."""
    if tokens.ndim != 3 or tokens.shape[1] != (height // patch) * (width // patch) or tokens.shape[2] % (patch * patch):
        raise ValueError(
            f"tokens must have shape (B, {(height // patch) * (width // patch)}, C * {patch * patch}) for a "
            f"{height}x{width} image, got {tuple(tokens.shape)}"
        )
    b, _, d = tokens.shape
    c = d // (patch * patch)
    images = tokens.reshape(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return images.reshape(b, c, height, width)


def image_ids(rows: int, columns: int) -> torch.Tensor:
    """Flux position ids of a token grid: (rows * columns, 3) with (0, row, column)."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3)


def make_grid(images: np.ndarray, columns: int, scale: int = 1, padding: int = 2, background: int = 128) -> np.ndarray:
    """uint8 (N, H, W) -> one uint8 image with `columns` per row, each cell scaled up `scale` times.

    The cells are separated by `padding` pixels of the grey level `background`.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 of shape (N, H, W), got {images.dtype} {images.shape}")
    n, h, w = images.shape
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    rows = -(-n // columns)
    cell_h, cell_w = h * scale + padding, w * scale + padding
    grid = np.full((rows * cell_h + padding, columns * cell_w + padding), background, dtype=np.uint8)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        grid[padding + r * cell_h : (r + 1) * cell_h, padding + c * cell_w : (c + 1) * cell_w] = image
    return grid


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 grey (H, W) or RGB (H, W, 3) image as PNG with zlib alone (no imaging library)."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must be uint8 of shape (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    colour_type = 0 if image.ndim == 2 else 2

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    # Every scanline starts with filter type 0 (none).
    raw = b"".join(b"\x00" + row.tobytes() for row in image.reshape(height, -1))
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


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
    """Write a demo folder (diffusers layout); returns the files written."""
    from safetensors.torch import save_file

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
        "transformer": ["teacache_models.models", type(transformer).__name__],
        "text_encoder": ["teacache_models.demo", "DigitTextEncoder"],
        **index,
    }
    (folder / _INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [folder / _INDEX_NAME, *written]


def _load_part(folder: Path, classes: dict[str, type[ConfiguredModel]]) -> ConfiguredModel:
    from safetensors.torch import load_file

    config = json.loads((folder / _CONFIG_NAME).read_text())
    class_name = config.get("_class_name")
    if class_name not in classes:
        raise ValueError(f"{folder / _CONFIG_NAME} names class {class_name!r}; expected one of {sorted(classes)}")
    model = classes[class_name].from_config(config)
    model.load_state_dict(load_file(str(folder / _WEIGHTS_NAME)), strict=True)
    return model.eval()


def load_demo_model(folder: str | Path) -> DemoModel:
    """Load a demo folder written by `save_demo_model` (float32, CPU, eval mode)."""
    folder = Path(folder)
    if not (folder / _INDEX_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a demo model folder: it has no {_INDEX_NAME}")
    index = json.loads((folder / _INDEX_NAME).read_text())
    transformer = _load_part(folder / "transformer", _TRANSFORMERS)
    text_encoder = _load_part(folder / "text_encoder", {"DigitTextEncoder": DigitTextEncoder})
    return DemoModel(transformer, text_encoder, index)  # type: ignore[arg-type]


# ---- sampling --------------------------------------------------------------------------------------


def flow_sigmas(num_inference_steps: int, shift: float = 1.0) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's noise levels (static shift): N values from 1 down, then 0."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")

    def shifted(sigma: np.ndarray | float) -> np.ndarray | float:
        return shift * sigma / (1 + (shift - 1) * sigma)

    # The scheduler's lowest level is the shifted 1/1000 of its 1000 training steps, and it shifts the
    # spaced levels once more: both shifts are part of its schedule.
    spaced = np.linspace(1.0, shifted(1.0 / 1000), num_inference_steps)
    sigmas = torch.from_numpy(shifted(spaced)).float()
    return torch.cat([sigmas, torch.zeros(1)])  # (N + 1,)


def predict_flow(
    demo: DemoModel,
    noisy: torch.Tensor,
    sigma: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled: torch.Tensor | None,
) -> torch.Tensor:
    """One transformer call on pixel images (B, 1, F, H, W) at noise levels (B,) -> flow (B, 1, F, H, W).

    The prediction is noise - clean image (the rectified-flow velocity), as Flux and Wan are trained.
    """
    model = demo.transformer
    frames, height, width = noisy.shape[2:]
    if isinstance(model, FluxTransformer2DModel):
        if frames != 1:
            raise ValueError(f"the Flux demo generates single images, got {frames} frames")
        tokens = pack_patches(noisy[:, :, 0])  # (B, H/2 * W/2, 4)
        text_len = encoder_hidden_states.shape[1]
        out = model(
            tokens,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled,
            timestep=sigma,  # Flux scales sigma by 1000 inside
            img_ids=image_ids(height // 2, width // 2).to(noisy.device),
            txt_ids=torch.zeros(text_len, 3, device=noisy.device),
            return_dict=False,
        )[0]
        return unpack_patches(out, height, width).unsqueeze(2)
    return model(noisy, sigma * 1000, encoder_hidden_states, return_dict=False)[0]


@torch.no_grad()
def sample(
    demo: DemoModel,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    teacache: TeaCacheParams | None = None,
    negative_prompt: str = "",
    shift: float = 1.0,
) -> torch.Tensor:
    """Generate one sample per prompt with classifier-free guidance; returns (B, 1, F, H, W) in [-1, 1].

    Each sample's starting noise is drawn from its own seed. Both CFG branches run as separate calls
    inside `teacache_step`, so TeaCache (when `teacache` is given) keeps one state per branch; the
    whole batch shares one skip decision per branch. `guidance_scale` 1 runs the positive branch only.
    """
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(
            f"prompts and seeds must be non-empty and of equal length, got {len(prompts)} and {len(seeds)}"
        )
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1 (1 turns CFG off), got {guidance_scale}")
    size, frames = demo.image_size, demo.num_frames
    model = demo.transformer
    noise = [torch.randn(1, 1, frames, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds]
    x = torch.cat(noise)  # (B, 1, F, H, W)
    batch = x.shape[0]
    text, pooled = demo.text_encoder.encode(list(prompts))
    use_cfg = guidance_scale != 1
    if use_cfg:
        negative_text, negative_pooled = demo.text_encoder.encode([negative_prompt] * batch)
    sigmas = flow_sigmas(num_inference_steps, shift)

    if teacache is not None:
        model.enable_teacache(teacache, num_inference_steps)
    try:
        for step in range(num_inference_steps):
            sigma = sigmas[step].expand(batch)
            with model.teacache_step(step, is_cfg_negative=False):
                flow = predict_flow(demo, x, sigma, text, pooled)
            if use_cfg:
                with model.teacache_step(step, is_cfg_negative=True):
                    negative = predict_flow(demo, x, sigma, negative_text, negative_pooled)
                flow = negative + guidance_scale * (flow - negative)
            x = x + (sigmas[step + 1] - sigmas[step]) * flow
    finally:
        if teacache is not None:
            model.disable_teacache()
    return x.clamp(-1, 1)
