"""`teacache-serve` / `python scripts/serve.py`: load one model and serve it over HTTP.

    teacache-serve --model flux-digits --port 8000
    torchrun --nproc-per-node 2 scripts/serve.py --model wan2.1-t2v-1.3b --cfg-parallel

Under torchrun, rank 0 serves HTTP and the other ranks follow each job. SIGTERM stops the server
gracefully: no new work, queued jobs cancelled, the running jobs finished within --shutdown-grace or
stopped at their next step, exit status 0.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from ..cli import (
    ArgumentParser,
    CliError,
    HelpFormatter,
    add_model_arguments,
    add_parallel_arguments,
    add_run_arguments,
    add_teacache_arguments,
    check_run_arguments,
    load_configured_pipeline,
    path_argument,
    report_error,
    resolve_entry,
    start_parallel,
    teacache_params,
)
from ..params import TeaCacheParams
from ..zoo import ZooEntry
from .app import create_app
from .engine import Engine, follow
from .schemas import Served

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="teacache-serve",
        description="Serve one model over an OpenAI-style HTTP API (images, video jobs) with TeaCache per request.",
        epilog="--teacache sets the default cache of requests that do not choose one (field 'teacache'). "
        "Offline demo: teacache-serve --model flux-digits",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(parser, list_hint="python scripts/generate.py --list-models")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on")
    http.add_argument("--port", type=int, default=8000, help="port to listen on")
    http.add_argument(
        "--max-queue", type=int, default=16, help="jobs that may wait behind the running ones; more answer 429"
    )
    http.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="the most requests generated together: compatible single-image requests share a batch step by "
        "step, each with its own TeaCache state (joining at the next step, leaving when done); 1: one at a time. "
        "Under torchrun, and for models that cannot batch, requests run one at a time",
    )
    http.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a job may take from submission, waiting and running; past it the job stops at its next "
        "step and fails (504 for an image request); 0: no limit",
    )
    http.add_argument(
        "--output-dir", type=path_argument, default=Path("outputs/videos"), help="folder of the video jobs' MP4s"
    )
    http.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds the running jobs may take to finish before they are stopped",
    )
    http.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_teacache_arguments(parser)
    add_run_arguments(parser)
    add_parallel_arguments(parser)
    return parser


def _check(args: argparse.Namespace) -> None:
    if not 1 <= args.port <= 65535:
        raise CliError(f"--port must be in [1, 65535], got {args.port}")
    if not args.host.strip():
        # uvicorn would read an empty host as every interface: never without being asked.
        raise CliError("--host is empty: give an address such as 127.0.0.1 (the default), or 0.0.0.0 for all")
    try:  # before the model loads, not after
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise CliError(f"--host {args.host!r} is not an address this machine can listen on: {error}") from None
    if args.max_queue < 1:
        raise CliError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.max_batch < 1:
        raise CliError(f"--max-batch must be at least 1, got {args.max_batch}")
    for flag, value in (("--request-timeout", args.request_timeout), ("--shutdown-grace", args.shutdown_grace)):
        if not math.isfinite(value) or value < 0:
            raise CliError(f"{flag} must be a finite number of seconds >= 0, got {value}")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise CliError(f"--output-dir {str(args.output_dir)!r} is not a directory")
    check_run_arguments(args)


def serve(args: argparse.Namespace) -> int:
    _check(args)
    model, entry = resolve_entry(args)
    default_teacache = teacache_params(args, entry)
    state = start_parallel(args, "scripts/serve.py")
    if state is not None:
        args.device = str(state.device)
    listener = None
    try:
        if state is None or state.is_main:
            # The address is taken before the model loads: a port in use fails in a second, not after loading.
            listener = _listen(args.host, args.port)
        pipe = load_configured_pipeline(args, model, entry, state)
        if listener is None:
            # torchrun signals every rank; rank 0 shuts down gracefully and then tells the others to stop.
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
            with state.guard():
                follow(pipe, state)
            return 0
        return _run_http(args, pipe, model, entry, default_teacache, state, listener)
    finally:
        if listener is not None:
            listener.close()
        if state is not None:
            state.close()


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` for uvicorn to listen on, as uvicorn binds it: IPv6 for an address with a
    colon, else IPv4 (a name such as localhost resolves to its IPv4 address), address reuse on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        reason = error.strerror or str(error)
        raise CliError(
            f"--port {port}: cannot listen on {host}:{port} ({reason}); stop what holds it or choose another --port"
        ) from None
    return listener


def _run_http(
    args: argparse.Namespace,
    pipe: Any,
    model: str,
    entry: ZooEntry | None,
    default_teacache: TeaCacheParams | None,
    state: Any,
    listener: socket.socket,
) -> int:
    name = entry.name if entry is not None else Path(model).name
    served = Served(name=name, pipe=pipe, entry=entry, default_teacache=default_teacache)
    app = create_app(
        served,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout or None,
        output_dir=args.output_dir,
        shutdown_grace_s=args.shutdown_grace,
        parallel=state,
        # Idle ranks wait in a collective for the next job: rank 0 wakes them well within --dist-timeout.
        heartbeat_s=min(30.0, args.dist_timeout / 4),
        max_batch=args.max_batch,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=max(1, math.ceil(args.shutdown_grace)),
    )
    server = _GracefulServer(config, app.state.engine)
    # uvicorn re-raises a captured SIGTERM after its graceful shutdown, to the handler that was installed
    # before it started: this one, so that the process then exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run(sockets=[listener])
    return 0


class _GracefulServer(uvicorn.Server):
    """Drains the engine (no new work, queued jobs cancelled) as soon as a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # In a signal handler: the engine's lock may be held by this very thread, so drain elsewhere.
        threading.Thread(target=self.engine.drain, name="teacache-drain", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(args)
    except (CliError, ValueError, TypeError, OSError, RuntimeError) as error:
        return report_error(error)


if __name__ == "__main__":
    sys.exit(main())
