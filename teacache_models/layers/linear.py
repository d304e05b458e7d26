"""A choice of matrix-multiply kernel for the linear layers of a model on CPU.

PyTorch runs a float32 `nn.Linear` on CPU through its BLAS (MKL in the official wheels); oneDNN's
inner-product kernel computes the same product, and on some machines it is up to twice as fast for
transformer-sized matrices, on others no faster: which one is faster depends on the processor, the
threads and the BLAS build. The results agree to float32 rounding, not bit for bit (the sums are taken in
another order), so the default stays "aten", PyTorch's own kernel, and "onednn" is chosen explicitly:
`set_linear_kernel(model, "onednn")`, `model.set_linear_kernel("onednn")` or the CLI's `--linear-kernel`.
"auto" (`resolve_linear_kernel`) takes oneDNN only where `onednn_is_faster()`, a short timing of both
kernels on this machine at the current thread count, measures it faster. The verdict is kept on disk
(`linear_kernel_cache_path()`), keyed by processor, PyTorch version and thread count, so that every later
process on the machine takes the same kernel and the same command gives the same bits; delete the file
to measure again.

The choice swaps the class of each plain `nn.Linear` for a subclass with the same parameters, so the
`state_dict`, `isinstance` checks and every other use of the module are unchanged. oneDNN is used only
where it computes the same thing: a float32 CPU input and weight, no gradient wanted, outside
`torch.compile` tracing and outside CPU autocast (which runs PyTorch's product in its lower precision, and which
oneDNN's operator would ignore); anything else takes PyTorch's path.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LINEAR_KERNELS",
    "OneDNNLinear",
    "linear_activation",
    "linear_kernel_cache_path",
    "linear_kernel_of",
    "onednn_available",
    "onednn_is_faster",
    "processor_name",
    "resolve_linear_kernel",
    "set_linear_kernel",
]

LINEAR_KERNELS = ("aten", "onednn")


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch build can run float32 linear layers through oneDNN (checked once, by a call)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, weight, bias = torch.ones(2, 3), torch.ones(4, 3), torch.ones(4)
        out = _onednn_linear(x, weight, bias)
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.equal(out, torch.full((2, 4), 4.0)))


# Activations oneDNN can apply to the product as it is written out: ours -> (its name, its algorithm).
_ONEDNN_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}
_TORCH_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
}


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none", algorithm: str = ""
) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], algorithm)


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.layout != torch.strided:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


class OneDNNLinear(nn.Linear):
    """`nn.Linear` whose float32 CPU inference runs oneDNN's inner-product kernel (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _onednn_applies(x, self.weight):
            return _onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def linear_activation(layer: nn.Linear, x: torch.Tensor, activation: str) -> torch.Tensor:
    """`activation(layer(x))` for "gelu", "gelu_tanh" or "silu"; on the oneDNN kernel, in one pass."""
    if type(layer) is OneDNNLinear and _onednn_applies(x, layer.weight):
        return _onednn_linear(x, layer.weight, layer.bias, *_ONEDNN_ACTIVATIONS[activation])
    return _TORCH_ACTIVATIONS[activation](layer(x))


_CLASS_OF_KERNEL: dict[str, type[nn.Linear]] = {"aten": nn.Linear, "onednn": OneDNNLinear}


def set_linear_kernel(module: nn.Module, kernel: str) -> int:
    """Run every plain `nn.Linear` inside `module` on `kernel` ("aten" or "onednn"); returns how many.

    Raises ValueError for another name and RuntimeError for "onednn" where this PyTorch build lacks it.
    """
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear kernel must be one of {list(LINEAR_KERNELS)}, got {kernel!r}")
    if kernel == "onednn" and not onednn_available():
        raise RuntimeError(
            "linear kernel 'onednn' needs a PyTorch build with oneDNN (torch.backends.mkldnn), which this one "
            "lacks; use 'aten'"
        )
    target = _CLASS_OF_KERNEL[kernel]
    swapped = 0
    for child in module.modules():
        if type(child) in _CLASS_OF_KERNEL.values():
            child.__class__ = target
            swapped += 1
    return swapped


def linear_kernel_of(module: nn.Module) -> str | None:
    """The kernel of the linear layers inside `module`: "aten", "onednn", or None if none or mixed."""
    kinds = {type(child) for child in module.modules() if type(child) in _CLASS_OF_KERNEL.values()}
    if len(kinds) != 1:
        return None
    return "onednn" if kinds == {OneDNNLinear} else "aten"


# The check's product: a transformer-sized projection, (tokens, width) @ (width, 2 x width), about 0.5 GFLOP.
_CHECK_SHAPE = (128, 1024, 2048)
_CHECK_REPEATS = 5
# oneDNN must beat PyTorch's kernel by this factor: within it the two are a tie, and "aten" is bit-identical.
_CHECK_MARGIN = 0.95


def onednn_is_faster() -> bool:
    """Whether oneDNN's float32 linear is faster than PyTorch's on this machine at the current thread count.

    Times both kernels on one transformer-sized product, alternating, `_CHECK_REPEATS` times each after a
    warm-up (about a tenth of a second), and compares the medians with a 5% margin. The verdict is stored per
    processor, PyTorch version and thread count in `linear_kernel_cache_path()` and read from there by every
    later process, so the timing runs once per machine and setting.
    """
    return onednn_available() and _timed_check(torch.get_num_threads())


@functools.cache
def _timed_check(threads: int) -> bool:
    key = f"{processor_name()} | torch {torch.__version__} | {threads} threads"
    verdicts = _read_verdicts()
    if isinstance(verdicts.get(key), bool):
        return verdicts[key]
    aten, onednn = measure_linear_kernels()
    faster = onednn < _CHECK_MARGIN * aten
    _write_verdicts({**verdicts, key: faster})
    return faster


# Where the timed verdicts live; TEACACHE_MODELS_CACHE moves the folder (tests point it at a temporary one).
CACHE_ENV = "TEACACHE_MODELS_CACHE"


def linear_kernel_cache_path() -> Path:
    """The file that keeps `onednn_is_faster`'s verdicts: `$TEACACHE_MODELS_CACHE/linear_kernel.json`, by
    default under `$XDG_CACHE_HOME` (else `~/.cache`) in `teacache_models/`."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "teacache_models"
    return Path(folder) / "linear_kernel.json"


def processor_name() -> str:
    """The processor's model name where the system says it (Linux), else its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_verdicts() -> dict:
    """The stored verdicts; an absent or unreadable file is an empty store (the check then runs again)."""
    try:
        verdicts = json.loads(linear_kernel_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return verdicts if isinstance(verdicts, dict) else {}


def _write_verdicts(verdicts: dict) -> None:
    """Stores the verdicts through a temporary file and a rename; where the folder is not writable the
    verdict stays with this process only."""
    path = linear_kernel_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(verdicts, indent=1, sort_keys=True))
        partial.replace(path)
    except OSError:
        pass


def measure_linear_kernels() -> tuple[float, float]:
    """Median seconds of one float32 product on PyTorch's kernel and on oneDNN's, timed alternately."""
    import statistics
    import time

    tokens, width, out = _CHECK_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=generator)
    weight, bias = torch.randn(out, width, generator=generator), torch.randn(out, generator=generator)
    kernels = {"aten": lambda: F.linear(x, weight, bias), "onednn": lambda: _onednn_linear(x, weight, bias)}
    times: dict[str, list[float]] = {"aten": [], "onednn": []}
    with torch.no_grad():
        for run in kernels.values():  # warm-up: first calls allocate and pick their code paths
            run()
        for _ in range(_CHECK_REPEATS):
            for name, run in kernels.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    return statistics.median(times["aten"]), statistics.median(times["onednn"])


def resolve_linear_kernel(kernel: str, device: torch.device | str, dtype: torch.dtype | str) -> str:
    """`kernel`, or for "auto": "onednn" for float32 on a CPU where this build has it and a short timing
    (`onednn_is_faster`, cached) measures it faster than PyTorch's kernel, else "aten".

    Raises ValueError for an unknown name, and for "onednn" asked for another device or dtype (where it
    would silently do nothing)."""
    on_cpu = torch.device(device).type == "cpu"
    is_float32 = dtype in (torch.float32, "float32")
    if kernel == "auto":
        return "onednn" if on_cpu and is_float32 and onednn_is_faster() else "aten"
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear kernel must be 'auto' or one of {list(LINEAR_KERNELS)}, got {kernel!r}")
    if kernel == "onednn" and not (on_cpu and is_float32):
        raise ValueError(
            f"linear kernel 'onednn' runs float32 on a CPU; this run is {dtype} on {device}: use 'aten' or 'auto'"
        )
    return kernel
