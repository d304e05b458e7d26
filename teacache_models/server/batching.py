"""Step-level continuous batching: requests of one shape share a running batch, joining and leaving at step
boundaries.

Each request keeps its own latents, scheduler, timesteps, step count and TeaCache state
(`TeaCacheMixin.new_teacache_row`); at every step the running requests are stacked into one batch, and the
transformer runs its block stack only on the rows whose TeaCache decides to compute. A finished request
leaves after its last step; a cancelled one leaves at once. Requests whose latents, conditioning, CFG or
generation state differ are kept in separate batches, never mixed: a batch of another shape waits until the
running one has emptied.

Two modes, by the pipeline:

- One timestep per sample (`Pipeline.per_sample_timesteps`, the pixel-space demo pipelines): each row runs
  at its own timestep and step index, so a request joins a running batch at the next step boundary.
- One timestep per call (every other family: its `predict` gives the whole batch one timestep, as its own
  loop does): only requests at the same step of the same schedule share a call, so requests join a batch
  before its first step, and a request that arrives later waits for the next batch. Their rows still
  decide alone, and leave alone when cancelled.

What a family's `prepare_latents` / `make_timesteps` leave on the pipeline for `predict` to read (Flux's
guidance and image ids, Qwen-Image's image shapes, HunyuanVideo-1.5's condition latents) is kept per
request and joined for each call: a tensor whose first dimension is the request's batch (1), or a list of
one item, is a per-row value and is stacked; any other value must be equal in every request of a batch.

Refused (`can_batch` False; the server runs their requests one at a time): pipelines with more than one
transformer (Wan2.2 A14B's experts), transformers without per-row TeaCache state (Z-Image), and pipelines
whose CFG switches per step (`cfg_at_step`).
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

_MAX_SEED = 2**63 - 1  # as `Pipeline.__call__` draws a seed


@dataclass(eq=False)
class BatchRequest:
    """One prompt's generation inside a `ContinuousBatcher`: what was asked, and how far it got.

    `result` (a `PipelineResult` of one image) is set when the request has finished, or `error` when its last
    step left it nothing to decode (latents overflowed to NaN or inf); `finished_at` and `steps_done` say when
    and how far.
    """

    prompt: str
    params: SamplingParams
    submitted_at: float = field(default_factory=time.perf_counter)
    steps_done: int = 0
    result: Any = None
    error: Exception | None = None
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
    _state: dict[str, Any] = field(default_factory=dict)  # what preparing it left on the pipeline

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None or self.cancelled


class ContinuousBatcher:
    """Runs the requests given to `submit` on `pipe`, one denoising step of the running batch per `step()`.

    Args:
        pipe: a pipeline that `can_batch`: with `per_sample_timesteps` requests join at any step, without it
            only before a batch's first step.
        max_batch: the most requests in the running batch; more wait for a free row.
        join_running: a waiting request joins a running batch at the next step (continuous batching);
            False admits requests only when the running batch has emptied (static batches).
    """

    @staticmethod
    def can_batch(pipe: Any) -> bool:
        """Whether `pipe` can batch requests: one transformer for every step, a transformer that keeps TeaCache
        state per batch row, and CFG on or off for a whole generation."""
        from ..pipelines.base import Pipeline

        if not isinstance(pipe, Pipeline):
            return False
        return (
            len(pipe.teacache_models()) == 1
            and getattr(pipe.transformer, "teacache_row_inputs", None) is not None
            and type(pipe).cfg_at_step is Pipeline.cfg_at_step
        )

    def __init__(self, pipe: Any, max_batch: int = 8, join_running: bool = True) -> None:
        if not self.can_batch(pipe):
            raise ValueError(
                f"{type(pipe).__name__} cannot batch requests: it needs one transformer for every step (not "
                "experts switched by timestep), per-row TeaCache state (teacache_row_inputs) and CFG on or off for "
                "the whole generation; run its requests one at a time"
            )
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not isinstance(join_running, bool):
            raise ValueError(f"join_running must be True or False, got {join_running!r}")
        self.pipe = pipe
        # One timestep per call: only requests at the same step of the same schedule share it.
        self.same_step = not pipe.per_sample_timesteps
        self.max_batch = max_batch
        self.join_running = join_running
        self.running: list[BatchRequest] = []
        self.waiting: collections.deque[BatchRequest] = collections.deque()
        # Rows that ran the block stack and rows a forward call carried, over every call (both branches).
        self.rows_computed = 0
        self.rows_total = 0
        # The requests the latest step ran.
        self.last_batch: list[BatchRequest] = []
        # The pipeline attributes preparing a request has assigned so far (`_generation_state`).
        self._state_names: set[str] = set()

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
        pipe.check_inputs(params)
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
            before = dict(vars(pipe))
            request._latents = pipe.prepare_latents(1, params, generator)
            request._scheduler = pipe.make_scheduler(params)
            request._timesteps = pipe.make_timesteps(request._scheduler, request._latents, params)
            request._state = self._generation_state(before)
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
        # One timestep per call: every row is at the same step of the same schedule.
        t_call = t[0] if self.same_step else t
        rows, steps = [r._row for r in batch], [r.steps_done for r in batch]
        _set_state(pipe, _joined_state([r._state for r in batch]))
        with torch.no_grad():
            with transformer.teacache_rows_step(rows, steps, is_cfg_negative=False):
                positive = pipe.predict(transformer, latents, t_call, _joined([r._condition for r in batch]))
            negative = None
            if batch[0]._negative is not None:
                with transformer.teacache_rows_step(rows, steps, is_cfg_negative=True):
                    negative = pipe.predict(transformer, latents, t_call, _joined([r._negative for r in batch]))
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
        first = self.running[0]
        if request._key != first._key or not _shared_state_equal(request._state, first._state):
            return False
        if not _shared_state_equal(request._condition.tensors, first._condition.tensors):
            return False
        if request._negative is not None and not _shared_state_equal(
            request._negative.tensors, first._negative.tensors
        ):
            return False
        if self.same_step and (first.steps_done or not torch.equal(request._timesteps, first._timesteps)):
            return False
        # The model computes the TeaCache indicator once for the whole batch: one indicator per batch.
        indicators = {r._indicator for r in self.running} - {None}
        return request._indicator is None or not indicators or request._indicator in indicators

    def _finish(self, request: BatchRequest) -> None:
        from ..pipelines.base import PipelineResult, check_finite_latents

        started = time.perf_counter()
        try:
            check_finite_latents(request._latents, request.params, self.pipe.dtype)
        except ValueError as error:  # this request's own input: it fails alone, the batch goes on
            request.error, request.finished_at = error, started
            request._latents = request._row = request._condition = request._negative = None
            return
        _set_state(self.pipe, request._state)
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

    def _generation_state(self, before: dict[str, Any]) -> dict[str, Any]:
        """What preparing a request left on the pipeline: the private attributes it assigned (a new value), and
        those any earlier request's preparation assigned (which this one may have set to the same value)."""
        current = vars(self.pipe)
        assigned = {n for n, v in current.items() if n.startswith("_") and (n not in before or before[n] is not v)}
        self._state_names |= assigned
        return {name: current[name] for name in sorted(self._state_names) if name in current}

    def _count_rows(self, rows: list[Any], steps: list[int], with_negative: bool) -> None:
        for negative in (False, True) if with_negative else (False,):
            for row, step in zip(rows, steps, strict=True):
                self.rows_total += 1
                self.rows_computed += step in row.branches[negative].computed_steps if row is not None else 1


def _batch_key(request: BatchRequest) -> Hashable:
    """What requests sharing a batch must agree on: latent shape and dtype, conditioning shapes, CFG."""

    def kinds(values: dict[str, Any] | None) -> Hashable:
        return None if values is None else tuple(sorted((name, _state_kind(v)) for name, v in values.items()))

    latents = request._latents
    negative = None if request._negative is None else request._negative.tensors
    return (
        tuple(latents.shape[1:]),
        latents.dtype,
        kinds(request._condition.tensors),
        kinds(negative),
        kinds(request._state),
    )


# ---- per-request values joined for a call: the generation state a family's pipeline keeps for `predict`, and
# the conditioning tensors (text ids shared by every row, say, beside per-row embeddings) ------------------------


def _is_row(value: Any) -> bool:
    """A per-request value: a tensor whose first dimension is the request's batch of 1, or a list of one item."""
    if isinstance(value, torch.Tensor):
        return value.ndim >= 1 and value.shape[0] == 1
    return isinstance(value, list) and len(value) == 1


def _state_kind(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("row" if _is_row(value) else "shared", tuple(value.shape[1:]), value.dtype, str(value.device))
    return ("row", "list") if _is_row(value) else ("shared", type(value).__name__)


def _shared_state_equal(mine: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Whether the values that are not per-row (image ids, a schedule, None) are equal in both requests."""
    for name, value in mine.items():
        other = theirs[name]
        if _is_row(value):
            continue
        if isinstance(value, torch.Tensor):
            if value.shape != other.shape or not torch.equal(value, other):
                return False
        elif value is not other and not _plainly_equal(value, other):
            return False
    return True


def _plainly_equal(value: Any, other: Any) -> bool:
    try:
        return bool(value == other)
    except (TypeError, ValueError, RuntimeError):  # no single truth value (an array): not known to be equal
        return False


def _joined_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch's state: per-row values stacked in batch order, shared values as they are."""
    joined = {}
    for name, value in states[0].items():
        values = [state[name] for state in states]
        if not _is_row(value) or len(values) == 1:
            joined[name] = value
        elif isinstance(value, torch.Tensor):
            joined[name] = torch.cat(values)
        else:
            joined[name] = [item for items in values for item in items]
    return joined


def _set_state(pipe: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(pipe, name, value)


def _joined(conditions: list[Any]) -> Any:
    from ..pipelines.base import Conditioning

    return Conditioning(_joined_state([c.tensors for c in conditions]))
