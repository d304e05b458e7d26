#!/usr/bin/env python
"""Calibrate TeaCache's rescaling polynomial for a model: record, fit, plot, write the zoo config.

Examples:
    python scripts/calibrate.py --model demo_models/wan-digits --config wan-digits --indicator modulated_input \
        --plot docs/results/calibration-wan-digits-modulated_input.png --write-config configs/wan-digits.yaml
    python scripts/calibrate.py --model wan2.1-t2v-1.3b --prompts-file prompts.txt --device cuda --dtype bfloat16

The model runs uncached (TeaCache with threshold 0, which computes the chosen indicator at every step and
skips nothing) over every prompt and seed. For each pair of consecutive steps of each CFG branch it records
x, the relative L1 change of the indicator, and y, that of the block-stack output (`--target output`, as
the TeaCache paper fits) or of its residual (`--target residual`). It fits `numpy.polyfit(x, y, degree)`,
prints the number of points, R^2 and the x range, and optionally saves a scatter-and-fit PNG, a JSON record
and the coefficients into the presets of a zoo config that use this indicator (comments and other keys
are kept; the preset's `source` says where the coefficients come from).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from teacache_models.calibration import (  # noqa: E402
    TARGETS,
    fit_polynomial,
    plot_fit,
    record_runs,
    write_coefficients,
)
from teacache_models.demo import digit_prompt  # noqa: E402
from teacache_models.params import TeaCacheParams  # noqa: E402
from teacache_models.zoo import load_zoo_entry  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibrate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="zoo name, zoo YAML or local diffusers-layout folder")
    parser.add_argument("--config", help="zoo entry (name or YAML) for a folder: its sampling defaults")
    parser.add_argument("--component", help="which transformer to record when the pipeline has several (Wan2.2)")
    parser.add_argument("--indicator", help="indicator to calibrate (default: the model's default indicator)")
    parser.add_argument("--target", choices=TARGETS, default="output", help="y: block-stack output or residual")
    parser.add_argument("--degree", type=int, default=4, help="polynomial degree")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line (default: the ten digit prompts)")
    parser.add_argument("--image", type=Path, help="the first frame of every run, for image-to-video models")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per prompt")
    parser.add_argument("--seed-offset", type=int, default=1000, help="first seed (keep apart from benchmark seeds)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the zoo entry's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--plot", type=Path, help="save the scatter-and-fit PNG here")
    parser.add_argument("--json", type=Path, help="save the fit and every recorded point here")
    parser.add_argument("--write-config", type=Path, help="zoo YAML whose presets using this indicator get the fit")
    return parser


def _image_input(pipe, path: Path | None) -> dict:
    """{"image": the image} for an image-to-video pipeline (which requires one), {} for the others."""
    takes = pipe.takes_image()
    if path is None:
        if takes == "required":
            raise SystemExit("this is an image-to-video model: give the first frame with --image FILE")
        return {}
    if takes == "no":
        raise SystemExit("--image is only for image-to-video models; this model takes no image")
    from PIL import Image

    with Image.open(path) as image:
        return {"image": image.convert("RGB")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from teacache_models.pipelines import load_pipeline

    entry = load_zoo_entry(args.config) if args.config else None
    pipe = load_pipeline(args.model, torch_dtype=args.dtype, device=args.device, zoo_entry=entry)
    models = pipe.teacache_models()
    if args.component is None and len(models) > 1:
        raise SystemExit(f"the pipeline has several transformers {sorted(models)}: choose one with --component")
    name = args.component or next(iter(models))
    if name not in models:
        raise SystemExit(f"--component {name!r} is not one of {sorted(models)}")
    model = models[name]
    indicator = args.indicator or model.supported_teacache_indicators[0]
    if indicator not in model.supported_teacache_indicators:
        raise SystemExit(f"--indicator {indicator!r} is not one of {list(model.supported_teacache_indicators)}")

    inputs = _image_input(pipe, args.image)
    if args.prompts_file:
        prompts = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    else:
        prompts = [digit_prompt(d) for d in range(10)]
    seeds = range(args.seed_offset, args.seed_offset + args.seeds)
    overrides = {} if args.steps is None else {"num_inference_steps": args.steps}

    def run(params: TeaCacheParams) -> None:
        for prompt in prompts:
            for seed in seeds:
                sampling = pipe.default_sampling_params(teacache="off", seed=seed, **overrides)
                pipe(prompt, dataclasses.replace(sampling, teacache_params=params), **inputs)

    started = time.perf_counter()
    records = record_runs(model, run, indicator, args.target)
    fit = fit_polynomial([r.x for r in records], [r.y for r in records], args.degree)
    wall = time.perf_counter() - started
    print(
        f"{len(prompts)} prompts x {args.seeds} seeds, indicator {indicator}, target {args.target}: "
        f"{fit.num_points} points, R^2 {fit.r_squared:.4f}, x in [{fit.x_min:.4g}, {fit.x_max:.4g}] ({wall:.1f} s)"
    )
    print("coefficients (highest degree first): [" + ", ".join(f"{c:.8e}" for c in fit.coefficients) + "]")

    label = Path(args.model).name
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        y_label = "rel. L1 change of block-stack " + ("output" if args.target == "output" else "residual")
        title = f"{label} ({name}): {indicator}, {fit.num_points} points, R$^2$ {fit.r_squared:.3f}"
        plot_fit(records, fit, args.plot, title, f"rel. L1 change of indicator '{indicator}'", y_label)
        print(f"plot: {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "model": args.model,
            "component": name,
            "indicator": indicator,
            "target": args.target,
            "prompts": prompts,
            "seeds": list(seeds),
            "fit": fit.as_dict(),
            "points": {
                branch: [[r.x, r.y] for r in records if r.is_cfg_negative == negative]
                for branch, negative in (("positive", False), ("negative", True))
            },
        }
        args.json.write_text(json.dumps(record) + "\n")
        print(f"json: {args.json}")
    if args.write_config:
        updated = write_coefficients(args.write_config, indicator, fit, model.supported_teacache_indicators[0])
        print(f"{args.write_config}: coefficients of presets {updated} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
