#!/usr/bin/env python
"""A bounded load test of the server: a fixed number of image requests at a fixed concurrency.

    python scripts/load_test_server.py                       # starts flux-digits on a free port itself
    python scripts/load_test_server.py --url http://127.0.0.1:8000 --requests 300 --concurrency 16

Every request asks for one tiny image with its own seed; a 429 (queue full) is retried after the time
the server's Retry-After names, so that every request ends answered. It prints the requests, the
concurrency, latency p50/p95 (from sending to the final answer, retries included), throughput, the 429s
retried, errors (requests without a correct 200), the deepest queue seen in /metrics, and the server's
memory (RSS) after the first tenth of the requests and at the end. `--check` compares every image with
the same request run once beforehand (a request's output must not depend on the load around it, nor on
the requests batched with it, beyond float32 rounding).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# ---- HTTP -------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    base_url: str, method: str, path: str, body: Any = None, timeout: float = 120.0, raw: bytes | None = None,
    content_type: str = "application/json",
) -> Reply:  # fmt: skip
    """One HTTP request (stdlib only); `body` is sent as JSON, `raw` as it is."""
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Content-Type": content_type} if payload is not None else {}
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def metric(base_url: str, name: str, **labels: str) -> float:
    """The value of one sample of the server's /metrics (0 when absent)."""
    text = request(base_url, "GET", "/metrics").body.decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        sample, _, rest = key.partition("{")
        if sample == name and ",".join(sorted(rest.rstrip("}").split(","))) == wanted:
            return float(value)
    return 0.0


# ---- a server process -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`scripts/serve.py` with `args` on 127.0.0.1 and a free port, started and ready (GET /health)."""

    def __init__(
        self, args: list[str], ready_timeout: float = 120.0, log: Path | None = None, launcher: list[str] | None = None
    ) -> None:
        """`launcher` runs the script instead of this Python (e.g. torchrun and its flags)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = log
        output = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - kept while it runs
        self.process = subprocess.Popen(
            [*(launcher or [sys.executable]), str(REPO / "scripts" / "serve.py"), *args, "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.process.poll() is not None:
                tail = log.read_text()[-3000:] if log is not None else ""
                raise RuntimeError(f"the server exited with {self.process.returncode} before it was ready\n{tail}")
            try:
                if request(self.url, "GET", "/health", timeout=2).status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server was not ready within {ready_timeout} s")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.pid).memory_info().rss

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the load -----------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    requests: int
    concurrency: int
    answered: int = 0
    errors: list[str] = field(default_factory=list)
    retried_429: int = 0
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    max_queue_depth: float = 0.0
    rss_mb: dict[str, float] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        ordered = sorted(self.latencies_s)

        def quantile(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "answered_200": self.answered,
            "errors": len(self.errors),
            "retried_429": self.retried_429,
            "latency_p50_s": round(quantile(0.50), 4),
            "latency_p95_s": round(quantile(0.95), 4),
            "latency_mean_s": round(statistics.fmean(ordered), 4) if ordered else None,
            "throughput_rps": round(self.answered / self.wall_s, 2) if self.wall_s else None,
            "wall_s": round(self.wall_s, 2),
            "max_queue_depth_seen": self.max_queue_depth,
            "rss_mb": self.rss_mb,
        }


def image_body(index: int, steps: int, seeds: int) -> dict[str, Any]:
    """Request `index`: one 16x16 image, `steps` steps, CFG off (guidance 1), seed and digit from index % seeds."""
    return {
        "prompt": f"a handwritten digit {index % seeds % 10}",
        "n": 1,
        "size": "16x16",
        "num_inference_steps": steps,
        "guidance_scale": 1.0,
        "seed": index % seeds,
    }


def run_load(
    base_url: str,
    total: int,
    concurrency: int,
    body: Callable[[int], dict[str, Any]],
    check: Callable[[int, dict[str, Any]], str | None] | None = None,
    rss: Callable[[], int] | None = None,
    max_retries: int = 1000,
    time_limit_s: float = 600.0,
) -> LoadReport:
    """`total` requests from `concurrency` threads; each retried on 429 after the server's Retry-After."""
    report = LoadReport(total, concurrency)
    lock = threading.Lock()
    next_index = iter(range(total))
    stop_at = time.monotonic() + time_limit_s
    warm_mark = max(1, total // 10)

    def one(index: int) -> None:
        started = time.perf_counter()
        for _ in range(max_retries):
            if time.monotonic() > stop_at:
                raise TimeoutError("the load test ran past its time limit")
            reply = request(base_url, "POST", "/v1/images/generations", body(index))
            if reply.status != 429:
                break
            with lock:
                report.retried_429 += 1
            wait_ms = float(reply.headers.get("retry-after-ms") or 1000 * float(reply.headers["retry-after"]))
            time.sleep(wait_ms / 1000)
        latency = time.perf_counter() - started
        problem = None
        if reply.status != 200:
            problem = f"request {index}: HTTP {reply.status}: {reply.body[:200]!r}"
        elif check is not None:
            problem = check(index, reply.json())
        with lock:
            report.latencies_s.append(latency)
            if problem:
                report.errors.append(problem)
            else:
                report.answered += 1
            if rss is not None and len(report.latencies_s) == warm_mark:
                report.rss_mb["after_first_tenth"] = round(rss() / 2**20, 1)

    def worker() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            try:
                one(index)
            except Exception as error:  # a lost answer is an error of the run, never silence
                with lock:
                    report.errors.append(f"request {index}: {type(error).__name__}: {error}")

    def watch_queue(done: threading.Event) -> None:
        while not done.wait(0.05):
            try:
                depth = metric(base_url, "teacache_queue_depth")
            except OSError:
                continue
            report.max_queue_depth = max(report.max_queue_depth, depth)

    started = time.perf_counter()
    done = threading.Event()
    watcher = threading.Thread(target=watch_queue, args=(done,), daemon=True)
    watcher.start()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.wall_s = time.perf_counter() - started
    done.set()
    watcher.join()
    if rss is not None:
        report.rss_mb["end"] = round(rss() / 2**20, 1)
    return report


def reference_check(
    base_url: str, body: Callable[[int], dict[str, Any]], seeds: int
) -> Callable[[int, dict[str, Any]], str | None]:
    """Run request 0 .. seeds - 1 alone, one after another; the check compares request i's image with that of
    request i % seeds (the same prompt and seed). Under load the server batches requests, whose blocks then see
    another batch size: float32 rounding may move a pixel by one level of 255, never more."""
    references = {}
    for index in range(seeds):
        reply = request(base_url, "POST", "/v1/images/generations", body(index))
        if reply.status != 200:
            raise RuntimeError(f"reference request {index}: HTTP {reply.status}: {reply.body[:300]!r}")
        references[index] = decode_png(reply.json()["data"][0]["b64_json"]).astype(int)

    def check(index: int, reply: dict[str, Any]) -> str | None:
        pixels = decode_png(reply["data"][0]["b64_json"]).astype(int)
        reference = references[index % seeds]
        if pixels.shape != reference.shape or abs(pixels - reference).max() > 1:
            return f"request {index}: its image differs from the same request run alone"
        return None

    return check


def decode_png(b64: str) -> Any:
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start flux-digits on a free port)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per request")
    parser.add_argument("--seeds", type=int, default=8, help="distinct seeds (request i uses seed i %% seeds)")
    parser.add_argument("--max-queue", type=int, default=8, help="--max-queue of the server this script starts")
    parser.add_argument("--max-batch", type=int, default=4, help="--max-batch of the server this script starts")
    parser.add_argument("--check", action="store_true", help="compare every image with a reference request")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.seeds < 1:
        parser.error("--requests, --concurrency and --seeds must be at least 1")

    def body(index: int) -> dict[str, Any]:
        return image_body(index, args.steps, args.seeds)

    server = None
    if args.url is None:
        flags = ["--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch)]
        server = ServerProcess(["--model", "flux-digits", "--threads", "1", *flags])
    base_url = args.url or server.url
    try:
        check = None
        if args.check:
            check = reference_check(base_url, body, args.seeds)

        report = run_load(base_url, args.requests, args.concurrency, body, check, server.rss_bytes if server else None)
    finally:
        if server is not None:
            server.stop()
    figures = report.figures()
    print(json.dumps(figures, indent=2))
    for problem in report.errors[:10]:
        print(problem, file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if not report.errors else 1


if __name__ == "__main__":
    sys.exit(main())
