"""Speed of the native transformers against diffusers, and how close TeaCache gets to its ideal.

For each family, in one process, on identical random weights and inputs, alternating the two
implementations and taking medians over repeats:

1. forward time, ours / diffusers;
2. the cost of a skipped step (embeddings, indicator, residual add, head) / a computed step;
3. a denoising loop with TeaCache at a threshold that skips about half the steps:
   realized speedup / ideal speedup (steps / computed steps).

Prints a table of ratios and writes JSON. Run: `python scripts/benchmark_speed.py [--family flux]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from teacache_models import TeaCacheParams
from teacache_models.models import FluxTransformer2DModel


@dataclass
class Case:
    """A family at one size: builds both models with the same weights and one step's inputs."""

    family: str
    build: Callable[[], tuple[torch.nn.Module, torch.nn.Module]]
    inputs: Callable[[float], dict]


def _randomize(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def flux_case(size: str) -> Case:
    from diffusers import FluxTransformer2DModel as Reference

    heads, head_dim, layers, single = {"medium": (4, 64, 2, 4), "large": (24, 128, 19, 38)}[size]
    config = dict(
        in_channels=64,
        num_layers=layers,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=256,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=(head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16),
    )
    side, text = (32, 64) if size == "medium" else (64, 512)

    def build() -> tuple[torch.nn.Module, torch.nn.Module]:
        reference = Reference(**config).eval()
        _randomize(reference, 0)
        ours = FluxTransformer2DModel(**config).eval()
        ours.load_state_dict(reference.state_dict(), strict=True)
        return ours, reference

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, side * side, 64, generator=generator)
    prompt = torch.randn(1, text, 256, generator=generator)
    pooled = torch.randn(1, 64, generator=generator)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]

    def inputs(sigma: float) -> dict:
        return dict(
            hidden_states=latents,
            encoder_hidden_states=prompt,
            pooled_projections=pooled,
            timestep=torch.tensor([sigma]),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(text, 3),
            guidance=torch.tensor([3.5]),
            return_dict=False,
        )

    return Case("flux", build, inputs)


CASES = {"flux": flux_case}


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def measure(case: Case, repeats: int, steps: int) -> dict:
    ours, reference = case.build()
    inputs = case.inputs(0.5)
    for _ in range(2):  # warm-up
        ours(**inputs), reference(**inputs)
    ours_times, reference_times = [], []
    for _ in range(repeats):
        ours_times.append(_time(lambda: ours(**inputs)))
        reference_times.append(_time(lambda: reference(**inputs)))
    forward_ratio = statistics.median(ours_times) / statistics.median(reference_times)

    # A skipped step: a threshold that skips everything after the first step.
    ours.enable_teacache(TeaCacheParams(teacache_thresh=1e9, coefficients=[1.0], end_skipping=0), repeats + 1)
    with ours.teacache_step(0):
        ours(**inputs)
    skipped_times, computed_times = [], []
    for step in range(1, repeats + 1):
        with ours.teacache_step(step):
            skipped_times.append(_time(lambda: ours(**inputs)))
        computed_times.append(_time(lambda: ours(**inputs)))
    skip_cost = statistics.median(skipped_times) / statistics.median(computed_times)

    # A loop: every other step skipped (linear rescaling, threshold above one step's distance).
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist()

    def loop(params: TeaCacheParams | None) -> float:
        if params is not None:
            ours.enable_teacache(params, steps)
        start = time.perf_counter()
        for step, sigma in enumerate(sigmas):
            with ours.teacache_step(step):
                ours(**case.inputs(sigma))
        elapsed = time.perf_counter() - start
        ours.disable_teacache()
        return elapsed

    params = _half_skip_params(ours, case, sigmas)
    uncached = statistics.median(loop(None) for _ in range(3))
    cached = statistics.median(loop(params) for _ in range(3))
    loop(params)
    computed = ours.teacache_stats().positive.num_computed
    ideal = steps / computed
    realized = uncached / cached
    return {
        "family": case.family,
        "forward_ours_s": statistics.median(ours_times),
        "forward_diffusers_s": statistics.median(reference_times),
        "forward_ratio": forward_ratio,
        "skipped_step_cost": skip_cost,
        "loop_steps": steps,
        "loop_computed_steps": computed,
        "loop_realized_speedup": realized,
        "loop_ideal_speedup": ideal,
        "loop_efficiency": realized / ideal,
    }


def _half_skip_params(model: torch.nn.Module, case: Case, sigmas: list[float]) -> TeaCacheParams:
    """A threshold (linear rescaling) that lets about every other step skip.

    The inputs of the loop do not depend on its outputs, so a dry run that never computes after the
    first step yields every step's indicator distance as the growth of the accumulator.
    """
    model.enable_teacache(TeaCacheParams(teacache_thresh=1e9, coefficients=[1.0, 0.0], end_skipping=0), len(sigmas))
    accumulated = []
    for step, sigma in enumerate(sigmas):
        with model.teacache_step(step):
            model(**case.inputs(sigma))
        accumulated.append(model.accumulated_rel_l1_distance)
    model.disable_teacache()
    distances = [b - a for a, b in itertools.pairwise(accumulated)]
    threshold = 1.05 * max(distances)  # one step's distance never reaches it, two steps' always do
    threshold = min(threshold, 0.99 * min(a + b for a, b in itertools.pairwise(distances)))
    return TeaCacheParams(teacache_thresh=threshold, coefficients=[1.0, 0.0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(CASES), action="append", help="default: all")
    parser.add_argument("--size", choices=["medium", "large"], default="medium")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark_speed.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = [measure(CASES[family](args.size), args.repeats, args.steps) for family in args.family or sorted(CASES)]
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"machine: {machine}; size: {args.size}")
    print(f"{'family':<14}{'ours/diffusers':>16}{'skip/compute':>14}{'realized/ideal':>16}{'computed':>10}")
    for r in results:
        print(
            f"{r['family']:<14}{r['forward_ratio']:>16.3f}{r['skipped_step_cost']:>14.3f}"
            f"{r['loop_efficiency']:>16.3f}{r['loop_computed_steps']:>7}/{r['loop_steps']}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"machine": machine, "size": args.size, "results": results}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
