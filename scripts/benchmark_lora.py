"""TeaCache with a LoRA on the demo models: do the base model's coefficients and presets still hold?

For each demo model, with and without its "bold" LoRA (`scripts/train_demo_lora.py`, shipped in
`demo_loras/`), every prompt/seed pair is generated alone: uncached, then with each TeaCache preset of the
zoo entry. It reports the fraction of block-stack calls TeaCache skipped (both CFG branches; a decision of
TeaCache, no fixed schedule) and the PSNR of the cached images against the uncached ones of the same
model (base against base, LoRA against LoRA). It also records the calibration points (as
`scripts/calibrate.py` does) with and without the LoRA and reports how well the base model's fitted
polynomial predicts each (R^2), beside a fit made on the LoRA's own points.

Run: `python scripts/benchmark_lora.py [--json docs/results/lora-teacache.json]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from teacache_models.calibration import fit_polynomial, record_runs  # noqa: E402
from teacache_models.demo import digit_prompt  # noqa: E402
from teacache_models.metrics import psnr  # noqa: E402
from teacache_models.params import evaluate_polynomial  # noqa: E402
from teacache_models.pipelines import load_pipeline  # noqa: E402

MODELS = ("flux-digits", "wan-digits")


def lora_path(model: str) -> Path:
    return REPO / "demo_loras" / f"{model}-bold.safetensors"


def generate_all(pipe, prompts: list[str], seeds: list[int], teacache: str) -> tuple[torch.Tensor, int, int]:
    """Every prompt/seed pair alone: the images (N, C, H, W) and the block-stack calls computed and skipped."""
    images, computed, skipped = [], 0, 0
    for prompt in prompts:
        for seed in seeds:
            result = pipe([prompt], pipe.default_sampling_params(teacache, seed=seed))
            images.append(result.images)
            for branch in (result.teacache_stats.positive, result.teacache_stats.negative):
                computed, skipped = computed + branch.num_computed, skipped + branch.num_skipped
    return torch.cat(images), computed, skipped


def r_squared(coefficients, x: np.ndarray, y: np.ndarray) -> float:
    predicted = np.array([evaluate_polynomial(coefficients, float(v)) for v in x])
    return float(1 - np.sum((y - predicted) ** 2) / np.sum((y - y.mean()) ** 2))


def calibration_points(
    pipe, prompts: list[str], seeds: list[int], indicator: str | None
) -> tuple[np.ndarray, np.ndarray]:
    def run(params) -> None:
        for prompt in prompts:
            for seed in seeds:
                sampling = pipe.default_sampling_params("off", seed=seed)
                pipe([prompt], dataclasses.replace(sampling, teacache_params=params))

    records = record_runs(pipe.transformer, run, indicator)
    return np.array([r.x for r in records]), np.array([r.y for r in records])


def measure(model: str, prompts: list[str], seeds: list[int], calibration_seeds: list[int]) -> dict:
    pipe = load_pipeline(model)
    entry = pipe.zoo_entry
    preset = entry.presets[entry.default_preset].params  # the fit and indicator of the base model's presets
    base_coefficients = preset.coefficients
    result: dict = {"model": model, "lora": str(lora_path(model).relative_to(REPO)), "presets": {}}
    result["indicator"] = preset.indicator
    for with_lora in (False, True):
        if with_lora:
            pipe.load_lora_weights(lora_path(model), adapter_name="bold")
        label = "lora" if with_lora else "base"
        uncached, _, _ = generate_all(pipe, prompts, seeds, "off")
        result.setdefault("mean_ink", {})[label] = float(uncached.mean())
        for name in entry.presets:
            started = time.perf_counter()
            cached, computed, skipped = generate_all(pipe, prompts, seeds, name)
            values = psnr(cached, uncached, data_range=1.0)
            result["presets"].setdefault(name, {})[label] = {
                "skipped_fraction": skipped / (computed + skipped),
                "psnr_db_mean": float(values[torch.isfinite(values)].mean()) if torch.isfinite(values).any() else None,
                "psnr_db_min": float(values.min()),
                "wall_s": round(time.perf_counter() - started, 1),
            }
        x, y = calibration_points(pipe, prompts, calibration_seeds, preset.indicator)
        refit = fit_polynomial(x, y, len(base_coefficients) - 1)
        result.setdefault("coefficients", {})[label] = {
            "points": len(x),
            "x_range": [float(x.min()), float(x.max())],
            "r_squared_of_base_fit": r_squared(base_coefficients, x, y),
            "r_squared_of_own_fit": refit.r_squared,
        }
    if not result["mean_ink"]["lora"] > result["mean_ink"]["base"]:
        print(f"warning: the {model} LoRA did not make the digits bolder", file=sys.stderr)
    return result


def table(results: list[dict]) -> str:
    lines = [
        "| model | preset | skipped, base | skipped, LoRA | PSNR base (dB) | PSNR LoRA (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for preset, row in result["presets"].items():
            base, lora = row["base"], row["lora"]
            lines.append(
                f"| {result['model']} | {preset} | {base['skipped_fraction']:.2f} | {lora['skipped_fraction']:.2f} | "
                f"{base['psnr_db_mean']:.1f} | {lora['psnr_db_mean']:.1f} |"
            )
    lines += ["", "| model | R^2 of the base fit: base points | LoRA points | R^2 of a fit on the LoRA points |"]
    lines.append("|---|---|---|---|")
    for result in results:
        base, lora = result["coefficients"]["base"], result["coefficients"]["lora"]
        lines.append(
            f"| {result['model']} | {base['r_squared_of_base_fit']:.3f} | {lora['r_squared_of_base_fit']:.3f} "
            f"| {lora['r_squared_of_own_fit']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt (0, 1, ...)")
    parser.add_argument("--calibration-seeds", type=int, default=2, help="seeds per prompt for the fits (from 1000)")
    parser.add_argument("--digits", type=int, default=10, help="prompts: 'a handwritten digit d' for d < this")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = [digit_prompt(d) for d in range(args.digits)]
    seeds, calibration_seeds = list(range(args.seeds)), list(range(1000, 1000 + args.calibration_seeds))
    results = [measure(model, prompts, seeds, calibration_seeds) for model in args.models]
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"prompts": prompts, "seeds": seeds, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
