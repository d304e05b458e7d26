"""Serving throughput: requests one at a time, as static batches, and batched step by step.

A fixed arrival pattern of `--requests` requests (request i arrives `i * --arrival-interval` seconds after
the start) with mixed prompts and TeaCache thresholds is served three ways on one pipeline, in one process:

1. one at a time: each request alone (`pipe(prompt, params)`), in arrival order;
2. static batches: the requests waiting when the previous batch ends, up to `--concurrency`, run together
   to the end of the longest (per-sample TeaCache state, `ContinuousBatcher` without joining);
3. continuous: a request joins the running batch at the next step boundary, a finished one leaves at once
   (`ContinuousBatcher`, at most `--concurrency` rows).

Reported per mode: throughput (images per minute over the whole run), latency p50 / p95 (arrival to
result), the share of the run the server sat idle waiting for the next arrival (a mode that idles is bounded
by the arrival pattern, not by its capacity: `--arrival-interval 0` offers every request at once), the
fraction of block-stack rows computed (rows a forward call ran through the blocks / rows it carried, both CFG
branches), the speedup of the mode's throughput over one at a time, and the largest
difference of any output from its run alone (the one-at-a-time output) with whether every TeaCache
schedule equals its solo schedule. `--repeats` runs the whole comparison several times, modes
interleaved, and prints every repeat's throughput, so the spread on a shared machine shows.

    python scripts/benchmark_serving.py [--model flux-digits|wan-digits|flux-medium] [--requests 16]
        [--concurrency 8] [--steps 20] [--arrival-interval 0.05] [--repeats 3] [--threads 2] [--json out.json]
        [--device cpu|cuda|cuda:N] [--profile]

`--device` (default: cuda where there is one, else cpu) puts the pipeline there; on a GPU the run waits for
the device after every request and every batch step, so the run times include the device's queued work.

`--profile` then runs one-at-a-time and continuous once more under cProfile and prints where the time went:
the block stack, TeaCache's decisions and bookkeeping, gathering the computing rows and scattering them back,
the transformer outside its blocks (embeddings, head), guidance and scheduler steps, text encoding, decoding
and the rest (batch assembly, Python glue). cProfile slows Python code more than kernels: read the shares,
not the seconds.

After the modes the script measures the ceiling of batching on this device: the transformer's forward (every
block, TeaCache off) on one request's inputs and on a batch of `--concurrency` requests' inputs (taken from a run
in which every row computes), timed back to back `--repeats` times. Its per-row speedup, rows x (one row's time)
/ (the batch's time), bounds what any batching of this model can gain here without changing the outputs: the
modes above batch exactly these calls and add their own bookkeeping.

`flux-medium` is a randomly initialised Flux transformer of medium width (4 dual + 8 single blocks, 8
heads x 64) on the Flux demo's text encoder and pixel space, 32x32: the forward costs what a medium model
costs on this CPU; its outputs are noise, and its TeaCache uses the demo's coefficients.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from teacache_models import SamplingParams
from teacache_models.pipelines import load_pipeline
from teacache_models.server.batching import ContinuousBatcher
from teacache_models.weights.loading import resolve_device

PROMPTS = ("a digit 3", "seven", "the digit 0", "a handwritten 5", "nine", "a digit 1", "two", "an 8")
THRESHOLDS = (0.2, 0.36, 0.0, 0.3)


def medium_flux_pipeline(device: torch.device) -> object:
    from teacache_models.models import FluxTransformer2DModel
    from teacache_models.pipelines.demo import FluxDigitsPipeline

    demo = load_pipeline("flux-digits")
    config = demo.transformer.config
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        in_channels=config.in_channels,
        num_layers=4,
        num_single_layers=8,
        attention_head_dim=64,
        num_attention_heads=8,
        joint_attention_dim=config.joint_attention_dim,
        pooled_projection_dim=config.pooled_projection_dim,
        guidance_embeds=config.guidance_embeds,
        axes_dims_rope=(16, 24, 24),
    ).eval()
    transformer.set_teacache_fits(demo.transformer.teacache_rescaling_fits)
    text_encoder = demo.text_encoder.to(device)
    return FluxDigitsPipeline(transformer.to(device), text_encoder=text_encoder, zoo_entry=demo.zoo_entry)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a time read next includes it (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_requests(pipe: object, count: int, steps: int, size: int) -> list[tuple[str, SamplingParams]]:
    base = pipe.default_sampling_params(height=size, width=size, num_inference_steps=steps)
    requests = []
    for i in range(count):
        cache = dataclasses.replace(base.teacache_params, teacache_thresh=THRESHOLDS[i % len(THRESHOLDS)])
        params = dataclasses.replace(base, teacache_params=cache, seed=i)
        requests.append((PROMPTS[i % len(PROMPTS)], params))
    return requests


def wait_until(start: float, arrival: float) -> float:
    """Sleep until `arrival` seconds after `start`; the seconds waited (the server idle, nothing to serve)."""
    began = time.perf_counter()
    while time.perf_counter() - start < arrival:
        time.sleep(0.001)
    return time.perf_counter() - began


def one_at_a_time(pipe, requests, arrivals):
    start = time.perf_counter()
    results, latencies, computed, total, idle = [], [], 0, 0, 0.0
    for (prompt, params), arrival in zip(requests, arrivals, strict=True):
        idle += wait_until(start, arrival)
        result = pipe(prompt, params)
        synchronize(pipe.device)
        results.append(result)
        latencies.append(time.perf_counter() - start - arrival)
        stats = result.teacache_stats
        computed += stats.num_computed
        total += stats.num_computed + stats.num_skipped
    return time.perf_counter() - start, results, latencies, computed / total, idle


def batched(pipe, requests, arrivals, concurrency, continuous):
    batcher = ContinuousBatcher(pipe, max_batch=concurrency, join_running=continuous)
    start = time.perf_counter()
    submitted, order, idle = 0, [], 0.0
    while submitted < len(requests) or not batcher.idle:
        now = time.perf_counter() - start
        while submitted < len(requests) and arrivals[submitted] <= now:
            order.append(batcher.submit(*requests[submitted]))
            order[-1].submitted_at = start + arrivals[submitted]
            submitted += 1
        if batcher.idle:
            idle += wait_until(start, arrivals[submitted])
            continue
        batcher.step()
        synchronize(pipe.device)
    elapsed = time.perf_counter() - start
    latencies = [r.finished_at - r.submitted_at for r in order]
    fraction = batcher.rows_computed / batcher.rows_total
    return elapsed, [r.result for r in order], latencies, fraction, idle


def capture_first_call(pipe, run) -> tuple[tuple, dict]:
    """The positional and keyword arguments of the first transformer call that `run()` makes."""
    transformer, calls = pipe.transformer, []
    forward = transformer.forward

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return forward(*args, **kwargs)

    transformer.forward = spy
    try:
        run()
    finally:
        del transformer.forward
    return calls[0]


def time_call(pipe, call) -> float:
    """Seconds per transformer forward on `call`'s arguments (TeaCache off), over about half a second of calls."""
    args, kwargs = call
    pipe.transformer.disable_teacache()
    with torch.no_grad():
        start = time.perf_counter()
        pipe.transformer(*args, **kwargs)  # warm-up, and how many calls fill half a second
        synchronize(pipe.device)
        count = max(2, min(500, int(0.5 / (time.perf_counter() - start))))
        start = time.perf_counter()
        for _ in range(count):
            pipe.transformer(*args, **kwargs)
        synchronize(pipe.device)
    return (time.perf_counter() - start) / count


def batching_ceiling(pipe, requests, concurrency: int, repeats: int) -> dict:
    """One row's forward against `concurrency` rows' forward: the most batching can gain on this device."""
    computing = [
        (
            prompt,
            dataclasses.replace(
                params, teacache_params=dataclasses.replace(params.teacache_params, teacache_thresh=0.0)
            ),
        )
        for prompt, params in requests[:concurrency]
    ]
    solo = capture_first_call(pipe, lambda: pipe(*computing[0]))
    batch = capture_first_call(pipe, lambda: batched(pipe, computing, [0.0] * len(computing), concurrency, True))
    rows = _rows(batch)
    measured = []
    for _ in range(repeats):
        one = time_call(pipe, solo)
        many = time_call(pipe, batch)
        measured.append(dict(one_row_s=one, batch_s=many, ceiling=rows * one / many))
    ceiling = statistics.median(m["ceiling"] for m in measured)
    each = ", ".join(f"{m['ceiling']:.2f}x" for m in measured)
    print(
        f"\nceiling of batching here: the transformer's forward on 1 row {measured[-1]['one_row_s'] * 1e3:.1f} ms, "
        f"on {rows} rows {measured[-1]['batch_s'] * 1e3:.1f} ms (last repeat); per-row speedup {ceiling:.2f}x "
        f"(median; each repeat {each})"
    )
    return dict(rows=rows, ceiling=ceiling, repeats=measured)


def _rows(call) -> int:
    args, kwargs = call
    return (args[0] if args else kwargs["hidden_states"]).shape[0]


def compare(results, solo):
    worst = max(float((a.images - b.images).abs().max()) for a, b in zip(results, solo, strict=True))
    same = all(a.teacache_stats.rows == () and _same(a, b) for a, b in zip(results, solo, strict=True))
    return worst, same


def _same(result, solo) -> bool:
    mine, theirs = result.teacache_stats, solo.teacache_stats
    return mine.positive == theirs.positive and mine.negative == theirs.negative


# Parts of a run, each the cumulative time of the named functions of teacache_models (`profile_parts`).
PARTS = {
    "block stack": ("forward_blocks",),
    "TeaCache decisions": ("_teacache_plan",),
    "TeaCache bookkeeping": ("_teacache_record", "_teacache_notify", "_teacache_record_rows", "_teacache_notify_rows"),
    "gather / scatter rows": ("_run_rows",),
    "transformer outside the blocks": ("predict",),
    "guidance + scheduler step": ("guide", "step_latents"),
    "text encoding": ("encode_prompt",),
    "noise + schedule": ("prepare_latents", "make_timesteps"),
    "decoding": ("decode",),
}


def profile_parts(run) -> dict[str, float]:
    """Seconds of each of `PARTS` in `run()` under cProfile, and "other" (what is left of the total)."""
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    stats = pstats.Stats(profiler)

    def cumulative(*names: str) -> float:
        return sum(
            entry[3]
            for (path, _, name), entry in stats.stats.items()
            if name in names and "teacache_models" in path.replace("\\", "/")
        )

    parts = {label: cumulative(*names) for label, names in PARTS.items()}
    inside_run_rows = parts["block stack"] if parts["gather / scatter rows"] else 0.0
    bookkeeping_rows = cumulative("_teacache_record_rows", "_teacache_notify_rows")
    parts["gather / scatter rows"] -= inside_run_rows + bookkeeping_rows
    # The transformer call holds the block stack and TeaCache's work; what is left is embeddings and the head.
    parts["transformer outside the blocks"] -= cumulative("run_blocks")
    top = ("transformer outside the blocks", "guidance + scheduler step", "text encoding", "noise + schedule")
    top += ("decoding",)
    parts["other"] = stats.total_tt - sum(parts[label] for label in top) - cumulative("run_blocks")
    parts["total"] = stats.total_tt
    return parts


def print_profile(pipe, requests, arrivals, concurrency) -> dict[str, dict[str, float]]:
    profiles = {
        "one at a time": profile_parts(lambda: one_at_a_time(pipe, requests, arrivals)),
        "continuous": profile_parts(lambda: batched(pipe, requests, arrivals, concurrency, True)),
    }
    print("\nwhere the time went (cProfile, one run each; seconds and share of the run)")
    print("| part | one at a time | continuous |")
    print("|---|---|---|")
    for label in [*PARTS, "other", "total"]:
        cells = [f"{p[label]:.2f} s ({p[label] / p['total']:.0%})" for p in profiles.values()]
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    return profiles


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["flux-digits", "wan-digits", "flux-medium"], default="flux-digits")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--arrival-interval", type=float, default=0.05, help="seconds between arrivals")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    parser.add_argument("--profile", action="store_true", help="then print where the time went (cProfile)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the pipeline runs"
    )
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.arrival_interval < 0:
        parser.error(f"--arrival-interval must be >= 0, got {args.arrival_interval}")
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = medium_flux_pipeline(device) if args.model == "flux-medium" else load_pipeline(args.model, device=device)
    size = 32 if args.model == "flux-medium" else 16
    requests = make_requests(pipe, args.requests, args.steps, size)
    arrivals = [i * args.arrival_interval for i in range(args.requests)]
    pipe(*requests[0])  # warm-up

    runs: dict[str, list[dict]] = {"one at a time": [], "static batches": [], "continuous": []}
    for _ in range(args.repeats):
        elapsed, solo, latencies, fraction, idle = one_at_a_time(pipe, requests, arrivals)
        runs["one at a time"].append(_row(args.requests, elapsed, latencies, fraction, idle, 0.0, True))
        for mode, continuous in (("static batches", False), ("continuous", True)):
            elapsed, results, latencies, fraction, idle = batched(
                pipe, requests, arrivals, args.concurrency, continuous
            )
            runs[mode].append(_row(args.requests, elapsed, latencies, fraction, idle, *compare(results, solo)))

    base = statistics.median(r["images_per_min"] for r in runs["one at a time"])
    print(
        f"{args.model}: {args.requests} requests, {args.steps} steps, arrivals every {args.arrival_interval} s, "
        f"concurrency {args.concurrency}, {torch.get_num_threads()} threads, {args.repeats} repeat(s), on {device}"
    )
    header = (
        "| mode | images/min (median; each repeat) | p50 latency s | p95 latency s | rows computed | speedup "
        "| max diff vs solo | schedules = solo | server idle |"
    )
    print(header)
    print("|" + "---|" * 9)
    summary = {}
    for mode, rows in runs.items():
        throughput = statistics.median(r["images_per_min"] for r in rows)
        each = ", ".join(f"{r['images_per_min']:.1f}" for r in rows)
        summary[mode] = dict(
            images_per_min=throughput,
            p50_s=statistics.median(r["p50_s"] for r in rows),
            p95_s=statistics.median(r["p95_s"] for r in rows),
            rows_computed=statistics.median(r["rows_computed"] for r in rows),
            speedup=throughput / base,
            max_diff=max(r["max_diff"] for r in rows),
            schedules_equal=all(r["schedules_equal"] for r in rows),
            idle_share=statistics.median(r["idle_share"] for r in rows),
            repeats=rows,
        )
        s = summary[mode]
        print(
            f"| {mode} | {throughput:.1f} ({each}) | {s['p50_s']:.2f} | {s['p95_s']:.2f} | "
            f"{s['rows_computed']:.1%} | {s['speedup']:.2f}x | {s['max_diff']:.1e} | {s['schedules_equal']} | "
            f"{s['idle_share']:.0%} |"
        )
    if any(s["idle_share"] > 0.05 for s in summary.values()):
        print(
            "note: a mode whose server idled more than 5% of the run waited for arrivals, so its throughput is "
            "bounded by the arrival pattern, not its capacity; lower --arrival-interval (0 = all at once) to "
            "compare capacities."
        )
    ceiling = batching_ceiling(pipe, requests, args.concurrency, args.repeats)
    summary["continuous"]["share_of_ceiling"] = summary["continuous"]["speedup"] / ceiling["ceiling"]
    profiles = print_profile(pipe, requests, arrivals, args.concurrency) if args.profile else None
    if args.json is not None:
        record = {"args": {k: str(v) for k, v in vars(args).items()}, "modes": summary, "ceiling": ceiling}
        record["profile"] = profiles
        args.json.write_text(json.dumps(record, indent=2))
    return summary


def _row(count, elapsed, latencies, fraction, idle, max_diff, schedules_equal) -> dict:
    return dict(
        images_per_min=count / elapsed * 60,
        idle_share=idle / elapsed,
        p50_s=percentile(latencies, 0.5),
        p95_s=percentile(latencies, 0.95),
        rows_computed=fraction,
        max_diff=max_diff,
        schedules_equal=schedules_equal,
    )


if __name__ == "__main__":
    main()
