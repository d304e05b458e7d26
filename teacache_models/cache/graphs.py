"""The TeaCache decision helpers, kept out of torch.compile graphs.

The decision reads and writes Python state (step index, branch, accumulator) and syncs for one float, so
it stays out of graphs, and a compiled model traces the block stack once per path (computed or skipped)
instead of recompiling at every step. A method marked `@outside_graphs` is called through
`outside_graphs_call(name)`: once torch.compile is in use (`prepare_for_compile`), that is the method
wrapped with `torch.compiler.disable`. The wrappers are made lazily because importing the compiler
costs seconds that eager runs never need.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["outside_graphs", "outside_graphs_call", "prepare_for_compile"]

_EAGER: dict[str, Callable[..., Any]] = {}
_DISABLED: dict[str, Callable[..., Any]] = {}


def outside_graphs(method: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a decision helper (a function of the model) to run outside compiled graphs."""
    assert method.__name__ not in _EAGER, f"two decision helpers are named {method.__name__}"
    _EAGER[method.__name__] = method
    return method


def prepare_for_compile() -> None:
    """Wrap the marked helpers with `torch.compiler.disable`, once, when the compiler has been imported."""
    if not _DISABLED and "torch._dynamo" in sys.modules:
        for name, method in _EAGER.items():
            _DISABLED[name] = torch.compiler.disable(method)


def outside_graphs_call(name: str) -> Callable[..., Any]:
    """The marked helper `name`, to be called with the model as its first argument."""
    return _DISABLED.get(name) or _EAGER[name]
