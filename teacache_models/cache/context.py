"""`cache_context(name, **fields)`: the hook diffusers' pipelines open around each transformer call.

diffusers 0.42 pipelines name every denoising call ("cond", "uncond", or "cond_uncond" for a call that
batches both CFG branches) and may say where the loop is (`step_index`, `num_inference_steps`,
`timestep`, `sigma`). Here that information drives TeaCache: with TeaCache off the context does
nothing; with it on, the call becomes a `teacache_step` of the named branch, at `step_index` when the
pipeline gives it, else at the step a step source attached to the model reports (see
`teacache_models.integrations.diffusers`), else at the number of earlier calls in the same context
during this generation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["CACHE_CONTEXT_FIELDS", "CacheContextMixin", "StepSource"]

# The fields of diffusers' `CacheContext` besides its name.
CACHE_CONTEXT_FIELDS = frozenset({"step_index", "num_inference_steps", "timestep", "sigma"})
# Context name -> (is_cfg_negative, batched_cfg).
_BRANCHES = {"cond": (False, False), "uncond": (True, False), "cond_uncond": (False, True)}


class StepSource(Protocol):
    """What knows the denoising loop a model runs in (a diffusers pipeline's scheduler, for one)."""

    def begin_call(self, model: Any) -> None:
        """Called before each call of `model`: starts a new generation (`enable_teacache`) when one began."""

    def step_index(self, model: Any) -> int | None:
        """The denoising step of the call about to run, None when unknown."""


class CacheContextMixin:
    """diffusers' `cache_context` for a `TeaCacheMixin` model (which provides `teacache_step`)."""

    def attach_step_source(self, source: StepSource | None) -> None:
        """Let `source` start generations and tell step indices to `cache_context` (None detaches it)."""
        self.__dict__["_teacache_step_source"] = source

    @property
    def step_source(self) -> StepSource | None:
        return self.__dict__.get("_teacache_step_source")

    @contextmanager
    def cache_context(self, name: str, **fields: Any) -> Iterator[None]:
        """The call inside computes the CFG branch `name` ("cond", "uncond"; "cond_uncond" batches both).

        `fields` are those of diffusers' `CacheContext`: `step_index`, `num_inference_steps`, `timestep`,
        `sigma`. With TeaCache off (or inside a `teacache_step` context, which already declares the call)
        nothing happens.
        """
        if not isinstance(name, str):
            raise TypeError(f"cache_context name must be a string such as 'cond' or 'uncond', got {name!r}")
        unknown = sorted(set(fields) - CACHE_CONTEXT_FIELDS)
        if unknown:
            raise TypeError(f"cache_context got unexpected fields {unknown}; it takes {sorted(CACHE_CONTEXT_FIELDS)}")
        source = self.step_source
        if source is not None:
            source.begin_call(self)
        session = self.__dict__.get("_teacache_session")
        if not self.teacache_enabled or self.__dict__.get("_teacache_context") is not None:
            yield
            return
        if name not in _BRANCHES:
            raise ValueError(
                f"cache_context name {name!r} is not a CFG branch TeaCache keeps state for; with TeaCache on, "
                f"use one of {sorted(_BRANCHES)}"
            )
        steps = fields.get("num_inference_steps")
        if steps is not None and steps != session.num_inference_steps:
            raise ValueError(
                f"cache_context says num_inference_steps={steps!r}, but TeaCache was enabled for "
                f"{session.num_inference_steps} steps: call enable_teacache() with the pipeline's step count"
            )
        step = fields.get("step_index")
        if step is None and source is not None:
            step = source.step_index(self)
        if step is None:
            step = self._context_call_count(session, name)
        negative, batched = _BRANCHES[name]
        with self.teacache_step(step, is_cfg_negative=negative, batched_cfg=batched):
            yield

    def _context_call_count(self, session: Any, name: str) -> int:
        """How many calls `name` has had in this generation (then counts this one)."""
        counted = self.__dict__.get("_cache_context_counts")
        if counted is None or counted[0] is not session:
            counted = self.__dict__["_cache_context_counts"] = (session, Counter())
        count = counted[1][name]
        counted[1][name] += 1
        return count
