"""Peak memory of loading a sharded checkpoint: peak RSS / checkpoint bytes (target <= 1.3).

Writes a diffusers-layout sharded checkpoint of a medium Flux transformer (about 400 MB in bfloat16,
100 MB shards) to a temporary folder, loads it with `load_transformer` in a fresh subprocess, and
reports the rise of resident memory during the load (peak RSS minus the RSS just before it: the
interpreter and torch themselves are not the loader's) over the checkpoint's bytes, plus the raw peak.
The peak is the kernel's high-water mark (VmHWM), reset just before loading.

    python scripts/benchmark_loading.py [--dtype bfloat16] [--output outputs/benchmark_loading.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from teacache_models.models import FluxTransformer2DModel

# About 207M parameters: 3 dual-stream and 6 single-stream blocks, 1024 wide.
CONFIG = dict(
    in_channels=64,
    num_layers=3,
    num_single_layers=6,
    attention_head_dim=128,
    num_attention_heads=8,
    joint_attention_dim=1024,
    pooled_projection_dim=256,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TARGET = 1.3


def write_checkpoint(folder: Path, dtype: torch.dtype, shard_size: str) -> int:
    """Random weights in diffusers' layout (config.json, shards, index); returns the tensor bytes."""
    from huggingface_hub import save_torch_state_dict

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxTransformer2DModel(**CONFIG).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=generator) * 0.02).to(dtype) for k, s in shapes.items()}
    save_torch_state_dict(
        state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size=shard_size
    )
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **CONFIG}))
    return sum(t.numel() * t.element_size() for t in state.values())


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(folder: Path, dtype: str) -> None:
    """Runs in a fresh process: load once, print the memory figures as JSON."""
    from teacache_models.weights import load_transformer

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    model = load_transformer(folder, FluxTransformer2DModel, subfolder=None, torch_dtype=dtype)
    seconds = time.perf_counter() - start
    peak, after = _status("VmHWM"), _status("VmRSS")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps(dict(rss_before=before, peak_rss=peak, rss_after=after, model_bytes=weights, seconds=seconds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark_loading.json"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.dtype)
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("this benchmark reads Linux's /proc/self/status and needs /proc/self/clear_refs")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint_bytes = write_checkpoint(folder, getattr(torch, args.dtype), args.shard_size)
        shards = len(list(folder.glob("*.safetensors")))
        command = [sys.executable, __file__, "--child", str(folder), "--dtype", args.dtype]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    ratio = (result["peak_rss"] - result["rss_before"]) / checkpoint_bytes
    report = dict(
        config=CONFIG,
        dtype=args.dtype,
        shards=shards,
        checkpoint_bytes=checkpoint_bytes,
        peak_rss_rise_over_checkpoint=ratio,
        peak_rss_over_checkpoint=result["peak_rss"] / checkpoint_bytes,
        target=TARGET,
        **result,
    )
    mb = 1e6
    print(
        f"checkpoint {checkpoint_bytes / mb:.0f} MB in {shards} shards ({args.dtype}); RSS before load "
        f"{result['rss_before'] / mb:.0f} MB, peak {result['peak_rss'] / mb:.0f} MB, load {result['seconds']:.2f} s"
    )
    print(f"peak RSS rise / checkpoint bytes = {ratio:.3f} (target <= {TARGET}) {'OK' if ratio <= TARGET else 'OVER'}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
