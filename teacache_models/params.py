"""Sampling-time configuration: `TeaCacheParams` and the `SamplingParams` that carry it.

Both are frozen dataclasses validated at construction, so an invalid value fails where it is written,
not steps later inside a model. Use `dataclasses.replace` to derive a changed copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field, fields
from typing import Any

from .checks import require_bool, require_int, require_number

__all__ = [
    "CACHE_METHODS",
    "FORECAST_SLOPES",
    "OPTIONAL_SAMPLING_FIELDS",
    "RescalingFit",
    "SamplingParams",
    "TeaCacheParams",
]

_MAX_SEED = 2**64 - 1
# Released models sample with 1-100 steps; a schedule of millions would fill memory before its first step.
MAX_STEPS = 10_000


def _coefficient_tuple(value: Any, name: str = "coefficients") -> tuple[float, ...] | None:
    if value is None:
        return None
    allowed = "None or a non-empty sequence of finite floats (highest degree first)"
    if isinstance(value, str | bytes | Mapping | Set):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if hasattr(value, "tolist"):  # numpy arrays and torch tensors
        value = value.tolist()
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"{name} must be {allowed}, got {value!r}") from None
    if not items:
        raise ValueError(f"{name} must be {allowed}, got an empty sequence")
    return tuple(require_number(f"{name}[{i}]", c) for i, c in enumerate(items))


def _range_pair(name: str, value: Any) -> tuple[float, float]:
    allowed = "None or two finite numbers (low, high) with low <= high"
    if isinstance(value, str | bytes | Mapping | Set) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    low, high = (require_number(f"{name}[{i}]", v) for i, v in enumerate(value))
    if low > high:
        raise ValueError(f"{name} must be {allowed}, got ({low}, {high})")
    return low, high


# 0: reuse the last residual; 1: extrapolate it linearly from the last two computed steps.
RESIDUAL_ORDERS = (0, 1)
# "teacache": the published decision (a fitted polynomial of the indicator's change, accumulated);
# "forecast": skip while the indicator follows the forecast a skipped step uses (`cache/forecast.py`).
CACHE_METHODS = ("teacache", "forecast")
# How far along the slope of its last two computed steps the forecast method carries a step (`forecast_slope`).
FORECAST_SLOPES = ("steps", "indicator")


def _refuse_unknown_fields(cls: type, kwargs: dict[str, Any]) -> None:
    """A keyword that is no field of the dataclass `cls` is a TypeError naming it and the fields (Python's own
    error names only the keyword)."""
    unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {unknown}; its fields: {[f.name for f in fields(cls)]}")


def evaluate_polynomial(coefficients: Sequence[float], x: float) -> float:
    """Horner evaluation, highest degree first (the convention of `numpy.poly1d`)."""
    result = 0.0
    for c in coefficients:
        result = result * x + c
    return result


@dataclass(frozen=True)
class RescalingFit:
    """A checkpoint's rescaling polynomial for one indicator, as a model holds it (`set_teacache_fits`).

    Args:
        coefficients: the polynomial, highest degree first; both CFG branches use it unless
            `coefficients_negative` is given.
        coefficients_negative: the negative branch's own polynomial, where calibration found the branches
            differ; None: `coefficients`.
        calibrated_range: (min, max) of the indicator distances it was fitted on; None: unknown.
    """

    coefficients: tuple[float, ...]
    coefficients_negative: tuple[float, ...] | None = None
    calibrated_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        coefficients = _coefficient_tuple(self.coefficients)
        if coefficients is None:
            raise ValueError("coefficients must be a non-empty sequence of finite floats (highest degree first)")
        object.__setattr__(self, "coefficients", coefficients)
        negative = _coefficient_tuple(self.coefficients_negative, "coefficients_negative")
        object.__setattr__(self, "coefficients_negative", negative)
        if self.calibrated_range is not None:
            object.__setattr__(self, "calibrated_range", _range_pair("calibrated_range", self.calibrated_range))

    def for_branch(self, is_cfg_negative: bool) -> tuple[float, ...]:
        """The polynomial of one CFG branch."""
        return (self.coefficients_negative if is_cfg_negative else None) or self.coefficients


@dataclass(frozen=True)
class TeaCacheParams:
    """How TeaCache decides to skip the block stack during one generation.

    Args:
        teacache_thresh: the accumulated rescaled distance below which a step is skipped. 0 never skips
            (output is bit-identical to the uncached model); higher is faster and less faithful.
        coefficients: the rescaling polynomial, highest degree first. None uses the fit the model was
            given for the chosen indicator (`set_teacache_fits`; a pipeline hands over its zoo entry's).
        start_skipping: number of first denoising steps that always compute.
        end_skipping: number of last denoising steps that always compute.
        use_ret_steps: use the model's alternative indicator, where the model offers one (Wan).
        indicator: which indicator to use among those the model offers (its
            `supported_teacache_indicators`); None is the model's published default.
        residual_order: what a skipped step adds to the block-stack input. 0 (TeaCache as published):
            the residual of the branch's last computed step. 1: that residual extrapolated linearly in
            the step index from the branch's last two computed steps (a first-order Taylor step), which
            follows the residual's drift between computes; until a branch has computed twice, order 0.
        max_consecutive_skips: at most this many skipped steps in a row per branch, then one computes
            whatever the accumulated distance; None (as published) sets no limit.
        calibrated_range: (min, max) of the indicator distances the coefficients were fitted on
            (`scripts/calibrate.py` records it); `teacache_stats()` lists the steps whose distance fell
            outside it. None: unknown.
        coefficients_negative: the negative CFG branch's polynomial, where calibration found the branches
            differ (`scripts/calibrate.py`); None: `coefficients` rescale both branches. Needs `coefficients`
            (with `coefficients=None` the model's fit brings its own negative-branch polynomial, if any).
        per_sample: each row of a batch keeps its own TeaCache state (accumulator, previous indicator,
            residual, per CFG branch) and decides alone; a step runs the block stack only on the rows that
            must compute. False (the default) takes one decision for the whole batch, from the distance over
            all of it. Per-row thresholds: give `enable_teacache` a sequence of TeaCacheParams, one per row.
        method: the skip decision. "teacache" (the default) is TeaCache as published. "forecast" forecasts the
            indicator with the rule a skipped step forecasts the residual with (`residual_order`,
            `extrapolation_scale`) and skips while the indicator stays within `teacache_thresh` (relative L1)
            of its forecast: it needs no fitted coefficients (`coefficients` then only feed the fit monitor).
            See `teacache_models.cache.forecast`.
        extrapolation_scale: under `residual_order=1`, the share of the extrapolated slope a skipped step
            adds, in [0, 1]: 1 (the default) extrapolates fully, 0.5 goes half-way from reuse to the linear
            extrapolation, which guards against the overshoot of a slope measured over a long gap.
        forecast_slope: method "forecast" with `residual_order=1`: how far along the slope between the
            branch's last two computed steps a step is carried. "steps" (the default): by the steps since the
            last computed one, `(k - k1) / (k1 - k0)`. "indicator": by how far the step's own indicator has
            moved along the indicator's slope (its least-squares projection onto it, at least 0), so the
            forecast follows a trajectory that speeds up or slows down; both are then scaled by
            `extrapolation_scale`. See `teacache_models.cache.forecast`.
        forecast_cadence: method "forecast": once the threshold has made a branch compute a step of its own
            choosing, the steps since the computed one before it (the branch's first gap) become its cadence:
            a later step also computes when that many steps have passed since the branch's last computed one,
            however well the forecast holds. False (the default): only the threshold decides.
        forecast_tail: method "forecast" with a threshold above 0: the last `forecast_tail` steps never
            compute (they are forecast from the computed steps; the inputs changing or
            `max_consecutive_skips` still make them compute), and a cadence step that would fall among them
            computes just before them, so that the last computed step serves several steps. Needs
            `end_skipping=0`. 0 (the default): none.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> TeaCacheParams:
        _refuse_unknown_fields(cls, kwargs)
        return super().__new__(cls)

    teacache_thresh: float = 0.1
    coefficients: tuple[float, ...] | None = None
    start_skipping: int = 1
    end_skipping: int = 1
    use_ret_steps: bool = False
    indicator: str | None = None
    residual_order: int = 0
    max_consecutive_skips: int | None = None
    calibrated_range: tuple[float, float] | None = None
    per_sample: bool = False
    coefficients_negative: tuple[float, ...] | None = None
    method: str = "teacache"
    extrapolation_scale: float = 1.0
    forecast_slope: str = "steps"
    forecast_cadence: bool = False
    forecast_tail: int = 0

    def __post_init__(self) -> None:
        require_bool("per_sample", self.per_sample)
        thresh = require_number("teacache_thresh", self.teacache_thresh, minimum=0.0)
        object.__setattr__(self, "teacache_thresh", thresh)
        object.__setattr__(self, "coefficients", _coefficient_tuple(self.coefficients))
        negative = _coefficient_tuple(self.coefficients_negative, "coefficients_negative")
        if negative is not None and self.coefficients is None:
            raise ValueError(
                "coefficients_negative needs coefficients (the positive branch's polynomial): give both, or "
                "neither to use the model's fit"
            )
        object.__setattr__(self, "coefficients_negative", negative)
        object.__setattr__(self, "start_skipping", require_int("start_skipping", self.start_skipping, 0))
        object.__setattr__(self, "end_skipping", require_int("end_skipping", self.end_skipping, 0))
        require_bool("use_ret_steps", self.use_ret_steps)
        if self.indicator is not None and (not isinstance(self.indicator, str) or not self.indicator):
            raise ValueError(f"indicator must be None or a non-empty string, got {self.indicator!r}")
        if self.indicator is not None:
            object.__setattr__(self, "indicator", str(self.indicator))  # numpy strings compare and print as str
        order = require_int("residual_order", self.residual_order, 0)
        if order not in RESIDUAL_ORDERS:
            raise ValueError(f"residual_order must be one of {list(RESIDUAL_ORDERS)}, got {order}")
        object.__setattr__(self, "residual_order", order)
        if self.max_consecutive_skips is not None:
            limit = require_int("max_consecutive_skips", self.max_consecutive_skips, 1)
            object.__setattr__(self, "max_consecutive_skips", limit)
        if self.calibrated_range is not None:
            object.__setattr__(self, "calibrated_range", _range_pair("calibrated_range", self.calibrated_range))
        if not isinstance(self.method, str) or str(self.method) not in CACHE_METHODS:
            raise ValueError(f"method must be one of {list(CACHE_METHODS)}, got {self.method!r}")
        object.__setattr__(self, "method", str(self.method))
        scale = require_number("extrapolation_scale", self.extrapolation_scale, minimum=0.0)
        if scale > 1:
            raise ValueError(f"extrapolation_scale must be in [0, 1], got {scale}")
        if scale != 1 and order == 0:
            raise ValueError(
                f"extrapolation_scale={scale} scales the extrapolated residual of residual_order=1, but "
                "residual_order is 0 (reuse): set residual_order=1, or leave extrapolation_scale at 1"
            )
        object.__setattr__(self, "extrapolation_scale", scale)
        if not isinstance(self.forecast_slope, str) or str(self.forecast_slope) not in FORECAST_SLOPES:
            raise ValueError(f"forecast_slope must be one of {list(FORECAST_SLOPES)}, got {self.forecast_slope!r}")
        object.__setattr__(self, "forecast_slope", str(self.forecast_slope))
        if self.forecast_slope != "steps" and (self.method != "forecast" or order == 0):
            raise ValueError(
                f"forecast_slope={self.forecast_slope!r} sets the slope of the forecast method's extrapolation, "
                f"but method is {self.method!r} and residual_order {order}: set method='forecast' and "
                "residual_order=1, or leave forecast_slope at 'steps'"
            )
        require_bool("forecast_cadence", self.forecast_cadence)
        tail = require_int("forecast_tail", self.forecast_tail, 0)
        object.__setattr__(self, "forecast_tail", tail)
        for name, value, unset in (("forecast_cadence", self.forecast_cadence, False), ("forecast_tail", tail, 0)):
            if value != unset and self.method != "forecast":
                raise ValueError(
                    f"{name}={value!r} is a setting of the forecast method, but method is {self.method!r}: set "
                    f"method='forecast', or leave {name} at {unset!r}"
                )
        if tail and self.end_skipping:
            raise ValueError(
                f"forecast_tail={tail} makes the last {tail} steps skip, but end_skipping={self.end_skipping} makes "
                "the last steps compute: set end_skipping=0 with forecast_tail"
            )


@dataclass(frozen=True)
class SamplingParams:
    """Everything one generation is asked for, apart from the prompt.

    Every field has a generic default; a model-zoo config supplies the model's own values.

    Args:
        num_inference_steps: denoising steps, 1 to 10,000 (`MAX_STEPS`).
        guidance_scale: guidance strength (CFG scale, or the embedded guidance of distilled models).
        seed: random seed; None draws one at random (the pipeline reports the seed it used).
        height, width: output size in pixels.
        num_frames: frames to generate (1 for images).
        negative_prompt: the prompt of the negative CFG branch; None uses the model's default.
        teacache_params: TeaCache settings; None runs without the cache.
        true_cfg_scale: true CFG scale of a guidance-distilled model (Flux, HunyuanVideo: CFG runs when it
            is > 1 and a negative prompt is given) or of Qwen-Image (its CFG scale). None: the family's
            default.
        guidance_scale_2: the CFG scale of Wan2.2's low-noise expert; None reuses `guidance_scale`.
        flow_shift: the flow-matching sigma shift; None keeps the scheduler's own setting.
        fps: frames per second of a saved video; None: the family's default.
        cfg_truncation: Z-Image: CFG stops once the normalised time (1 - sigma) exceeds it, in [0, 1]; None:
            never.
        cfg_normalization: Z-Image: cap the guided prediction's norm at this multiple of the positive
            one's; None: no cap.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SamplingParams:
        _refuse_unknown_fields(cls, kwargs)
        return super().__new__(cls)

    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    seed: int | None = None
    height: int = 1024
    width: int = 1024
    num_frames: int = 1
    negative_prompt: str | None = None
    teacache_params: TeaCacheParams | None = field(default_factory=TeaCacheParams)
    true_cfg_scale: float | None = None
    guidance_scale_2: float | None = None
    flow_shift: float | None = None
    fps: int | None = None
    cfg_truncation: float | None = None
    cfg_normalization: float | None = None

    def __post_init__(self) -> None:
        steps = require_int("num_inference_steps", self.num_inference_steps, 1)
        if steps > MAX_STEPS:
            raise ValueError(f"num_inference_steps must be an integer in [1, {MAX_STEPS}], got {steps}")
        object.__setattr__(self, "num_inference_steps", steps)
        scale = require_number("guidance_scale", self.guidance_scale, minimum=0.0)
        object.__setattr__(self, "guidance_scale", scale)
        if self.seed is not None:
            seed = require_int("seed", self.seed, 0)
            if seed > _MAX_SEED:
                raise ValueError(f"seed must be at most 2**64 - 1, got {seed}")
            object.__setattr__(self, "seed", seed)
        for name in ("height", "width", "num_frames"):
            object.__setattr__(self, name, require_int(name, getattr(self, name), 1))
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(
                f"negative_prompt must be a string or None, got {self.negative_prompt!r} "
                f"({type(self.negative_prompt).__name__})"
            )
        if self.teacache_params is not None and not isinstance(self.teacache_params, TeaCacheParams):
            raise ValueError(
                "teacache_params must be a TeaCacheParams or None, got "
                f"{self.teacache_params!r} ({type(self.teacache_params).__name__})"
            )
        for name in ("true_cfg_scale", "guidance_scale_2", "cfg_truncation"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, require_number(name, getattr(self, name), minimum=0.0))
        if self.cfg_truncation is not None and self.cfg_truncation > 1:
            # A normalised time never exceeds 1: a larger value would silently never truncate.
            raise ValueError(f"cfg_truncation must be None or in [0, 1] (a normalised time), got {self.cfg_truncation}")
        for name in ("flow_shift", "cfg_normalization"):
            value = getattr(self, name)
            if value is None:
                continue
            if require_number(name, value) <= 0:
                raise ValueError(f"{name} must be None or a number > 0, got {value}")
            object.__setattr__(self, name, float(value))
        if self.fps is not None:
            object.__setattr__(self, "fps", require_int("fps", self.fps, 1))

    def extras(self) -> dict[str, Any]:
        """The optional family-specific fields that are set (not None)."""
        return {name: getattr(self, name) for name in OPTIONAL_SAMPLING_FIELDS if getattr(self, name) is not None}


OPTIONAL_SAMPLING_FIELDS = (
    "true_cfg_scale",
    "guidance_scale_2",
    "flow_shift",
    "fps",
    "cfg_truncation",
    "cfg_normalization",
)
