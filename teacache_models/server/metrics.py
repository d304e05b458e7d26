"""Prometheus metrics of the server: HTTP requests, latency, the queue, jobs, and TeaCache's steps.

Each application has its own registry (no process-global state), rendered in the text format at
GET /metrics. Routes are labelled by their template (`/v1/videos/{video_id}`), so job ids never become
label values.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "teacache_http_requests",
            "HTTP requests answered, by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "teacache_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by route template and method",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge("teacache_queue_depth", "Jobs waiting in the queue", registry=self.registry)
        self.running = Gauge(
            "teacache_jobs_running", "Jobs being generated (up to --max-batch together)", registry=self.registry
        )
        self.jobs = Counter(
            "teacache_jobs",
            "Finished jobs, by kind (image, video) and status",
            ["kind", "status"],
            registry=self.registry,
        )
        self.generation = Histogram(
            "teacache_generation_duration_seconds",
            "Seconds a completed job's generation took (text encoding, denoising, decoding), by kind",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "teacache_batch_size",
            "Requests in the running batch at each denoising step of batched generation (--max-batch)",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=self.registry,
        )
        self.steps = Counter(
            "teacache_steps",
            "Transformer steps of completed jobs, by CFG branch and whether TeaCache computed or skipped them",
            ["branch", "outcome"],
            registry=self.registry,
        )

    def watch(self, engine: Any) -> None:
        """Read the queue depth and the running jobs from `engine` at each scrape."""
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.running.set_function(lambda: len(engine.running_jobs))

    def observe_job(self, job: Any) -> None:
        self.jobs.labels(job.kind, job.status).inc()
        result = job.result
        if job.status != "completed" or result is None:
            return
        self.generation.labels(job.kind).observe(result.timings["total"])
        stats = result.teacache_stats
        for branch in ("positive", "negative"):
            record = getattr(stats, branch)
            self.steps.labels(branch, "computed").inc(record.num_computed)
            self.steps.labels(branch, "skipped").inc(record.num_skipped)

    def observe_batch_step(self, size: int) -> None:
        self.batch_size.observe(size)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def middleware_class(self) -> type:
        """An ASGI middleware class counting every HTTP request of the application."""
        metrics = self

        class RequestMetrics:
            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
                if scope["type"] != "http":
                    await self.app(scope, receive, send)
                    return
                started = time.perf_counter()
                status = {"code": 500}

                async def record_status(message: dict) -> None:
                    if message["type"] == "http.response.start":
                        status["code"] = message["status"]
                    await send(message)

                try:
                    await self.app(scope, receive, record_status)
                finally:
                    route = scope.get("route")
                    template = getattr(route, "path", None) or "unmatched"
                    method = scope.get("method", "")
                    metrics.requests.labels(template, method, str(status["code"])).inc()
                    metrics.latency.labels(template, method).observe(time.perf_counter() - started)

        return RequestMetrics
