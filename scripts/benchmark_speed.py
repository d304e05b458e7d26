"""Speed of the native transformers against diffusers, and how close TeaCache gets to its ideal.

For each family (Flux, Wan, HunyuanVideo, HunyuanVideo-1.5, Qwen-Image, Z-Image), in one process, on identical random
weights and inputs, alternating the implementations and taking medians over repeats:

1. forward time, ours / diffusers (target <= 0.9, never above 1.0), with our linear layers on PyTorch's
   kernel (as diffusers runs them) and on the one `--linear-kernel auto` picks (oneDNN for float32 on CPU);
2. the cost of a skipped step (embeddings, indicator, residual add, head) / a computed step (target <= 5%);
3. a denoising loop with TeaCache at a threshold that skips about half the steps:
   realized speedup / ideal speedup, ideal = steps / computed steps (target >= 0.95); the cached and the
   uncached loop run in lockstep, a step of each in turn, and each loop's time is the sum over its steps
   of the step's median time over the repeats, robust to bursts of load from elsewhere;
4. peak memory while loading a sharded checkpoint / its bytes (target <= 1.3; runs
   `scripts/benchmark_loading.py` in a subprocess);
5. `torch.compile` of the whole model with TeaCache on: that it runs, matches eager, and how many graphs
   are compiled per step once the loop is warm (target: 0, i.e. no recompilation at every step).

`--size medium` takes a fraction of a second per forward on two CPU cores; `--size large` uses the
released widths and sequence lengths (fewer layers, so that both models fit on one GPU) and is meant
for a GPU, where both models run in bfloat16. Prints a table of ratios and writes JSON.

    python scripts/benchmark_speed.py [--family flux --family wan ...] [--size medium] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from teacache_models import TeaCacheParams
from teacache_models.layers.linear import processor_name, resolve_linear_kernel
from teacache_models.models import (
    FluxTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    ZImageTransformer2DModel,
)
from teacache_models.models.wan import WanTransformer3DModel

TARGETS = dict(forward_ratio=0.9, skipped_step_cost=0.05, loop_efficiency=0.95, loading_peak_ratio=1.3)


@dataclass
class Case:
    """A family at one size: both models with the same weights, and one step's inputs at a given sigma."""

    family: str
    ours: type
    reference: type
    config: dict
    inputs: Callable[[float], dict]
    # TeaCache indicators measured besides the default, where they skip another part of the model.
    extra_indicators: tuple[str, ...] = ()

    def build(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
        with torch.device(device):  # built in place: the large sizes take many GB
            reference = self.reference(**self.config).eval()
            ours = self.ours(**self.config).eval()
        generator = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            for p in reference.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, device=device) * 0.02)
        ours.load_state_dict(reference.state_dict(), strict=True)
        if dtype == torch.float32:
            return ours, reference
        return ours.to(dtype), reference.to(dtype)


def _noisy(clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The flow-matching interpolation: the latents a sampler would feed at noise level sigma."""
    return (1 - sigma) * clean + sigma * noise


def _randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def flux_case(size: str) -> Case:
    from diffusers import FluxTransformer2DModel as Reference

    heads, head_dim, layers, single, side, text, joint = {
        "medium": (4, 64, 2, 4, 32, 64, 256),
        "large": (24, 128, 4, 8, 64, 512, 4096),  # 1024x1024 images, 512 T5 tokens
    }[size]
    config = dict(
        in_channels=64,
        num_layers=layers,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=joint,
        pooled_projection_dim=768 if size == "large" else 64,
        guidance_embeds=True,
        axes_dims_rope=(head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16),
    )
    g = torch.Generator().manual_seed(1)
    clean, noise = _randn(1, side * side, 64, generator=g), _randn(1, side * side, 64, generator=g)
    prompt, pooled = _randn(1, text, joint, generator=g), _randn(1, config["pooled_projection_dim"], generator=g)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]

    def inputs(sigma: float) -> dict:
        return dict(
            hidden_states=_noisy(clean, noise, sigma),
            encoder_hidden_states=prompt,
            pooled_projections=pooled,
            timestep=torch.tensor([sigma]),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(text, 3),
            guidance=torch.tensor([3.5]),
        )

    return Case("flux", FluxTransformer2DModel, Reference, config, inputs)


def wan_case(size: str) -> Case:
    from diffusers import WanTransformer3DModel as Reference

    heads, layers, ffn, latent, text, text_dim = {
        "medium": (4, 4, 1024, (4, 32, 32), 64, 256),
        "large": (12, 6, 8960, (21, 60, 104), 512, 4096),  # Wan2.1-1.3B widths, 832x480, 81 frames
    }[size]
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=64 if size == "medium" else 128,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=ffn,
        num_layers=layers,
        rope_max_seq_len=1024,
    )
    g = torch.Generator().manual_seed(1)
    clean, noise = _randn(1, 16, *latent, generator=g), _randn(1, 16, *latent, generator=g)
    prompt = _randn(1, text, text_dim, generator=g)

    def inputs(sigma: float) -> dict:
        return dict(
            hidden_states=_noisy(clean, noise, sigma),
            timestep=torch.tensor([1000 * sigma]),
            encoder_hidden_states=prompt,
        )

    return Case("wan", WanTransformer3DModel, Reference, config, inputs)


def hunyuan_video_case(size: str) -> Case:
    from diffusers import HunyuanVideoTransformer3DModel as Reference

    heads, head_dim, layers, single, latent, text, text_dim = {
        "medium": (4, 64, 2, 4, (4, 32, 32), 64, 256),
        "large": (24, 128, 4, 8, (9, 68, 120), 256, 4096),  # 960x544, 33 frames
    }[size]
    config = dict(
        in_channels=16,
        out_channels=16,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=layers,
        num_single_layers=single,
        num_refiner_layers=2,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=text_dim,
        pooled_projection_dim=768 if size == "large" else 64,
        rope_axes_dim=(head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16),
    )
    g = torch.Generator().manual_seed(1)
    clean, noise = _randn(1, 16, *latent, generator=g), _randn(1, 16, *latent, generator=g)
    prompt = _randn(1, text, text_dim, generator=g)
    pooled = _randn(1, config["pooled_projection_dim"], generator=g)
    mask = (torch.arange(text) < 3 * text // 4).long()[None]  # a padded prompt

    def inputs(sigma: float) -> dict:
        return dict(
            hidden_states=_noisy(clean, noise, sigma),
            timestep=torch.tensor([1000 * sigma]),
            encoder_hidden_states=prompt,
            encoder_attention_mask=mask,
            pooled_projections=pooled,
            guidance=torch.tensor([6000.0]),
        )

    return Case("hunyuan_video", HunyuanVideoTransformer3DModel, Reference, config, inputs)


def hunyuan_video15_case(size: str) -> Case:
    from diffusers import HunyuanVideo15Transformer3DModel as Reference

    heads, head_dim, layers, latent, text, glyph, image = {
        "medium": (4, 64, 4, (4, 16, 16), 64, 16, 16),
        "large": (16, 128, 4, (9, 30, 53), 1000, 256, 729),  # 848x480, 33 frames; the release's stream lengths
    }[size]
    config = dict(
        in_channels=65,
        out_channels=32,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=layers,
        text_embed_dim=3584 if size == "large" else 256,
        text_embed_2_dim=1472 if size == "large" else 64,
        image_embed_dim=1152 if size == "large" else 64,
        rope_axes_dim=(head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16),
    )
    g = torch.Generator().manual_seed(1)
    clean, noise = _randn(1, 32, *latent, generator=g), _randn(1, 32, *latent, generator=g)
    condition = torch.zeros(1, 33, *latent)  # text-to-video: no condition frame, zero mask
    prompt = _randn(1, text, config["text_embed_dim"], generator=g)
    glyphs = _randn(1, glyph, config["text_embed_2_dim"], generator=g)
    mask = (torch.arange(text) < 3 * text // 4).long()[None]  # a padded prompt
    glyph_mask = (torch.arange(glyph) < glyph // 4).long()[None]  # a short quoted text

    def inputs(sigma: float) -> dict:
        return dict(
            hidden_states=torch.cat([_noisy(clean, noise, sigma), condition], dim=1),
            timestep=torch.tensor([1000 * sigma]),
            encoder_hidden_states=prompt,
            encoder_attention_mask=mask,
            encoder_hidden_states_2=glyphs,
            encoder_attention_mask_2=glyph_mask,
            image_embeds=torch.zeros(1, image, config["image_embed_dim"]),
        )

    return Case("hunyuan_video15", HunyuanVideo15Transformer3DModel, Reference, config, inputs)


def qwen_image_case(size: str) -> Case:
    from diffusers import QwenImageTransformer2DModel as Reference

    heads, layers, side, text, joint = {
        "medium": (4, 4, 32, 64, 256),
        "large": (24, 8, 64, 256, 3584),  # 1024x1024
    }[size]
    config = dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=64 if size == "medium" else 128,
        num_attention_heads=heads,
        joint_attention_dim=joint,
        axes_dims_rope=(16, 24, 24) if size == "medium" else (16, 56, 56),
    )
    g = torch.Generator().manual_seed(1)
    clean, noise = _randn(1, side * side, 64, generator=g), _randn(1, side * side, 64, generator=g)
    prompt = _randn(1, text, joint, generator=g)
    mask = (torch.arange(text) < 3 * text // 4).long()[None]

    def inputs(sigma: float) -> dict:
        return dict(
            hidden_states=_noisy(clean, noise, sigma),
            encoder_hidden_states=prompt,
            encoder_hidden_states_mask=mask,
            timestep=torch.tensor([sigma]),
            img_shapes=[[(1, side, side)]],
        )

    return Case("qwen_image", QwenImageTransformer2DModel, Reference, config, inputs)


def z_image_case(size: str) -> Case:
    from diffusers import ZImageTransformer2DModel as Reference

    dim, layers, heads, side, text, cap = {
        # Fifteen main layers to one refiner, as the release's 30 to 2: the proportion sets what a skipped
        # step costs with the published indicator, which is read after the refiners.
        "medium": (256, 15, 4, 48, 64, 256),
        "large": (3840, 6, 30, 128, 256, 2560),  # Z-Image-Turbo widths, 1024x1024
    }[size]
    config = dict(
        in_channels=16,
        dim=dim,
        n_layers=layers,
        n_refiner_layers=2 if size == "large" else 1,
        n_heads=heads,
        n_kv_heads=heads,
        cap_feat_dim=cap,
        axes_dims=(16, 24, 24) if size == "medium" else (32, 48, 48),
        axes_lens=(1536, 512, 512),
    )
    g = torch.Generator().manual_seed(1)
    clean, noise = _randn(16, 1, side, side, generator=g), _randn(16, 1, side, side, generator=g)
    caption = _randn(text, cap, generator=g)

    def inputs(sigma: float) -> dict:
        # Z-Image takes t = 1 - sigma.
        return dict(x=[_noisy(clean, noise, sigma)], t=torch.tensor([1 - sigma]), cap_feats=[caption])

    return Case("z_image", ZImageTransformer2DModel, Reference, config, inputs, ("refiner_modulated_input",))


CASES = {
    "flux": flux_case,
    "wan": wan_case,
    "hunyuan_video": hunyuan_video_case,
    "hunyuan_video15": hunyuan_video15_case,
    "qwen_image": qwen_image_case,
    "z_image": z_image_case,
}


# ---- measuring ------------------------------------------------------------------------------------


def _to(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    def move(value: object) -> object:
        if isinstance(value, torch.Tensor):
            return value.to(device, dtype) if value.is_floating_point() else value.to(device)
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return {k: move(v) for k, v in inputs.items()}


class Timer:
    """Wall time of a call, synchronising the accelerator around it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def _spread(times: list[float]) -> float:
    """(max - min) / median: how noisy the repeats were."""
    return (max(times) - min(times)) / statistics.median(times)


def _alternate(fns: list[Callable[[], float]], repeats: int) -> list[list[float]]:
    """Run each of `fns` once per repeat, in turn, so that load from elsewhere hits all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            out.append(fn())
    return times


def _sum_of_step_medians(runs: list[list[float]]) -> float:
    """The time of a loop from repeats of it: each step's median over the repeats, summed over the steps."""
    return sum(statistics.median(step_times) for step_times in zip(*runs, strict=True))


def _half_skip_params(
    model: torch.nn.Module, inputs: Callable[[float], dict], sigmas: list[float], indicator: str | None = None
) -> TeaCacheParams:
    """A threshold (linear rescaling) that lets about every other step skip.

    The inputs of the loop do not depend on its outputs, so a dry run that never computes after the
    first step yields every step's indicator distance as the growth of the accumulator.
    """
    dry_run = TeaCacheParams(teacache_thresh=1e9, coefficients=[1.0, 0.0], end_skipping=0, indicator=indicator)
    model.enable_teacache(dry_run, len(sigmas))
    accumulated = []
    for step, sigma in enumerate(sigmas):
        with model.teacache_step(step):
            model(**inputs(sigma))
        accumulated.append(model.accumulated_rel_l1_distance)
    model.disable_teacache()
    distances = [b - a for a, b in itertools.pairwise(accumulated)]
    threshold = 1.05 * max(distances)  # one step's distance never reaches it, two steps' always do
    threshold = min(threshold, 0.99 * min(a + b for a, b in itertools.pairwise(distances)))
    return TeaCacheParams(teacache_thresh=threshold, coefficients=[1.0, 0.0], indicator=indicator)


def _teacache_costs(
    ours: torch.nn.Module,
    inputs: Callable[[float], dict],
    step_inputs: dict,
    timer: Timer,
    repeats: int,
    steps: int,
    indicator: str | None,
) -> dict:
    """Measurements 2 and 3 for one indicator (None: the model's default)."""
    # A skipped step: a threshold no distance reaches skips everything after the first step.
    skip_all = TeaCacheParams(teacache_thresh=1e9, coefficients=[1.0], end_skipping=0, indicator=indicator)
    ours.enable_teacache(skip_all, 2 * repeats + 2)
    with ours.teacache_step(0):
        ours(**step_inputs)
    step = iter(range(1, 2 * repeats + 2))

    def skipped() -> float:
        with ours.teacache_step(next(step)):
            return timer(lambda: ours(**step_inputs))

    skipped_times, computed_times = _alternate([skipped, lambda: timer(lambda: ours(**step_inputs))], repeats)
    assert ours.teacache_stats().positive.num_computed == 1, "the skip measurement computed more than one step"
    ours.disable_teacache()

    # A loop that skips about every other step, against the same loop uncached.
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist()
    loop_inputs = [inputs(sigma) for sigma in sigmas]
    params = _half_skip_params(ours, inputs, sigmas, indicator)

    def lockstep(cached_first: bool) -> tuple[list[float], list[float]]:
        """One uncached and one cached loop advancing together: the time of each step of each.

        A call outside `teacache_step` computes everything and leaves the cache alone, so both loops run in
        one model, step after step, and load from elsewhere hits both alike. The order within a step
        alternates between repeats, so that neither loop always finds the caches warmed by the other.
        """
        ours.enable_teacache(params, steps)
        uncached, cached = [], []
        for index, step_inputs in enumerate(loop_inputs):

            def cached_step(step_inputs: dict = step_inputs, index: int = index) -> None:
                with ours.teacache_step(index):
                    cached.append(timer(lambda: ours(**step_inputs)))

            def uncached_step(step_inputs: dict = step_inputs) -> None:
                uncached.append(timer(lambda: ours(**step_inputs)))

            for run in (cached_step, uncached_step) if cached_first else (uncached_step, cached_step):
                run()
        ours.disable_teacache()
        return uncached, cached

    # Every repeat of the cached loop skips the same steps (the inputs are fixed), so each step's time is
    # taken as its median over the repeats: a burst of load then spoils one step of one repeat instead of a
    # whole loop. The paired estimate (median of the per-repeat ratios) is kept beside it.
    runs = [lockstep(cached_first=repeat % 2 == 1) for repeat in range(max(6, repeats))]
    uncached_runs, cached_runs = [run[0] for run in runs], [run[1] for run in runs]
    computed = ours.teacache_stats().positive.num_computed
    ideal = steps / computed
    uncached_total, cached_total = _sum_of_step_medians(uncached_runs), _sum_of_step_medians(cached_runs)
    realized = uncached_total / cached_total
    paired = statistics.median(sum(u) / sum(c) for u, c in zip(uncached_runs, cached_runs, strict=True))
    return {
        "skipped_step_s": statistics.median(skipped_times),
        "computed_step_s": statistics.median(computed_times),
        "skipped_step_cost": statistics.median(skipped_times) / statistics.median(computed_times),
        "loop_steps": steps,
        "loop_computed_steps": computed,
        "loop_uncached_s": uncached_total,
        "loop_cached_s": cached_total,
        "loop_realized_speedup": realized,
        "loop_ideal_speedup": ideal,
        "loop_efficiency": realized / ideal,
        "loop_efficiency_paired": paired / ideal,
        "loop_repeats": len(cached_runs),
        "loop_spread": max(_spread([sum(run) for run in runs]) for runs in (uncached_runs, cached_runs)),
    }


@torch.no_grad()
def measure_speed(case: Case, device: torch.device, dtype: torch.dtype, repeats: int, steps: int) -> dict:
    ours, reference = case.build(device, dtype)
    timer = Timer(device)

    def inputs(sigma: float) -> dict:
        return _to(case.inputs(sigma), device, dtype)

    step_inputs = inputs(0.5)
    # Our model on PyTorch's linear kernel (as diffusers runs) and, where it applies, on oneDNN's.
    fast_kernel = resolve_linear_kernel("auto", device, dtype)

    def ours_on(kernel: str) -> Callable[[], float]:
        def run() -> float:
            ours.set_linear_kernel(kernel)
            return timer(lambda: ours(**step_inputs))

        return run

    for _ in range(2):  # warm-up: allocator, kernels, lazy tables
        ours_on("aten")(), ours_on(fast_kernel)(), reference(**step_inputs)
    ours_times, fast_times, reference_times = _alternate(
        [ours_on("aten"), ours_on(fast_kernel), lambda: timer(lambda: reference(**step_inputs))], repeats
    )
    # The rest measures TeaCache on the kernel a CPU float32 run picks by default.
    ours.set_linear_kernel(fast_kernel)

    costs = {
        indicator: _teacache_costs(ours, inputs, step_inputs, timer, repeats, steps, indicator)
        for indicator in (None, *case.extra_indicators)
    }
    default = costs.pop(None)
    return {
        "forward_ours_s": statistics.median(ours_times),
        "forward_diffusers_s": statistics.median(reference_times),
        "forward_ratio": statistics.median(ours_times) / statistics.median(reference_times),
        # The fastest repeats are the least disturbed by other processes: a second estimate of the ratio.
        "forward_ratio_min": min(ours_times) / min(reference_times),
        "forward_spread": max(_spread(ours_times), _spread(reference_times)),
        "fast_linear_kernel": fast_kernel,
        "forward_fast_s": statistics.median(fast_times),
        "forward_ratio_fast": statistics.median(fast_times) / statistics.median(reference_times),
        "forward_ratio_fast_min": min(fast_times) / min(reference_times),
        **default,
        "by_indicator": costs,
    }


class CountingBackend:
    """A torch.compile backend that counts the graphs it is handed, then passes them on."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.graphs = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        if self.backend == "eager":
            return graph_module.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.backend)(graph_module, example_inputs)


@torch.no_grad()
def measure_compile(case: Case, device: torch.device, dtype: torch.dtype, backend: str, steps: int) -> dict:
    """torch.compile(model) over a TeaCache loop: graphs compiled per step, and the gap to eager."""
    import torch._dynamo

    torch._dynamo.reset()
    ours, _ = case.build(device, dtype)
    counter = CountingBackend(backend)
    compiled = torch.compile(ours, backend=counter)
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist()
    loop_inputs = [_to(case.inputs(sigma), device, dtype) for sigma in sigmas]
    params = _half_skip_params(ours, lambda sigma: _to(case.inputs(sigma), device, dtype), sigmas)

    def loop(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[int]]:
        ours.enable_teacache(params, steps)
        outputs, graphs = [], []
        for index, step_inputs in enumerate(loop_inputs):
            with ours.teacache_step(index):
                outputs.append(_first(model(**step_inputs)))
            graphs.append(counter.graphs)
        ours.disable_teacache()
        return outputs, graphs

    try:
        start = time.perf_counter()
        compiled_outputs, graphs = loop(compiled)
        seconds = time.perf_counter() - start
    except Exception as error:  # the benchmark reports a failure as its result
        return {"compile_ok": False, "compile_error": f"{type(error).__name__}: {error}"[:300]}
    eager_outputs, _ = loop(ours)
    error = max(
        ((a.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-12)).item()
        for a, e in zip(compiled_outputs, eager_outputs, strict=True)
    )
    warm = steps // 2  # by then both the computed and the skipped path have run at least twice
    return {
        "compile_ok": True,
        "compile_backend": backend,
        "compile_graphs_total": counter.graphs,
        "compile_graphs_after_warmup": graphs[-1] - graphs[warm - 1],
        "compile_graphs_per_step": graphs,
        "compile_max_rel_error_vs_eager": error,
        "compile_loop_s": seconds,
    }


def _first(output: object) -> torch.Tensor:
    sample = output.sample if hasattr(output, "sample") else output[0]
    return sample[0] if isinstance(sample, list) else sample


def measure_loading() -> dict:
    """Run scripts/benchmark_loading.py (its own subprocess measures a fresh interpreter's peak RSS)."""
    script = Path(__file__).with_name("benchmark_loading.py")
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "loading.json"
        subprocess.run([sys.executable, str(script), "--output", str(output)], check=True, capture_output=True)
        report = json.loads(output.read_text())
    return {
        "loading_peak_ratio": report["peak_rss_rise_over_checkpoint"],
        "loading_checkpoint_bytes": report["checkpoint_bytes"],
        "loading_shards": report["shards"],
        "loading_dtype": report["dtype"],
    }


def _mark(value: float, target: float, lower_is_better: bool = True) -> str:
    ok = value <= target if lower_is_better else value >= target
    return " " if ok else "!"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(CASES), action="append", help="default: all")
    parser.add_argument("--size", choices=["medium", "large"], default=None, help="default: large on a GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on a CPU")
    parser.add_argument("--compile-backend", default=None, help="default: eager on a CPU, inductor on a GPU")
    parser.add_argument("--compile-steps", type=int, default=8)
    parser.add_argument("--no-compile", action="store_true", help="skip measurement 5")
    parser.add_argument("--no-loading", action="store_true", help="skip measurement 4")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark_speed.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.size or ("large" if device.type == "cuda" else "medium")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "eager")
    torch.set_num_threads(args.threads)

    results = []
    for family in args.family or list(CASES):
        case = CASES[family](size)
        result = {"family": family, **measure_speed(case, device, dtype, args.repeats, args.steps)}
        if not args.no_compile:
            result.update(measure_compile(case, device, dtype, backend, args.compile_steps))
        results.append(result)
        print(f"{family}: done", file=sys.stderr, flush=True)
    loading = None if args.no_loading else measure_loading()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else processor_name()
    machine = f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}, {dtype}"
    print(
        f"machine: {machine}; size: {size}; {args.repeats} repeats, medians (min: ratio of the fastest repeats; "
        f"noise: (max - min) / median of the forward repeats); loop of {args.steps} steps, real/ideal from the "
        "sum of each step's median time, both loops in lockstep (paired: median of the per-repeat ratios)"
    )
    print(
        f"aten: our model on PyTorch's linear kernel, as diffusers runs; "
        f"fast: on {results[0]['fast_linear_kernel']!r}, the kernel "
        "`--linear-kernel auto` picks here (skip/comp and real/ideal are measured on it)"
    )
    header = (
        f"{'family':<14}{'aten/diff':>10}{'(min)':>7}{'fast/diff':>10}{'(min)':>7}{'noise':>7}{'skip/comp':>10}"
        f"{'real/ideal':>11}{'(paired)':>9}{'computed':>9}"
    )
    print(header + f"{'graphs':>8}{'after warm':>11}{'compile err':>12}")
    for r in results:
        line = (
            f"{r['family']:<14}{r['forward_ratio']:>9.3f}{_mark(r['forward_ratio'], TARGETS['forward_ratio'])}"
            f"{r['forward_ratio_min']:>7.3f}"
            f"{r['forward_ratio_fast']:>9.3f}{_mark(r['forward_ratio_fast'], TARGETS['forward_ratio'])}"
            f"{r['forward_ratio_fast_min']:>7.3f}{r['forward_spread']:>7.2f}"
            f"{r['skipped_step_cost']:>9.3f}{_mark(r['skipped_step_cost'], TARGETS['skipped_step_cost'])}"
            f"{r['loop_efficiency']:>10.3f}{_mark(r['loop_efficiency'], TARGETS['loop_efficiency'], False)}"
            f"{r['loop_efficiency_paired']:>9.3f}{r['loop_computed_steps']:>6}/{r['loop_steps']:<2}"
        )
        if r.get("compile_ok"):
            line += (
                f"{r['compile_graphs_total']:>8}{r['compile_graphs_after_warmup']:>11}"
                f"{r['compile_max_rel_error_vs_eager']:>12.1e}"
            )
        elif "compile_ok" in r:
            line += f"  compile failed: {r['compile_error']}"
        print(line)
        for indicator, c in r["by_indicator"].items():
            print(
                f"{'  indicator ' + indicator:<55}"
                f"{c['skipped_step_cost']:>9.3f}{_mark(c['skipped_step_cost'], TARGETS['skipped_step_cost'])}"
                f"{c['loop_efficiency']:>10.3f}{_mark(c['loop_efficiency'], TARGETS['loop_efficiency'], False)}"
                f"{c['loop_efficiency_paired']:>9.3f}{c['loop_computed_steps']:>6}/{c['loop_steps']:<2}"
            )
    print(
        f"targets: ours/diffusers <= {TARGETS['forward_ratio']}, skip/compute <= {TARGETS['skipped_step_cost']}, "
        f"realized/ideal >= {TARGETS['loop_efficiency']}, no graphs after warm-up ('!' = missed)"
    )
    if loading is not None:
        ratio = loading["loading_peak_ratio"]
        print(
            f"loading: peak RSS rise / checkpoint bytes = {ratio:.3f} "
            f"({loading['loading_checkpoint_bytes'] / 1e6:.0f} MB in {loading['loading_shards']} shards, "
            f"{loading['loading_dtype']}; target <= {TARGETS['loading_peak_ratio']})"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "size": size, "repeats": args.repeats, "targets": TARGETS, "results": results}
    args.output.write_text(json.dumps({**report, "loading": loading}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
