#!/usr/bin/env python
"""Compute against quality: TeaCache against diffusers' FirstBlockCache, MagCache and TaylorSeer.

Example:
    python scripts/benchmark_quality.py --model demo_models/flux-digits --config flux-digits \
        --output docs/results/benchmark-flux-digits.json --plot docs/results/benchmark-flux-digits.png

One demo model (a pixel-space folder of `demo_models/`), one prompt/seed set (`--pairs`, digit prompts with
consecutive seeds) and one sampler loop (flow-matching Euler with classifier-free guidance, each CFG branch
its own call) drive two implementations holding the same weights: our native transformer with TeaCache, and
diffusers' class of the same name with its cache hooks (`transformer.enable_cache(config)`,
`cache_context("cond" / "uncond")` around each branch).

Methods are ranked by compute: the fraction of the transformer blocks' work that actually ran, counted (a
hook on each block's last linear layer records whether the block ran; each block weighs its FLOPs in an
uncached call, from `torch.utils.flop_counter`). Wall-clock speedup stands beside it: the median over
`--rounds` interleaved rounds (every method once per round, the order reversed every other round) of the
method's time against its implementation's uncached time in the same round, with the range over rounds. A
point measured faster than its ideal (1 / the work fraction of its timed runs) is flagged as noise.

Each method is swept over its own knobs, with grids of comparable size: TeaCache over the threshold (each
variant its own curve), the forecast method (`TeaCacheParams(method="forecast")`, `--forecast-variants`)
over its threshold (each variant its own curve), FirstBlockCache over its threshold, MagCache over
threshold x `retention_ratio` x `max_skip_steps`, TaylorSeer over interval x order x warm-up steps. A
method's frontier is the best of its own sweep (lowest work at each PSNR); the summary gives the work each
frontier needs for a mean PSNR of at least 30 and 35 dB against its implementation's uncached images.

MagCache is calibrated as its documentation says: one run per calibration prompt with
`MagCacheConfig(calibrate=True)`, whose printed ratios are averaged over runs and CFG branches. The
calibration prompts use other seeds than the benchmark set.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from teacache_models.demo import digit_prompt, load_demo_model  # noqa: E402
from teacache_models.metrics import psnr, ssim  # noqa: E402
from teacache_models.params import FORECAST_SLOPES, RESIDUAL_ORDERS, TeaCacheParams  # noqa: E402
from teacache_models.pipelines.demo import flow_sigmas  # noqa: E402
from teacache_models.pipelines.shared import pack_2x2, unpack_2x2  # noqa: E402
from teacache_models.zoo import load_zoo_entry  # noqa: E402

# An image equal to its reference has infinite PSNR; averages cap each image at this value.
PSNR_CAP_DB = 100.0
DATA_RANGE = 2.0  # pixels in [-1, 1]
QUALITY_GOALS_DB = (30.0, 35.0)

DEFAULT_TEACACHE_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0)
DEFAULT_FORECAST_THRESHOLDS = (0.05, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5)
DEFAULT_FBC_THRESHOLDS = (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)
DEFAULT_MAGCACHE_THRESHOLDS = (0.1, 0.25, 0.5)
DEFAULT_MAGCACHE_RETENTION = (0.1, 0.2)
DEFAULT_MAGCACHE_MAX_SKIPS = (2, 4)
DEFAULT_TAYLORSEER_INTERVALS = (2, 4, 6)
DEFAULT_TAYLORSEER_ORDERS = (1, 2)
DEFAULT_TAYLORSEER_WARMUP = (1, 3)
# TaylorSeer predicts whole blocks: diffusers' default hooks only the attention modules, which leaves the
# feed-forward layers running at every step, so no step would skip the block stack.
TAYLORSEER_BLOCKS = [r"blocks\.\d+", r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"]
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


# ---- the shared sampler ----------------------------------------------------------------------------


@dataclass
class Workload:
    """The prompt/seed set with everything precomputed that is not the transformer's work."""

    family: str
    prompts: list[str]
    seeds: list[int]
    noise: list[torch.Tensor]  # each (1, 1, F, H, W)
    text: list[tuple[torch.Tensor, torch.Tensor | None]]  # positive (states, pooled) per pair
    negative: tuple[torch.Tensor, torch.Tensor | None]
    sigmas: torch.Tensor
    guidance_scale: float
    positions: tuple[torch.Tensor, torch.Tensor] | None  # Flux (img_ids, txt_ids)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


def make_workload(
    demo: Any, pairs: list[tuple[str, int]], num_steps: int, guidance_scale: float, shift: float
) -> Workload:
    size, frames = demo.image_size, demo.num_frames
    family = demo.index["family"]
    with torch.no_grad():
        text = [demo.text_encoder.encode([prompt]) for prompt, _ in pairs]
        negative = demo.text_encoder.encode([""])
    noise = [torch.randn(1, 1, frames, size, size, generator=torch.Generator().manual_seed(s)) for _, s in pairs]
    positions = None
    if family == "flux":
        rows = torch.arange(size // 2)
        grid = torch.stack([torch.zeros(size // 2, size // 2), *torch.meshgrid(rows, rows, indexing="ij")], dim=-1)
        # Image position ids (0, row, column) of the 2x2 patches; text ids all zero, as FLUX.1 uses them.
        positions = (grid.reshape(-1, 3).float(), torch.zeros(text[0][0].shape[1], 3))
    return Workload(
        family,
        [p for p, _ in pairs],
        [s for _, s in pairs],
        noise,
        text,
        negative,
        flow_sigmas(num_steps, shift),
        guidance_scale,
        positions,
    )


def predict(model: nn.Module, work: Workload, x: torch.Tensor, sigma: torch.Tensor, text: tuple) -> torch.Tensor:
    """One transformer call (ours or diffusers': the same signature) on pixels (B, 1, F, H, W)."""
    states, pooled = text
    if work.family == "flux":
        height, width = x.shape[-2:]
        out = model(
            pack_2x2(x[:, :, 0]),
            encoder_hidden_states=states,
            pooled_projections=pooled,
            timestep=sigma,
            img_ids=work.positions[0],
            txt_ids=work.positions[1],
            return_dict=False,
        )[0]
        return unpack_2x2(out, height, width).unsqueeze(2)
    return model(x, sigma * 1000, states, return_dict=False)[0]


BranchContext = Callable[[int, bool], contextlib.AbstractContextManager]


@torch.no_grad()
def generate(model: nn.Module, work: Workload, index: int, branch: BranchContext) -> torch.Tensor:
    """Sample pair `index` with CFG, each branch's call inside `branch(step, is_cfg_negative)`."""
    x = work.noise[index]
    sigmas = work.sigmas
    for step in range(work.num_steps):
        sigma = sigmas[step].expand(1)
        with branch(step, False):
            flow = predict(model, work, x, sigma, work.text[index])
        with branch(step, True):
            negative = predict(model, work, x, sigma, work.negative)
        flow = negative + work.guidance_scale * (flow - negative)
        x = x + (sigmas[step + 1] - sigmas[step]) * flow
    return x.clamp(-1, 1)


# ---- counting the block work that ran --------------------------------------------------------------


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every block in the model's block lists, in the order they run."""
    found = []
    for list_name in BLOCK_LISTS:
        blocks = getattr(model, list_name, None)
        if isinstance(blocks, nn.ModuleList):
            found += [(f"{list_name}.{i}", block) for i, block in enumerate(blocks)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no block list among {list(BLOCK_LISTS)}")
    return found


def block_flops(model: nn.Module, work: Workload) -> dict[str, float]:
    """Each block's FLOPs in one uncached call of `model`: the weights of the work fraction."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        predict(model, work, work.noise[0], work.sigmas[:1], work.text[0])
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    flops = {name: float(sum(counts.get(f"{prefix}.{name}", {}).values())) for name, _ in transformer_blocks(model)}
    if not all(flops.values()):
        raise RuntimeError(f"the FLOP counter saw no work in blocks {[n for n, f in flops.items() if not f]}")
    return flops


@contextlib.contextmanager
def count_block_work(model: nn.Module, flops: dict[str, float]) -> Iterator[list[float]]:
    """Sum the FLOPs of the blocks that ran while the context is open, into `[total]`.

    A block ran when its last linear layer ran: a cache hook that skips or predicts a block never reaches it,
    and TeaCache's indicator, which reads the first norm of block 0, does not either.
    """
    total = [0.0]
    handles = []
    for name, block in transformer_blocks(model):
        last_linear = [m for m in block.modules() if isinstance(m, nn.Linear)][-1]

        def count(*_: Any, weight: float = flops[name]) -> None:
            total[0] += weight

        handles.append(last_linear.register_forward_hook(count))
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


# ---- methods ---------------------------------------------------------------------------------------


@dataclass
class Method:
    """One sweep point: which implementation, which cache and which setting of its knobs."""

    name: str  # the curve: one method (one TeaCache variant)
    knobs: dict[str, Any]
    implementation: str  # "native" or "diffusers"
    teacache: TeaCacheParams | None = None
    cache_config: Any = None
    seconds: list[float] = field(default_factory=list)
    timed_work: list[float] = field(default_factory=list)
    images: torch.Tensor | None = None
    work_fraction: float | None = None

    @property
    def setting(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.knobs.items()) or self.implementation

    @property
    def is_baseline(self) -> bool:
        return self.teacache is None and self.cache_config is None


def run_method(
    method: Method, model: nn.Module, work: Workload, indices: range, flops: dict[str, float]
) -> tuple[torch.Tensor, float, float]:
    """Generate pairs `indices` with `method`: (images (N, 1, F, H, W), seconds, fraction of block work run)."""
    images = []
    if method.implementation == "native":

        def branch(step: int, negative: bool) -> contextlib.AbstractContextManager:
            return model.teacache_step(step, is_cfg_negative=negative)

        def before() -> None:
            if method.teacache is not None:
                model.enable_teacache(method.teacache, work.num_steps)

        def after() -> None:
            if method.teacache is not None:
                model.disable_teacache()

    else:

        def branch(step: int, negative: bool) -> contextlib.AbstractContextManager:
            return model.cache_context("uncond" if negative else "cond")

        def before() -> None:
            pass

        def after() -> None:
            # What diffusers' pipelines do at the end of each generation (maybe_free_model_hooks).
            if method.cache_config is not None:
                model._reset_stateful_cache()

        if method.cache_config is not None:
            model.enable_cache(method.cache_config)
    try:
        with count_block_work(model, flops) as ran:
            started = time.perf_counter()
            for index in indices:
                before()
                images.append(generate(model, work, index, branch))
                after()
            seconds = time.perf_counter() - started
    finally:
        if method.implementation == "diffusers" and method.cache_config is not None:
            model.disable_cache()
    full = len(indices) * work.num_steps * 2 * sum(flops.values())
    return torch.cat(images), seconds, ran[0] / full


def calibrate_magcache(model: nn.Module, work: Workload) -> list[float]:
    """MagCache's documented calibration: runs with `calibrate=True`; the printed ratios, averaged."""
    from diffusers import MagCacheConfig

    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=work.num_steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            for index in range(len(work.noise)):
                generate(model, work, index, lambda _, negative: model.cache_context("uncond" if negative else "cond"))
                model._reset_stateful_cache()
    finally:
        model.disable_cache()
    # Each run prints a header line and then the list of ratios, once per cache context (CFG branch).
    runs = [
        ast.literal_eval(line)
        for line in printed.getvalue().splitlines()
        if line.startswith("[") and line.endswith("]")
    ]
    runs = [r for r in runs if isinstance(r, list) and len(r) == work.num_steps]
    if not runs:
        raise RuntimeError("MagCache calibration printed no ratios")
    return np.mean(np.array(runs), axis=0).round(5).tolist()


def teacache_label(indicator: str, order: int, limit: int | None, several_indicators: bool) -> str:
    """A TeaCache curve's name: as published, or with its options named (a skip limit is not TeaCache's own
    decision, and says so)."""
    options = [indicator] if several_indicators else []
    if order:
        options.append("extrapolated residual")
    if limit:
        options.append(f"at most {limit} skipped in a row")
    return "TeaCache" + (f" ({', '.join(options)})" if options else "")


def forecast_label(indicator: str, variant: tuple[int, float, str, bool, int], several_indicators: bool) -> str:
    """A forecast curve's name: its indicator where several are measured, and how it forecasts and decides."""
    order, scale, slope, cadence, tail = variant
    options = [indicator] if several_indicators else []
    options.append(f"extrapolation x{scale:g}" if order else "reuse")
    if slope != "steps":
        options.append(f"slope from the {slope}")
    if cadence:
        options.append("cadence")
    if tail:
        options.append(f"last {tail} steps forecast")
    return f"Forecast ({', '.join(options)})"


def native_curve(label: str, thresholds: list[float], **fields: Any) -> list[Method]:
    """One curve of our cache: a point per threshold, the other `TeaCacheParams` fields fixed."""
    return [
        Method(label, {"thresh": t}, "native", teacache=TeaCacheParams(teacache_thresh=t, **fields)) for t in thresholds
    ]


def build_methods(
    args: argparse.Namespace, teacache_curves: list[tuple[str, tuple[float, ...]]], mag_ratios: list[float], steps: int
) -> list[Method]:
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    curves: list[list[Method]] = []
    several = len(teacache_curves) > 1
    for (indicator, coefficients), (order, limit) in itertools.product(teacache_curves, args.teacache_variants):
        label = teacache_label(indicator, order, limit, several)
        fields = dict(coefficients=coefficients, indicator=indicator, residual_order=order, max_consecutive_skips=limit)
        curves.append(native_curve(label, args.teacache_thresholds, **fields))
    for (indicator, coefficients), variant in itertools.product(teacache_curves, args.forecast_variants):
        label = forecast_label(indicator, variant, several)
        order, scale, slope, cadence, tail = variant
        fields = dict(coefficients=coefficients, indicator=indicator, residual_order=order)
        fields.update(method="forecast", extrapolation_scale=scale, end_skipping=0, forecast_slope=slope)
        fields.update(forecast_cadence=cadence, forecast_tail=tail)
        curves.append(native_curve(label, args.forecast_thresholds, **fields))
    if "fbc" in args.peers:
        curves.append(
            [
                Method(
                    "FirstBlockCache", {"threshold": t}, "diffusers", cache_config=FirstBlockCacheConfig(threshold=t)
                )
                for t in args.fbc_thresholds
            ]
        )
    if "magcache" in args.peers:
        grid = itertools.product(args.magcache_thresholds, args.magcache_retention, args.magcache_max_skips)
        curves.append(
            [
                Method(
                    "MagCache",
                    {"threshold": t, "retention_ratio": r, "max_skip_steps": k},
                    "diffusers",
                    cache_config=MagCacheConfig(
                        threshold=t,
                        retention_ratio=r,
                        max_skip_steps=k,
                        num_inference_steps=steps,
                        mag_ratios=mag_ratios,
                    ),
                )
                for t, r, k in grid
            ]
        )
    if "taylorseer" in args.peers:
        grid = itertools.product(args.taylorseer_intervals, args.taylorseer_orders, args.taylorseer_warmup)
        curves.append(
            [
                Method(
                    "TaylorSeer",
                    {"cache_interval": n, "max_order": o, "disable_cache_before_step": w},
                    "diffusers",
                    cache_config=TaylorSeerCacheConfig(
                        cache_interval=n,
                        max_order=o,
                        disable_cache_before_step=w,
                        taylor_factors_dtype=torch.float32,
                        cache_identifiers=TAYLORSEER_BLOCKS,
                    ),
                )
                for n, o, w in grid
            ]
        )
    # Interleave the curves, so that a slow stretch of the shared machine hits every method alike.
    methods = [Method("uncached", {}, "native"), Method("uncached (diffusers)", {}, "diffusers")]
    for index in range(max(len(c) for c in curves) if curves else 0):
        methods += [c[index] for c in curves if index < len(c)]
    return methods


# ---- analysis --------------------------------------------------------------------------------------


def quality(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    flat, ref = images[:, :, 0], reference[:, :, 0]  # (N, 1, H, W): one frame per demo sample
    values = psnr(flat, ref, DATA_RANGE).clamp(max=PSNR_CAP_DB)
    return {
        "psnr_mean": float(values.mean()),
        "psnr_min": float(values.min()),
        "ssim_mean": float(ssim(flat, ref, DATA_RANGE).mean()),
    }


def timing(method: Method, baseline: Method) -> dict[str, Any]:
    """Speedup per round against the baseline's time in the same round: median and range, and the ideal."""
    ratios = [b / s for b, s in zip(baseline.seconds, method.seconds, strict=True)]
    timed_work = statistics.mean(method.timed_work)
    ideal = 1 / timed_work if timed_work > 0 else float("inf")
    median = statistics.median(ratios)
    return {
        "speedup": median,
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "seconds": method.seconds,
        "ideal_speedup": ideal,
        # Faster than skipping the work allows: the shared machine's noise, not a result.
        "above_ideal": median > ideal * 1.0001,
    }


def frontier(curve: list[dict]) -> list[dict]:
    """The points of one method that no other point of it beats: less or equal work at higher PSNR."""
    best: list[dict] = []
    for point in sorted(curve, key=lambda p: (p["work_fraction"], -p["psnr_mean"])):
        if not best or point["psnr_mean"] > best[-1]["psnr_mean"]:
            best.append(point)
    return best


def least_work_at(curve: list[dict], goal_db: float) -> dict | None:
    """The point of the frontier with the least work at a mean PSNR of at least `goal_db`; None if none."""
    good = [p for p in frontier(curve) if p["psnr_mean"] >= goal_db]
    return min(good, key=lambda p: p["work_fraction"]) if good else None


def summarise(points: list[dict]) -> dict[str, Any]:
    """Per method: its frontier and the work (and speedup) it needs at each quality goal."""
    curves: dict[str, list[dict]] = {}
    for point in points:
        if not point["method"].startswith("uncached"):
            curves.setdefault(point["method"], []).append(point)
    summary = {}
    for name, curve in curves.items():
        summary[name] = {
            "points": len(curve),
            "frontier": [p["setting"] for p in frontier(curve)],
            **{f"at_{goal:g}db": _goal_row(least_work_at(curve, goal)) for goal in QUALITY_GOALS_DB},
        }
    return summary


def _goal_row(point: dict | None) -> dict | None:
    keys = ("setting", "work_fraction", "psnr_mean", "speedup", "speedup_min", "speedup_max", "ideal_speedup")
    return None if point is None else {k: point[k] for k in (*keys, "above_ideal")}


def format_summary(summary: dict[str, Any]) -> str:
    """A Markdown table: per method, the least work at each quality goal, with the speedup beside it."""
    goals = [f"at_{goal:g}db" for goal in QUALITY_GOALS_DB]
    head = " | ".join(f"work at >= {goal:g} dB (speedup, range; setting)" for goal in QUALITY_GOALS_DB)
    lines = [f"| method | points | {head} |", "|---|---|" + "---|" * len(goals)]
    for name, row in summary.items():
        cells = []
        for goal in goals:
            point = row[goal]
            if point is None:
                cells.append("not reached")
                continue
            noise = ", above its ideal: noise" if point["above_ideal"] else ""
            cells.append(
                f"{point['work_fraction']:.3f} ({point['speedup']:.2f}x, {point['speedup_min']:.2f}-"
                f"{point['speedup_max']:.2f}x{noise}; {point['setting']})"
            )
        lines.append(f"| {name} | {row['points']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110)
    curves: dict[str, list[dict]] = {}
    for point in points:
        if not point["method"].startswith("uncached"):
            curves.setdefault(point["method"], []).append(point)
    for name, curve in curves.items():
        style = "-o" if name.startswith("TeaCache") else "-^" if name.startswith("Forecast") else "--s"
        (line,) = axes[0].plot(
            [p["work_fraction"] for p in frontier(curve)], [p["psnr_mean"] for p in frontier(curve)], style, label=name
        )
        axes[0].plot([p["work_fraction"] for p in curve], [p["psnr_mean"] for p in curve], ".", color=line.get_color())
        best = frontier(curve)
        axes[1].errorbar(
            [p["speedup"] for p in best],
            [p["psnr_mean"] for p in best],
            xerr=[[p["speedup"] - p["speedup_min"] for p in best], [p["speedup_max"] - p["speedup"] for p in best]],
            fmt=style[-1],
            color=line.get_color(),
            markersize=4,
            capsize=2,
        )
    labels = ("fraction of block work run (counted)", "wall-clock speedup (median, range over rounds)")
    finite = [p["psnr_mean"] for p in points if p["psnr_mean"] < PSNR_CAP_DB]
    for ax, label in zip(axes, labels, strict=True):
        for goal in QUALITY_GOALS_DB:
            ax.axhline(goal, color="grey", linewidth=0.8, linestyle=":")
        if finite:
            ax.set_ylim(max(min(finite) - 2, 10), max(finite) + 3)
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR vs uncached (dB, mean)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(title + " (left: every point, lines join each method's frontier)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# ---- command line ----------------------------------------------------------------------------------


def _variant(text: str) -> tuple[int, int | None]:
    """ "1:2" -> (residual order 1, at most 2 skipped steps in a row); "0" -> (0, no limit)."""
    order, _, limit = text.partition(":")
    try:
        parsed = (int(order), int(limit) if limit else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ORDER or ORDER:MAX_SKIPS, e.g. 1:2") from None
    if parsed[0] not in RESIDUAL_ORDERS or (parsed[1] is not None and parsed[1] < 1):
        raise argparse.ArgumentTypeError(f"{text!r}: ORDER is one of {list(RESIDUAL_ORDERS)}, MAX_SKIPS >= 1")
    return parsed


def _forecast_variant(text: str) -> tuple[int, float, str, bool, int]:
    """ "1:0.5" -> (residual order 1, extrapolation scale 0.5, slope "steps", no cadence, no tail); "0" -> (0, 1.0,
    "steps", False, 0): reuse; "1:0.5:indicator" -> the slope from the indicator (`forecast_slope="indicator"`);
    "1:0.5:indicator:cadence:2" -> with `forecast_cadence` and `forecast_tail=2`."""
    parts = text.split(":")
    usage = f"{text!r}: expected ORDER[:SCALE[:SLOPE[:cadence[:TAIL]]]], e.g. 1:0.5, 1:0.5:indicator:cadence:2"
    if len(parts) > 5 or (len(parts) > 3 and parts[3] not in ("", "cadence")):
        raise argparse.ArgumentTypeError(usage)
    order, scale, slope, cadence, tail = parts + [""] * (5 - len(parts))
    try:
        parsed = (int(order), float(scale) if scale else 1.0, slope or "steps", cadence == "cadence", int(tail or 0))
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None
    if parsed[0] not in RESIDUAL_ORDERS or not 0 <= parsed[1] <= 1 or (parsed[0] == 0 and parsed[1] != 1):
        raise argparse.ArgumentTypeError(
            f"{text!r}: ORDER is one of {list(RESIDUAL_ORDERS)}, SCALE in [0, 1] and only with ORDER 1"
        )
    if parsed[2] not in FORECAST_SLOPES or (parsed[2] != "steps" and parsed[0] == 0):
        raise argparse.ArgumentTypeError(f"{text!r}: ORDER 1 and SLOPE one of {list(FORECAST_SLOPES)}")
    if parsed[4] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: ORDER[:SCALE[:SLOPE[:cadence[:TAIL]]]] with TAIL at least 0")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmark_quality.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, help="a demo folder (demo_models/flux-digits, ...)")
    parser.add_argument("--config", help="zoo entry whose default preset gives the TeaCache indicator and coefficients")
    parser.add_argument(
        "--teacache-calibration",
        type=Path,
        action="append",
        default=[],
        help="a scripts/calibrate.py JSON: TeaCache curves with its indicator and coefficients (repeatable)",
    )
    parser.add_argument("--pairs", type=int, default=20, help="prompt/seed pairs for quality (digits 0..9 in turn)")
    parser.add_argument("--timing-pairs", type=int, default=5, help="the first N pairs, timed in every round")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--calibration-pairs", type=int, default=10, help="MagCache calibration runs (other seeds)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the median counts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teacache-thresholds", type=float, nargs="+", default=list(DEFAULT_TEACACHE_THRESHOLDS))
    parser.add_argument(
        "--teacache-variants",
        type=_variant,
        nargs="+",
        default=[(0, None), (1, None)],
        metavar="ORDER[:MAX_SKIPS]",
        help="one TeaCache curve per variant: residual order (0: reuse the residual, as published; 1: extrapolate "
        "it), optionally with a limit on skipped steps in a row (named in the curve), e.g. 0 1 1:2",
    )
    parser.add_argument("--forecast-thresholds", type=float, nargs="+", default=list(DEFAULT_FORECAST_THRESHOLDS))
    parser.add_argument(
        "--forecast-variants",
        type=_forecast_variant,
        nargs="*",
        default=[(1, 0.5, "steps", False, 0)],
        metavar="ORDER[:SCALE[:SLOPE[:cadence[:TAIL]]]]",
        help="one curve of the forecast method (TeaCacheParams(method='forecast'), last step not forced) per "
        "variant: residual order, extrapolation scale, forecast_slope (steps, the default, or indicator), "
        "forecast_cadence (the word cadence) and forecast_tail, e.g. 1:0.5 1:0.5:indicator "
        "1:0.5:indicator:cadence:2 1 0; none: no forecast curve",
    )
    parser.add_argument("--fbc-thresholds", type=float, nargs="+", default=list(DEFAULT_FBC_THRESHOLDS))
    parser.add_argument("--magcache-thresholds", type=float, nargs="+", default=list(DEFAULT_MAGCACHE_THRESHOLDS))
    parser.add_argument("--magcache-retention", type=float, nargs="+", default=list(DEFAULT_MAGCACHE_RETENTION))
    parser.add_argument("--magcache-max-skips", type=int, nargs="+", default=list(DEFAULT_MAGCACHE_MAX_SKIPS))
    parser.add_argument("--taylorseer-intervals", type=int, nargs="+", default=list(DEFAULT_TAYLORSEER_INTERVALS))
    parser.add_argument("--taylorseer-orders", type=int, nargs="+", default=list(DEFAULT_TAYLORSEER_ORDERS))
    parser.add_argument(
        "--taylorseer-warmup",
        type=int,
        nargs="+",
        default=list(DEFAULT_TAYLORSEER_WARMUP),
        help="TaylorSeer's disable_cache_before_step values",
    )
    parser.add_argument(
        "--peers",
        nargs="*",
        default=["fbc", "magcache", "taylorseer"],
        choices=["fbc", "magcache", "taylorseer"],
        help="the other caches to measure beside TeaCache (default: all three); --peers with no name measures none",
    )
    parser.add_argument("--output", type=Path, required=True, help="JSON report")
    parser.add_argument("--plot", type=Path, help="PNG: PSNR against work fraction and against speedup")
    return parser


def teacache_curves(args: argparse.Namespace, native: nn.Module) -> list[tuple[str, tuple[float, ...]]]:
    curves = []
    for path in args.teacache_calibration:
        record = json.loads(path.read_text())
        curves.append((record["indicator"], tuple(record["fit"]["coefficients"])))
    if not curves:
        if not args.config:
            raise SystemExit("give --teacache-calibration JSON(s) or --config (a zoo entry with TeaCache presets)")
        entry = load_zoo_entry(args.config)
        params = entry.presets[entry.default_preset].params
        curves.append((params.indicator or native.supported_teacache_indicators[0], params.coefficients))
    return curves


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.timing_pairs <= args.pairs:
        raise SystemExit(f"--timing-pairs must be in 1..--pairs ({args.pairs}), got {args.timing_pairs}")
    torch.set_num_threads(args.threads)
    import diffusers

    demo = load_demo_model(args.model)
    native = demo.transformer
    reference_class = getattr(diffusers, type(native).__name__)
    reference = reference_class.from_config(dict(native.config.to_dict())).eval()
    reference.load_state_dict(native.state_dict(), strict=True)
    models = {"native": native, "diffusers": reference}

    pairs = [(digit_prompt(i % 10), args.seed_offset + i) for i in range(args.pairs)]
    work = make_workload(demo, pairs, args.steps, args.guidance_scale, args.shift)
    flops = block_flops(native, work)
    calibration = [(digit_prompt(i % 10), 1000 + args.seed_offset + i) for i in range(args.calibration_pairs)]
    mag_ratios = []
    if "magcache" in args.peers:
        calibration_work = make_workload(demo, calibration, args.steps, args.guidance_scale, args.shift)
        mag_ratios = calibrate_magcache(reference, calibration_work)
    methods = build_methods(args, teacache_curves(args, native), mag_ratios, args.steps)

    # Quality and counted work: every pair once, untimed.
    for method in methods:
        model = models[method.implementation]
        method.images, _, method.work_fraction = run_method(method, model, work, range(args.pairs), flops)
    for baseline in methods[:2]:
        if not np.isclose(baseline.work_fraction, 1.0):
            raise RuntimeError(f"{baseline.name}: counted {baseline.work_fraction} of the block work, not all of it")
    # Timing: the first pairs, every method once per round, the order reversed every other round.
    timed = range(args.timing_pairs)
    for round_index in range(args.rounds):
        for method in methods if round_index % 2 == 0 else methods[::-1]:
            _, seconds, ran = run_method(method, models[method.implementation], work, timed, flops)
            method.seconds.append(seconds)
            method.timed_work.append(ran)
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    baselines = {m.implementation: m for m in methods if m.is_baseline}
    points = []
    for method in methods:
        base = baselines[method.implementation]
        points.append(
            {
                "method": method.name,
                "implementation": method.implementation,
                "setting": method.setting,
                "knobs": method.knobs,
                "work_fraction": method.work_fraction,
                **timing(method, base),
                **quality(method.images, base.images),
            }
        )
    report = {
        "model": str(args.model),
        "pairs": args.pairs,
        "timing_pairs": args.timing_pairs,
        "prompts": sorted(set(work.prompts)),
        "seeds": [work.seeds[0], work.seeds[-1]],
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "rounds": args.rounds,
        "threads": args.threads,
        "machine": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "psnr_cap_db": PSNR_CAP_DB,
        "ssim": "teacache_models.metrics.ssim: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid positions",
        "block_flops": flops,
        "magcache_ratios": mag_ratios,
        "uncached_native_vs_diffusers": quality(baselines["diffusers"].images, baselines["native"].images),
        "points": points,
        "summary": summarise(points),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    width = max(len(p["method"]) for p in points)
    setting = max(len(p["setting"]) for p in points)
    print(
        f"{'method':{width}s} {'setting':{setting}s} {'work':>6s} {'PSNR':>6s} {'speedup (range)':>20s} {'ideal':>6s}"
    )
    for p in points:
        spread = f"{p['speedup']:.2f}x ({p['speedup_min']:.2f}-{p['speedup_max']:.2f})"
        flag = "  above ideal: noise" if p["above_ideal"] else ""
        print(
            f"{p['method']:{width}s} {p['setting']:{setting}s} {p['work_fraction']:6.3f} {p['psnr_mean']:6.2f} "
            f"{spread:>20s} {p['ideal_speedup']:5.2f}x{flag}"
        )
    print(format_summary(report["summary"]))
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        title = f"{args.model.name}: {args.pairs} prompt/seed pairs, {args.steps} steps, CFG {args.guidance_scale:g}"
        plot(points, args.plot, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
