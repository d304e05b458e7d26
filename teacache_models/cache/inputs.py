"""The block-stack inputs of a cached call: inputs computed only when the blocks run, and signatures.

A signature holds the shapes, dtypes and devices of the tensors the block stack reads and its plain
values (layouts, lengths): when it changes between steps, the cached residual is stale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Deferred", "inputs_signature", "materialize", "value_signature"]


@dataclass(frozen=True)
class Deferred:
    """A block-stack input computed only when the block stack runs: a skipped step never needs it.

    `compute()` returns the value `forward_blocks` receives; `sources`, the tensors (and plain values,
    such as a layout) it is computed from, stand for it in the check that the block-stack inputs kept
    their shape, dtype and device. The indicator must not read a deferred input.
    """

    compute: Callable[[], Any]
    sources: tuple[Any, ...] = ()


def materialize(block_inputs: dict[str, Any]) -> dict[str, Any]:
    """The block inputs as `forward_blocks` receives them: every `Deferred` computed."""
    return {k: v.compute() if isinstance(v, Deferred) else v for k, v in block_inputs.items()}


def _tensor_signature(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.dtype, tensor.device


def value_signature(value: Any, per_row: bool = False) -> Any:
    """A tensor's shape, dtype and device; a plain value (a layout, a length) itself; containers (and
    dataclasses) item by item.

    `per_row`: the value carries the batch in dim 0 and the signature is one row's (the batch size left out).
    """
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape[1:]), value.dtype, value.device) if per_row else _tensor_signature(value)
    if isinstance(value, Deferred):
        return value_signature(value.sources, per_row)
    if isinstance(value, list | tuple):
        return tuple(value_signature(v, per_row) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return type(value).__name__, *(value_signature(getattr(value, f.name), per_row) for f in fields)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return type(value).__name__


def inputs_signature(hidden_states: torch.Tensor, indicator: torch.Tensor, block_inputs: dict[str, Any]) -> tuple:
    """Shapes, dtypes and devices of everything the block stack reads, and its plain values (layouts, lengths):
    a change means the cache is stale."""
    parts = [_tensor_signature(hidden_states), _tensor_signature(indicator)]
    parts.extend((name, value_signature(value)) for name, value in sorted(block_inputs.items()))
    return tuple(parts)
