"""Fine-tune a small LoRA on a shipped demo model: "bold" handwritten digits.

The training images are the demo's digits with their strokes thickened by a 3x3 maximum filter; the base
model and its text encoder stay frozen, and only a rank-`--rank` LoRA on the linear layers of the
transformer's blocks learns (PEFT's LoRA layers, initialised as PEFT does: the adapter starts as the base
model). The loss is the demo's rectified-flow loss (`scripts/train_demo.py`), prompts included, so the
LoRA changes the style and keeps the digit a prompt asks for.

Run: `python scripts/train_demo_lora.py [--family flux|wan|both] [--steps 300] [--rank 4]`. Each LoRA trains
in a few minutes on one CPU core and is written with `save_lora_adapter` (PEFT keys, LoraConfig in the
metadata) to `demo_loras/<family>-digits-bold.safetensors`; `configs/flux-digits-bold.yaml` loads it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from teacache_models.demo import load_demo_model, load_digits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import IMAGE_SIZE, flow_matching_loss  # noqa: E402

ADAPTER = "bold"
# The blocks' linear layers (attention, feed-forward, modulation): the style lives there, not in the embedders.
TARGETS = {
    "flux": r".*(transformer_blocks|single_transformer_blocks)\.\d+\..*(to_q|to_k|to_v|to_out\.0|add_\w_proj|"
    r"to_add_out|proj_mlp|proj_out|net\.0\.proj|net\.2|linear)",
    "wan": r"blocks\.\d+\.(attn1|attn2|ffn)\..*(to_q|to_k|to_v|to_out\.0|net\.0\.proj|net\.2)",
}


def bold(images: torch.Tensor) -> torch.Tensor:
    """Thicker strokes: a 3x3 maximum filter on (N, 1, H, W) images with the ink at +1."""
    return torch.nn.functional.max_pool2d(images, kernel_size=3, stride=1, padding=1)


def train_lora(family: str, steps: int, rank: int, batch_size: int, seed: int) -> tuple[torch.nn.Module, dict]:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    demo = load_demo_model(REPO / "demo_models" / f"{family}-digits")
    transformer, encoder = demo.transformer, demo.text_encoder.requires_grad_(False)
    images, labels = load_digits(IMAGE_SIZE)
    images = bold(images).unsqueeze(2)  # (N, 1, F=1, H, W)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS[family])
    inject_adapter_in_model(config, transformer, adapter_name=ADAPTER)
    trainable = [p for n, p in transformer.named_parameters() if ".lora_" in n]
    assert trainable and all(p.requires_grad for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.0)
    transformer.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        index = torch.randint(0, images.shape[0], (batch_size,))
        loss = flow_matching_loss(transformer, encoder, images[index], labels[index], rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = 0.95 * running + 0.05 * loss.item() if step else loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"[{family}] step {step + 1}/{steps}  loss {running:.4f}  {time.perf_counter() - start:.0f} s")
    transformer.eval()
    parameters = sum(p.numel() for p in trainable)
    record = dict(steps=steps, rank=rank, batch_size=batch_size, seed=seed, final_loss=round(running, 4))
    record.update(lora_parameters=parameters, wall_s=round(time.perf_counter() - start, 1))
    return transformer, record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["flux", "wan", "both"], default="both")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=REPO / "demo_loras")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for family in ("flux", "wan") if args.family == "both" else (args.family,):
        transformer, record = train_lora(family, args.steps, args.rank, args.batch_size, args.seed)
        path = transformer.save_lora_adapter(args.out, ADAPTER, weight_name=f"{family}-digits-{ADAPTER}.safetensors")
        print(f"[{family}] wrote {path} ({path.stat().st_size} bytes): {record}")


if __name__ == "__main__":
    main()
