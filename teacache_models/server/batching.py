"""Step-level continuous batching: requests of one shape share a running batch, joining and leaving at step
boundaries.

Each request keeps its own latents, scheduler, timesteps, step count and TeaCache state
(`TeaCacheMixin.new_teacache_row`); at every step the running requests are stacked into one batch, each
row at its own timestep and step index, and the transformer runs its block stack only on the rows whose
TeaCache decides to compute. A finished request leaves after its last step; a cancelled one leaves at
once. Requests whose latents, conditioning or CFG differ are kept in separate batches, never mixed: a
batch of another shape waits until the running one has emptied.

This needs a pipeline that takes one timestep per sample and one transformer for every step
(`Pipeline.per_sample_timesteps`): the pixel-space demo pipelines. The other families (their pipelines
pass one timestep to the whole batch, and Wan2.2 switches experts by timestep) are refused by
`ContinuousBatcher`; the server runs their requests one at a time.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..params import SamplingParams

__all__ = ["BatchRequest", "ContinuousBatcher"]

_MAX_SEED = 2**64 - 1


@dataclass(eq=False)
class BatchRequest:
    """One prompt's generation inside a `ContinuousBatcher`: what was asked, and how far it got.

    `result` (a `PipelineResult` of one image) is set when the request has finished; `finished_at` and
    `steps_done` say when and how far.
    """

    prompt: str
    params: SamplingParams
    submitted_at: float = field(default_factory=time.perf_counter)
    steps_done: int = 0
    result: Any = None
    cancelled: bool = False
    finished_at: float | None = None
    # Seconds of the request's own work: preparing it (text encoding, noise, schedule) and decoding.
    timings: dict[str, float] = field(default_factory=dict)
    # The batcher's state of the request.
    _key: Hashable = None
    _latents: torch.Tensor | None = None
    _scheduler: Any = None
    _timesteps: torch.Tensor | None = None
    _condition: Any = None
    _negative: Any = None
    _row: Any = None
    _indicator: str | None = None  # the TeaCache indicator, None without the cache
    _seed: int = 0
    _joined_at: float = 0.0

    @property
    def finished(self) -> bool:
        return self.result is not None or self.cancelled


class ContinuousBatcher:
    """Runs the requests given to `submit` on `pipe`, one denoising step of the running batch per `step()`.

    Args:
        pipe: a pipeline with `per_sample_timesteps` (the demo pipelines).
        max_batch: the most requests in the running batch; more wait for a free row.
        join_running: a waiting request joins a running batch at the next step (continuous batching);
            False admits requests only when the running batch has emptied (static batches).
    """

    @staticmethod
    def can_batch(pipe: Any) -> bool:
        """Whether `pipe` can batch requests step by step: one timestep per sample, one transformer, and a
        transformer that keeps TeaCache state per batch row."""
        transformer = getattr(pipe, "transformer", None)
        return (
            getattr(pipe, "per_sample_timesteps", False)
            and len(pipe.teacache_models()) == 1
            and getattr(transformer, "teacache_row_inputs", None) is not None
        )

    def __init__(self, pipe: Any, max_batch: int = 8, join_running: bool = True) -> None:
        if not self.can_batch(pipe):
            raise ValueError(
                f"{type(pipe).__name__} cannot be batched step by step: its pipeline passes one timestep to the "
                "whole batch (or switches transformers by timestep); run its requests one at a time"
            )
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not isinstance(join_running, bool):
            raise ValueError(f"join_running must be True or False, got {join_running!r}")
        self.pipe = pipe
        self.max_batch = max_batch
        self.join_running = join_running
        self.running: list[BatchRequest] = []
        self.waiting: collections.deque[BatchRequest] = collections.deque()
        # Rows that ran the block stack and rows a forward call carried, over every call (both branches).
        self.rows_computed = 0
        self.rows_total = 0
        # The requests the latest step ran.
        self.last_batch: list[BatchRequest] = []

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def submit(self, prompt: str, params: SamplingParams) -> BatchRequest:
        """Check and prepare a request (prompt encoding, noise, schedule); it joins at the next step boundary."""
        pipe = self.pipe
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        pipe.check_params(params)
        request = BatchRequest(prompt, params)
        started = time.perf_counter()
        request._seed = params.seed if params.seed is not None else random.SystemRandom().randint(0, _MAX_SEED)
        with torch.no_grad():
            request._condition = pipe.encode_prompt([prompt], params)
            if pipe.uses_cfg(params):
                negative = params.negative_prompt
                negative = pipe.default_negative_prompt or "" if negative is None else negative
                request._negative = pipe.encode_prompt([negative], params)
            generator = torch.Generator("cpu").manual_seed(request._seed)
            request._latents = pipe.prepare_latents(1, params, generator)
            request._scheduler = pipe.make_scheduler(params)
            request._timesteps = pipe.make_timesteps(request._scheduler, request._latents, params)
        request.timings["text_encoding"] = time.perf_counter() - started
        request._row = pipe.transformer.new_teacache_row(params.teacache_params, len(request._timesteps))
        request._key = _batch_key(request)
        if params.teacache_params is not None:
            request._indicator = pipe.transformer.teacache_indicator_for(params.teacache_params).name
        self.waiting.append(request)
        return request

    def cancel(self, request: BatchRequest) -> None:
        """Drop `request` now, waiting or running; its row leaves the batch before the next step."""
        request.cancelled = True
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def step(self) -> list[BatchRequest]:
        """Admit waiting requests that fit the running batch, run one step of every running request; return
        those that finished with it."""
        self._admit()
        if not self.running:
            return []
        pipe, batch = self.pipe, self.running
        self.last_batch = list(batch)
        transformer = pipe.transformer
        latents = torch.cat([r._latents for r in batch])  # (B, C, F, H, W)
        t = torch.stack([r._timesteps[r.steps_done] for r in batch])  # (B,): each request's own timestep
        rows, steps = [r._row for r in batch], [r.steps_done for r in batch]
        with torch.no_grad():
            with transformer.teacache_rows_step(rows, steps, is_cfg_negative=False):
                positive = pipe.predict(transformer, latents, t, _joined([r._condition for r in batch]))
            negative = None
            if batch[0]._negative is not None:
                with transformer.teacache_rows_step(rows, steps, is_cfg_negative=True):
                    negative = pipe.predict(transformer, latents, t, _joined([r._negative for r in batch]))
            finished = []
            try:
                for index, request in enumerate(batch):
                    own = slice(index, index + 1)
                    prediction = pipe.guide(
                        positive[own],
                        None if negative is None else negative[own],
                        request.steps_done,
                        t[index],
                        request.params,
                    )
                    request._latents = pipe.step_latents(request._scheduler, prediction, t[index], request._latents)
                    request.steps_done += 1
                    if request.steps_done == len(request._timesteps):
                        self._finish(request)
                        finished.append(request)
            finally:
                # A request that finished before an error is done all the same; the others stay running.
                self.running = [r for r in batch if not r.finished]
        self._count_rows(rows, steps, negative is not None)
        return finished

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while not self.idle:
            self.step()

    def _admit(self) -> None:
        """Waiting requests join in arrival order while they fit: the first that does not (another shape or
        TeaCache indicator, or no free row) stops the admission, so that none waits behind later arrivals for
        ever; it starts the next batch once this one has emptied."""
        if self.running and not self.join_running:
            return
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting[0]
            if self.running and not self._fits(request):
                return
            request = self.waiting.popleft()
            request._joined_at = time.perf_counter()
            self.running.append(request)

    def _fits(self, request: BatchRequest) -> bool:
        # The model computes the TeaCache indicator once for the whole batch: one indicator per batch.
        indicators = {r._indicator for r in self.running} - {None}
        clash = request._indicator is not None and indicators and request._indicator not in indicators
        return request._key == self.running[0]._key and not clash

    def _finish(self, request: BatchRequest) -> None:
        from ..pipelines.base import PipelineResult

        started = time.perf_counter()
        pixels = self.pipe.decode(request._latents, request.params).float().cpu()
        finished = time.perf_counter()
        request.timings["denoising"] = started - request._joined_at
        request.timings["decoding"] = finished - started
        video = self.pipe.is_video
        request.result = PipelineResult(
            images=None if video else pixels,
            frames=pixels if video else None,
            seed=request._seed,
            sampling_params=request.params,
            timings={**request.timings, "total": finished - request.submitted_at},
            teacache_stats=self._stats(request),
            prompt=[request.prompt],
        )
        request.finished_at = finished
        request._latents = request._row = request._condition = request._negative = None

    def _stats(self, request: BatchRequest) -> Any:
        """The request's TeaCache record, as its run alone reports it (without the cache: the steps run)."""
        if request.params.teacache_params is not None:
            return self.pipe.transformer.teacache_row_stats(request._row)
        from ..cache import TeaCacheStats
        from ..cache.state import BranchStats

        branches = request._row.branches
        return TeaCacheStats(
            num_inference_steps=len(request._timesteps),
            positive=BranchStats(tuple(branches[False].computed_steps)),
            negative=BranchStats(tuple(branches[True].computed_steps)),
        )

    def _count_rows(self, rows: list[Any], steps: list[int], with_negative: bool) -> None:
        for negative in (False, True) if with_negative else (False,):
            for row, step in zip(rows, steps, strict=True):
                self.rows_total += 1
                self.rows_computed += step in row.branches[negative].computed_steps if row is not None else 1


def _batch_key(request: BatchRequest) -> Hashable:
    """What requests sharing a batch must agree on: latent shape and dtype, conditioning shapes, CFG."""

    def shapes(condition: Any) -> Hashable:
        if condition is None:
            return None
        return tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in condition.tensors.items()))

    latents = request._latents
    return tuple(latents.shape[1:]), latents.dtype, shapes(request._condition), shapes(request._negative)


def _joined(conditions: list[Any]) -> Any:
    from ..pipelines.base import Conditioning

    return Conditioning({k: torch.cat([c.tensors[k] for c in conditions]) for k in conditions[0].tensors})
