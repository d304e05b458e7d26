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
and the coefficients into the presets of a zoo config that use this indicator, and into the config's
`teacache.fits` entry for it where it has one (comments and other keys are kept; `source` says where the
coefficients come from, `calibrated_range` the x range). `--write-config` without a path writes the zoo
entry's own YAML (`--model NAME`, or `--config`).

It then sweeps the threshold (`--table-thresholds`) with the new coefficients and the settings of a preset
that uses this indicator, on the first `--table-pairs` prompt/seed pairs, and records per threshold the mean
fraction of block-stack calls computed and the mean PSNR against the uncached outputs of the recording runs
(threshold 0 computes every step, bit-identical to uncached). With `--write-config` the table goes into
`teacache.threshold_table`, from which `--teacache-target-speedup` (scripts/generate.py) and
`ZooEntry.teacache_for_speedup` pick a threshold. `--table-thresholds` with no value skips the sweep.

An entry with no preset for the indicator (the zoo's entries that ship none, `default: "off"`) gets one,
`calibrated` (`calibrated-<indicator>` where that name is taken): the table is swept with the new fit and
TeaCache's default settings, and the preset takes the largest threshold up to which every measured threshold
keeps the mean PSNR against uncached >= `--min-psnr` (30 dB), with the fit (or, where the entry keeps its fit
in `teacache.fits`, nothing: the fit is replaced there) and a `source` giving the fit, the rule and the numbers
measured (a two-expert entry's preset carries no fit: each expert's goes into `teacache.fits`). It becomes the
entry's default only where the default was "off"; the table goes into `teacache.threshold_table` unless the
entry has one already and the new preset is not its default. Without a table (`--table-thresholds` with no
value: refused before anything runs) or without a threshold reaching the floor, nothing is written.

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
)
from teacache_models.calibration_config import (  # noqa: E402
    CALIBRATED_PRESET,
    MIN_PSNR_DB,
    add_preset,
    calibration_source,
    presets_using,
    threshold_for_psnr,
    threshold_rule_note,
    write_coefficients,
    write_expert_fits,
    write_threshold_table,
)
from teacache_models.cli import (  # noqa: E402
    CliError,
    check_last_image,
    check_pipeline_images,
    image_inputs,
    load_images,
    lora_argument,
)
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
    parser.add_argument(
        "--last-image",
        type=Path,
        metavar="FILE",
        help="the last frame of every run, besides --image (the first), for first-last-frame video models (Wan2.1 "
        "FLF2V, Wan2.2 I2V A14B); refused by the others",
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
        nargs="?",
        const=True,
        metavar="YAML",
        help="zoo YAML whose presets using this indicator get the fit (two experts: teacache.fits per expert); "
        "without a value, the zoo entry's own YAML (--model NAME or --config). An entry with no preset for this "
        f"indicator gets a new one, {CALIBRATED_PRESET!r}, with a threshold chosen from the threshold table "
        "(--min-psnr), which becomes its default where TeaCache was off by default",
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
    parser.add_argument(
        "--min-psnr",
        type=float,
        default=MIN_PSNR_DB,
        metavar="DB",
        help="a preset --write-config adds gets the largest threshold of the table up to which the mean PSNR "
        "against uncached stays at or above this",
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

    config_path = args.write_config
    if config_path is True:
        if pipe.zoo_entry is None:
            raise SystemExit(
                f"--write-config without a YAML writes the zoo entry's own, but {args.model!r} is not a zoo entry: "
                "give --config NAME_OR_YAML or --write-config YAML"
            )
        config_path = pipe.zoo_entry.path
    if args.table_pairs < 1:
        raise SystemExit(f"--table-pairs must be >= 1, got {args.table_pairs}")
    # The name of the preset --write-config adds to an entry with none for this indicator (None: it has one).
    new_preset = None if config_path is None else preset_to_add(config_path, indicator, model, args.table_thresholds)

    try:
        check_last_image(args, "last_image" in pipe.call_inputs, args.model)
        check_pipeline_images(len(args.image), pipe, args.model)
        inputs = image_inputs(load_images(args.image))
        if args.last_image is not None:
            inputs["last_image"] = load_images([args.last_image], "--last-image")[0]
        # What the pipeline takes beside the prompt (FLF2V's last frame, ...), before the first run, not in it.
        pipe.check_inputs(pipe.default_sampling_params(teacache="off"), **inputs)
    except (CliError, ValueError, TypeError) as error:
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
    if config_path and len(fits) > 1 and new_preset is None:
        write_expert_fits(config_path, indicator, fits)
        print(f"{config_path}: per-expert fits of indicator {indicator} written for {sorted(fits)}")
    elif config_path and new_preset is None:
        updated = write_coefficients(config_path, indicator, fit, model.supported_teacache_indicators[0])
        print(f"{config_path}: coefficients of presets {updated} updated")
    if args.table_thresholds:
        preset, base = table_settings(args, config_path, entry, indicator, updated, fit, model, new_preset is None)
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
            record["threshold_table"] = {"preset": preset or new_preset, "rows": rows}
            args.json.write_text(json.dumps(record) + "\n")
        table_pairs = min(args.table_pairs, len(pairs))
        if new_preset is not None:
            add_calibrated_preset(
                config_path, new_preset, base, rows, fits, args, table_pairs, model.supported_teacache_indicators[0]
            )
            written = load_zoo_entry(config_path)
            # The entry's one threshold table serves --teacache-target-speedup with its preset's settings: the
            # new preset's replaces it only where the new preset is the default or there was none.
            preset = new_preset
            if written.default_preset != new_preset and written.threshold_table is not None:
                preset = None
                print(f"{config_path}: the threshold table of preset {written.threshold_table.preset!r} is kept")
        if config_path and preset is not None:
            source = (
                f"scripts/calibrate.py: {table_pairs} prompt/seed pairs, mean computed "
                f"fraction and PSNR against uncached, preset {preset} with the new coefficients"
            )
            write_threshold_table(config_path, preset, rows, source)
            print(f"{config_path}: threshold table of preset {preset!r} written")
    return 0


def preset_to_add(config_path: Path, indicator: str, model: Any, table_thresholds: list[float]) -> str | None:
    """The name of the preset --write-config adds to `config_path` (None where a preset uses `indicator`):
    `calibrated`, or `calibrated-<indicator>` where that name is taken. Refuses, before anything runs, when no
    threshold table will be measured to choose its threshold from."""
    import yaml

    load_zoo_entry(config_path)  # a broken YAML fails before the recording runs
    presets = (yaml.safe_load(Path(config_path).read_text())["teacache"] or {}).get("presets") or {}
    if presets_using(presets, indicator, model.supported_teacache_indicators[0]):
        return None
    if not table_thresholds:
        raise SystemExit(
            f"{config_path} has no TeaCache preset using indicator {indicator!r}: --write-config adds one and "
            "chooses its threshold from the threshold table, which --table-thresholds measures; give "
            "--table-thresholds a list of thresholds (or leave it out for the default list)"
        )
    for name in (CALIBRATED_PRESET, f"{CALIBRATED_PRESET}-{indicator}"):
        if name not in presets:
            return name
    raise SystemExit(f"{config_path}: presets {CALIBRATED_PRESET!r} and {name!r} both exist but use another indicator")


def add_calibrated_preset(
    config_path: Path,
    name: str,
    base: TeaCacheParams,
    rows: list[tuple[float, float, float]],
    fits: dict[str, Any],
    args: argparse.Namespace,
    table_pairs: int,
    default_indicator: str,
) -> None:
    """Add preset `name` with `base`'s settings at the threshold chosen from `rows`, once one is chosen; it
    becomes the default where TeaCache was off by default. The new fit goes into the preset, or into
    teacache.fits where the entry keeps its fit for this indicator there (and each expert's, per expert)."""
    try:
        chosen = threshold_for_psnr(rows, args.min_psnr)
    except ValueError as error:
        raise SystemExit(
            f"{error}; nothing was written to {config_path} (measure smaller thresholds with --table-thresholds, "
            "or lower --min-psnr; --json keeps the fit)"
        ) from None
    entry = load_zoo_entry(config_path)
    steps = entry.sampling.num_inference_steps if args.steps is None else args.steps
    note = threshold_rule_note(rows, chosen, args.min_psnr, table_pairs, steps)
    indicator = base.indicator
    params = dataclasses.replace(base, teacache_thresh=chosen[0])
    (fit,) = fits.values() if len(fits) == 1 else (None,)
    if fit is not None and indicator not in entry.fits:
        source = f"{calibration_source(fit)}; {note}"
    else:
        if fit is None:
            write_expert_fits(config_path, indicator, fits)
            print(f"{config_path}: per-expert fits of indicator {indicator} written for {sorted(fits)}")
        else:
            write_coefficients(config_path, indicator, fit, default_indicator)
            print(f"{config_path}: teacache.fits.{indicator} replaced by the new fit")
        # The preset takes the fit (and its calibrated range) from teacache.fits.
        params = dataclasses.replace(params, coefficients=None, coefficients_negative=None, calibrated_range=None)
        source = f"coefficients: teacache.fits ({'each expert its own' if fit is None else indicator}); {note}"
    make_default = entry.default_preset == "off"
    add_preset(config_path, name, params, source, make_default)
    print(
        f"{config_path}: preset {name!r} added with threshold {chosen[0]:g} ({chosen[1]:.1%} of the calls "
        f"computed, {chosen[2]:.2f} dB: the largest threshold up to which the mean PSNR stays >= {args.min_psnr:g} dB)"
    )
    if steps != entry.sampling.num_inference_steps:
        print(
            f"note: the threshold was measured at {steps} steps (--steps); the entry samples "
            f"{entry.sampling.num_inference_steps}, where it may skip more or less"
        )
    if make_default:
        print(f"{config_path}: TeaCache was off by default; preset {name!r} is now the default")
    else:
        print(f"{config_path}: the default preset stays {entry.default_preset!r}")
    if chosen[1] >= 1:
        print(
            f"note: threshold {chosen[0]:g} computed every step of the table's runs, so the preset skips nothing: "
            "measure larger thresholds with --table-thresholds"
        )


def pixels(result: Any) -> torch.Tensor:
    return (result.frames if result.is_video else result.images).float()


def psnr_db(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of pixels in [0, 1] over the whole tensor, capped at 100 dB for identical outputs."""
    mse = (actual - reference).pow(2).mean().item()
    return 100.0 if mse == 0 else min(100.0, -10 * math.log10(mse))


def table_settings(
    args: argparse.Namespace,
    config_path: Path | None,
    entry: Any,
    indicator: str,
    updated: list[str],
    fit: Any,
    model: Any,
    use_presets: bool = True,
) -> tuple[str | None, TeaCacheParams]:
    """(preset name, its settings with the new coefficients) for the threshold table: --table-preset, else
    the entry's default preset if it uses this indicator, else a preset just updated; (None, plain settings
    with this indicator and the new fit) without such a preset or with `use_presets` False."""
    if config_path:
        entry = load_zoo_entry(config_path)
    candidates = [args.table_preset] if args.table_preset else []
    if entry is not None and use_presets:
        candidates += [entry.default_preset, *updated]
    for preset in candidates:
        if entry is not None and preset in entry.presets:
            params = entry.presets[preset].params
            if model.teacache_indicator_for(params).name == indicator:
                return preset, dataclasses.replace(
                    params,
                    coefficients=fit.coefficients,
                    coefficients_negative=fit.coefficients_negative,
                    calibrated_range=fit.calibrated_range,
                )
        if preset == args.table_preset:
            raise SystemExit(f"--table-preset {preset!r} is not a preset of the entry using indicator {indicator!r}")
    return None, TeaCacheParams(
        indicator=indicator,
        coefficients=fit.coefficients,
        coefficients_negative=fit.coefficients_negative,
        calibrated_range=fit.calibrated_range,
    )


if __name__ == "__main__":
    sys.exit(main())
