"""What the command-line programs share: the flags that choose and load a model, and writing files.

`scripts/generate.py` and the server (`teacache-serve`) take the same model, TeaCache, device/dtype/threads
and torchrun flags; they are declared here once, with the checks behind them, so both read and refuse
them alike. Errors a user can fix are `CliError`: one line, no traceback, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from .layers.linear import LINEAR_KERNELS, resolve_linear_kernel
from .lora.spec import LoraSpec, parse_lora_argument
from .params import TeaCacheParams
from .zoo import TASK_IMAGES, ZooEntry, list_zoo, load_zoo_entry

__all__ = [
    "DTYPES",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "ArgumentParser",
    "CliError",
    "HelpFormatter",
    "add_model_arguments",
    "add_parallel_arguments",
    "add_run_arguments",
    "add_teacache_arguments",
    "check_entry_images",
    "check_image_count",
    "check_pipeline_images",
    "check_run_arguments",
    "default_device",
    "image_inputs",
    "load_configured_pipeline",
    "load_images",
    "report_error",
    "resolve_entry",
    "save_mp4",
    "start_parallel",
    "teacache_params",
    "write_atomically",
]

DTYPES = ("float32", "bfloat16", "float16")


# Exit statuses: bad input (a flag, a file or a setting the user can fix), and a failure while running.
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2 (`EXIT_BAD_INPUT`)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line naming the flag (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def report_error(error: BaseException) -> int:
    """Print `error` as one line on stderr; its exit status: 2 for bad input (`CliError`, `ValueError`,
    `TypeError`, `FileNotFoundError`), 1 for a failure while running (other `OSError`s, `RuntimeError`)."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    bad_input = isinstance(error, CliError | ValueError | TypeError | FileNotFoundError)
    return EXIT_BAD_INPUT if bad_input else EXIT_FAILED


def path_argument(text: str) -> Path:
    """An argparse type: a non-empty path (an empty one would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a file path, got an empty string")
    return Path(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it has one and its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# ---- flags ------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, list_hint: str = "--list-models") -> argparse._ArgumentGroup:
    """--model and --config; `list_hint` says where the zoo names are listed."""
    source = parser.add_argument_group("model")
    source.add_argument("--model", help=f"zoo name (see {list_hint}), a local diffusers-layout folder, or a Hub id")
    source.add_argument(
        "--config",
        type=path_argument,
        help="a zoo YAML: its sampling defaults and TeaCache presets; its weights unless --model is given",
    )
    source.add_argument(
        "--lora",
        action="append",
        type=lora_argument,
        default=[],
        metavar="PATH_OR_HUB_ID[:SCALE]",
        help="load a LoRA (.safetensors file, a folder holding one, or a Hub id) into the transformer, active at "
        "SCALE (default 1); repeatable, added to those the zoo entry lists",
    )
    return source


def lora_argument(text: str) -> LoraSpec:
    """An argparse type: `PATH_OR_HUB_ID[:SCALE]` with a finite scale."""
    try:
        return parse_lora_argument(text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_teacache_arguments(parser: argparse.ArgumentParser) -> None:
    cache = parser.add_argument_group("TeaCache")
    cache.add_argument("--teacache", default=None, help="off, slow or fast (or another preset of the zoo entry)")
    cache.add_argument("--teacache-thresh", type=float, help="override the preset's threshold (0 never skips)")
    cache.add_argument(
        "--teacache-target-speedup",
        type=float,
        help="pick the threshold from the zoo entry's threshold table (scripts/calibrate.py writes it): the "
        "lowest measured threshold whose computed steps give at least this speedup (steps / computed steps)",
    )
    cache.add_argument(
        "--teacache-residual-order",
        type=int,
        help="what a skipped step adds: 0 the last residual (as published), 1 its linear extrapolation",
    )
    cache.add_argument(
        "--teacache-max-consecutive-skips", type=int, help="compute after this many skipped steps in a row"
    )
    cache.add_argument(
        "--teacache-method",
        help="the skip decision: teacache (as published) or forecast (skip while the indicator follows the "
        "forecast a skipped step uses; needs no coefficients)",
    )
    cache.add_argument(
        "--teacache-extrapolation-scale",
        type=float,
        help="with residual order 1: the share of the extrapolated slope a skipped step adds, in [0, 1]",
    )
    cache.add_argument(
        "--teacache-forecast-slope",
        help="forecast method, residual order 1: how far along the slope a step is carried: steps (by the steps "
        "since the last computed one, the default) or indicator (by how far its indicator moved along it)",
    )
    cache.add_argument(
        "--teacache-forecast-cadence",
        action="store_const",
        const=True,
        help="forecast method: the first gap the threshold chooses becomes the cadence, and a step also computes "
        "once that many steps have passed since the last computed one",
    )
    cache.add_argument(
        "--teacache-forecast-tail",
        type=int,
        help="forecast method: the last N steps never compute (forecast instead); needs --teacache-end-skipping 0",
    )
    cache.add_argument("--teacache-end-skipping", type=int, help="the number of last steps that always compute")
    cache.add_argument(
        "--teacache-coefficients",
        help="override the rescaling polynomial: comma-separated numbers, highest degree first",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--device, --dtype, --threads, --linear-kernel (the returned group takes a program's own run flags)."""
    run = parser.add_argument_group("run")
    run.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")
    run.add_argument(
        "--threads", type=int, help="CPU threads of torch (default: torch's; 1 is fastest for the tiny demo models)"
    )
    run.add_argument(
        "--linear-kernel",
        choices=["auto", *LINEAR_KERNELS],
        default="auto",
        help="kernel of the transformer's linear layers: aten (PyTorch's), onednn (float32 on CPU, equal to "
        "float32 rounding, often faster); auto: onednn for float32 on CPU where a short timing, run once per machine "
        "and thread count and stored, measures it faster, else aten",
    )
    return run


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    parallel = parser.add_argument_group("several GPUs (launch with torchrun --nproc-per-node N)")
    parallel.add_argument(
        "--cfg-parallel", action="store_true", help="compute the positive and negative CFG branch on two ranks"
    )
    parallel.add_argument(
        "--sp-degree",
        type=int,
        default=1,
        help="ranks splitting the token sequence (Ulysses sequence parallelism; Wan, HunyuanVideo, HunyuanVideo-1.5)",
    )
    parallel.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="seconds a rank waits for the others in a collective before failing instead of hanging",
    )


# ---- checks and loading -----------------------------------------------------------------------------


def check_run_arguments(args: argparse.Namespace) -> None:
    """--threads and --device, checked before anything is loaded (the device resolved to its full name)."""
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads must be at least 1, got {args.threads}")
    if args.device is not None:
        from .pipelines.loading import resolve_device

        try:
            args.device = str(resolve_device(args.device))
        except ValueError as error:
            raise CliError(f"--device: {error}") from None


def check_image_count(count: int, takes: str, max_images: int | None, name: str) -> None:
    """`count` --image files against what model `name` takes: `takes` "required", "optional" or "no" input
    images, at most `max_images` (None: not known yet)."""
    if count == 0 and takes == "required":
        several = f" (up to {max_images} times)" if max_images is None or max_images > 1 else ""
        raise CliError(f"{name} needs an input image: --image FILE is required{several}")
    if count and takes == "no":
        raise CliError(
            f"--image has no effect on {name}: it takes no input image (--image is for image-to-video, "
            "image-editing, reference-image (FLUX.2) and layered models)"
        )
    if max_images is not None and count > max_images:
        raise CliError(
            f"--image given {count} times, but {name} takes at most {max_images} input "
            f"image{'s' if max_images > 1 else ''}"
        )


def check_entry_images(count: int, entry: ZooEntry | None) -> None:
    """--image against the zoo entry's task, before anything is loaded (the pipeline checks again once loaded)."""
    if entry is not None:
        takes, max_images = TASK_IMAGES[entry.task]
        check_image_count(count, takes, max_images, entry.name)


def check_pipeline_images(count: int, pipe: Any, name: str) -> None:
    """--image against what the loaded pipeline takes."""
    takes = pipe.takes_image()
    check_image_count(count, takes, pipe.max_images if takes != "no" else 0, name)


def load_images(paths: list[Path], flag: str = "--image") -> list[Any]:
    """The image files of `flag` as PIL images, in order: RGBA where the file has transparency (a layered model
    reads it), else RGB; each pipeline converts to what it reads. A missing or unreadable one is a CliError naming
    it."""
    if not paths:
        return []
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        if not path.is_file():
            raise CliError(f"{flag} {str(path)!r} does not exist")
        try:
            with Image.open(path) as image:
                alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
                images.append(image.convert("RGBA" if alpha else "RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise CliError(f"{flag} {str(path)!r} cannot be read as an image: {error}") from None
    return images


def check_last_image(args: argparse.Namespace, takes: bool | None, name: str) -> None:
    """--last-image against a first-last-frame model (`takes` None: not known yet); it needs --image too."""
    if args.last_image is None:
        return
    if not args.image:
        raise CliError("--last-image FILE is the last frame: give the first with --image FILE")
    if takes is False:
        raise CliError(
            f"--last-image has no effect on {name}: it is for first-last-frame video models (Wan2.1 FLF2V, Wan2.2 "
            "I2V A14B)"
        )


def image_inputs(images: list[Any]) -> dict[str, Any]:
    """The pipeline keyword of the input images: none, `image=` one image, or `image=` a list of several."""
    if not images:
        return {}
    return {"image": images[0] if len(images) == 1 else list(images)}


def start_parallel(args: argparse.Namespace, program: str) -> Any:
    """The `ParallelState` of this rank under torchrun, None for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.sp_degree < 1:
        raise CliError(f"--sp-degree must be at least 1, got {args.sp_degree}")
    if not math.isfinite(args.dist_timeout) or args.dist_timeout <= 0:
        raise CliError(f"--dist-timeout must be a finite number of seconds > 0, got {args.dist_timeout}")
    if world_size == 1 and not args.cfg_parallel and args.sp_degree == 1:
        return None
    if world_size == 1:
        needed = (2 if args.cfg_parallel else 1) * args.sp_degree
        raise CliError(
            f"--cfg-parallel / --sp-degree need {needed} ranks: launch with "
            f"torchrun --nproc-per-node {needed} {program} ..."
        )
    from .distributed import init_parallel

    try:
        return init_parallel(args.cfg_parallel, args.sp_degree, timeout_s=args.dist_timeout)
    except ValueError as error:
        raise CliError(str(error)) from None


def resolve_entry(args: argparse.Namespace) -> tuple[str, ZooEntry | None]:
    """(what to load, the zoo entry supplying defaults) from --model and --config."""
    entry = None
    if args.config is not None:
        try:
            entry = load_zoo_entry(args.config)
        except ValueError as error:
            raise CliError(f"--config: {error}") from None
    if args.model is None:
        if entry is None:
            raise CliError("give --model NAME|PATH or --config FILE (see --list-models)")
        return str(entry.path), entry  # the config's own weights (its manifest), not those of a zoo name
    if not args.model.strip():
        raise CliError("--model is empty: give a zoo name (see --list-models), a local folder or a Hub id")
    model_path = Path(args.model).expanduser()
    if model_path.is_dir():
        check_family(str(model_path), entry, _folder_family(model_path))
        return str(model_path), entry
    if args.model in list_zoo():
        own = load_zoo_entry(args.model)
        check_family(args.model, entry, own.family)
        entry = entry or own
    elif entry is None and "/" not in args.model:
        load_zoo_entry(args.model)  # raises: unknown model, with the close names
    return args.model, entry


def _folder_family(folder: Path) -> str | None:
    """The family of a pipeline folder's `model_index.json`, None when it has none (the loader says why)."""
    from .pipelines.loading import pipeline_class_for, read_model_index

    if not (folder / "model_index.json").is_file():
        return None
    return pipeline_class_for(read_model_index(folder), str(folder)).family


def check_family(model: str, entry: ZooEntry | None, family: str | None) -> None:
    """--config and --model must name the same family: checked before any weights are loaded."""
    if entry is not None and family is not None and family != entry.family:
        raise CliError(f"--config {entry.name} is a {entry.family} model, but --model {model!r} is a {family} model")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_configured_pipeline(args: argparse.Namespace, model: str, entry: ZooEntry | None, state: Any) -> Any:
    """Load the pipeline on --device in --dtype (their defaults filled in on `args`), set --linear-kernel
    (resolved on `args`), load the --lora files, join the ranks of `state` and set --threads."""
    args.device = args.device or default_device()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    from .pipelines import load_pipeline

    pipe = load_pipeline(model, torch_dtype=args.dtype, device=args.device, zoo_entry=entry)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)  # before "auto" times the kernels: at the threads the run uses
    try:
        args.linear_kernel = resolve_linear_kernel(args.linear_kernel, args.device, args.dtype)
    except ValueError as error:
        raise CliError(f"--linear-kernel: {error}") from None
    pipe.set_linear_kernel(args.linear_kernel)
    try:
        pipe.load_loras(args.lora)
    except (ValueError, TypeError, OSError, ImportError) as error:
        raise CliError(f"--lora: {error}") from None
    if state is not None:
        try:
            pipe.enable_parallel(state)
        except ValueError as error:
            raise CliError(str(error)) from None
    return pipe


# ---- TeaCache flags ---------------------------------------------------------------------------------

TEACACHE_FLAGS = {
    "teacache_thresh": "--teacache-thresh",
    "coefficients": "--teacache-coefficients",
    "residual_order": "--teacache-residual-order",
    "max_consecutive_skips": "--teacache-max-consecutive-skips",
    "method": "--teacache-method",
    "extrapolation_scale": "--teacache-extrapolation-scale",
    "forecast_slope": "--teacache-forecast-slope",
    "forecast_cadence": "--teacache-forecast-cadence",
    "forecast_tail": "--teacache-forecast-tail",
    "end_skipping": "--teacache-end-skipping",
}


def parse_coefficients(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise CliError(f"--teacache-coefficients must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise CliError("--teacache-coefficients is empty")
    return values


def teacache_params(args: argparse.Namespace, entry: ZooEntry | None) -> TeaCacheParams | None:
    """The TeaCache settings of --teacache and the --teacache-* overrides (None: off)."""
    choice = args.teacache
    flags = {
        "teacache_thresh": args.teacache_thresh,
        "coefficients": (
            parse_coefficients(args.teacache_coefficients) if args.teacache_coefficients is not None else None
        ),
        "residual_order": args.teacache_residual_order,
        "max_consecutive_skips": args.teacache_max_consecutive_skips,
        "method": args.teacache_method,
        "extrapolation_scale": args.teacache_extrapolation_scale,
        "forecast_slope": args.teacache_forecast_slope,
        "forecast_cadence": args.teacache_forecast_cadence,
        "forecast_tail": args.teacache_forecast_tail,
        "end_skipping": args.teacache_end_skipping,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    if choice is not None and not choice.strip():
        raise CliError("--teacache is empty: give off, slow, fast or another preset of the zoo entry")
    if args.teacache_target_speedup is not None:
        return _teacache_for_speedup(args.teacache_target_speedup, choice, overrides, entry)
    if choice == "off":
        if overrides:
            given = ", ".join(TEACACHE_FLAGS[k] for k in overrides)
            raise CliError(f"--teacache off contradicts {given}")
        return None
    if entry is None and choice is not None:
        raise CliError(
            f"--teacache {choice}: this model folder has no zoo config, so no presets; pass --config FILE, "
            "or --teacache-thresh (and --teacache-coefficients) to define the cache"
        )
    preset = choice or (entry.default_preset if entry is not None else "off")
    if preset == "off":  # no preset to start from: the flags define the cache, or it stays off
        if args.teacache_thresh is None:
            if overrides:
                raise CliError(f"{', '.join(TEACACHE_FLAGS[k] for k in overrides)} need --teacache-thresh here")
            return None
        return _teacache_or_error(TeaCacheParams, overrides)
    if preset not in entry.presets:
        raise CliError(f"--teacache {preset!r}: {entry.name} offers 'off' or {sorted(entry.presets)}")
    params = entry.presets[preset].params
    if "coefficients" in overrides:
        # The preset's range and negative-branch polynomial belong to the preset's coefficients.
        overrides.update(calibrated_range=None, coefficients_negative=None)
    return _teacache_or_error(functools.partial(dataclasses.replace, params), overrides)


def _teacache_for_speedup(
    target: float, choice: str | None, overrides: dict[str, Any], entry: ZooEntry | None
) -> TeaCacheParams:
    """--teacache-target-speedup: the settings the threshold table measured, at the threshold it picks."""
    if choice is not None or overrides:
        given = ", ".join([f"--teacache {choice}"] * (choice is not None) + [TEACACHE_FLAGS[k] for k in overrides])
        raise CliError(f"--teacache-target-speedup picks the threshold of the table's preset itself; drop {given}")
    if entry is None:
        raise CliError("--teacache-target-speedup needs a zoo entry with a threshold table: pass --config FILE")
    try:
        return entry.teacache_for_speedup(target)
    except ValueError as error:
        raise CliError(f"--teacache-target-speedup: {error}") from None


def _teacache_or_error(build: Any, values: dict[str, Any]) -> TeaCacheParams:
    try:
        return build(**values)
    except ValueError as error:
        raise CliError(f"TeaCache settings: {error}") from None


# ---- files ------------------------------------------------------------------------------------------


def write_atomically(path: Path, write: Any, suffix: str, flag: str = "--output") -> None:
    """Write through a temporary file in the same folder, renamed at the end: never a partial file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)
    except OSError as error:
        raise CliError(
            f"{flag}: cannot write {str(path)!r} in {str(path.parent)!r}: {error.strerror or error}"
        ) from None
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_mp4(frames: Any, path: Path, fps: int) -> None:
    """(F, H, W, 3) uint8 frames -> an H.264 MP4 at `fps`."""
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise CliError(
            "writing MP4 needs imageio and imageio-ffmpeg: pip install 'teacache_models[pipelines]'"
        ) from None
    with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
        for frame in frames.numpy() if hasattr(frames, "numpy") else frames:
            writer.append_data(frame)
