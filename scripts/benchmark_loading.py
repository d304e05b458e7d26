"""Peak memory of loading a sharded checkpoint: peak RSS / checkpoint bytes (target <= 1.3).

Writes a diffusers-layout sharded checkpoint of a medium Flux transformer (about 400 MB in bfloat16,
100 MB shards) to a temporary folder, loads it with `load_transformer` in a fresh subprocess, and
reports the rise of resident memory during the load (peak RSS minus the RSS just before it: the
interpreter and torch themselves are not the loader's) over the checkpoint's bytes, plus the raw peak.
The peak is the kernel's high-water mark (VmHWM), reset just before loading.

Then, in the same process, it loads a LoRA (rank `--lora-rank` on every linear layer of the blocks, in the
checkpoint's dtype, in the layout `save_lora_weights` writes) with `load_lora_adapter` and reports the rise of
resident memory it causes, held and at peak, over the adapter's own bytes (target: the adapter's size). PEFT
is imported before (its import, once per process, is reported apart).

    python scripts/benchmark_loading.py [--dtype bfloat16] [--lora-rank 16] [--output outputs/benchmark_loading.json]
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


def write_lora(path: Path, dtype: torch.dtype, rank: int) -> int:
    """A random LoRA on every linear layer of the blocks; returns its tensor bytes."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = FluxTransformer2DModel(**CONFIG)
    generator = torch.Generator().manual_seed(1)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "transformer_blocks" in name:
            a = torch.randn(rank, module.in_features, generator=generator) * 0.01
            b = torch.randn(module.out_features, rank, generator=generator) * 0.01
            state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = a, b
    state = {k: v.to(dtype) for k, v in state.items()}
    save_file(state, str(path))
    return sum(t.numel() * t.element_size() for t in state.values())


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(folder: Path, dtype: str, lora: Path | None) -> None:
    """Runs in a fresh process: load once (then the LoRA), print the memory figures as JSON."""
    from teacache_models.weights import load_transformer

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    model = load_transformer(folder, FluxTransformer2DModel, subfolder=None, torch_dtype=dtype)
    seconds = time.perf_counter() - start
    peak, after = _status("VmHWM"), _status("VmRSS")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    figures = dict(rss_before=before, peak_rss=peak, rss_after=after, model_bytes=weights, seconds=seconds)
    if lora is not None:
        parameters = sum(p.numel() for p in model.parameters())
        # Importing PEFT (and what it imports) is a one-time cost of the process, not of the adapter: measured apart.
        before_import = _status("VmRSS")
        import peft.tuners.lora  # noqa: F401

        imported = _status("VmRSS") - before_import
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
        model.load_lora_adapter(lora)
        peak, after = _status("VmHWM"), _status("VmRSS")
        added = sum(p.numel() * p.element_size() for p in model.parameters()) - parameters * model.dtype.itemsize
        figures["lora"] = dict(
            rss_before=before, peak_rss=peak, rss_after=after, parameter_bytes_added=added, peft_import_rss=imported
        )
    print(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--output", type=Path, default=Path("outputs/benchmark_loading.json"))
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the LoRA loaded after the model (0: none)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-lora", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.dtype, args.child_lora)
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("this benchmark reads Linux's /proc/self/status and needs /proc/self/clear_refs")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint_bytes = write_checkpoint(folder, getattr(torch, args.dtype), args.shard_size)
        shards = len(list(folder.glob("*.safetensors")))
        command = [sys.executable, __file__, "--child", str(folder), "--dtype", args.dtype]
        lora_bytes = 0
        if args.lora_rank > 0:
            lora = Path(tmp) / "lora" / "pytorch_lora_weights.safetensors"
            lora.parent.mkdir()
            lora_bytes = write_lora(lora, getattr(torch, args.dtype), args.lora_rank)
            command += ["--child-lora", str(lora)]
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
    if "lora" in result:
        figures = result["lora"]
        held = (figures["rss_after"] - figures["rss_before"]) / lora_bytes
        peak = (figures["peak_rss"] - figures["rss_before"]) / lora_bytes
        report["lora"] = dict(
            figures,
            rank=args.lora_rank,
            lora_bytes=lora_bytes,
            rss_held_over_lora=held,
            peak_rss_rise_over_lora=peak,
            parameters_added_over_lora=figures["parameter_bytes_added"] / lora_bytes,
        )
        print(
            f"LoRA rank {args.lora_rank}, {lora_bytes / mb:.1f} MB: parameters added "
            f"{figures['parameter_bytes_added'] / mb:.1f} MB; RSS held {held:.2f}x the adapter, peak rise {peak:.2f}x "
            f"(importing PEFT first: {figures['peft_import_rss'] / mb:.0f} MB, once per process)"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
