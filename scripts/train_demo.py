"""Train the offline demo models: a Flux-architecture and a Wan-architecture digit generator.

Both learn scikit-learn's 8x8 handwritten digits, upsampled to 16x16, in pixel space (one grey
channel, no VAE), with rectified flow as Flux and Wan are trained: x_s = (1 - s) x0 + s noise, the
model predicts noise - x0. The prompt ("a handwritten digit 7", "the number seven", ...) goes through
`DigitTextEncoder`, trained jointly; 12% of the prompts are replaced by "" so that the empty prompt
learns the unconditional prediction and classifier-free guidance is real.

Run: `python scripts/train_demo.py [--family flux|wan|both] [--steps N] [--out demo_models]`.
The two models train side by side, one CPU core each, in about fifteen minutes; the weights, an exponential
moving average of the trained parameters, are written in the diffusers layout with their sha256
(`sha256sums.txt`, and the `sha256:` blocks printed for `weights_manifest.yaml`, which the loader checks).
Sampling defaults and TeaCache presets live in `configs/flux-digits.yaml` and `configs/wan-digits.yaml`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from teacache_models.demo import NUMBER_WORDS, DigitTextEncoder, load_digits, save_demo_model
from teacache_models.models import FluxTransformer2DModel, WanTransformer3DModel
from teacache_models.pipelines.demo import predict_flow

IMAGE_SIZE = 16
TEXT_WIDTH = 32

FLUX_CONFIG = dict(
    patch_size=1,  # the 2x2 pixel patches are packed into tokens outside, as the Flux pipeline does
    in_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=TEXT_WIDTH,
    pooled_projection_dim=TEXT_WIDTH,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)
WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=1,
    out_channels=1,
    text_dim=TEXT_WIDTH,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    cross_attn_norm=True,
    rope_max_seq_len=32,
)
TEXT_CONFIG = dict(max_length=8, embedding_dim=32, hidden_dim=TEXT_WIDTH)

TEMPLATES = (
    "a handwritten digit {}",
    "handwritten digit {}",
    "the digit {}",
    "a digit {}",
    "digit {}",
    "the number {}",
    "number {}",
    "a handwritten {}",
    "an image of the digit {}",
    "a picture of a handwritten number {}",
    "{}",
)
CONDITION_DROPOUT = 0.12


def random_prompt(digit: int, rng: random.Random) -> str:
    """A training prompt for `digit`: a random template with the numeral or the word; "" for dropout."""
    if rng.random() < CONDITION_DROPOUT:
        return ""
    name = str(digit) if rng.random() < 0.6 else NUMBER_WORDS[digit]
    return rng.choice(TEMPLATES).format(name)


def flow_matching_loss(
    transformer: torch.nn.Module, encoder: DigitTextEncoder, x0: torch.Tensor, labels: torch.Tensor, rng: random.Random
) -> torch.Tensor:
    """The rectified-flow loss on clean images `x0` (B, 1, 1, H, W) of digits `labels`, with random prompts."""
    batch_size = x0.shape[0]
    noise = torch.randn_like(x0)
    # Logit-normal noise levels (as SD3 / Flux training), mixed with uniform ones so the ends are seen.
    sigma = torch.sigmoid(torch.randn(batch_size))
    uniform = torch.rand(batch_size) < 0.2
    sigma = torch.where(uniform, torch.rand(batch_size), sigma)
    s = sigma.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    text, pooled = encoder.encode([random_prompt(int(d), rng) for d in labels])
    return torch.nn.functional.mse_loss(predict_flow(transformer, noisy, sigma, text, pooled), noise - x0)


def build(family: str, num_layers: int | None = None) -> tuple[torch.nn.Module, DigitTextEncoder]:
    """A fresh model of `family`; `num_layers` sets its depth (Flux: that many double-stream and that many
    single-stream blocks), None keeps the shipped demo's."""
    if family == "flux":
        depth = {} if num_layers is None else {"num_layers": num_layers, "num_single_layers": num_layers}
        transformer = FluxTransformer2DModel(**{**FLUX_CONFIG, **depth})
        encoder = DigitTextEncoder(**TEXT_CONFIG, pooled_dim=TEXT_WIDTH)
    else:
        depth = {} if num_layers is None else {"num_layers": num_layers}
        transformer = WanTransformer3DModel(**{**WAN_CONFIG, **depth})
        encoder = DigitTextEncoder(**TEXT_CONFIG)
    # A zero output head starts training from the prediction 0, as DiT initialises its final layer.
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)
    return transformer, encoder


def train(
    family: str, steps: int, batch_size: int, seed: int, num_layers: int | None = None
) -> tuple[torch.nn.Module, DigitTextEncoder, dict]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    images, labels = load_digits(IMAGE_SIZE)  # (N, 1, 16, 16), (N,)
    images = images.unsqueeze(2)  # (N, 1, F=1, H, W)
    transformer, encoder = build(family, num_layers)
    modules = torch.nn.ModuleList([transformer, encoder]).train()
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = min(200, steps // 10)

    def learning_rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))) * 0.95 + 0.05

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    print(
        f"[{family}] transformer {sum(p.numel() for p in transformer.parameters()):,} parameters, "
        f"text encoder {sum(p.numel() for p in encoder.parameters()):,}; {steps} steps of batch {batch_size}"
    )
    start = time.perf_counter()
    running = 0.0
    for step in range(steps):
        index = torch.randint(0, images.shape[0], (batch_size,))
        loss = flow_matching_loss(transformer, encoder, images[index], labels[index], rng)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, current in zip(ema.parameters(), modules.parameters(), strict=True):
                averaged.lerp_(current, 1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 500 == 0 or step + 1 == steps:
            print(
                f"[{family}] step {step + 1}/{steps}  loss {running:.4f}  {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    wall = time.perf_counter() - start
    record = {
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "final_loss": round(running, 4),
        "wall_s": round(wall, 1),
    }
    return ema[0], ema[1], record


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sha256sums(root: Path) -> Path:
    """`sha256sum`-format list of every file under `root`, relative paths; the tests check it."""
    listing = root / "sha256sums.txt"
    files = sorted(p for p in root.rglob("*") if p.is_file() and p != listing)
    listing.write_text("".join(f"{sha256(p)}  {p.relative_to(root).as_posix()}\n" for p in files))
    return listing


def train_and_save(family: str, args: argparse.Namespace) -> list[tuple[str, int, Path]]:
    """Train one family with `args.threads` threads and write its folder; returns (sha256, size, path) per file."""
    torch.set_num_threads(args.threads)
    transformer, encoder, record = train(family, args.steps, args.batch_size, args.seed, args.num_layers)
    index = {
        "family": family,
        "image_size": IMAGE_SIZE,
        "num_frames": 1,
        "channels": 1,
        "pixel_range": [-1, 1],
        "data": "sklearn.datasets.load_digits, 8x8 upsampled bilinearly to 16x16",
        "training": {**record, "threads": args.threads, "condition_dropout": CONDITION_DROPOUT},
    }
    files = save_demo_model(args.out / f"{family}-digits{args.suffix}", transformer, encoder, index)
    return [(sha256(path), path.stat().st_size, path) for path in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["flux", "wan", "both"], default="both")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    parser.add_argument("--out", type=Path, default=Path("demo_models"))
    parser.add_argument(
        "--num-layers",
        type=int,
        help="blocks of the model (Flux: that many double-stream and single-stream blocks each); default: "
        "the shipped demos' (Wan 4, Flux 2 + 2)",
    )
    parser.add_argument("--suffix", default="", help="appended to the folder name, e.g. -deep: wan-digits-deep")
    args = parser.parse_args()

    families = ["flux", "wan"] if args.family == "both" else [args.family]
    start = time.perf_counter()
    # The two models train side by side, one process and one thread each: on a small shared machine
    # two single-threaded processes are far faster than one process whose threads wait on each other.
    with ProcessPoolExecutor(max_workers=len(families)) as pool:
        results = dict(zip(families, pool.map(train_and_save, families, [args] * len(families)), strict=True))
    print(f"trained {', '.join(families)} in {time.perf_counter() - start:.0f} s of wall time")
    print(f"wrote {write_sha256sums(args.out)}")
    for family, files in results.items():
        print(f"[{family}] files (sha256, bytes, path):")
        for digest, size, path in files:
            print(f"  {digest}  {size:>9,}  {path}")
    print("weights_manifest.yaml: replace the sha256 blocks of the entries with")
    for family, files in results.items():
        print(f"{family}-digits{args.suffix}:\n  sha256:")
        for digest, _, path in files:
            print(f"    {path.relative_to(args.out / f'{family}-digits{args.suffix}').as_posix()}: {digest}")


if __name__ == "__main__":
    main()
