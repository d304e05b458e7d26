"""The server's engine: a bounded queue of generation jobs and one worker thread that runs them.

One pipeline serves every request, and every request keeps its own TeaCache state. Where the pipeline can
batch requests step by step (`ContinuousBatcher.can_batch`) and `max_batch` > 1, the worker runs the
compatible single-image jobs as one batch, one denoising step at a time: a job joins at the next step
boundary with its own timestep, step count and TeaCache row state (`TeaCacheMixin.new_teacache_row`), a
finished one leaves, and a cancelled one leaves before the next step. Jobs that cannot share a batch (several
images, an input image, another shape) run alone, in arrival order, once the batch has emptied; there
`Pipeline.__call__` switches the transformer's cache on for that generation and off after it.

A job stops at the next step boundary when it is cancelled, when its client went away, when it passed its
deadline, or when the server shuts down. An error inside one job fails that job only; an error inside a
batched step fails the jobs of that step (they computed it together). Under torchrun, rank 0 runs this
engine, one job at a time, and sends every job, and every step's go-on-or-stop decision, to the other ranks
(`follow`), which compute the same generation with it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..params import SamplingParams
from .batching import BatchRequest, ContinuousBatcher

__all__ = ["Engine", "Job", "JobStoppedError", "QueueFullError", "follow"]

log = logging.getLogger("teacache_models.server")

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
FINISHED = (COMPLETED, FAILED, CANCELLED)
# Why a job was stopped -> (final status, the reason recorded on the job).
STOP_REASONS = {
    "cancelled": (CANCELLED, "cancelled by the client"),
    "disconnected": (CANCELLED, "the client disconnected"),
    "shutdown": (CANCELLED, "the server is shutting down"),
    "timeout": (FAILED, "the request did not finish within the server's --request-timeout"),
}
# Finished video jobs kept for GET /v1/videos; the oldest beyond this are forgotten (their files stay).
MAX_FINISHED_JOBS = 1000


class JobStoppedError(Exception):
    """Raised from the step callback to stop a generation at a step boundary."""


class QueueFullError(Exception):
    """The queue holds --max-queue waiting jobs; `retry_after_s` estimates when a slot frees."""

    def __init__(self, max_queue: int, retry_after_s: float) -> None:
        super().__init__(f"the queue is full ({max_queue} jobs waiting); retry after {retry_after_s:.2f} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Job:
    """One generation: what to run, and its state as the worker advances it.

    `finish` (run on the worker thread) turns the pipeline's result into what the job keeps (PNG bytes,
    an MP4 file); `on_done` callbacks run once the job is finished, on the worker or the cancelling thread.
    """

    kind: str
    prompts: list[str]
    params: SamplingParams
    inputs: dict[str, Any] = field(default_factory=dict)
    finish: Callable[[Job, Any], Any] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    deadline: float | None = None  # time.monotonic() by which the job must be finished
    status: str = QUEUED
    step: int = 0
    num_steps: int = 0
    error: str | None = None
    error_code: str | None = None
    result: Any = None
    output: Any = None
    started_at: float | None = None
    completed_at: float | None = None
    queue_wait_s: float | None = None
    stop_reason: str | None = None
    request: dict[str, Any] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    _callbacks: list[Callable[[Job], None]] = field(default_factory=list)
    _queued_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.num_steps = self.params.num_inference_steps

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def on_done(self, callback: Callable[[Job], None]) -> None:
        """Call `callback(job)` once the job is finished (at once if it already is)."""
        self._callbacks.append(callback)
        if self.done.is_set():
            callback(self)

    def _set_done(self) -> None:
        self.completed_at = time.time()
        self.done.set()
        for callback in list(self._callbacks):
            try:
                callback(self)
            except Exception:  # a waiter's callback must not break the worker
                log.exception("a job's completion callback failed")


class Engine:
    """Runs jobs on a worker thread, batched step by step where the pipeline allows; at most `max_queue` jobs
    wait behind the running ones.

    Args:
        pipe: the loaded pipeline (a job run alone runs `pipe(prompts, params, progress=..., **inputs)`).
        max_queue: jobs that may wait; a submission beyond that raises `QueueFullError`.
        request_timeout_s: a job's whole life, waiting and running, from submission; None: no limit.
        parallel: this rank's `ParallelState` under torchrun (rank 0), None alone. Jobs then run one at a time.
        observer: called with each finished job (the metrics).
        step_observer: called with the number of requests in the batch at each batched step (the metrics).
        max_batch: the most jobs generated together (`ContinuousBatcher`); 1, or a pipeline that cannot batch
            requests step by step, runs one job at a time.
    """

    def __init__(
        self,
        pipe: Any,
        max_queue: int,
        request_timeout_s: float | None = None,
        parallel: Any = None,
        observer: Callable[[Job], None] | None = None,
        heartbeat_s: float = 30.0,
        max_batch: int = 1,
        step_observer: Callable[[int], None] | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.pipe = pipe
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.parallel = parallel
        self.observer = observer
        self.heartbeat_s = heartbeat_s
        self.step_observer = step_observer
        self.batcher: ContinuousBatcher | None = None
        if max_batch > 1 and parallel is None and ContinuousBatcher.can_batch(pipe):
            self.batcher = ContinuousBatcher(pipe, max_batch=max_batch)
        self.max_batch = max_batch if self.batcher is not None else 1
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}  # video jobs by id, for GET /v1/videos
        # The jobs in progress, oldest first, each with its request in the batcher (None: a job run alone).
        self._active: dict[Job, BatchRequest | None] = {}
        self._lock = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Seconds between jobs leaving (exponential average), for Retry-After.
        self._service_s = 1.0
        self._last_end = time.monotonic()
        self.max_depth_seen = 0

    # ---- state ------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Jobs in the queue (what `max_queue` bounds); jobs prepared for the batch that have not run a step yet
        are still `queued` but no longer in it."""
        return len(self._queue)

    @property
    def running_jobs(self) -> list[Job]:
        """The jobs in progress, oldest first."""
        with self._lock:
            return [job for job in self._active if job.status == IN_PROGRESS]

    @property
    def running(self) -> Job | None:
        """The oldest job in progress, None when none is."""
        jobs = self.running_jobs
        return jobs[0] if jobs else None

    @property
    def accepting(self) -> bool:
        return self._accepting

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        """The kept (video) jobs, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.created_at, reverse=True)

    def forget(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def estimated_wait_s(self) -> float:
        """When a queue slot is expected to free: the average time between two jobs leaving."""
        return self._service_s

    # ---- submission and cancellation --------------------------------------------------------------

    def submit(self, job: Job, keep: bool = False) -> Job:
        """Queue `job` (`keep`: list it under GET /v1/videos); `QueueFullError` when --max-queue jobs wait."""
        with self._lock:
            if not self._accepting:
                raise RuntimeError("the server is shutting down and takes no new work")
            self._expire_locked()
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(self.max_queue, self.estimated_wait_s())
            if self.request_timeout_s is not None:
                job.deadline = time.monotonic() + self.request_timeout_s
            job._queued_at = time.monotonic()
            self._queue.append(job)
            self.max_depth_seen = max(self.max_depth_seen, len(self._queue))
            if keep:
                self._jobs[job.id] = job
                self._trim_locked()
            self._lock.notify_all()
        return job

    def cancel(self, job: Job, reason: str = "cancelled") -> bool:
        """Stop `job`: a queued one at once (its slot frees), a running one at its next step boundary (a batched
        one leaves its batch there). False when it had already finished."""
        with self._lock:
            if job.finished:
                return False
            job.stop_reason = job.stop_reason or reason
            if job.status == QUEUED and job in self._queue:
                self._queue.remove(job)
                self._finish_stopped_locked(job)
            return True

    def _finish_stopped_locked(self, job: Job) -> None:
        status, message = STOP_REASONS[job.stop_reason]
        job.status = status
        job.error = message if status == FAILED else None
        job.error_code = job.stop_reason
        self._lock.notify_all()
        self._after(job)

    def _expire_locked(self) -> None:
        """Queued jobs past their deadline fail now and free their slots; running ones are told to stop."""
        now = time.monotonic()
        for job in [j for j in self._queue if j.deadline is not None and now > j.deadline]:
            job.stop_reason = "timeout"
            self._queue.remove(job)
            self._finish_stopped_locked(job)
        for job in self._active:
            if job.stop_reason is None and job.deadline is not None and now > job.deadline:
                job.stop_reason = "timeout"

    def _trim_locked(self) -> None:
        finished = [j for j in self._jobs.values() if j.finished]
        for job in sorted(finished, key=lambda j: j.created_at)[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self._jobs[job.id]

    def _after(self, job: Job) -> None:
        if self.observer is not None:
            try:
                self.observer(job)
            except Exception:
                log.exception("the job observer failed")
        job._set_done()

    # ---- the worker -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="teacache-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Take no new work and cancel every queued job; the running ones go on."""
        with self._lock:
            self._accepting = False
            for job in list(self._queue):
                job.stop_reason = "shutdown"
                self._queue.remove(job)
                self._finish_stopped_locked(job)
            for job in self._active:  # prepared, waiting for the batch: the worker drops them before its next step
                if job.status == QUEUED:
                    job.stop_reason = job.stop_reason or "shutdown"

    def stop(self, grace_s: float) -> bool:
        """Drain, let the running jobs finish within `grace_s`, else stop them at their next step; end the
        worker. True when the worker ended in time."""
        self.drain()
        deadline = time.monotonic() + max(0.0, grace_s)
        for job in self.running_jobs:
            job.done.wait(max(0.0, deadline - time.monotonic()))
        for job in self.running_jobs:
            self.cancel(job, "shutdown")
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            # A step in flight must end before the cancellation is seen; a few more seconds for it.
            self._thread.join(max(5.0, deadline - time.monotonic()))
            return not self._thread.is_alive()
        return True

    def _batchable(self, job: Job) -> bool:
        """Whether `job` can share a batch: one image or video from a prompt alone (an input image, or several
        images drawn from one seed, run alone, as the CLI runs them)."""
        return self.batcher is not None and len(job.prompts) == 1 and not job.inputs

    def _next(self) -> tuple[str, list[Job]] | None:
        """What the worker does next: ("alone", [job]) runs one job by itself; ("batch", jobs) lets `jobs` join
        the batch and runs its next step; None: the engine stops."""
        with self._lock:
            while True:
                self._expire_locked()
                if self._queue and not self._batchable(self._queue[0]):
                    # It runs once the batch has emptied; until then nothing overtakes it.
                    if not self._active:
                        return "alone", [self._start_locked(self._queue.popleft())]
                else:
                    joining = []
                    room = self._room_locked()
                    while self._queue and self._batchable(self._queue[0]) and len(joining) < room:
                        joining.append(self._start_locked(self._queue.popleft(), running=False))
                    if joining:
                        return "batch", joining
                if self._active:
                    return "batch", []
                if self._stopping:
                    return None
                if not self._lock.wait(self.heartbeat_s) and self.parallel is not None:
                    # Idle: tell the other ranks so that their wait for the next job does not time out.
                    self._lock.release()
                    try:
                        self.parallel.broadcast_object(("idle",))
                    finally:
                        self._lock.acquire()

    def _room_locked(self) -> int:
        """How many queued jobs may be prepared now to join the batch at its next step: any free row while it
        runs requests at their own timesteps; none while it runs one timestep per call (a new request would be
        at another step), nor while a prepared job waits for it to empty (nothing overtakes that one)."""
        if not self._active:
            return self.max_batch
        if self.batcher.same_step or any(job.status == QUEUED for job in self._active):
            return 0
        return self.max_batch - len(self._active)

    def _start_locked(self, job: Job, running: bool = True) -> Job:
        """`job` leaves the queue: run alone (`running`), or prepared for the batch, where it stays queued until
        it runs its first step."""
        if running:
            self._mark_running(job)
        self._active[job] = None
        return job

    @staticmethod
    def _mark_running(job: Job) -> None:
        job.status = IN_PROGRESS
        job.started_at = time.time()
        job.queue_wait_s = time.monotonic() - job._queued_at

    def _end(self, job: Job) -> None:
        """`job` has reached its end state: it leaves the running set and its waiters are told."""
        now = time.monotonic()
        self._service_s = 0.8 * self._service_s + 0.2 * (now - self._last_end)
        self._last_end = now
        with self._lock:
            self._active.pop(job, None)
            self._after(job)

    def _work(self) -> None:
        while True:
            task = self._next()
            if task is None:
                if self.parallel is not None:
                    self.parallel.broadcast_object(("stop",))
                return
            kind, jobs = task
            if kind == "alone":
                self._run(jobs[0])
                self._end(jobs[0])
                continue
            for job in jobs:
                self._join(job)
            self._step_batch()

    # ---- a job run alone --------------------------------------------------------------------------

    def _progress(self, job: Job) -> Callable[[int, int], None]:
        def progress(done: int, total: int) -> None:
            job.step, job.num_steps = done, total
            with self._lock:
                self._expire_locked()
            stop = job.stop_reason is not None and done < total
            if self.parallel is not None:
                self.parallel.broadcast_object(stop)  # every rank stops at the same step
            if stop:
                raise JobStoppedError(job.stop_reason)

        return progress

    def _run(self, job: Job) -> None:
        """Run one job alone to its end state; any error fails this job only."""
        with self._failures(job):
            if job.stop_reason is not None:
                raise JobStoppedError(job.stop_reason)
            if self.parallel is not None:
                self.parallel.broadcast_object(("job", job.prompts, job.params, job.inputs))
            job.result = self.pipe(job.prompts, job.params, progress=self._progress(job), **job.inputs)
            self._complete(job)

    # ---- batched jobs -----------------------------------------------------------------------------

    def _join(self, job: Job) -> None:
        """Prepare `job`'s request (text encoding, noise, schedule); it joins the batch at the next step."""
        with self._failures(job):
            if job.stop_reason is not None:
                raise JobStoppedError(job.stop_reason)
            request = self.batcher.submit(job.prompts[0], job.params)
            job.num_steps = len(request._timesteps)
            with self._lock:
                self._active[job] = request
            return
        self._end(job)

    def _step_batch(self) -> None:
        """Stopped jobs leave, then one step of every running request; the jobs it finished complete."""
        batcher = self.batcher
        with self._lock:
            self._expire_locked()
            batched = [(job, request) for job, request in self._active.items() if request is not None]
        for job, request in batched:
            if job.stop_reason is not None:
                batcher.cancel(request)
                self._stop(job)
                self._end(job)
        if batcher.idle:
            return
        try:
            batcher.step()
        except Exception as error:
            # The requests of the failed step computed it together: each of their jobs fails with the error.
            for request in list(batcher.running):
                batcher.cancel(request)
            for job, request in batched:
                if request.cancelled and not job.finished:
                    self._fail(job, error)
                    self._end(job)
        if self.step_observer is not None:
            self.step_observer(len(batcher.last_batch))
        ran = {id(request) for request in batcher.last_batch}
        for job, request in batched:
            job.step = request.steps_done
            if id(request) in ran and job.status == QUEUED:
                self._mark_running(job)
            if request.error is not None and not job.finished:
                self._fail(job, request.error)
                self._end(job)
            if request.result is not None and not job.finished:
                job.result = request.result
                with self._failures(job):
                    self._complete(job)
                self._end(job)

    # ---- end states -------------------------------------------------------------------------------

    def _complete(self, job: Job) -> None:
        if job.finish is not None:
            job.output = job.finish(job, job.result)
        job.status = COMPLETED

    @contextlib.contextmanager
    def _failures(self, job: Job) -> Iterator[None]:
        """Any error inside the block sets `job`'s end state (stopped, or failed with the error), and only its."""
        try:
            yield
        except JobStoppedError:
            self._stop(job)
        except Exception as error:
            self._fail(job, error)

    @staticmethod
    def _stop(job: Job) -> None:
        status, message = STOP_REASONS[job.stop_reason]
        log.info("job %s stopped at step %d of %d: %s", job.id, job.step, job.num_steps, message)
        job.status, job.error_code = status, job.stop_reason
        job.error = message if status == FAILED else None

    @staticmethod
    def _fail(job: Job, error: Exception) -> None:
        if isinstance(error, ValueError | TypeError):  # input only the generation itself could find wrong
            job.status, job.error, job.error_code = FAILED, str(error), "invalid_request"
        else:
            job.status, job.error_code = FAILED, "server_error"
            job.error = _describe(error)
            log.error("job %s failed", job.id, exc_info=error)


def _describe(error: BaseException) -> str:
    """One line naming an unexpected error, without a traceback (the server log has it)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory on the device: try a smaller size, fewer frames or n"
    text = str(error).splitlines()[0][:300] if str(error) else ""
    return f"the generation failed: {type(error).__name__}{': ' + text if text else ''}"


def follow(pipe: Any, parallel: Any) -> None:
    """The loop of a rank other than 0: compute every job rank 0 sends, stopping where it stops, until it
    says stop."""
    while True:
        message = parallel.broadcast_object(None)
        if message[0] == "stop":
            return
        if message[0] != "job":
            continue
        _, prompts, params, inputs = message

        def progress(done: int, total: int) -> None:
            if parallel.broadcast_object(None):
                raise JobStoppedError("rank 0 stopped the job")

        try:
            pipe(prompts, params, progress=progress, **inputs)
        except JobStoppedError:
            pass
        except (ValueError, TypeError):  # rank 0 meets the same error and reports it
            pass


def retry_after_headers(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds (HTTP) and in milliseconds (read first by the openai client)."""
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}
