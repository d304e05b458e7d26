#!/usr/bin/env python
"""Generate an image (PNG) or a video (MP4) with TeaCache, from a model-zoo entry or a local folder.

Examples:
    python scripts/generate.py --model flux1-dev --prompt "a red fox in the snow" --teacache fast
    python scripts/generate.py --model ./my-flux-folder --config configs/flux1-schnell.yaml --prompt "a cat"
    python scripts/generate.py --list-models

Settings come from the zoo entry (`configs/<name>.yaml`: steps, guidance, resolution, frames, TeaCache
presets); every flag given overrides its setting. Next to the output a JSON sidecar records every
setting, the timings and the TeaCache statistics; one summary line (steps computed and skipped per CFG
branch, wall time) is printed. Nothing is written when the run fails: errors exit non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from teacache_models.params import SamplingParams, TeaCacheParams  # noqa: E402
from teacache_models.zoo import ZooEntry, list_zoo, load_zoo_entry  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
IMAGE_SUFFIXES = (".png",)
VIDEO_SUFFIXES = (".mp4",)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="generate.py",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "TeaCache: --teacache picks a preset of the zoo entry ('slow' is more faithful, 'fast' skips more "
            "steps; the entry's default preset when omitted); 'off' runs every step. --teacache-thresh and "
            "--teacache-coefficients override the preset's values (or define the cache for a folder without "
            "a zoo config). Outputs: PNG for image models, MP4 for video models, plus <output>.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_argument_group("model")
    source.add_argument("--model", help="zoo name (see --list-models), a local diffusers-layout folder, or a Hub id")
    source.add_argument(
        "--config",
        type=Path,
        help="a zoo YAML: its sampling defaults and TeaCache presets; its weights unless --model names a folder",
    )
    source.add_argument("--list-models", action="store_true", help="list the zoo models and exit")
    prompt = parser.add_argument_group("prompt")
    prompt.add_argument("--prompt", help="the text prompt (required unless --list-models)")
    prompt.add_argument("--negative-prompt", help="negative prompt of the CFG branch (default: the model's)")
    prompt.add_argument("--image", type=Path, help="input image for image-to-video models (required for I2V)")
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
    cache = parser.add_argument_group("TeaCache")
    cache.add_argument("--teacache", default=None, help="off, slow or fast (or another preset of the zoo entry)")
    cache.add_argument("--teacache-thresh", type=float, help="override the preset's threshold (0 never skips)")
    cache.add_argument(
        "--teacache-coefficients",
        help="override the rescaling polynomial: comma-separated numbers, highest degree first",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")
    run.add_argument("--output", type=Path, help="output file (.png or .mp4; default: outputs/<model>-<seed>.<ext>)")
    run.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return parser


def list_models() -> str:
    lines = []
    for name in list_zoo():
        entry = load_zoo_entry(name)
        s = entry.sampling
        size = f"{s.width}x{s.height}" + (f"x{s.num_frames}f" if entry.is_video else "")
        presets = ", ".join(f"{p}={entry.presets[p].params.teacache_thresh:g}" for p in entry.presets)
        lines.append(f"{name:22s} {entry.task:5s} {size:16s} {s.num_inference_steps:3d} steps  TeaCache: {presets}")
    return "\n".join(lines)


def parse_coefficients(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise CliError(f"--teacache-coefficients must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise CliError("--teacache-coefficients is empty")
    return values


def resolve_entry(args: argparse.Namespace) -> tuple[str, ZooEntry | None]:
    """(what to load, the zoo entry supplying defaults)."""
    entry = load_zoo_entry(args.config) if args.config is not None else None
    if args.model is None:
        if entry is None:
            raise CliError("give --model NAME|PATH or --config FILE (see --list-models)")
        return entry.name, entry
    model_path = Path(args.model).expanduser()
    if model_path.is_dir():
        return str(model_path), entry
    if entry is None and args.model in list_zoo():
        entry = load_zoo_entry(args.model)
    elif entry is None and "/" not in args.model:
        load_zoo_entry(args.model)  # raises: unknown model, with the close names
    return args.model, entry


def teacache_params(args: argparse.Namespace, entry: ZooEntry | None) -> TeaCacheParams | None:
    choice = args.teacache
    coefficients = parse_coefficients(args.teacache_coefficients) if args.teacache_coefficients else None
    if choice == "off":
        if args.teacache_thresh is not None or coefficients is not None:
            raise CliError("--teacache off contradicts --teacache-thresh / --teacache-coefficients")
        return None
    if entry is None:
        if choice is not None:
            raise CliError(
                f"--teacache {choice}: this model folder has no zoo config, so no presets; pass --config FILE, "
                "or --teacache-thresh (and --teacache-coefficients) to define the cache"
            )
        if args.teacache_thresh is None:
            return None
        return TeaCacheParams(teacache_thresh=args.teacache_thresh, coefficients=coefficients)
    preset = choice or entry.default_preset
    if preset not in entry.presets:
        raise CliError(f"--teacache {preset!r}: {entry.name} offers 'off' or {sorted(entry.presets)}")
    params = entry.presets[preset].params
    overrides: dict[str, Any] = {}
    if args.teacache_thresh is not None:
        overrides["teacache_thresh"] = args.teacache_thresh
    if coefficients is not None:
        overrides["coefficients"] = coefficients
    return dataclasses.replace(params, **overrides)


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


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def write_atomically(path: Path, write: Any, suffix: str) -> None:
    """Write through a temporary file in the same folder, renamed at the end: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_png(pixels: Any, path: Path) -> None:
    from PIL import Image

    Image.fromarray(pixels.numpy()).save(path, format="PNG")


def save_mp4(frames: Any, path: Path, fps: int) -> None:
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise CliError(
            "writing MP4 needs imageio and imageio-ffmpeg: pip install 'teacache_models[pipelines]'"
        ) from None
    with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
        for frame in frames.numpy():
            writer.append_data(frame)


def sidecar(args: argparse.Namespace, model: str, entry: ZooEntry | None, result: Any, files: list[Path]) -> dict:
    params = result.sampling_params
    settings = dataclasses.asdict(params)
    settings["seed"] = result.seed
    return {
        "model": model,
        "zoo_entry": entry.name if entry is not None else None,
        "prompt": args.prompt,
        "image": str(args.image) if args.image is not None else None,
        "device": args.device,
        "dtype": args.dtype,
        "teacache": args.teacache or ("off" if params.teacache_params is None else "default"),
        "sampling_params": settings,
        "outputs": [str(f) for f in files],
        "timings_s": result.timings,
        "teacache_stats": result.teacache_stats.as_dict(),
        "summary": result.summary(),
    }


def output_paths(base: Path, batch: int) -> list[Path]:
    if batch == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(batch)]


def run(args: argparse.Namespace) -> int:
    if args.list_models:
        print(list_models())
        return 0
    if not args.prompt:
        raise CliError("--prompt is required (a non-empty text)")
    model, entry = resolve_entry(args)
    params = sampling_params(args, entry)
    is_video = entry.is_video if entry is not None else None
    if entry is not None and entry.task == "i2v" and args.image is None:
        raise CliError(f"{entry.name} is an image-to-video model: --image FILE is required")
    if args.image is not None:
        if entry is not None and entry.task not in ("i2v", "ti2v"):
            raise CliError(f"--image is only for image-to-video models; {entry.name} is {entry.task}")
        if not args.image.is_file():
            raise CliError(f"--image {str(args.image)!r} does not exist")
        inputs = {"image": load_image(args.image)}
    else:
        inputs = {}
    args.device = args.device or default_device()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.output is not None and is_video is not None:
        check_output(args.output, is_video)

    from teacache_models.pipelines import load_pipeline

    pipe = load_pipeline(model, torch_dtype=args.dtype, device=args.device, zoo_entry=entry)
    is_video = pipe.is_video
    if args.image is None and pipe.takes_image() == "required":
        raise CliError(f"{name_of(model, entry)} is an image-to-video model: --image FILE is required")
    if args.image is not None and pipe.takes_image() == "no":
        raise CliError(f"--image is only for image-to-video models; {name_of(model, entry)} takes no image")
    seed_label = params.seed if params.seed is not None else "random"
    name = name_of(model, entry)
    output = args.output or REPO / "outputs" / f"{name}-{seed_label}{'.mp4' if is_video else '.png'}"
    check_output(output, is_video)
    pipe.check_params(params)

    progress = None
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=params.num_inference_steps, desc="denoising", unit="step", file=sys.stderr)

        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

    try:
        result = pipe(args.prompt, params, progress=progress, **inputs)
    finally:
        if bar is not None:
            bar.close()
    if args.output is None and params.seed is None:
        output = output.with_name(output.name.replace("-random", f"-{result.seed}"))
    pixels = result.to_uint8()
    files = output_paths(output, pixels.shape[0])
    fps = params.fps or 16
    for path, sample in zip(files, pixels, strict=True):
        if is_video:
            write_atomically(path, lambda p, s=sample: save_mp4(s, p, fps), path.suffix)
        else:
            write_atomically(path, lambda p, s=sample: save_png(s, p), path.suffix)
    record = sidecar(args, model, entry, result, files)
    text = json.dumps(record, indent=2)
    write_atomically(output.with_suffix(".json"), lambda p: p.write_text(text + "\n"), ".json")
    print(f"{', '.join(str(f) for f in files)}: {result.summary()}")
    return 0


def name_of(model: str, entry: ZooEntry | None) -> str:
    return entry.name if entry is not None else Path(model).name


def load_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise CliError(f"--image {str(path)!r} cannot be read as an image: {error}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (CliError, ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
