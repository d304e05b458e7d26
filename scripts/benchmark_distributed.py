#!/usr/bin/env python
"""Communication of CFG- and sequence-parallel generation: collectives and bytes per denoising step.

Two parts:

1. Measured: a short CFG denoising loop with TeaCache on a small random-weight Wan and HunyuanVideo,
   on 2 or 4 local ranks (Gloo on the CPU, NCCL when every rank has a GPU), for each layout (CFG x2,
   sequence x2, CFG x2 x sequence x2). Every torch.distributed call is wrapped and counted; the
   per-step bytes are checked against the formula of part 2, and the final latents against a
   single-process run of the same loop.
2. Predicted from shapes: the same formula for the released checkpoints at their published resolutions.

Bytes are what each rank hands to its collectives ("payload") and, for ring algorithms, what it sends on
the wire: all-to-all (N-1)/N of its input, all-gather (N-1) x its input, all-reduce 2 (N-1)/N x the tensor.

    python scripts/benchmark_distributed.py                # spawns its own ranks
    python scripts/benchmark_distributed.py --json out.json

Scaling (time per step against the number of GPUs) needs a machine with several GPUs; on the CPU the
timings only show that nothing stalls.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from teacache_models import TeaCacheParams  # noqa: E402
from teacache_models.distributed import ParallelState, init_parallel  # noqa: E402
from teacache_models.models import HunyuanVideoTransformer3DModel  # noqa: E402
from teacache_models.models.wan import WanTransformer3DModel  # noqa: E402

LAYOUTS = {"cfg2": (True, 1), "sp2": (False, 2), "cfg2xsp2": (True, 2)}
# Small but shaped like the real models: several heads, several blocks, an odd token count (padding).
WAN_SMALL = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=64,
    ffn_dim=128,
    num_layers=4,
    rope_max_seq_len=64,
)
HV_SMALL = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=4,
    attention_head_dim=16,
    num_layers=2,
    num_single_layers=4,
    num_refiner_layers=1,
    patch_size=2,
    patch_size_t=1,
    text_embed_dim=32,
    pooled_projection_dim=16,
    rope_axes_dim=(4, 6, 6),
)
GRID = (3, 5, 7)  # post-patch frames, height, width: 105 tokens
TEXT_LEN = 12
# Skips some steps of the measured loop (identity rescaling, block 0's modulated input: per token, so the
# sequence-parallel ranks must join their shards' distances).
TEACACHE_THRESH = 1.0

# ---- counting collectives -----------------------------------------------------------------------------

_COUNTED = ("all_to_all_single", "all_gather_single", "all_gather_into_tensor", "all_reduce", "broadcast")
_OBJECTS = ("broadcast_object_list", "all_gather_object")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class CollectiveLog:
    """Wraps torch.distributed's collectives (this process only) and records (name, payload, wire bytes)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []
        self._originals: dict[str, Callable] = {}

    def __enter__(self) -> CollectiveLog:
        for name in _COUNTED + _OBJECTS:
            original = getattr(dist, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _wrap(self, name: str, original: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            size = dist.get_world_size(group)
            if name == "all_to_all_single":
                payload = _nbytes(args[1])
                wire = payload * (size - 1) / size
            elif name in ("all_gather_single", "all_gather_into_tensor"):
                payload = _nbytes(args[1])
                wire = payload * (size - 1)
            elif name == "all_reduce":
                payload = _nbytes(args[0])
                wire = 2 * payload * (size - 1) / size
            elif name == "broadcast":
                payload = wire = _nbytes(args[0])
            else:  # pickled objects: sizes are not known here and are tiny (seeds, statistics)
                payload = wire = 0
            self.calls.append((name.replace("all_gather_into_tensor", "all_gather_single"), payload, wire))
            return original(*args, **kwargs)

        return counted

    def mark(self) -> int:
        return len(self.calls)

    def summary(self, start: int, stop: int) -> dict[str, Any]:
        counts: dict[str, int] = defaultdict(int)
        payload = wire = 0.0
        for name, p, w in self.calls[start:stop]:
            counts[name] += 1
            payload += p
            wire += w
        return {"collectives": dict(counts), "payload_bytes": payload, "wire_bytes": wire}


# ---- the formula ------------------------------------------------------------------------------------------


def predicted_per_step(
    family: str,
    config: dict,
    tokens: int,
    text_len: int,
    element_size: int,
    cfg: bool,
    sp: int,
    teacache: bool,
    computed: tuple[bool, ...],
    monitored: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Collectives and payload bytes of one rank in one CFG denoising step (batch 1).

    `computed` holds, per transformer call of this rank in the step (one with CFG parallelism, else the
    positive and the negative call), whether it ran the blocks (True) or TeaCache skipped them (False):
    a skipped call moves no attention data. `monitored` holds, per call, the distances the fit monitor
    reduces over the ranks (`cache/monitor.py`): 0, or at a computed step whose indicator distance was
    measured (not forced), 1 for the output's change since the branch's last computed step, plus 1 for the
    indicator's chord where skipped steps lie between them. None: none.
    """
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    shard = -(-tokens // sp)
    patch = config["patch_size"]
    patch_volume = math.prod(patch) if family == "wan" else patch**2 * config.get("patch_size_t", 1)
    out_channels = config.get("out_channels") or config["in_channels"]
    counts: dict[str, int] = defaultdict(int)
    payload = wire = 0.0

    def add(name: str, nbytes: float, group_size: int) -> None:
        nonlocal payload, wire
        counts[name] += 1
        payload += nbytes
        wire += {
            "all_to_all_single": nbytes * (group_size - 1) / group_size,
            "all_gather_single": nbytes * (group_size - 1),
            "all_reduce": 2 * nbytes * (group_size - 1) / group_size,
        }[name]

    for ran_blocks, monitor in zip(computed, monitored or (0,) * len(computed), strict=True) if sp > 1 else ():
        if teacache:
            add("all_reduce", 3 * 4, sp)  # forced flag, |difference| sum, |previous| sum in float32
            for _ in range(monitor):  # the fit monitor's distances, the same three float32 sums
                add("all_reduce", 3 * 4, sp)
        if ran_blocks:
            token_bytes = shard * heads * head_dim * element_size  # one of q, k, v on this rank
            layers = config["num_layers"] + (config.get("num_single_layers", 0) if family == "hunyuan" else 0)
            for _ in range(layers):
                add("all_to_all_single", 3 * token_bytes, sp)  # q, k, v: tokens -> heads
                add("all_to_all_single", token_bytes, sp)  # output: heads -> tokens
                if family == "hunyuan":  # the replicated text rows of this rank's heads, to every rank
                    add("all_gather_single", text_len * heads // sp * head_dim * element_size, sp)
        add("all_gather_single", shard * out_channels * patch_volume * element_size, sp)  # the output
    if cfg:
        add("all_gather_single", tokens * out_channels * patch_volume * element_size, 2)  # the prediction
    return {"collectives": dict(counts), "payload_bytes": payload, "wire_bytes": wire}


def formula_mismatches(layout: str, family: str, ranks: list[dict[str, Any]], steps: int) -> list[str]:
    """Where the measured collectives of `family` in `layout` (`measure`'s ranks) differ from the formula, one
    line per rank and step; empty where they agree on every step."""
    cfg, sp = LAYOUTS[layout]
    config = WAN_SMALL if family == "wan" else HV_SMALL
    tokens = GRID[0] * GRID[1] * GRID[2]
    mismatches = []
    for rank, report in enumerate(ranks):
        skipped = report[family]["skipped_steps"]
        for step, measured in enumerate(report[family]["per_step"]):
            calls = tuple(step not in steps_skipped for steps_skipped in skipped.values())
            monitored = tuple(fit_monitor_reductions(step, steps, steps_skipped) for steps_skipped in skipped.values())
            expected = predicted_per_step(family, config, tokens, TEXT_LEN, 4, cfg, sp, True, calls, monitored)
            if (measured["collectives"], measured["payload_bytes"]) != (
                expected["collectives"],
                expected["payload_bytes"],
            ):
                mismatches.append(f"rank {rank} step {step}: measured {measured}, formula {expected}")
    return mismatches


def fit_monitor_reductions(step: int, steps: int, skipped: list[int]) -> int:
    """The fit monitor's reductions of one branch at `step` of the measured loop (see `predicted_per_step`): the
    first and the last step are forced (no distance measured), and step 0 has no earlier computed output."""
    if step in skipped or step in (0, steps - 1):
        return 0
    return 1 + (step - 1 in skipped)


# ---- the measured loop --------------------------------------------------------------------------------------


def _inputs(family: str, negative: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + negative)
    if family == "wan":
        return {"encoder_hidden_states": torch.randn(1, TEXT_LEN, WAN_SMALL["text_dim"], generator=generator)}
    return {
        "encoder_hidden_states": torch.randn(1, TEXT_LEN, HV_SMALL["text_embed_dim"], generator=generator),
        "encoder_attention_mask": (torch.arange(TEXT_LEN) < TEXT_LEN - 3 * negative).long()[None],
        "pooled_projections": torch.randn(1, HV_SMALL["pooled_projection_dim"], generator=generator),
        "guidance": torch.full((1,), 6000.0),
    }


def _model(family: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN_SMALL) if family == "wan" else HunyuanVideoTransformer3DModel(**HV_SMALL)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.eval().to(device)


def _latents(family: str, device: torch.device) -> torch.Tensor:
    patch = WAN_SMALL["patch_size"] if family == "wan" else (1, HV_SMALL["patch_size"], HV_SMALL["patch_size"])
    sizes = [g * p for g, p in zip(GRID, patch, strict=True)]
    return torch.randn(1, 4, *sizes, generator=torch.Generator().manual_seed(7)).to(device)


def denoise(
    family: str, model: torch.nn.Module, steps: int, state: ParallelState | None, log: CollectiveLog | None
) -> tuple[torch.Tensor, list[tuple[int, int]], Any]:
    """CFG (scale 5) Euler loop with TeaCache; returns the latents, each step's log span and the stats."""
    device = next(model.parameters()).device
    params = TeaCacheParams(teacache_thresh=TEACACHE_THRESH, coefficients=[1.0, 0.0], indicator="modulated_input")
    model.enable_teacache(params, steps)
    conditions = {b: {k: v.to(device) for k, v in _inputs(family, b).items()} for b in (False, True)}
    latents = _latents(family, device)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    cfg = state.cfg if state is not None else None
    spans = []
    for step in range(steps):
        start = log.mark() if log is not None else 0
        timestep = (sigmas[step] * 1000).reshape(1).to(device)
        predictions = {}
        for negative in (cfg.is_cfg_negative,) if cfg is not None else (False, True):
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=negative):
                predictions[negative] = model(latents, timestep=timestep, **conditions[negative], return_dict=False)[0]
        if cfg is not None:
            predictions[False], predictions[True] = cfg.combine(predictions[cfg.is_cfg_negative])
        guided = predictions[True] + 5.0 * (predictions[False] - predictions[True])
        latents = latents + float(sigmas[step + 1] - sigmas[step]) * guided
        spans.append((start, log.mark() if log is not None else 0))
    return latents, spans, model.teacache_stats()


def _rank(rank: int, world_size: int, layout: str, steps: int, folder: str, backend: str) -> None:
    torch.set_num_threads(1)
    cfg, sp = LAYOUTS[layout]
    state = init_parallel(
        cfg,
        sp,
        backend=backend,
        timeout_s=120,
        init_method=f"file://{folder}/rendezvous-{layout}",
        rank=rank,
        world_size=world_size,
    )
    report: dict[str, Any] = {}
    try:
        with state.guard():
            for family in ("wan", "hunyuan"):
                reference, _, reference_stats = denoise(family, _model(family, state.device), steps, None, None)
                model = _model(family, state.device)
                state.enable_sequence_parallel(model)
                dist.barrier()
                started = time.perf_counter()
                with CollectiveLog() as log:
                    latents, spans, stats = denoise(family, model, steps, state, log)
                seconds = time.perf_counter() - started
                per_step = [log.summary(a, b) for a, b in spans]
                error = ((latents - reference).abs().max() / reference.abs().max()).item()
                branches = [state.cfg.is_cfg_negative] if state.cfg is not None else [False, True]
                names = ["negative" if b else "positive" for b in branches]
                report[family] = {
                    "per_step": per_step,
                    "max_rel_error_vs_one_process": error,
                    "skipped_steps": {n: list(getattr(stats, n).skipped_steps) for n in names},
                    "skipped_steps_one_process": {n: list(getattr(reference_stats, n).skipped_steps) for n in names},
                    "seconds_per_step": seconds / steps,
                }
        torch.save(report, f"{folder}/{layout}-rank{rank}.pt")
    finally:
        state.close()


def measure(layout: str, steps: int, backend: str) -> list[dict[str, Any]]:
    cfg, sp = LAYOUTS[layout]
    world_size = (2 if cfg else 1) * sp
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "teacache_models.distributed", "teacache_models.models"])
    with tempfile.TemporaryDirectory() as folder:
        ranks = [
            context.Process(target=_rank, args=(r, world_size, layout, steps, folder, backend))
            for r in range(world_size)
        ]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join(timeout=600)
        failed = [r for r, p in enumerate(ranks) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"layout {layout}: ranks {failed} failed (see their errors above)")
        return [torch.load(f"{folder}/{layout}-rank{r}.pt") for r in range(world_size)]


# ---- released checkpoints ---------------------------------------------------------------------------------

RELEASED = {
    # name: (family, config, post-patch tokens, text tokens, what)
    "wan2.1-t2v-14b 1280x720x81": (
        "wan",
        dict(num_attention_heads=40, attention_head_dim=128, num_layers=40, patch_size=(1, 2, 2), in_channels=16),
        21 * 45 * 80,
        512,
        "Wan2.1 T2V 14B, 720p, 81 frames (21 x 90 x 160 latents)",
    ),
    "wan2.1-t2v-1.3b 832x480x81": (
        "wan",
        dict(num_attention_heads=12, attention_head_dim=128, num_layers=30, patch_size=(1, 2, 2), in_channels=16),
        21 * 30 * 52,
        512,
        "Wan2.1 T2V 1.3B, 480p, 81 frames (21 x 60 x 104 latents)",
    ),
    "hunyuanvideo 1280x720x129": (
        "hunyuan",
        dict(
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=20,
            num_single_layers=40,
            patch_size=2,
            patch_size_t=1,
            in_channels=16,
        ),
        33 * 45 * 80,
        256,
        "HunyuanVideo, 720p, 129 frames (33 x 90 x 160 latents), 256 text tokens",
    ),
}


def released_table(teacache: bool) -> list[dict[str, Any]]:
    rows = []
    for name, (family, config, tokens, text_len, what) in RELEASED.items():
        for cfg, sp in ((True, 1), (False, 2), (False, 4), (False, 8), (True, 4)):
            if config["num_attention_heads"] % sp:
                continue
            calls = (True,) if cfg else (True, True)
            # A computed step after skipped ones: the fit monitor reduces the output's change and the chord.
            numbers = predicted_per_step(
                family, config, tokens, text_len, 2, cfg, sp, teacache, calls, (2,) * len(calls)
            )
            rows.append({"model": name, "what": what, "cfg": cfg, "sp": sp, **numbers})
    return rows


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:10.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="denoising steps of the measured loop")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="gloo: CPU ranks")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.backend == "nccl" and torch.cuda.device_count() < 4:
        parser.error(f"--backend nccl needs 4 GPUs on this machine for every layout, found {torch.cuda.device_count()}")
    output: dict[str, Any] = {"measured": {}, "released_bf16": released_table(teacache=True)}
    print(f"Measured: small random models, {GRID} patch grid, batch 1, float32, {args.steps} CFG steps, TeaCache on")
    print(f"{'layout':9s} {'model':8s} {'collectives in step 0 (rank 0)':52s} {'payload MiB':>11s} {'wire MiB':>10s}")
    ok = True
    for layout, (_, sp) in LAYOUTS.items():
        started = time.perf_counter()
        ranks = measure(layout, args.steps, args.backend)
        output["measured"][layout] = ranks
        for family in ("wan", "hunyuan"):
            agree = not formula_mismatches(layout, family, ranks, args.steps)
            errors = max(rank[family]["max_rel_error_vs_one_process"] for rank in ranks)
            same_skips = all(r[family]["skipped_steps"] == r[family]["skipped_steps_one_process"] for r in ranks)
            ok = ok and agree and same_skips and errors < 1e-5
            first = ranks[0][family]["per_step"][0]  # step 0 always computes
            counts = ", ".join(f"{n} x{c}" for n, c in sorted(first["collectives"].items()))
            skips = "; ".join(f"{n} {s}" for r in ranks[:: max(1, sp)] for n, s in r[family]["skipped_steps"].items())
            print(
                f"{layout:9s} {family:8s} {counts:52s} {_mib(first['payload_bytes']):>11s} {_mib(first['wire_bytes'])}"
                f"  formula {'agrees' if agree else 'DISAGREES'} on every step; max rel error vs 1 process "
                f"{errors:.1e}; skipped steps {'as 1 process' if same_skips else 'DIFFER'} ({skips}); "
                f"{ranks[0][family]['seconds_per_step'] * 1000:.0f} ms/step"
            )
        output["measured"][layout + "_seconds"] = time.perf_counter() - started
    print(
        "\nPredicted per computed denoising step after skipped ones (CFG on) and rank, bfloat16, batch 1, TeaCache on "
        "(its fit monitor adds two 12-byte all-reduces): a step TeaCache skips keeps only the output gather and the "
        "12-byte all-reduce"
    )
    print(f"{'model':30s} {'layout':10s} {'collectives per step':56s} {'payload MiB':>11s} {'wire MiB':>10s}")
    for row in output["released_bf16"]:
        layout = ("cfg2 x " if row["cfg"] else "") + f"sp{row['sp']}"
        counts = ", ".join(f"{n} x{c}" for n, c in sorted(row["collectives"].items()))
        print(f"{row['model']:30s} {layout:10s} {counts:56s} {_mib(row['payload_bytes'])} {_mib(row['wire_bytes'])}")
    print(
        "\nScaling: not measured here (no machine with several GPUs); on the CPU the per-step times only show that "
        "no rank stalls."
    )
    if args.json is not None:
        args.json.write_text(json.dumps(output, indent=2, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
