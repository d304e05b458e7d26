#!/usr/bin/env python
"""Generate an image (PNG) or a video (MP4) with TeaCache, from a model-zoo entry or a local folder.

Examples:
    python scripts/generate.py --model flux-digits --prompt "a handwritten digit 7"     # offline demo
    python scripts/generate.py --model flux-digits --prompt "a handwritten digit "{0..9} --num-images 4 --grid --compare
    python scripts/generate.py --model flux1-dev --prompt "a red fox in the snow" --teacache fast
    python scripts/generate.py --model ./my-flux-folder --config configs/flux1-schnell.yaml --prompt "a cat"
    python scripts/generate.py --list-models
    torchrun --nproc-per-node 4 scripts/generate.py --model wan2.1-t2v-14b --prompt "a fox" --cfg-parallel --sp-degree 2

Settings come from the zoo entry (`configs/<name>.yaml`: steps, guidance, resolution, frames, TeaCache
presets); every flag given overrides its setting. Several prompts (and --num-images per prompt) run as one
batch; --grid tiles an image batch into one PNG; --compare also runs the batch with TeaCache off and prints
the speedup and the PSNR against it. Next to the output a JSON sidecar records every setting, the timings
and the TeaCache statistics; one summary line (steps computed and skipped per CFG branch, wall time) is
printed. Nothing is written when the run fails: bad input (a flag, a file, a setting) exits 2 with one line naming
it, a failure while running exits 1.

Under torchrun, --cfg-parallel computes the two CFG branches on two ranks and --sp-degree N splits the
token sequence over N ranks (Wan, HunyuanVideo, HunyuanVideo-1.5); the world size must be 2 x N with CFG,
else N. Every rank generates the same result; only rank 0 writes files and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from teacache_models.cli import (  # noqa: E402
    ArgumentParser,
    CliError,
    HelpFormatter,
    add_model_arguments,
    add_parallel_arguments,
    add_run_arguments,
    add_teacache_arguments,
    check_entry_images,
    check_last_image,
    check_pipeline_images,
    check_run_arguments,
    image_inputs,
    load_configured_pipeline,
    load_images,
    path_argument,
    report_error,
    resolve_entry,
    save_mp4,
    start_parallel,
    teacache_params,
    write_atomically,
)
from teacache_models.params import SamplingParams  # noqa: E402
from teacache_models.zoo import ZooEntry, list_zoo, load_zoo_entry  # noqa: E402

# Grid cells smaller than this many pixels are enlarged (nearest neighbour) so that small images stay visible.
GRID_CELL_PIXELS = 64
_MAX_SEED = 2**63 - 1
IMAGE_SUFFIXES = (".png",)
VIDEO_SUFFIXES = (".mp4",)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="generate.py",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "TeaCache: --teacache picks a preset of the zoo entry ('slow' is more faithful, 'fast' skips more "
            "steps; the entry's default preset when omitted); 'off' runs every step. --teacache-thresh and "
            "--teacache-coefficients override the preset's values (or define the cache for a folder without "
            "a zoo config). Outputs: PNG for image models, MP4 for video models, plus <output>.json. "
            "Offline demo (weights shipped in this repository): --model flux-digits (or wan-digits) "
            '--prompt "a handwritten digit "{0..9} --grid --compare'
        ),
        formatter_class=HelpFormatter,
    )
    source = add_model_arguments(parser)
    source.add_argument("--list-models", action="store_true", help="list the zoo models and exit")
    prompt = parser.add_argument_group("prompt")
    prompt.add_argument(
        "--prompt",
        nargs="+",
        metavar="TEXT",
        help="one or more text prompts, one output each (required unless --list-models); in bash, "
        '--prompt "a handwritten digit "{0..9} gives ten; a layered model takes a blank one (--prompt "") and '
        "captions its input image instead",
    )
    prompt.add_argument("--negative-prompt", help="negative prompt of the CFG branch (default: the model's)")
    prompt.add_argument(
        "--image",
        type=path_argument,
        action="append",
        default=[],
        metavar="FILE",
        help="input image: the first frame of an image-to-video model (exactly one), the image(s) an editing "
        "model edits (required; repeat for several reference images, up to the model's limit), or the image a "
        "layered model decomposes; refused by text-to-image and text-to-video models",
    )
    prompt.add_argument(
        "--last-image",
        type=path_argument,
        metavar="FILE",
        help="first-last-frame video models (Wan2.1 FLF2V, Wan2.2 I2V A14B): the last frame, besides --image (the "
        "first); refused by the others",
    )
    prompt.add_argument(
        "--layers",
        type=int,
        help="layered models: how many RGBA layers to decompose the input image into (default 4); each is written "
        "as its own PNG, <output>-layer<k>.png",
    )
    sampling = parser.add_argument_group("sampling (default: the zoo entry's values)")
    sampling.add_argument("--height", type=int, help="output height in pixels")
    sampling.add_argument("--width", type=int, help="output width in pixels")
    sampling.add_argument("--num-frames", type=int, help="frames of a video (Wan: 4k+1)")
    sampling.add_argument("--steps", type=int, help="denoising steps")
    sampling.add_argument(
        "--guidance-scale", type=float, help="guidance scale (CFG, or embedded guidance for Flux/HunyuanVideo)"
    )
    sampling.add_argument(
        "--true-cfg-scale", type=float, help="true CFG scale of Flux/HunyuanVideo (with a negative prompt)"
    )
    sampling.add_argument("--seed", type=int, help="random seed (default: drawn at random and reported)")
    batch = parser.add_argument_group("batch, grid and comparison")
    batch.add_argument(
        "--num-images", type=int, default=1, help="outputs per prompt, each from its own noise (one batch, one seed)"
    )
    batch.add_argument(
        "--grid",
        action="store_true",
        help="image models: write the whole batch as one PNG grid (a column per prompt, a row per --num-images; "
        f"cells under {GRID_CELL_PIXELS} px are enlarged) instead of one file per image",
    )
    batch.add_argument(
        "--compare",
        action="store_true",
        help="also run the batch with TeaCache off (same prompts and seed, same process, after a one-step warm-up), "
        "print the speedup (denoising time uncached / cached) and the PSNR of the cached output against the "
        "uncached one, and write the uncached output next to it as <output>-uncached",
    )
    batch.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="with --compare: timed runs of each mode, alternating; the speedup compares their median times",
    )
    add_teacache_arguments(parser)
    run = add_run_arguments(parser)
    run.add_argument(
        "--output", type=path_argument, help="output file (.png or .mp4; default: outputs/<model>-<seed>.<ext>)"
    )
    run.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    add_parallel_arguments(parser)
    return parser


def list_models() -> str:
    names = list_zoo()
    width = max(map(len, names), default=0)  # the columns stay aligned whatever the longest name
    lines = []
    for name in names:
        entry = load_zoo_entry(name)
        s = entry.sampling
        size = f"{s.width}x{s.height}" + (f"x{s.num_frames}f" if entry.is_video else "")
        presets = ", ".join(f"{p}={entry.presets[p].params.teacache_thresh:g}" for p in entry.presets) or "no preset"
        steps = f"{s.num_inference_steps:3d} steps"
        lines.append(f"{name:{width}s} {entry.task:7s} {size:16s} {steps}  TeaCache: {presets}")
    return "\n".join(lines)


def sampling_params(args: argparse.Namespace, entry: ZooEntry | None) -> SamplingParams:
    base = entry.sampling if entry is not None else SamplingParams()
    flags = {
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "true_cfg_scale": args.true_cfg_scale,
        "seed": args.seed,
        "negative_prompt": args.negative_prompt,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides["teacache_params"] = teacache_params(args, entry)
    return dataclasses.replace(base, **overrides)


# The sampling flags a model may not read with some settings, by the SamplingParams field (and argument) they set.
_SAMPLING_FLAGS = {
    "guidance_scale": "--guidance-scale",
    "true_cfg_scale": "--true-cfg-scale",
    "negative_prompt": "--negative-prompt",
}


def check_flags_take_effect(args: argparse.Namespace, pipe: Any, params: SamplingParams, name: str) -> None:
    """A flag given explicitly that this model would ignore with these settings is an error, not a no-op."""
    ignored = pipe.ignored_settings(params)
    for field_name, flag in _SAMPLING_FLAGS.items():
        value = getattr(args, field_name)
        if value is not None and field_name in ignored:
            raise CliError(f"{flag} {value!r} has no effect on {name}: {ignored[field_name]}")


def check_output(path: Path, is_video: bool) -> None:
    allowed = VIDEO_SUFFIXES if is_video else IMAGE_SUFFIXES
    if path.suffix.lower() not in allowed:
        kind = "a video model writes" if is_video else "an image model writes"
        raise CliError(f"--output {str(path)!r}: {kind} {' or '.join(allowed)} files")
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise CliError(f"--output {str(path)!r} is a directory")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise CliError(f"--output {str(path)!r} cannot be written: {str(existing)!r} is not a writable directory")


def save_png(pixels: Any, path: Path) -> None:
    # zlib alone: the offline demo runs without an imaging library.
    from teacache_models.demo import write_png

    write_png(path, pixels.numpy() if hasattr(pixels, "numpy") else pixels)


def grid_image(pixels: Any, columns: int) -> Any:
    """(N, H, W, 3) uint8 -> one grid image, `columns` per row."""
    from teacache_models.demo import make_grid

    height, width = pixels.shape[1:3]
    scale = max(1, GRID_CELL_PIXELS // max(height, width))
    return make_grid(pixels.numpy(), columns=columns, scale=scale)


def sidecar(
    args: argparse.Namespace,
    model: str,
    entry: ZooEntry | None,
    result: Any,
    files: list[Path],
    comparison: dict[str, Any] | None,
) -> dict:
    params = result.sampling_params
    settings = dataclasses.asdict(params)
    settings["seed"] = result.seed
    record = {
        "model": model,
        "zoo_entry": entry.name if entry is not None else None,
        "prompt": args.prompt,
        # What the blank prompts became (a layered model's caption of its input image).
        "encoded_prompt": result.prompt[: len(args.prompt)],
        "num_images": args.num_images,
        "grid": args.grid,
        "images": [str(path) for path in args.image],
        "last_image": None if args.last_image is None else str(args.last_image),
        "device": args.device,
        "dtype": args.dtype,
        "linear_kernel": args.linear_kernel,
        "loras": [dataclasses.asdict(spec) for spec in (*(entry.loras if entry is not None else ()), *args.lora)],
        "teacache": args.teacache or ("off" if params.teacache_params is None else "default"),
        "sampling_params": settings,
        "outputs": [str(f) for f in files],
        "timings_s": result.timings,
        "teacache_stats": result.teacache_stats.as_dict(),
        "summary": result.summary(),
    }
    if comparison is not None:
        record["comparison"] = comparison
    return record


def output_paths(base: Path, batch: int) -> list[Path]:
    if batch == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(batch)]


def uncached_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}-uncached{path.suffix}")


def psnr(actual: Any, reference: Any) -> float:
    """PSNR in dB of pixels in [0, 1] against a reference (inf when equal)."""
    mse = float(((actual.double() - reference.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def check_layers(args: argparse.Namespace, layered: bool | None, name: str) -> None:
    """--layers and --grid against a layered model (`layered` None: not known yet)."""
    if args.layers is not None and args.layers < 1:
        raise CliError(f"--layers must be at least 1, got {args.layers}")
    if args.layers is not None and layered is False:
        raise CliError(f"--layers {args.layers} has no effect on {name}: it is for layered models (Qwen-Image-Layered)")
    if args.grid and layered:
        raise CliError(f"--grid writes one PNG: {name} is a layered model, which writes one PNG per layer")


def check_blank_prompts(args: argparse.Namespace, captions: bool | None, name: str) -> None:
    """A blank --prompt only for a model that captions its input image (`captions` None: not known yet)."""
    if captions is False and not all(text.strip() for text in args.prompt):
        raise CliError(
            f"--prompt must not be blank for {name}: only a layered model (Qwen-Image-Layered) takes a blank "
            "prompt, which it replaces by a caption of its input image"
        )


def layer_paths(path: Path, layers: int) -> list[Path]:
    return [path.with_name(f"{path.stem}-layer{k}{path.suffix}") for k in range(layers)]


def write_outputs(result: Any, base: Path, columns: int, grid: bool, fps: int) -> list[Path]:
    """Write a result as one grid PNG, or one PNG / MP4 per sample (a layered model: one RGBA PNG per layer of
    each sample); returns the files."""
    pixels = result.to_uint8()
    if result.is_layered:
        files = []
        for path, sample in zip(output_paths(base, pixels.shape[0]), pixels, strict=True):
            for layer_path, layer in zip(layer_paths(path, sample.shape[0]), sample, strict=True):
                write_atomically(layer_path, lambda p, s=layer: save_png(s, p), layer_path.suffix)
                files.append(layer_path)
        return files
    if grid:
        image = grid_image(pixels, columns)
        write_atomically(base, lambda p: save_png(image, p), base.suffix)
        return [base]
    files = output_paths(base, pixels.shape[0])
    for path, sample in zip(files, pixels, strict=True):
        if result.is_video:
            write_atomically(path, lambda p, s=sample: save_mp4(s, p, fps), path.suffix)
        else:
            write_atomically(path, lambda p, s=sample: save_png(s, p), path.suffix)
    return files


def run(args: argparse.Namespace) -> int:
    if args.list_models:
        print(list_models())
        return 0
    if not args.prompt:
        raise CliError("--prompt is required (one or more texts)")
    for flag, value in (("--num-images", args.num_images), ("--repeats", args.repeats)):
        if value < 1:
            raise CliError(f"{flag} must be at least 1, got {value}")
    if args.repeats > 1 and not args.compare:
        raise CliError("--repeats times the runs of --compare: give --compare too")
    check_run_arguments(args)
    model, entry = resolve_entry(args)
    params = sampling_params(args, entry)
    if args.compare and params.teacache_params is None:
        raise CliError("--compare measures TeaCache against an uncached run: it needs TeaCache on (not --teacache off)")
    is_video = entry.is_video if entry is not None else None
    check_entry_images(len(args.image), entry)
    check_layers(args, entry.task == "layered" if entry is not None else None, name_of(model, entry))
    check_blank_prompts(args, entry.task == "layered" if entry is not None else None, name_of(model, entry))
    check_last_image(args, entry.task == "i2v" if entry is not None else None, name_of(model, entry))
    inputs = image_inputs(load_images(args.image))
    if args.last_image is not None:
        inputs["last_image"] = load_images([args.last_image], "--last-image")[0]
    if args.layers is not None:
        inputs["layers"] = args.layers
    if args.grid and is_video:
        raise CliError(f"--grid writes one PNG: it is for image models; {entry.name} is a video model")
    state = start_parallel(args, "scripts/generate.py")
    if state is None:
        return generate_and_write(args, model, entry, params, inputs, is_video, None)
    # Each rank computes on its own device (its GPU under NCCL); only rank 0 shows progress.
    args.device = str(state.device)
    args.no_progress = args.no_progress or not state.is_main
    try:
        with state.guard():
            return generate_and_write(args, model, entry, params, inputs, is_video, state)
    finally:
        state.close()


def generate_and_write(
    args: argparse.Namespace,
    model: str,
    entry: ZooEntry | None,
    params: SamplingParams,
    inputs: dict[str, Any],
    is_video: bool | None,
    state: Any,
) -> int:
    """Load, generate and (on rank 0 or alone) write the outputs, the sidecar and the summary."""
    if args.output is not None and is_video is not None:
        check_output(args.output, is_video)
    pipe = load_configured_pipeline(args, model, entry, state)
    is_video = pipe.is_video
    if args.grid and is_video:
        raise CliError(f"--grid writes one PNG: it is for image models; {name_of(model, entry)} is a video model")
    check_pipeline_images(len(args.image), pipe, name_of(model, entry))
    check_layers(args, "layers" in pipe.call_inputs, name_of(model, entry))
    check_last_image(args, "last_image" in pipe.call_inputs, name_of(model, entry))
    check_blank_prompts(args, pipe.captions_blank_prompts, name_of(model, entry))
    size = pipe.output_size(inputs["image"]) if inputs and args.height is None and args.width is None else None
    if size is not None:  # an editing model follows its input image's aspect ratio unless a size is given
        params = dataclasses.replace(params, height=size[0], width=size[1])
    if args.compare and params.seed is None:
        # Both runs must start from the same noise.
        seed = random.SystemRandom().randint(0, _MAX_SEED)
        if state is not None:
            seed = state.broadcast_object(seed)  # every rank must draw the same noise
        params = dataclasses.replace(params, seed=seed)
    seed_label = params.seed if params.seed is not None else "random"
    name = name_of(model, entry)
    output = args.output or REPO / "outputs" / f"{name}-{seed_label}{'.mp4' if is_video else '.png'}"
    check_output(output, is_video)
    check_flags_take_effect(args, pipe, params, name)
    pipe.check_params(params)
    prompts = list(args.prompt) * args.num_images  # row-major: a row per image index, a column per prompt

    if args.compare:
        result, uncached, seconds = compare(pipe, prompts, params, inputs, args)
    else:
        result = generate(pipe, prompts, params, inputs, args, "TeaCache" if params.teacache_params else "denoising")
    if state is not None and not state.is_main:
        return 0
    if args.output is None and params.seed is None:
        output = output.with_name(output.name.replace("-random", f"-{result.seed}"))
    fps = params.fps or 16
    files = write_outputs(result, output, len(args.prompt), args.grid, fps)
    comparison = None
    if args.compare:
        uncached_files = write_outputs(uncached, uncached_path(output), len(args.prompt), args.grid, fps)
        pixels, reference = (r.frames if r.is_video else r.images for r in (result, uncached))
        stats = result.teacache_stats
        calls = stats.num_computed + stats.num_skipped
        comparison = {
            "speedup": seconds["uncached"]["denoising"] / seconds["TeaCache"]["denoising"],
            "paired_speedups": seconds.pop("paired_speedups"),
            # What the computed steps allow if a skipped step cost nothing.
            "ideal_speedup": calls / stats.num_computed if stats.num_computed else None,
            "speedup_total": seconds["uncached"]["total"] / seconds["TeaCache"]["total"],
            "repeats": args.repeats,
            "median_seconds": seconds,
            "psnr_db": psnr(pixels, reference),
            "uncached_outputs": [str(f) for f in uncached_files],
            "uncached_timings_s": uncached.timings,
            "uncached_summary": uncached.summary(),
        }
    record = sidecar(args, model, entry, result, files, comparison)
    if state is not None:
        record["parallel"] = {
            "world_size": state.world_size,
            "cfg_parallel": state.cfg_parallel,
            "sp_degree": state.sp_degree,
            "backend": state.backend,
        }
    text = json.dumps(record, indent=2)
    write_atomically(output.with_suffix(".json"), lambda p: p.write_text(text + "\n"), ".json")
    print(f"{', '.join(str(f) for f in files)}: {result.summary()}")
    if comparison is not None:
        paired, ideal = comparison["paired_speedups"], comparison["ideal_speedup"]
        median = f" (medians of {args.repeats} runs, speedup {min(paired):.2f}-{max(paired):.2f}x by run)"
        median = median if args.repeats > 1 else ""
        if ideal is not None:
            noise = "; measured above it: timing noise" if comparison["speedup"] > ideal else ""
            median += f"; ideal {ideal:.2f}x from the computed steps{noise}"
        print(
            f"speedup {comparison['speedup']:.2f}x with TeaCache: denoising {seconds['uncached']['denoising']:.2f} s "
            f"uncached, {seconds['TeaCache']['denoising']:.2f} s cached{median}; total "
            f"{comparison['speedup_total']:.2f}x; PSNR {comparison['psnr_db']:.1f} dB against uncached "
            f"({', '.join(comparison['uncached_outputs'])})"
        )
    return 0


def compare(
    pipe: Any, prompts: list[str], params: SamplingParams, inputs: dict[str, Any], args: argparse.Namespace
) -> tuple[Any, Any, dict[str, dict[str, float]]]:
    """The batch with TeaCache and uncached, `--repeats` times each, alternating: (the last cached result, the
    last uncached one, median seconds of each mode per stage)."""
    # A one-step warm-up first: the first call allocates, which would count against the uncached run.
    pipe(prompts, dataclasses.replace(params, num_inference_steps=1, teacache_params=None), **inputs)
    runs: dict[str, list[Any]] = {"uncached": [], "TeaCache": []}
    for repeat in range(args.repeats):
        for label, mode in (("uncached", dataclasses.replace(params, teacache_params=None)), ("TeaCache", params)):
            tag = f"{label} {repeat + 1}/{args.repeats}" if args.repeats > 1 else label
            runs[label].append(generate(pipe, prompts, mode, inputs, args, tag))
    seconds = {
        label: {stage: statistics.median(r.timings[stage] for r in results) for stage in ("denoising", "total")}
        for label, results in runs.items()
    }
    # Each repeat's uncached run against the cached run beside it: the spread of the speedup.
    seconds["paired_speedups"] = [
        u.timings["denoising"] / c.timings["denoising"] for u, c in zip(runs["uncached"], runs["TeaCache"], strict=True)
    ]
    return runs["TeaCache"][-1], runs["uncached"][-1], seconds


def generate(
    pipe: Any, prompts: list[str], params: SamplingParams, inputs: dict[str, Any], args: argparse.Namespace, label: str
) -> Any:
    """One pipeline call with a progress bar over the steps (unless --no-progress)."""
    if args.no_progress:
        return pipe(prompts, params, **inputs)
    from tqdm import tqdm

    with tqdm(total=params.num_inference_steps, desc=label, unit="step", file=sys.stderr) as bar:
        return pipe(prompts, params, progress=lambda done, total: bar.update(done - bar.n), **inputs)


def name_of(model: str, entry: ZooEntry | None) -> str:
    return entry.name if entry is not None else Path(model).name


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (CliError, ValueError, TypeError, OSError, RuntimeError) as error:
        return report_error(error)


if __name__ == "__main__":
    sys.exit(main())
