"""Generate a grid of digits 0-9 with a demo model, uncached and with TeaCache, and print the speedup.

Run: `python scripts/demo_generate.py demo_models/flux-digits --out outputs/flux-digits.png`.

Sampling and TeaCache settings default to the `sampling` section of the folder's `model_index.json`;
the flags override them. Both runs use the same prompts and seeds in the same process; the speedup is
the median wall time uncached / cached over `--repeats` alternating runs. With scikit-learn installed
the script also reports how many samples a logistic-regression reader of digits recognises as the
prompted digit.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from teacache_models import TeaCacheParams
from teacache_models.demo import digit_prompt, load_demo_model, make_grid, sample, tensor_to_images, write_png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a demo folder, e.g. demo_models/flux-digits")
    parser.add_argument("--out", type=Path, default=None, help="PNG of the cached grid (default outputs/<name>.png)")
    parser.add_argument("--seeds", type=int, default=4, help="rows of the grid: seeds 0..N-1")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--threshold", type=float, default=None, help="TeaCache threshold")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    demo = load_demo_model(args.model)
    defaults = demo.index.get("sampling", {})
    teacache_defaults = defaults.get("teacache", {})
    steps = args.steps or defaults.get("num_inference_steps", 20)
    guidance = args.guidance_scale or defaults.get("guidance_scale", 4.0)
    shift = defaults.get("shift", 1.0)
    threshold = args.threshold if args.threshold is not None else teacache_defaults.get("teacache_thresh", 0.1)
    params = TeaCacheParams(
        teacache_thresh=threshold,
        coefficients=teacache_defaults.get("coefficients"),
        indicator=teacache_defaults.get("indicator"),
    )
    digits = list(range(10)) * args.seeds
    prompts = [digit_prompt(d) for d in digits]
    seeds = [1000 * row + d for row in range(args.seeds) for d in range(10)]

    def run(teacache: TeaCacheParams | None) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        images = sample(demo, prompts, seeds, steps, guidance, teacache=teacache, shift=shift)
        return images, time.perf_counter() - start

    sample(demo, prompts[:2], seeds[:2], 2, guidance)  # warm-up: first calls allocate
    times: dict[str, list[float]] = {"uncached": [], "teacache": []}
    for _ in range(args.repeats):
        uncached, seconds = run(None)
        times["uncached"].append(seconds)
        cached, seconds = run(params)
        times["teacache"].append(seconds)
    stats = demo.transformer.teacache_stats()
    median = {mode: statistics.median(values) for mode, values in times.items()}

    name = args.model.name
    print(f"{name}: {len(prompts)} samples, {steps} steps, guidance {guidance}, TeaCache threshold {threshold}")
    print(f"  uncached {median['uncached']:.2f} s, TeaCache {median['teacache']:.2f} s (median of {args.repeats})")
    print(f"  speedup {median['uncached'] / median['teacache']:.2f}x; TeaCache: {stats.summary()}")
    mse = torch.mean((cached - uncached) ** 2).item()
    print(f"  PSNR of the cached grid against the uncached one: {10 * np.log10(4 / max(mse, 1e-12)):.1f} dB")
    try:
        from teacache_models.demo import fit_digit_classifier

        read = fit_digit_classifier()
    except ImportError:
        read = None
    if read is not None:
        for mode, images in (("uncached", uncached), ("TeaCache", cached)):
            accuracy = float(np.mean(read(images) == np.array(digits)))
            print(f"  {mode}: {accuracy:.0%} of the samples are read as the prompted digit")

    out = args.out or Path("outputs") / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, images in ((out, cached), (out.with_name(f"{out.stem}-uncached.png"), uncached)):
        write_png(path, make_grid(tensor_to_images(images[:, :, 0]), columns=10, scale=4))
        print(f"  wrote {path}")


if __name__ == "__main__":
    main()
