#!/usr/bin/env python
"""Calibrate TeaCache's rescaling polynomial for a model: record, fit, plot, write the zoo config.

Examples:
    python scripts/calibrate.py --model demo_models/wan-digits --config wan-digits --indicator modulated_input \
        --plot docs/results/calibration-wan-digits-modulated_input.png --write-config configs/wan-digits.yaml
    python scripts/calibrate.py --model wan2.1-t2v-1.3b --prompts-file prompts.txt --device cuda --dtype bfloat16
    python scripts/calibrate.py --model flux-digits --lora demo_loras/flux-digits-bold.safetensors --json fit.json

The model runs uncached (TeaCache with threshold 0, which computes the chosen indicator at every step and
skips nothing) over every prompt and seed. For each pair of consecutive steps of each CFG branch it records
x, the relative L1 change of the indicator, and y, that of the block-stack output (`--target output`, as
the TeaCache paper fits) or of its residual (`--target residual`). It fits `numpy.polyfit(x, y, degree)`,
one polynomial for both CFG branches, or one per branch where the branches differ (`--branch-fits auto`: per
branch when that removes at least a fifth of the joint fit's squared residual; it says which it chose, and a
per-branch fit is written as `coefficients` plus `coefficients_negative`), prints the number of points, R^2
and the x range, and optionally saves a scatter-and-fit PNG, a JSON record
and the coefficients into the presets of a zoo config that use this indicator (comments and other keys
are kept; the preset's `source` says where the coefficients come from, `calibrated_range` the x range).

It then sweeps the threshold (`--table-thresholds`) with the new coefficients and the settings of a preset
that uses this indicator, on the first `--table-pairs` prompt/seed pairs, and records per threshold the mean
fraction of block-stack calls computed and the mean PSNR against the uncached outputs of the recording runs
(threshold 0 computes every step, bit-identical to uncached). With `--write-config` the table goes into
`teacache.threshold_table`, from which `--teacache-target-speedup` (scripts/generate.py) and
`ZooEntry.teacache_for_speedup` pick a threshold. `--table-thresholds` with no value skips the sweep.

A pipeline with two experts (Wan2.2 A14B) gets one fit per expert unless `--component` picks one: each
expert's steps are recorded apart, `--plot` saves one PNG per expert (`<stem>-<expert>.png`), `--json`
keeps points and fit under `experts`, and `--write-config` writes `teacache.fits.<expert>.<indicator>`, each
with the expert's own `calibrated_range` (and per-branch polynomials where its branches differ).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from teacache_models.calibration import (  # noqa: E402
    BRANCH_FITS,
    TARGETS,
    fit_branches,
    plot_fit,
    record_runs_per_model,
    write_coefficients,
    write_expert_fits,
    write_threshold_table,
)
from teacache_models.cli import CliError, check_pipeline_images, image_inputs, load_images, lora_argument  # noqa: E402
from teacache_models.demo import digit_prompt  # noqa: E402
from teacache_models.params import RescalingFit, TeaCacheParams  # noqa: E402
from teacache_models.zoo import load_zoo_entry  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calibrate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="zoo name, zoo YAML or local diffusers-layout folder")
    parser.add_argument("--config", help="zoo entry (name or YAML) for a folder: its sampling defaults")
    parser.add_argument(
        "--component",
        help="record only this transformer when the pipeline has several (default: one fit per Wan2.2 expert)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        type=lora_argument,
        default=[],
        metavar="PATH_OR_HUB_ID[:SCALE]",
        help="fit with this LoRA loaded and active at SCALE (repeatable; a zoo entry's loras are loaded too)",
    )
    parser.add_argument("--indicator", help="indicator to calibrate (default: the model's default indicator)")
    parser.add_argument("--target", choices=TARGETS, default="output", help="y: block-stack output or residual")
    parser.add_argument("--degree", type=int, default=4, help="polynomial degree")
    parser.add_argument(
        "--branch-fits",
        choices=BRANCH_FITS,
        default="auto",
        help="one polynomial for both CFG branches (joint), one per branch (separate), or one per branch where "
        "that removes at least a fifth of the joint fit's squared residual (auto)",
    )
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line (default: the ten digit prompts)")
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="the input image of every run: the first frame of an image-to-video model, the image(s) an editing "
        "model edits (repeat for several), the image a layered model decomposes",
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds per prompt")
    parser.add_argument("--seed-offset", type=int, default=1000, help="first seed (keep apart from benchmark seeds)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the zoo entry's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--plot", type=Path, help="save the scatter-and-fit PNG here")
    parser.add_argument("--json", type=Path, help="save the fit and every recorded point here")
    parser.add_argument(
        "--write-config",
        type=Path,
        help="zoo YAML whose presets using this indicator get the fit (two experts: teacache.fits per expert)",
    )
    parser.add_argument(
        "--table-thresholds",
        type=float,
        nargs="*",
        default=[0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0],
        help="thresholds of the threshold table (none: no table)",
    )
    parser.add_argument("--table-pairs", type=int, default=10, help="prompt/seed pairs the table is measured on")
    parser.add_argument(
        "--table-preset", help="preset whose settings the table sweeps (default: the entry's default preset)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from teacache_models.pipelines import load_pipeline

    entry = load_zoo_entry(args.config) if args.config else None
    pipe = load_pipeline(args.model, torch_dtype=args.dtype, device=args.device, zoo_entry=entry)
    pipe.load_loras(args.lora)
    models = pipe.teacache_models()
    name = args.component or next(iter(models))
    if name not in models:
        raise SystemExit(f"--component {name!r} is not one of {sorted(models)}")
    # Without --component, a pipeline with several transformers (Wan2.2 A14B's experts) gets one fit per expert.
    recorded = models if args.component is None and len(models) > 1 else {name: models[name]}
    model = models[name]
    indicator = args.indicator or model.supported_teacache_indicators[0]
    if indicator not in model.supported_teacache_indicators:
        raise SystemExit(f"--indicator {indicator!r} is not one of {list(model.supported_teacache_indicators)}")

    try:
        check_pipeline_images(len(args.image), pipe, args.model)
        inputs = image_inputs(load_images(args.image))
    except CliError as error:
        raise SystemExit(str(error)) from None
    if args.prompts_file:
        prompts = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    else:
        prompts = [digit_prompt(d) for d in range(10)]
    seeds = range(args.seed_offset, args.seed_offset + args.seeds)
    overrides = {} if args.steps is None else {"num_inference_steps": args.steps}

    pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
    uncached: dict[tuple[str, int], torch.Tensor] = {}

    def generate(prompt: str, seed: int, params: TeaCacheParams) -> Any:
        sampling = pipe.default_sampling_params(teacache="off", seed=seed, **overrides)
        return pipe(prompt, dataclasses.replace(sampling, teacache_params=params), **inputs)

    def run(params: TeaCacheParams) -> None:
        for prompt, seed in pairs:
            uncached[prompt, seed] = pixels(generate(prompt, seed, params))

    started = time.perf_counter()
    records_by = record_runs_per_model(recorded, run, indicator, args.target)
    fits = {n: fit_branches(rs, args.degree, args.branch_fits) for n, rs in records_by.items()}
    wall = time.perf_counter() - started
    print(f"{len(prompts)} prompts x {args.seeds} seeds, indicator {indicator}, target {args.target} ({wall:.1f} s)")
    for component, branch_fits in fits.items():
        fit = branch_fits.joint
        print(
            f"{component}: {fit.num_points} points, R^2 {fit.r_squared:.4f}, x in [{fit.x_min:.4g}, {fit.x_max:.4g}]; "
            f"{branch_fits.describe()}"
        )
        for branch, coefficients in (("", branch_fits.coefficients), ("negative ", branch_fits.coefficients_negative)):
            if coefficients is not None:
                print(f"  {branch}coefficients (highest degree first): [{', '.join(f'{c:.8e}' for c in coefficients)}]")

    label = Path(args.model).name
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        y_label = "rel. L1 change of block-stack " + ("output" if args.target == "output" else "residual")
        for component, fit in fits.items():
            # One PNG per expert: the given path with the expert's name appended.
            path = args.plot if len(fits) == 1 else args.plot.with_stem(f"{args.plot.stem}-{component}")
            joint = fit.joint
            title = f"{label} ({component}): {indicator}, {joint.num_points} points, R$^2$ {joint.r_squared:.3f}"
            plot_fit(records_by[component], fit, path, title, f"rel. L1 change of indicator '{indicator}'", y_label)
            print(f"plot: {path}")
    record: dict[str, Any] = {
        "model": args.model,
        "loras": [dataclasses.asdict(spec) for spec in args.lora],
        "indicator": indicator,
        "target": args.target,
        "prompts": prompts,
        "seeds": list(seeds),
    }
    per_component = {
        component: {
            "fit": fit.joint.as_dict(),
            "branch_fits": {
                "per_branch": fit.per_branch,
                "residual_share": fit.residual_share,
                **({"positive": fit.positive.as_dict(), "negative": fit.negative.as_dict()} if fit.per_branch else {}),
            },
            "points": {
                branch: [[r.x, r.y] for r in records_by[component] if r.is_cfg_negative == negative]
                for branch, negative in (("positive", False), ("negative", True))
            },
        }
        for component, fit in fits.items()
    }
    if len(fits) == 1:
        record.update(component=name, **per_component[name])
    else:
        record["experts"] = per_component
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record) + "\n")
        print(f"json: {args.json}")
    fit = fits[name]
    updated = []
    if args.write_config and len(fits) > 1:
        write_expert_fits(args.write_config, indicator, fits)
        print(f"{args.write_config}: per-expert fits of indicator {indicator} written for {sorted(fits)}")
    elif args.write_config:
        updated = write_coefficients(args.write_config, indicator, fit, model.supported_teacache_indicators[0])
        print(f"{args.write_config}: coefficients of presets {updated} updated")
    if args.table_thresholds:
        preset, base = table_settings(args, entry, indicator, updated, fit)
        if len(fits) > 1:
            # Each expert rescales with its own new fit and range (coefficients None take the model's fits).
            for component, expert_fit in fits.items():
                new = RescalingFit(
                    expert_fit.coefficients, expert_fit.coefficients_negative, expert_fit.calibrated_range
                )
                recorded[component].set_teacache_fits({**recorded[component].teacache_rescaling_fits, indicator: new})
            base = dataclasses.replace(base, coefficients=None, coefficients_negative=None, calibrated_range=None)
        rows = []
        for thresh in args.table_thresholds:
            params = dataclasses.replace(base, teacache_thresh=thresh)
            fractions, quality = [], []
            for prompt, seed in pairs[: args.table_pairs]:
                result = generate(prompt, seed, params)
                stats = [component.teacache_stats() for component in recorded.values()]
                computed = sum(s.num_computed for s in stats)
                fractions.append(computed / (computed + sum(s.num_skipped for s in stats)))
                quality.append(psnr_db(pixels(result), uncached[prompt, seed]))
            rows.append((thresh, sum(fractions) / len(fractions), sum(quality) / len(quality)))
            print(f"threshold {thresh:g}: {rows[-1][1]:.1%} of the calls computed, {rows[-1][2]:.2f} dB")
        if args.json:
            record["threshold_table"] = {"preset": preset, "rows": rows}
            args.json.write_text(json.dumps(record) + "\n")
        if args.write_config and preset is not None:
            source = (
                f"scripts/calibrate.py: {min(args.table_pairs, len(pairs))} prompt/seed pairs, mean computed "
                f"fraction and PSNR against uncached, preset {preset} with the new coefficients"
            )
            write_threshold_table(args.write_config, preset, rows, source)
            print(f"{args.write_config}: threshold table of preset {preset!r} written")
    return 0


def pixels(result: Any) -> torch.Tensor:
    return (result.frames if result.is_video else result.images).float()


def psnr_db(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of pixels in [0, 1] over the whole tensor, capped at 100 dB for identical outputs."""
    mse = (actual - reference).pow(2).mean().item()
    return 100.0 if mse == 0 else min(100.0, -10 * math.log10(mse))


def table_settings(
    args: argparse.Namespace, entry: Any, indicator: str, updated: list[str], fit: Any
) -> tuple[str | None, TeaCacheParams]:
    """(preset name, its settings with the new coefficients) for the threshold table: --table-preset, else
    the entry's default preset if it uses this indicator, else a preset just updated; (None, plain settings
    with this indicator) without such a preset."""
    if args.write_config:
        entry = load_zoo_entry(args.write_config)
    candidates = [args.table_preset] if args.table_preset else []
    if entry is not None:
        candidates += [entry.default_preset, *updated]
    for preset in candidates:
        if entry is not None and preset in entry.presets:
            params = entry.presets[preset].params
            if (params.indicator or indicator) == indicator:
                return preset, dataclasses.replace(
                    params,
                    coefficients=fit.coefficients,
                    coefficients_negative=fit.coefficients_negative,
                    calibrated_range=fit.calibrated_range,
                )
        if preset == args.table_preset:
            raise SystemExit(f"--table-preset {preset!r} is not a preset of the entry using indicator {indicator!r}")
    return None, TeaCacheParams(
        indicator=indicator, coefficients=fit.coefficients, coefficients_negative=fit.coefficients_negative
    )


if __name__ == "__main__":
    sys.exit(main())
