"""Request bodies of the server and their translation into `SamplingParams`.

The OpenAI fields keep OpenAI's names and meaning (`size` is "WIDTHxHEIGHT"); the extension fields are
the `SamplingParams` settings under their own names, and `teacache` is "off", a preset name, or an
object of `TeaCacheParams` fields that override the server's default cache settings. Unknown fields are
refused, never ignored, and every error names the field and what it allows.
"""

from __future__ import annotations

import dataclasses
import io
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..params import OPTIONAL_SAMPLING_FIELDS, SamplingParams, TeaCacheParams
from ..zoo import ZooEntry

__all__ = [
    "MAX_IMAGES",
    "MAX_STEPS",
    "ApiError",
    "ImageRequest",
    "Served",
    "VideoRequest",
    "decode_image",
    "param_of",
    "sampling_params",
]

# OpenAI's own limit on `n`.
MAX_IMAGES = 10
MAX_STEPS = 1000
MAX_SIDE = 8192
MAX_FRAMES = 1025
MAX_PROMPT_CHARS = 10000
_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
_TEACACHE_FIELDS = tuple(f.name for f in dataclasses.fields(TeaCacheParams))


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Fields(BaseModel):
    """The fields every generation request has."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, or 'auto' (the model's default)")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0)
    true_cfg_scale: float | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    # Checked by `_teacache`, which names what is allowed (pydantic would list the union's members).
    teacache: Any = Field(None, description="'off', a preset name, or an object of TeaCacheParams fields")


class ImageRequest(_Fields):
    """POST /v1/images/generations (JSON) and /v1/images/edits (multipart, with `image` parts)."""

    n: int = Field(1, ge=1, le=MAX_IMAGES)
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png"] = "png"


class VideoRequest(_Fields):
    """POST /v1/videos (JSON or multipart, with an optional `input_reference` image)."""

    seconds: float | None = Field(None, gt=0, le=MAX_FRAMES, description="duration: num_frames = seconds x fps + 1")
    num_frames: int | None = Field(None, ge=1, le=MAX_FRAMES)
    fps: int | None = Field(None, ge=1, le=240)


@dataclass
class Served:
    """The model this server runs and its defaults."""

    name: str
    pipe: Any
    entry: ZooEntry | None
    default_teacache: TeaCacheParams | None

    @property
    def is_video(self) -> bool:
        return bool(self.pipe.is_video)

    def presets(self) -> list[str]:
        return sorted(self.entry.presets) if self.entry is not None else []


def _size(text: str) -> tuple[int, int]:
    match = _SIZE.match(text)
    if not match:
        raise ApiError(400, f"size {text!r} must be 'WIDTHxHEIGHT' in pixels (e.g. '512x512') or 'auto'", "size")
    width, height = int(match.group(1)), int(match.group(2))
    if max(width, height) > MAX_SIDE:
        raise ApiError(400, f"size {text!r}: each side must be at most {MAX_SIDE} pixels", "size")
    return width, height


def _teacache(value: Any, served: Served) -> TeaCacheParams | None:
    if value is None:
        return served.default_teacache
    if isinstance(value, str):
        if value == "off":
            return None
        if value == "default":
            return served.default_teacache
        if served.entry is None or value not in served.entry.presets:
            raise ApiError(
                400,
                f"teacache {value!r} is not 'off', 'default' or a preset of {served.name}: {served.presets()}",
                "teacache",
            )
        return served.entry.presets[value].params
    if not isinstance(value, dict):
        raise ApiError(
            400,
            f"teacache must be 'off', a preset name ({served.presets()}) or an object of TeaCacheParams fields, "
            f"got {value!r}",
            "teacache",
        )
    unknown = sorted(set(value) - set(_TEACACHE_FIELDS))
    if unknown:
        raise ApiError(400, f"teacache has unknown fields {unknown}; allowed: {list(_TEACACHE_FIELDS)}", "teacache")
    base = served.default_teacache
    try:
        if base is None:
            if "teacache_thresh" not in value:
                raise ApiError(
                    400,
                    f"teacache: {served.name} runs without a cache by default, so an object needs "
                    "teacache_thresh (and coefficients for a model without presets)",
                    "teacache",
                )
            return TeaCacheParams(**value)
        return dataclasses.replace(base, **value)
    except (ValueError, TypeError) as error:
        raise ApiError(400, f"teacache: {error}", "teacache") from None


# SamplingParams field -> the request field that sets it.
_PARAM_FIELDS = {
    "height": "size",
    "width": "size",
    "num_inference_steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "true_cfg_scale": "true_cfg_scale",
    "seed": "seed",
    "negative_prompt": "negative_prompt",
    "num_frames": "num_frames",
    "fps": "fps",
}


def param_of(message: str) -> str | None:
    """The request field an error message of the params or the pipeline is about (it starts with it)."""
    first = re.split(r"[ =]", message, maxsplit=1)[0]  # "height must be ..." or "negative_prompt='x' has ..."
    return _PARAM_FIELDS.get(first)


def sampling_params(request: _Fields, served: Served) -> SamplingParams:
    """The request's settings over the model's defaults, checked by the pipeline as a generation would
    check them; ApiError (400) naming the field otherwise."""
    if request.model is not None and request.model != served.name:
        raise ApiError(
            400,
            f"model {request.model!r} is not served here; this server serves {served.name!r}",
            "model",
            code="model_not_found",
        )
    base = served.entry.sampling if served.entry is not None else SamplingParams()
    given: dict[str, Any] = {}
    if request.size is not None and request.size != "auto":
        given["width"], given["height"] = _size(request.size)
    for name in ("num_inference_steps", "guidance_scale", "true_cfg_scale", "seed", "negative_prompt"):
        if getattr(request, name) is not None:
            given[name] = getattr(request, name)
    if isinstance(request, VideoRequest):
        if request.num_frames is not None and request.seconds is not None:
            raise ApiError(400, "give seconds or num_frames, not both", "seconds")
        if request.fps is not None:
            given["fps"] = request.fps
        if request.num_frames is not None:
            given["num_frames"] = request.num_frames
        elif request.seconds is not None:
            fps = request.fps or base.fps or 16
            given["num_frames"] = round(request.seconds * fps) + 1
            if given["num_frames"] > MAX_FRAMES:
                raise ApiError(
                    400,
                    f"seconds {request.seconds} at {fps} fps make {given['num_frames']} frames; at most {MAX_FRAMES}",
                    "seconds",
                )
    if not request.prompt.strip() and not served.pipe.captions_blank_prompts:
        raise ApiError(
            400,
            f"prompt must not be blank for {served.name}: only a layered model (Qwen-Image-Layered) takes a blank "
            "prompt, which it replaces by a caption of its input image",
            "prompt",
        )
    unread = sorted(set(given) & set(OPTIONAL_SAMPLING_FIELDS) - served.pipe.sampling_extras)
    if unread:
        raise ApiError(
            400,
            f"{unread[0]} has no effect on {served.name}: of the optional settings it reads "
            f"{sorted(served.pipe.sampling_extras) or 'none'}",
            _PARAM_FIELDS[unread[0]],
        )
    try:
        params = dataclasses.replace(base, **given, teacache_params=_teacache(request.teacache, served))
    except ValueError as error:
        raise ApiError(400, str(error), param_of(str(error))) from None
    if params.teacache_params is not None:
        try:  # what the model offers (indicator, a fit for it): refused here, not when the job starts
            for model in served.pipe.teacache_models().values():
                model.teacache_schedule(params.teacache_params)
        except ValueError as error:
            raise ApiError(400, f"teacache: {error}", "teacache") from None
    # A field given explicitly that this model would not read with these settings is refused, not dropped.
    ignored = served.pipe.ignored_settings(params)
    refused = sorted(set(given) & set(ignored))
    if refused:
        name = refused[0]
        raise ApiError(400, f"{name} {given[name]!r} has no effect on {served.name}: {ignored[name]}", name)
    try:
        served.pipe.check_params(params)
    except ValueError as error:
        param = param_of(str(error))
        prefix = f"size {request.size!r}: " if param == "size" else ""
        raise ApiError(400, prefix + str(error), param) from None
    return params


def decode_image(data: bytes, field: str) -> Any:
    """Uploaded bytes -> an RGB PIL image; 400 naming `field` when they are not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ApiError(400, f"{field} is not an image PIL can read (PNG, JPEG, WebP ...): {error}", field) from None
