#!/usr/bin/env python
"""Speed against quality: our TeaCache against diffusers' FirstBlockCache, MagCache and TaylorSeer.

Example:
    python scripts/benchmark_quality.py --model demo_models/wan-digits \
        --teacache-calibration docs/results/calibration-wan-digits-temb.json \
        --output docs/results/benchmark-wan-digits.json --plot docs/results/benchmark-wan-digits.png

One demo model (a pixel-space folder of `demo_models/`), one prompt/seed set (`--pairs`, digit prompts
with consecutive seeds) and one sampler loop (flow-matching Euler with classifier-free guidance, each CFG
branch its own call) drive two implementations holding the same weights: our native transformer, with
TeaCache swept over thresholds, and diffusers' class of the same name, with its cache hooks swept through
`transformer.enable_cache(config)` and `cache_context("cond" / "uncond")` around each branch. Every point
reports the wall-clock speedup against its implementation's uncached run (median over `--rounds`, the
points of a round interleaved), the fraction of block-stack calls skipped, and the PSNR and SSIM of the
final images against its implementation's uncached images (mean over the set; SSIM is our own
`teacache_models.metrics.ssim`, Gaussian window 11 / 1.5, K1 0.01, K2 0.03).

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
from teacache_models.params import RESIDUAL_ORDERS, TeaCacheParams  # noqa: E402
from teacache_models.pipelines.demo import flow_sigmas  # noqa: E402
from teacache_models.pipelines.shared import pack_2x2, unpack_2x2  # noqa: E402
from teacache_models.zoo import load_zoo_entry  # noqa: E402

# An image equal to its reference has infinite PSNR; averages cap each image at this value.
PSNR_CAP_DB = 100.0
DATA_RANGE = 2.0  # pixels in [-1, 1]
QUALITY_GOAL_DB = 30.0

DEFAULT_TEACACHE_THRESHOLDS = (0.1, 0.2, 0.3, 0.5, 0.7)
DEFAULT_FBC_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_MAGCACHE_THRESHOLDS = (0.05, 0.1, 0.2, 0.4, 0.8)
DEFAULT_TAYLORSEER_INTERVALS = (2, 3, 4, 5)
# TaylorSeer predicts whole blocks: diffusers' default hooks only the attention modules, which leaves the
# feed-forward layers running at every step, so no step would skip the block stack.
TAYLORSEER_BLOCKS = [r"blocks\.\d+", r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"]


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


# ---- methods ---------------------------------------------------------------------------------------


def _last_block(model: nn.Module) -> nn.Module:
    for name in ("single_transformer_blocks", "blocks", "transformer_blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks[-1]
    raise ValueError(f"{type(model).__name__} has no block list")


@contextlib.contextmanager
def count_block_stack_runs(model: nn.Module) -> Iterator[list[int]]:
    """Count the forward calls that reach inside the last block (a skipped or predicted block stack does not).

    The first child of the last block (its first norm, in Flux and Wan alike) runs once per real call.
    """
    counter = [0]
    first_child = next(_last_block(model).children())
    handle = first_child.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    try:
        yield counter
    finally:
        handle.remove()


@dataclass
class Method:
    """One sweep point: which implementation, which cache and setting."""

    name: str  # the curve
    setting: str
    value: float | None
    implementation: str  # "native" or "diffusers"
    teacache: TeaCacheParams | None = None
    cache_config: Any = None
    seconds: list[float] = field(default_factory=list)
    images: torch.Tensor | None = None
    skipped_fraction: float | None = None

    @property
    def is_baseline(self) -> bool:
        return self.teacache is None and self.cache_config is None


def run_method(method: Method, model: nn.Module, work: Workload) -> tuple[torch.Tensor, float, float]:
    """Generate the whole set with `method`: (images (N, 1, F, H, W), seconds, skipped fraction)."""
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
        with count_block_stack_runs(model) as runs:
            started = time.perf_counter()
            for index in range(len(work.noise)):
                before()
                images.append(generate(model, work, index, branch))
                after()
            seconds = time.perf_counter() - started
    finally:
        if method.implementation == "diffusers" and method.cache_config is not None:
            model.disable_cache()
    total_calls = len(work.noise) * work.num_steps * 2
    return torch.cat(images), seconds, 1 - runs[0] / total_calls


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


def build_methods(
    args: argparse.Namespace, teacache_curves: list[tuple[str, tuple[float, ...]]], mag_ratios: list[float], steps: int
) -> list[Method]:
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    curves: list[list[Method]] = []
    for (indicator, coefficients), (order, limit) in itertools.product(teacache_curves, args.teacache_variants):
        options = [indicator, f"residual order {order}" * bool(order), f"max {limit} skips in a row" * bool(limit)]
        label = f"TeaCache ({', '.join(o for o in options if o)})"
        curves.append(
            [
                Method(
                    label,
                    f"thresh={t}",
                    t,
                    "native",
                    teacache=TeaCacheParams(
                        teacache_thresh=t,
                        coefficients=coefficients,
                        indicator=indicator,
                        residual_order=order,
                        max_consecutive_skips=limit,
                    ),
                )
                for t in args.teacache_thresholds
            ]
        )
    if "fbc" in args.peers:
        curves.append(
            [
                Method(
                    "FirstBlockCache", f"threshold={t}", t, "diffusers", cache_config=FirstBlockCacheConfig(threshold=t)
                )
                for t in args.fbc_thresholds
            ]
        )
    if "magcache" in args.peers:
        curves.append(
            [
                Method(
                    "MagCache",
                    f"threshold={t}",
                    t,
                    "diffusers",
                    cache_config=MagCacheConfig(threshold=t, num_inference_steps=steps, mag_ratios=mag_ratios),
                )
                for t in args.magcache_thresholds
            ]
        )
    if "taylorseer" in args.peers:
        curves.append(
            [
                Method(
                    "TaylorSeer",
                    f"cache_interval={n}",
                    n,
                    "diffusers",
                    cache_config=TaylorSeerCacheConfig(
                        cache_interval=n,
                        max_order=1,
                        taylor_factors_dtype=torch.float32,
                        cache_identifiers=TAYLORSEER_BLOCKS,
                    ),
                )
                for n in args.taylorseer_intervals
            ]
        )
    # Interleave the curves, so that a slow stretch of the shared machine hits every method alike.
    methods = [
        Method("uncached", "native", None, "native"),
        Method("uncached (diffusers)", "diffusers", None, "diffusers"),
    ]
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


def _interpolate(curve: list[dict], key: str, at: float) -> float | None:
    """Our PSNR at `key` = `at` on a curve, linear between its points; None outside its range."""
    points = sorted((p[key], p["psnr_mean"]) for p in curve)
    xs = [x for x, _ in points]
    if not xs or at < xs[0] or at > xs[-1]:
        return None
    return float(np.interp(at, xs, [y for _, y in points]))


def _best_at_least(points: list[dict], key: str, at: float) -> float | None:
    """The best PSNR among `points` whose `key` is at least `at`: what some setting reaches at that
    speed or faster (no interpolation); None if no point is that fast."""
    return max((p["psnr_mean"] for p in points if p[key] >= at), default=None)


def _compare(peer_points: dict[str, list[dict]], ours: Callable[[str, float], float | None]) -> list[dict]:
    """One row per peer point that skipped something (one that skipped nothing is the uncached model)."""
    rows = []
    for peer, curve in peer_points.items():
        for point in curve:
            if point["skipped_fraction"] == 0:
                continue
            row = {"peer": peer, "setting": point["setting"], "peer_psnr": point["psnr_mean"]}
            for key in ("speedup", "skipped_fraction"):
                our_psnr = ours(key, point[key])
                row[f"at_{key}"] = point[key]
                row[f"our_psnr_at_{key}"] = our_psnr
                row[f"we_win_at_{key}"] = None if our_psnr is None else our_psnr >= point["psnr_mean"]
            rows.append(row)
    return rows


ANY_SETTING = "TeaCache (best of the settings swept)"


def _beats_at_goal(ours: float | None, best: dict, peers: list[str]) -> dict[str, bool | None]:
    """Per peer: whether our best speedup at PSNR >= 30 dB is at least the peer's (None: the peer has none)."""
    return {
        peer: None if best[peer]["speedup"] is None else (ours is not None and ours >= best[peer]["speedup"])
        for peer in peers
    }


def summarise(points: list[dict]) -> dict[str, Any]:
    curves: dict[str, list[dict]] = {}
    for point in points:
        if point["method"].startswith("uncached"):
            continue
        curves.setdefault(point["method"], []).append(point)
    best = {}
    for name, curve in curves.items():
        good = [p for p in curve if p["psnr_mean"] >= QUALITY_GOAL_DB]
        best[name] = {
            "speedup": max((p["speedup"] for p in good), default=None),
            "skipped_fraction": max((p["skipped_fraction"] for p in good), default=None),
        }
    ours = [name for name in curves if name.startswith("TeaCache")]
    peers = [name for name in curves if not name.startswith("TeaCache")]
    peer_curves = {peer: curves[peer] for peer in peers}
    comparisons = {}
    for mine in ours:
        comparisons[mine] = {
            "best_speedup_at_30db_vs_peers": _beats_at_goal(best[mine]["speedup"], best, peers),
            # Our PSNR interpolated linearly along this curve.
            "equal_speedup_rows": _compare(peer_curves, lambda key, at, mine=mine: _interpolate(curves[mine], key, at)),
        }
    if len(ours) > 1:
        # Every TeaCache setting swept, as one offer: at each peer point, the best of ours at least as fast.
        everything = [p for name in ours for p in curves[name]]
        good = [p for p in everything if p["psnr_mean"] >= QUALITY_GOAL_DB]
        best[ANY_SETTING] = {
            "speedup": max((p["speedup"] for p in good), default=None),
            "skipped_fraction": max((p["skipped_fraction"] for p in good), default=None),
        }
        comparisons[ANY_SETTING] = {
            "best_speedup_at_30db_vs_peers": _beats_at_goal(best[ANY_SETTING]["speedup"], best, peers),
            "equal_speedup_rows": _compare(peer_curves, lambda key, at: _best_at_least(everything, key, at)),
        }
    return {"best_at_30db": best, "comparisons": comparisons}


def print_summary(summary: dict[str, Any]) -> None:
    """Per TeaCache curve: best speedup at >= 30 dB, and the peer points it matches at equal speed."""
    print(f"best speedup at PSNR >= {QUALITY_GOAL_DB:g} dB:")
    for name, best in summary["best_at_30db"].items():
        speedup = "none" if best["speedup"] is None else f"{best['speedup']:.2f}x"
        print(f"  {name}: {speedup}")
    for name, comparison in summary["comparisons"].items():
        rows = comparison["equal_speedup_rows"]
        for key in ("speedup", "skipped_fraction"):
            judged = [r for r in rows if r[f"we_win_at_{key}"] is not None]
            lost = [f"{r['peer']} {r['setting']}" for r in judged if not r[f"we_win_at_{key}"]]
            print(
                f"{name}, at equal {key}: PSNR >= the peer's at {len(judged) - len(lost)}/{len(judged)} peer points"
                + (f"; below at {', '.join(lost)}" if lost else "")
            )


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
        style = "-o" if name.startswith("TeaCache") else "--s"
        for ax, key in zip(axes, ("speedup", "skipped_fraction"), strict=True):
            # Joined in sweep order (setting increasing): noisy timings then show as a zig-zag, not a reordering.
            ax.plot([p[key] for p in curve], [p["psnr_mean"] for p in curve], style, label=name, markersize=4)
    for ax, label in zip(
        axes, ("wall-clock speedup vs uncached (median)", "fraction of block-stack calls skipped"), strict=True
    ):
        ax.axhline(QUALITY_GOAL_DB, color="grey", linewidth=0.8, linestyle=":")
        # Points that skipped nothing equal their reference (capped PSNR): kept above the frame.
        finite = [p["psnr_mean"] for p in points if p["psnr_mean"] < PSNR_CAP_DB]
        if finite:
            ax.set_ylim(min(finite) - 2, max(finite) + 3)
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR vs uncached (dB, mean)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmark_quality.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, help="a demo folder (demo_models/flux-digits, ...)")
    parser.add_argument("--config", help="zoo entry whose default preset gives the TeaCache coefficients")
    parser.add_argument(
        "--teacache-calibration",
        type=Path,
        action="append",
        default=[],
        help="a scripts/calibrate.py JSON: one TeaCache curve with its indicator and coefficients (repeatable)",
    )
    parser.add_argument("--pairs", type=int, default=50, help="prompt/seed pairs (digit prompts 0..9 in turn)")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--calibration-pairs", type=int, default=10, help="MagCache calibration runs (other seeds)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds; the median counts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teacache-thresholds", type=float, nargs="+", default=list(DEFAULT_TEACACHE_THRESHOLDS))
    parser.add_argument(
        "--teacache-variants",
        type=_variant,
        nargs="+",
        default=[(0, None)],
        metavar="ORDER[:MAX_SKIPS]",
        help="one TeaCache curve per variant: residual order (0: reuse the residual, as published; 1: extrapolate "
        "it), optionally with a limit on skipped steps in a row, e.g. 0 1 1:2 (default: 0)",
    )
    parser.add_argument("--fbc-thresholds", type=float, nargs="+", default=list(DEFAULT_FBC_THRESHOLDS))
    parser.add_argument("--magcache-thresholds", type=float, nargs="+", default=list(DEFAULT_MAGCACHE_THRESHOLDS))
    parser.add_argument("--taylorseer-intervals", type=int, nargs="+", default=list(DEFAULT_TAYLORSEER_INTERVALS))
    parser.add_argument(
        "--peers", nargs="*", default=["fbc", "magcache", "taylorseer"], choices=["fbc", "magcache", "taylorseer"]
    )
    parser.add_argument("--output", type=Path, required=True, help="JSON report")
    parser.add_argument("--plot", type=Path, help="PNG: PSNR against speedup and against skipped fraction")
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
    calibration = [(digit_prompt(i % 10), 1000 + args.seed_offset + i) for i in range(args.calibration_pairs)]
    mag_ratios = []
    if "magcache" in args.peers:
        calibration_work = make_workload(demo, calibration, args.steps, args.guidance_scale, args.shift)
        mag_ratios = calibrate_magcache(reference, calibration_work)
    methods = build_methods(args, teacache_curves(args, native), mag_ratios, args.steps)

    for method in methods[:2]:  # warm-up, untimed: first calls allocate and fill caches
        run_method(method, models[method.implementation], work)
    for round_index in range(args.rounds):
        for method in methods if round_index % 2 == 0 else methods[::-1]:
            images, seconds, skipped = run_method(method, models[method.implementation], work)
            method.seconds.append(seconds)
            if method.images is None:
                method.images, method.skipped_fraction = images, skipped
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    baselines = {m.implementation: m for m in methods if m.is_baseline}
    points = []
    for method in methods:
        base = baselines[method.implementation]
        median = statistics.median(method.seconds)
        point = {
            "method": method.name,
            "implementation": method.implementation,
            "setting": method.setting,
            "value": method.value,
            "seconds_median": median,
            "seconds": method.seconds,
            "timing_spread": (max(method.seconds) - min(method.seconds)) / median,
            "speedup": statistics.median(base.seconds) / median,
            "skipped_fraction": method.skipped_fraction,
            **quality(method.images, base.images),
        }
        points.append(point)
    native_vs_diffusers = quality(baselines["diffusers"].images, baselines["native"].images)
    report = {
        "model": str(args.model),
        "pairs": args.pairs,
        "prompts": sorted(set(work.prompts)),
        "seeds": [work.seeds[0], work.seeds[-1]],
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "rounds": args.rounds,
        "threads": args.threads,
        "machine": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "psnr_cap_db": PSNR_CAP_DB,
        "ssim": "teacache_models.metrics.ssim: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid positions",
        "magcache_ratios": mag_ratios,
        "uncached_native_vs_diffusers": native_vs_diffusers,
        "points": points,
        "summary": summarise(points),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    width = max(len(p["method"]) for p in points)
    header = f"{'speedup':>8s} {'skipped':>8s} {'PSNR':>7s} {'SSIM':>6s} {'spread':>7s}"
    print(f"{'method':{width}s} {'setting':16s} {header}")
    for p in points:
        print(
            f"{p['method']:{width}s} {p['setting']:16s} {p['speedup']:8.2f} {p['skipped_fraction']:8.3f} "
            f"{p['psnr_mean']:7.2f} {p['ssim_mean']:6.4f} {p['timing_spread']:7.1%}"
        )
    print_summary(report["summary"])
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(
            points,
            args.plot,
            f"{args.model.name}: {args.pairs} prompt/seed pairs, {args.steps} steps, CFG {args.guidance_scale}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
