"""The HTTP API: OpenAI-style image generation, video jobs, models, health and Prometheus metrics.

Routes:
    POST /v1/images/generations   JSON; answers when the images are ready (b64_json PNGs)
    POST /v1/images/edits         multipart with `image` parts; for models that take an image
    POST /v1/videos               JSON or multipart; answers at once with a queued job
    GET  /v1/videos, /v1/videos/{id}, /v1/videos/{id}/content (the MP4); DELETE /v1/videos/{id}
    GET  /v1/models, /health, /metrics
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..cli import save_mp4, write_atomically
from ..demo import encode_png
from ..params import SamplingParams
from .engine import COMPLETED, IN_PROGRESS, Engine, Job, QueueFullError, retry_after_headers
from .metrics import Metrics
from .schemas import ApiError, ImageRequest, Served, VideoRequest, decode_image, param_of, sampling_params

__all__ = ["create_app"]

log = logging.getLogger("teacache_models.server")

# How often a waiting request checks whether its client is still connected.
_DISCONNECT_POLL_S = 0.1
_FORM_FILE_FIELDS = {"image", "image[]", "input_reference", "last_image"}


def create_app(
    served: Served,
    *,
    max_queue: int = 16,
    request_timeout_s: float | None = 600.0,
    output_dir: Path | str = "outputs/videos",
    shutdown_grace_s: float = 30.0,
    parallel: Any = None,
    heartbeat_s: float = 30.0,
    max_batch: int = 1,
) -> FastAPI:
    """The FastAPI application serving `served`; its engine starts and stops with the application.

    `max_batch` > 1 generates up to that many compatible requests together, step by step (`Engine`).
    """
    metrics = Metrics()
    engine = Engine(
        served.pipe,
        max_queue,
        request_timeout_s=request_timeout_s,
        parallel=parallel,
        observer=metrics.observe_job,
        heartbeat_s=heartbeat_s,
        max_batch=max_batch,
        step_observer=metrics.observe_batch_step,
    )
    metrics.watch(engine)
    output_dir = Path(output_dir)

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, shutdown_grace_s)

    app = FastAPI(title="teacache_models server", version="1", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.served = engine, metrics, served
    app.add_middleware(metrics.middleware_class())

    # ---- errors: OpenAI's error body, a field name, never a traceback --------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_response(error.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else "request refused"
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models and the README"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(ApiError(error.status_code, message).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = ApiError(500, f"internal error: {type(error).__name__}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    # ---- images -------------------------------------------------------------------------------------

    @app.post("/v1/images/generations")
    async def images_generations(request: Request) -> JSONResponse:
        body = await _json_request(request, ImageRequest)
        if served.is_video:
            raise ApiError(400, f"{served.name} is a video model: create a job with POST /v1/videos", "model")
        return await _images(request, body, {})

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> JSONResponse:
        fields, files = await _form_request(request)
        if served.is_video or served.pipe.takes_image() == "no":
            kind = "a video model" if served.is_video else "a text-to-image model: it takes no input image"
            raise ApiError(
                400,
                f"{served.name} is {kind}; /v1/images/edits serves image-editing models "
                "(use POST /v1/images/generations)",
                "image",
            )
        body = _validate(ImageRequest, fields)
        parts = files.get("image", []) + files.get("image[]", [])
        most = served.pipe.max_images
        if not parts:
            raise ApiError(400, f"image is required: 1 to {most} image file parts", "image")
        if len(parts) > most:
            raise ApiError(400, f"{served.name} takes 1 to {most} input images, got {len(parts)} image parts", "image")
        images = [decode_image(data, "image") for data in parts]
        return await _images(request, body, {"image": images[0] if len(images) == 1 else images})

    async def _images(request: Request, body: ImageRequest, inputs: dict[str, Any]) -> JSONResponse:
        if body.response_format == "url":
            raise ApiError(
                400,
                "response_format 'url' is not supported: this server keeps no image files; use 'b64_json'",
                "response_format",
            )
        params = sampling_params(body, served)
        try:
            size = served.pipe.output_size(inputs["image"]) if inputs and body.size in (None, "auto") else None
        except ValueError as error:  # an input image no size fits (too narrow)
            raise ApiError(400, str(error), "image") from None
        if size is not None:  # an editing model follows its input image's aspect ratio unless a size is asked for
            params = dataclasses.replace(params, height=size[0], width=size[1])
        job = Job("image", [body.prompt] * body.n, params, inputs, finish=_encode_images)
        _submit(job)
        await _wait(request, job)
        if job.status != COMPLETED:
            raise _job_error(job)
        result = job.result
        stats = result.teacache_stats.as_dict()
        return JSONResponse(
            {
                "created": int(job.created_at),
                "model": served.name,
                "data": [{"b64_json": png, "revised_prompt": body.prompt, "teacache": stats} for png in job.output],
                "seed": result.seed,
                "teacache": _teacache_settings(params),
                "summary": result.teacache_stats.summary(),
                "timings": {"queue_wait": job.queue_wait_s, **result.timings},
            }
        )

    # ---- videos -------------------------------------------------------------------------------------

    @app.post("/v1/videos")
    async def create_video(request: Request) -> JSONResponse:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            fields, files = await _form_request(request)
            body = _validate(VideoRequest, fields)
        else:
            body, files = await _json_request(request, VideoRequest), {}
        if not served.is_video:
            raise ApiError(400, f"{served.name} makes images: use POST /v1/images/generations", "model")
        inputs = {}
        if files.get("input_reference"):
            image = decode_image(files["input_reference"][0], "input_reference")
            if served.pipe.takes_image() == "no":
                raise ApiError(400, f"{served.name} is text-to-video: it takes no input_reference", "input_reference")
            inputs["image"] = image
        elif served.pipe.takes_image() == "required":
            raise ApiError(
                400, f"{served.name} is image-to-video: input_reference (an image) is required", "input_reference"
            )
        params = sampling_params(body, served)
        _add_last_image(inputs, files, params)
        job = Job("video", [body.prompt], params, inputs, finish=_write_video)
        job.request = {"prompt": body.prompt}
        _submit(job, keep=True)
        return JSONResponse(_video_object(job))

    def _add_last_image(inputs: dict[str, Any], files: dict[str, list[bytes]], params: SamplingParams) -> None:
        """A first-last-frame model's `last_image` part (an extension field), checked with the first frame."""
        takes = "last_image" in served.pipe.call_inputs
        if files.get("last_image"):
            image = decode_image(files["last_image"][0], "last_image")
            if not takes:
                raise ApiError(
                    400,
                    f"{served.name} takes no last_image: it is for first-last-frame models (Wan2.1 FLF2V, Wan2.2 I2V "
                    "A14B)",
                    "last_image",
                )
            if "image" not in inputs:
                raise ApiError(400, "last_image is the last frame: send the first as input_reference", "last_image")
            inputs["last_image"] = image
        if takes and "image" in inputs:
            try:  # a checkpoint that requires the last frame, or one that cannot read it
                served.pipe.check_inputs(params, **inputs)
            except (ValueError, TypeError) as error:
                raise ApiError(400, str(error), "last_image") from None

    @app.get("/v1/videos")
    async def list_videos(limit: int = 20, order: str = "desc") -> JSONResponse:
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be in [1, 100], got {limit}", "limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be 'asc' or 'desc', got {order!r}", "order")
        jobs = engine.jobs()
        if order == "asc":
            jobs.reverse()
        data = [_video_object(job) for job in jobs[:limit]]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "has_more": len(jobs) > limit,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str) -> JSONResponse:
        return JSONResponse(_video_object(_video(video_id)))

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, variant: str = "video") -> Response:
        job = _video(video_id)
        if variant != "video":
            raise ApiError(400, f"variant {variant!r} is not available; only 'video' (the MP4)", "variant")
        if job.status != COMPLETED:
            raise ApiError(
                409, f"video {video_id} is {job.status}: its content exists once it is completed", code=job.status
            )
        if not Path(job.output).is_file():
            raise ApiError(404, f"the MP4 of video {video_id} is no longer on disk", code="gone")
        return FileResponse(job.output, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str) -> JSONResponse:
        job = _video(video_id)
        if engine.cancel(job, "cancelled"):
            return JSONResponse({**_video_object(job), "cancel_requested": True})
        engine.forget(job)
        if job.output is not None:
            Path(job.output).unlink(missing_ok=True)
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})

    def _video(video_id: str) -> Job:
        job = engine.get(video_id)
        if job is None:
            raise ApiError(404, f"no video job {video_id!r}", "video_id", code="not_found")
        return job

    def _video_object(job: Job) -> dict[str, Any]:
        params = job.params
        fps = params.fps or 16
        done = job.status == COMPLETED
        progress = 100 if done else int(100 * job.step / job.num_steps) if job.status == IN_PROGRESS else 0
        result = job.result if done else None
        return {
            "id": job.id,
            "object": "video",
            "model": served.name,
            "status": job.status,
            "progress": progress,
            "step": job.step,
            "num_steps": job.num_steps,
            "created_at": int(job.created_at),
            "completed_at": int(job.completed_at) if job.completed_at else None,
            "prompt": job.request.get("prompt"),
            "size": f"{params.width}x{params.height}",
            "seconds": f"{(params.num_frames - 1) / fps:g}",
            "num_frames": params.num_frames,
            "fps": fps,
            "seed": result.seed if result is not None else params.seed,
            "error": {"code": job.error_code, "message": job.error} if job.error else None,
            "teacache": _teacache_settings(params),
            "teacache_stats": result.teacache_stats.as_dict() if result is not None else None,
            "timings": {"queue_wait": job.queue_wait_s, **result.timings} if result is not None else None,
        }

    # ---- models, health, metrics --------------------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        entry = served.entry
        model = {
            "id": served.name,
            "object": "model",
            "created": int(started_at),
            "owned_by": "teacache_models",
            "task": entry.task if entry is not None else ("t2v" if served.is_video else "t2i"),
            "family": served.pipe.family,
            "teacache_presets": served.presets(),
            "default_teacache": _teacache_settings_of(served.default_teacache),
        }
        return JSONResponse({"object": "list", "data": [model]})

    @app.get("/health")
    async def health() -> JSONResponse:
        running = engine.running_jobs
        body = {
            "status": "ok" if engine.accepting else "draining",
            "model": served.name,
            "queue_depth": engine.queue_depth,
            "max_queue": engine.max_queue,
            "running": running[0].id if running else None,
            "running_jobs": len(running),
            "max_batch": engine.max_batch,
        }
        return JSONResponse(body, status_code=200 if engine.accepting else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        text, content_type = metrics.render()
        return Response(text, media_type=content_type)

    # ---- helpers that need the engine ---------------------------------------------------------------

    def _submit(job: Job, keep: bool = False) -> None:
        try:
            engine.submit(job, keep=keep)
        except QueueFullError as error:
            raise ApiError(
                429,
                str(error),
                code="queue_full",
                kind="rate_limit_error",
                headers=retry_after_headers(error.retry_after_s),
            ) from None
        except RuntimeError as error:
            raise ApiError(503, str(error), code="shutting_down", kind="server_error") from None

    def _write_video(job: Job, result: Any) -> str:
        path = output_dir / f"{job.id}.mp4"
        frames = result.to_uint8()[0]  # (F, H, W, 3)
        write_atomically(path, lambda p: save_mp4(frames, p, job.params.fps or 16), ".mp4", flag="--output-dir")
        return str(path)

    async def _wait(request: Request, job: Job) -> None:
        """Wait for `job`; a client that disconnects stops it (at its next step boundary)."""
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def wake(_: Job) -> None:
            loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

        job.on_done(wake)
        while not finished.done():
            await asyncio.wait([finished], timeout=_DISCONNECT_POLL_S)
            if not finished.done() and await request.is_disconnected():
                engine.cancel(job, "disconnected")
                await finished

    started_at = time.time()
    return app


def _encode_images(job: Job, result: Any) -> list[str]:
    """PNG files of the generated images, base64 (on the worker thread, off the event loop)."""
    return [base64.b64encode(encode_png(image.numpy())).decode("ascii") for image in result.to_uint8()]


def _teacache_settings(params: Any) -> dict[str, Any] | None:
    return _teacache_settings_of(params.teacache_params)


def _teacache_settings_of(cache: Any) -> dict[str, Any] | None:
    if cache is None:
        return None
    settings = dataclasses.asdict(cache)
    if settings["coefficients"] is not None:
        settings["coefficients"] = list(settings["coefficients"])
    return settings


def _job_error(job: Job) -> ApiError:
    """The answer to a synchronous request whose job did not complete."""
    code = job.error_code
    if code == "timeout":
        return ApiError(504, job.error or "timed out", code="timeout", kind="timeout_error")
    if code == "invalid_request":
        return ApiError(400, job.error or "invalid request", param_of(job.error or ""), code="invalid_request")
    if code in ("shutdown", "cancelled", "disconnected"):
        return ApiError(503, f"the request was cancelled: {code}", code=code, kind="server_error")
    return ApiError(500, job.error or "the generation failed", code=code, kind="server_error")


# ---- parsing ----------------------------------------------------------------------------------------


def _validation_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """Pydantic's errors as one OpenAI error: 400 for a body that is not JSON, 422 otherwise."""
    if not errors:
        return JSONResponse(ApiError(422, "invalid request").body(), status_code=422)
    if errors[0].get("type") == "json_invalid":
        first = errors[0]
        message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        return JSONResponse(ApiError(400, message).body(), status_code=400)
    params = [".".join(str(p) for p in e.get("loc", ()) if p != "body") or None for e in errors]
    message = "; ".join(_describe_error(error, param) for error, param in zip(errors, params, strict=True))
    return JSONResponse(ApiError(422, message, params[0]).body(), status_code=422)


def _describe_error(error: dict[str, Any], param: str | None) -> str:
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown field {param!r} (see the README for the fields of this endpoint)"
    if kind == "missing":
        return f"{param} is required"
    if param is None:
        return str(error.get("msg"))
    return f"{param}: {error.get('msg')} (got {error.get('input')!r})"


def _validate(model: type[BaseModel], data: Any, strict: bool = False) -> Any:
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None


async def _json_request(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body validated strictly (a string is not a number)."""
    raw = await request.body()
    if not raw:
        raise ApiError(400, "the body is empty: send a JSON object")
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None


async def _form_request(request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """A multipart form: its text fields (a JSON object in `teacache` decoded) and its files by field."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send multipart/form-data (the image as a file part)")
    try:
        form = await request.form()
    except Exception as error:
        raise ApiError(400, f"the multipart body cannot be read: {error}") from None
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key not in _FORM_FILE_FIELDS:
                raise ApiError(422, f"unknown file field {key!r}; allowed: {sorted(_FORM_FILE_FIELDS)}", key)
            files.setdefault(key, []).append(await value.read())
        elif key in _FORM_FILE_FIELDS:
            raise ApiError(400, f"{key} must be a file part (an image), got a text field", key)
        elif (match := _NESTED_FIELD.match(key)) is not None:
            # The openai client's form encoding of an object: teacache[field]=value, teacache[list][]=value.
            name, field, is_list = match.groups()
            nested = fields.setdefault(name, {})
            if not isinstance(nested, dict):
                raise ApiError(422, f"{name} is given both as a value and as an object", name)
            item = _form_value(value)
            if is_list:
                nested.setdefault(field, []).append(item)
            elif field in nested:
                raise ApiError(422, f"field {key!r} is given twice", name)
            else:
                nested[field] = item
        elif key in fields:
            raise ApiError(422, f"field {key!r} is given twice", key)
        else:
            fields[key] = value
    if isinstance(fields.get("teacache"), str) and fields["teacache"].lstrip().startswith("{"):
        try:
            fields["teacache"] = json.loads(fields["teacache"])
        except json.JSONDecodeError as error:
            raise ApiError(400, f"teacache is not a valid JSON object: {error}", "teacache") from None
    return fields, files


_NESTED_FIELD = re.compile(r"^(teacache)\[(\w+)\](\[\])?$")


def _form_value(text: str) -> Any:
    """A form field inside an object: a JSON number, true, false or null as such, anything else as text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
