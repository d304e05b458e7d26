"""Helpers shared by the test modules: random weights, relative comparison, and the uncached loop."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str) -> ModuleType:
    """Import `scripts/<name>.py` as a module, as its tests call its functions."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter and persistent floating buffer with seeded normal noise.

    Zero-initialised layers are randomised too, so they cannot hide a wiring mistake. Non-persistent
    buffers (precomputed RoPE tables) are derived data, not weights, and keep their values.
    """
    generator = torch.Generator().manual_seed(seed)
    persistent = {id(t) for t in module.state_dict(keep_vars=True).values()}
    buffers = [b for b in module.buffers() if b.is_floating_point() and id(b) in persistent]
    with torch.no_grad():
        for tensor in list(module.parameters()) + buffers:
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std)
    return module


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to the output scale max |expected|."""
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.float() - expected.float()).abs().max() / scale).item()


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), "the reference output is not finite"
    error = max_rel_error(actual, expected)
    assert error <= tol, f"max abs difference is {error:.3g} of the output scale (tolerance {tol:g})"


def assert_identical(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical outputs, as the project claims for float32 on PyTorch's kernels: equality, no tolerance."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    assert torch.isfinite(expected).all(), "the reference output is not finite"
    if not torch.equal(actual, expected):
        raise AssertionError(
            f"not bit-identical: max difference {max_rel_error(actual, expected):.3g} of the output scale"
        )


def load_both_ways(ours: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Check that the two state dicts have the same keys and shapes by loading strictly in both directions."""
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(ours.state_dict(), strict=True)


def run_steps(
    model: torch.nn.Module,
    call: Callable[[int, bool], torch.Tensor],
    num_steps: int,
    branches: tuple[bool, ...] = (False,),
) -> dict[bool, list[torch.Tensor]]:
    """Call `call(step, is_negative)` inside `teacache_step` for every step and branch, in that order."""
    outputs: dict[bool, list[torch.Tensor]] = {b: [] for b in branches}
    for step in range(num_steps):
        for negative in branches:
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=negative):
                outputs[negative].append(call(step, negative))
    return outputs


def check_linear_kernels(
    ours: torch.nn.Module, reference: torch.nn.Module, run: Callable[[torch.nn.Module], torch.Tensor]
) -> None:
    """Our model on oneDNN linear layers matches diffusers to float32 rounding with the same state_dict keys,
    and switching back to PyTorch's kernel gives diffusers' output exactly again."""
    from teacache_models.layers.linear import onednn_available

    if not onednn_available():
        import pytest

        pytest.skip("this PyTorch build has no oneDNN")
    expected = run(reference)
    keys = list(ours.state_dict())
    assert ours.set_linear_kernel("onednn") is ours and ours.linear_kernel == "onednn"
    assert list(ours.state_dict()) == keys
    assert_parity(run(ours), expected)
    ours.set_linear_kernel("aten")
    assert ours.linear_kernel == "aten"
    assert torch.equal(run(ours), expected)


def zoo_fit(entry: str, indicator: str = "modulated_input") -> tuple[float, ...]:
    """The rescaling polynomial the model-zoo entry `entry` holds for `indicator`."""
    from teacache_models.zoo import load_zoo_entry

    return load_zoo_entry(entry).fits[indicator].coefficients
