"""`TeaCacheMixin`: the cache every native transformer of this package inherits.

A model provides two pieces:

- `teacache_indicator(hidden_states, **block_inputs)`: the cheap tensor computed at block entry whose
  change between steps predicts the change of the output (for most models the timestep-modulated
  input of block 0);
- `forward_blocks(hidden_states, **block_inputs)`: the block stack between the embeddings and the
  output head, returning the stream the head reads.

Its `forward` then calls `self.run_blocks(hidden_states, **block_inputs)` where it would run the
blocks. The mixin decides, per step and per CFG branch, whether to run them or to add the residual
cached at the branch's last computed step. Which step and branch a call computes is told by the
caller through `with model.teacache_step(step_index, is_cfg_negative): ...` (or diffusers'
`cache_context`, see `context`); a call outside that context runs the blocks and touches no state.
A block input that only the blocks read (rotary tables, projected text) can be passed as
`Deferred(compute, sources)`: it is computed when the blocks run, never on a skipped step.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from ..params import TeaCacheParams, evaluate_polynomial, require_int
from .context import CacheContextMixin
from .monitor import FitMonitor
from .state import BranchState, StepObservation, TeaCacheSession, TeaCacheStats, branch_name

__all__ = ["Deferred", "ObserverHandle", "StepObserver", "TeaCacheIndicator", "TeaCacheMixin", "relative_l1_distance"]

StepObserver = Callable[[StepObservation], None]


def relative_l1_distance(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """mean|current - previous| / mean|previous| over the whole tensor (batch included), in float32."""
    previous = previous.float()
    return (current.float() - previous).abs().mean() / previous.abs().mean()


def _group_distance(
    current: torch.Tensor, previous: torch.Tensor | None, forced: bool, group: dist.ProcessGroup
) -> tuple[bool, float]:
    """The forced flag and the distance of the whole indicator, from the shards the ranks of `group` hold.

    One collective per step on every rank, forced or not, so no rank waits for a reduction another
    rank skipped; a step is forced everywhere as soon as one rank must compute.
    """
    stats = torch.zeros(3, dtype=torch.float32, device=current.device)
    stats[0] = float(forced)
    if not forced:
        previous = previous.float()
        stats[1] = (current.float() - previous).abs().sum()
        stats[2] = previous.abs().sum()
    dist.all_reduce(stats, group=group)
    forced_anywhere, difference, scale = stats.tolist()
    return forced_anywhere > 0, difference / scale if scale else float("inf")


# The decision helpers wrapped with torch.compiler.disable, made once torch.compile is in use: the
# decision reads and writes Python state (step index, branch, accumulator) and syncs for one float, so
# it stays out of graphs, and a compiled model traces the block stack once per path (computed or
# skipped) instead of recompiling at every step. Made lazily because importing the compiler costs
# seconds that eager runs never need.
_OUTSIDE_GRAPHS: dict[str, Callable[..., Any]] = {}


def _prepare_for_compile() -> None:
    if not _OUTSIDE_GRAPHS and "torch._dynamo" in sys.modules:
        for name in (
            "_teacache_plan",
            "_teacache_record",
            "_teacache_record_rows",
            "_teacache_notify",
            "_teacache_notify_rows",
            "_claim_batched_cfg_call",
        ):
            _OUTSIDE_GRAPHS[name] = torch.compiler.disable(getattr(TeaCacheMixin, name))


def _helper(name: str) -> Callable[..., Any]:
    return _OUTSIDE_GRAPHS.get(name) or getattr(TeaCacheMixin, name)


def _caller_stacklevel() -> int:
    """The warnings stack level of the first frame outside this package and torch: the user's call."""
    level, frame = 2, sys._getframe(2)  # 2: the caller of the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_PATHS):
        level, frame = level + 1, frame.f_back
    return level


_INTERNAL_PATHS = (str(Path(__file__).resolve().parents[1]), str(Path(torch.__file__).resolve().parent))


@dataclass(frozen=True)
class Deferred:
    """A block-stack input computed only when the block stack runs: a skipped step never needs it.

    `compute()` returns the value `forward_blocks` receives; `sources`, the tensors (and plain values,
    such as a layout) it is computed from, stand for it in the check that the block-stack inputs kept
    their shape, dtype and device. The indicator must not read a deferred input.
    """

    compute: Callable[[], Any]
    sources: tuple[Any, ...] = ()


def _materialize(block_inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.compute() if isinstance(v, Deferred) else v for k, v in block_inputs.items()}


def _tensor_signature(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.dtype, tensor.device


def _value_signature(value: Any, per_row: bool = False) -> Any:
    """A tensor's shape, dtype and device; a plain value (a layout, a length) itself; containers item by item.

    `per_row`: the value carries the batch in dim 0 and the signature is one row's (the batch size left out).
    """
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape[1:]), value.dtype, value.device) if per_row else _tensor_signature(value)
    if isinstance(value, Deferred):
        return _value_signature(value.sources, per_row)
    if isinstance(value, list | tuple):
        return tuple(_value_signature(v, per_row) for v in value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return type(value).__name__


def _inputs_signature(hidden_states: torch.Tensor, indicator: torch.Tensor, block_inputs: dict[str, Any]) -> tuple:
    """Shapes, dtypes and devices of everything the block stack reads, and its plain values (layouts, lengths):
    a change means the cache is stale."""
    parts = [_tensor_signature(hidden_states), _tensor_signature(indicator)]
    parts.extend((name, _value_signature(value)) for name, value in sorted(block_inputs.items()))
    return tuple(parts)


def _row_signature(
    hidden_states: torch.Tensor, indicator: torch.Tensor, block_inputs: dict[str, Any], row_inputs: frozenset[str]
) -> tuple:
    """`_inputs_signature` of one batch row: what a row's cache depends on, whatever the batch size."""
    parts = [_value_signature(hidden_states, True), _value_signature(indicator, True)]
    parts.extend((name, _value_signature(value, name in row_inputs)) for name, value in sorted(block_inputs.items()))
    return tuple(parts)


def _check_rows(name: str, value: Any, batch: int) -> None:
    """Refuse a block input said to carry the batch in dim 0 whose tensors lead with another size (1 broadcasts)."""
    if isinstance(value, Deferred):
        value = value.sources
    if isinstance(value, list | tuple):
        for item in value:
            _check_rows(name, item, batch)
    elif isinstance(value, torch.Tensor) and (value.ndim == 0 or value.shape[0] not in (1, batch)):
        raise ValueError(
            f"per-sample TeaCache splits the block input {name!r} by batch row, but its shape {tuple(value.shape)} "
            f"does not lead with the batch size {batch}; use per_sample=False for this call"
        )


def _take_rows(value: Any, index: torch.Tensor) -> Any:
    """The rows `index` of a block input that carries the batch in dim 0 (tensors inside lists and tuples too)."""
    if isinstance(value, torch.Tensor):
        if value.shape[0] == 1:
            return value  # broadcast over the batch: every row shares it
        return value.index_select(0, index.to(value.device))
    if isinstance(value, list | tuple):
        return type(value)(_take_rows(v, index) for v in value)
    return value  # None, or a plain value (a count) that every row shares


@dataclass
class _RowPlan:
    """One per-sample step: the row sessions, which rows compute, and what the skipped rows add."""

    rows: list[TeaCacheSession]
    compute: list[int]
    residuals: dict[int, torch.Tensor]
    contexts: list[_StepContext]


@dataclass
class _StepContext:
    step_index: int
    is_cfg_negative: bool
    batched_cfg: bool = False
    used: bool = False
    # The branches whose state the call has changed (both for a batched call split per branch): what a
    # failed call must undo.
    planned: list[bool] = field(default_factory=list)
    # What the decision saw, for the step observers: the indicator and its relative L1 distance.
    indicator: torch.Tensor | None = None
    distance: float | None = None
    # A call of requests batched step by step (`teacache_rows_step`): each row's state and step index.
    rows: list[TeaCacheSession] | None = None
    row_steps: list[int] | None = None


class ObserverHandle:
    """Returned by `add_teacache_observer`; `remove()` detaches the observer (also as a context manager)."""

    def __init__(self, observers: dict[int, StepObserver], key: int) -> None:
        self._observers, self._key = observers, key

    def remove(self) -> None:
        self._observers.pop(self._key, None)

    def __enter__(self) -> ObserverHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def _branch_property(name: str, is_cfg_negative: bool, default: Any) -> property:
    """A read-only view of one CFG branch's state field (`default` while no generation has started)."""

    def read(self: TeaCacheMixin) -> Any:
        state = self._branch_state(is_cfg_negative)
        return default if state is None else getattr(state, name)

    read.__doc__ = f"The {branch_name(is_cfg_negative)} branch's {name} ({default} before a generation)."
    return property(read)


@dataclass(frozen=True)
class TeaCacheIndicator:
    """An indicator a model offers, and how the steps of a schedule on it are forced.

    Attributes:
        name: the value of `TeaCacheParams.indicator` that picks it.
        ret_steps: it is the indicator `use_ret_steps=True` selects (at most one per model); the two
            fields below shape the forced steps of that mode (picked by name alone, it is forced as any).
        first_forced_steps: at least this many first steps always compute, whatever `start_skipping` says
            (Wan's ret-steps mode: 5).
        free_last_steps: an `end_skipping` up to this many forces no last step (Wan's ret-steps mode leaves
            the last step free: 1).
    """

    name: str
    ret_steps: bool = False
    first_forced_steps: int = 0
    free_last_steps: int = 0


class TeaCacheMixin(CacheContextMixin):
    """Adds TeaCache to an `nn.Module` whose forward runs `self.run_blocks(...)` between embeddings and head.

    What a model can do is class data:

    - `teacache_indicators`: the indicators `TeaCacheParams.indicator` may name, each a
      `TeaCacheIndicator` saying how its forced steps work; the first is the default (what `indicator=None`
      means). `supported_teacache_indicators` (their names) and `supports_ret_steps` derive from it.
    - `supports_cfg_separation`: the model keeps separate state per CFG branch. When False, a
      negative-branch step switches TeaCache off for the rest of the generation (with one warning).
    - `teacache_row_inputs`: the block inputs that carry the batch in dim 0 (the others, such as rotary
      tables, every row shares). Per-sample state (`TeaCacheParams.per_sample`) runs the block stack on a
      subset of the rows, so it needs this; None means the inputs cannot be split by row and per-sample
      state is refused.

    The rescaling polynomials are no part of a model: a checkpoint's fits live in its zoo entry, and the
    loader hands them to the instance with `set_teacache_fits` (per indicator). `TeaCacheParams.coefficients`
    None means the instance's fit for the chosen indicator.
    """

    supports_cfg_separation: ClassVar[bool] = True
    teacache_row_inputs: ClassVar[frozenset[str] | None] = None
    teacache_indicators: ClassVar[tuple[TeaCacheIndicator, ...]] = (TeaCacheIndicator("modulated_input"),)
    supported_teacache_indicators: ClassVar[tuple[str, ...]] = ("modulated_input",)
    supports_ret_steps: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        indicators = cls.teacache_indicators
        assert indicators and sum(i.ret_steps for i in indicators) <= 1, f"{cls.__name__}.teacache_indicators"
        cls.supported_teacache_indicators = tuple(i.name for i in indicators)
        cls.supports_ret_steps = any(i.ret_steps for i in indicators)

    # ---- the two pieces a model provides -------------------------------------------------------

    def teacache_indicator(self, hidden_states: torch.Tensor, **block_inputs: Any) -> torch.Tensor:
        """The tensor whose relative change between steps drives the skip decision."""
        raise NotImplementedError(f"{type(self).__name__} must implement teacache_indicator()")

    def forward_blocks(self, hidden_states: torch.Tensor, **block_inputs: Any) -> torch.Tensor:
        """The block stack: returns the stream the output head reads, same shape as `hidden_states`."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_blocks()")

    # ---- the fits and the schedule ----------------------------------------------------------------

    def teacache_weights_key(self) -> Any:
        """What the block stack's output depends on besides its inputs, e.g. the LoRA adapters and their
        weights: when it changes, the cached residuals are stale and every branch's next step computes."""
        return None

    def set_teacache_fits(self, fits: Mapping[str, Sequence[float]]) -> None:
        """Give this instance its checkpoint's rescaling polynomials, {indicator name: coefficients} (highest
        degree first): what `TeaCacheParams(coefficients=None)` uses. Replaces any earlier fits."""
        if not isinstance(fits, Mapping):
            raise TypeError(f"fits must be a mapping of indicator name to coefficients, got {type(fits).__name__}")
        checked = {}
        for name, coefficients in fits.items():
            if name not in self.supported_teacache_indicators:
                raise ValueError(
                    f"fits names indicator {name!r}, which {type(self).__name__} does not offer; "
                    f"choose among {list(self.supported_teacache_indicators)}"
                )
            checked[name] = TeaCacheParams(coefficients=coefficients).coefficients
        self.__dict__["_teacache_fits"] = checked

    @property
    def teacache_fits(self) -> dict[str, tuple[float, ...]]:
        """The instance's rescaling polynomials per indicator (empty unless a loader or the user set them)."""
        return dict(self.__dict__.get("_teacache_fits", {}))

    @classmethod
    def teacache_indicator_for(cls, params: TeaCacheParams | None) -> TeaCacheIndicator:
        """The indicator `params` chooses (the default one for None), checked against what the model offers."""
        by_name = {i.name: i for i in cls.teacache_indicators}
        if params is None:
            return cls.teacache_indicators[0]
        if params.indicator is not None and params.indicator not in by_name:
            raise ValueError(
                f"indicator {params.indicator!r} is not offered by {cls.__name__}; choose one of {list(by_name)}"
            )
        if not params.use_ret_steps:
            return by_name[params.indicator] if params.indicator else cls.teacache_indicators[0]
        ret_steps = next((i for i in cls.teacache_indicators if i.ret_steps), None)
        if ret_steps is None:
            raise ValueError(
                f"use_ret_steps=True is not available for {cls.__name__}: it has no alternative "
                "indicator; use use_ret_steps=False"
            )
        if params.indicator not in (None, ret_steps.name):
            raise ValueError(
                f"use_ret_steps=True uses the {ret_steps.name!r} indicator, but indicator={params.indicator!r} "
                f"was given; leave indicator=None (or {ret_steps.name!r}) with use_ret_steps=True, or set "
                "use_ret_steps=False"
            )
        return ret_steps

    def teacache_schedule(self, params: TeaCacheParams) -> tuple[tuple[float, ...], int, int]:
        """Resolve `params` for this model: (coefficients, first forced steps, last forced steps).

        The coefficients are `params.coefficients`, else the instance's fit for the chosen indicator; in the
        ret-steps mode the indicator's `first_forced_steps` and `free_last_steps` bound the forced windows.
        """
        indicator = self.teacache_indicator_for(params)
        coefficients = params.coefficients or self.teacache_fits.get(indicator.name)
        if coefficients is None:
            fitted = sorted(self.teacache_fits)
            raise ValueError(
                f"{type(self).__name__} has no TeaCache coefficients for indicator {indicator.name!r}"
                + (f" (its fits are for {fitted})" if fitted else "")
                + ": pass TeaCacheParams(coefficients=[...]) (highest degree first), or load the model "
                "through a zoo entry with a fit for that indicator"
            )
        if not params.use_ret_steps:
            return tuple(coefficients), params.start_skipping, params.end_skipping
        first_forced = max(indicator.first_forced_steps, params.start_skipping)
        last_forced = params.end_skipping if params.end_skipping > indicator.free_last_steps else 0
        return tuple(coefficients), first_forced, last_forced

    # ---- public surface -------------------------------------------------------------------------

    def enable_teacache(self, params: TeaCacheParams | Sequence[TeaCacheParams], num_inference_steps: int) -> None:
        """Start a generation of `num_inference_steps` steps with TeaCache on; all state is reset.

        `params` with `per_sample=True` gives every batch row its own state (any batch size, fixed by the
        first step). A sequence of TeaCacheParams, each with `per_sample=True`, gives one per row: each row
        its own threshold and skip settings; every call of the generation then has that many rows. The rows
        share the indicator (`indicator`, `use_ret_steps`), which the model computes once for the batch.
        """
        row_params = self._check_row_params(params)
        if not row_params and not isinstance(params, TeaCacheParams):
            raise TypeError(f"params must be a TeaCacheParams, got {type(params).__name__}")
        num_inference_steps = require_int("num_inference_steps", num_inference_steps, 1, wrong_type=TypeError)
        if self.__dict__.get("_teacache_context") is not None:
            raise RuntimeError("enable_teacache() cannot be called inside a teacache_step() context")
        _prepare_for_compile()
        sessions = [self._new_session(p, num_inference_steps, watched=False) for p in row_params]
        self.__dict__["_teacache_generation"] = self.__dict__.get("_teacache_generation", -1) + 1
        self._detach_monitor()
        session = self._new_session(row_params[0] if row_params else params, num_inference_steps, not row_params)
        session.row_params = row_params
        if len(row_params) > 1 or not isinstance(params, TeaCacheParams):
            session.rows = sessions
        self.__dict__["_teacache_session"] = session

    def _new_session(self, params: TeaCacheParams, num_inference_steps: int, watched: bool) -> TeaCacheSession:
        """A generation's state for `params`; `watched`: its fit monitor observes the model's steps."""
        coefficients, first_forced, last_forced = self.teacache_schedule(params)
        monitor = FitMonitor(
            coefficients,
            params.calibrated_range,
            num_inference_steps,
            type(self).__name__,
            lambda: self.__dict__.get("_teacache_group"),
        )
        return TeaCacheSession(
            params=params,
            coefficients=coefficients,
            num_inference_steps=num_inference_steps,
            first_forced_steps=first_forced,
            last_forced_steps=last_forced,
            monitor=monitor,
            monitor_handle=self.add_teacache_observer(monitor) if watched else None,
        )

    def _check_row_params(self, params: Any) -> tuple[TeaCacheParams, ...]:
        """The per-row parameters `params` asks for: () for a batch-shared decision."""
        if isinstance(params, TeaCacheParams):
            rows = (params,) if params.per_sample else ()
        elif isinstance(params, Sequence) and not isinstance(params, str | bytes):
            rows = tuple(params)
            if not rows:
                raise ValueError("params is an empty sequence: give one TeaCacheParams per batch row")
            for index, row in enumerate(rows):
                if not isinstance(row, TeaCacheParams):
                    raise TypeError(f"params[{index}] must be a TeaCacheParams, got {type(row).__name__}")
                if not row.per_sample:
                    raise ValueError(
                        f"params[{index}] has per_sample=False: a sequence of TeaCacheParams gives each batch row "
                        "its own state, so each must say per_sample=True"
                    )
                shared = (row.indicator, row.use_ret_steps)
                if shared != (rows[0].indicator, rows[0].use_ret_steps):
                    raise ValueError(
                        f"params[{index}] asks for indicator={row.indicator!r}, use_ret_steps={row.use_ret_steps}, "
                        f"params[0] for indicator={rows[0].indicator!r}, use_ret_steps={rows[0].use_ret_steps}: "
                        "the rows of one batch share the indicator"
                    )
        else:
            return ()
        if rows and self.teacache_row_inputs is None:
            raise ValueError(
                f"{type(self).__name__} cannot keep per-sample TeaCache state: its block-stack inputs cannot be "
                "split by batch row; use per_sample=False (one decision for the whole batch)"
            )
        return rows

    def _detach_monitor(self) -> None:
        session: TeaCacheSession | None = self.__dict__.get("_teacache_session")
        if session is not None and session.monitor_handle is not None:
            session.monitor_handle.remove()
            session.monitor_handle = None

    def disable_teacache(self) -> None:
        """Switch TeaCache off and free its tensors; `teacache_stats()` keeps describing the generation."""
        session: TeaCacheSession | None = self.__dict__.get("_teacache_session")
        if session is not None:
            session.active = False
            session.closed = True
            session.release_tensors()
            self._detach_monitor()

    def set_teacache_process_group(self, group: dist.ProcessGroup | None) -> None:
        """Share the skip decision with the ranks of `group`, which each hold a shard of the sequence.

        Every rank then computes the distance of the whole indicator, so all ranks skip the same steps.
        None (the default) decides from the local tensor alone.
        """
        group_type = getattr(dist, "ProcessGroup", None)
        if group is not None and (group_type is None or not isinstance(group, group_type)):
            raise TypeError(
                f"group must be a torch.distributed.ProcessGroup or None, got {group!r} ({type(group).__name__})"
            )
        self.__dict__["_teacache_group"] = group

    def add_teacache_observer(self, observer: StepObserver) -> ObserverHandle:
        """Call `observer(StepObservation)` after every step the model runs inside a `teacache_step()`
        context: the indicator, the block-stack input and output, the decision, the step and the branch.

        Observers watch; they must not change the tensors they receive. Returns a handle whose `remove()`
        detaches the observer.
        """
        if not callable(observer):
            raise TypeError(f"observer must be callable, got {type(observer).__name__}")
        observers: dict[int, StepObserver] = self.__dict__.setdefault("_teacache_observers", {})
        key = max(observers, default=-1) + 1
        observers[key] = observer
        return ObserverHandle(observers, key)

    @property
    def teacache_enabled(self) -> bool:
        session: TeaCacheSession | None = self.__dict__.get("_teacache_session")
        return session is not None and session.active

    @property
    def teacache_indicator_name(self) -> str:
        """The indicator of the running generation (the model's default when TeaCache is off); inside a
        `teacache_rows_step` call, that of its rows."""
        context: _StepContext | None = self.__dict__.get("_teacache_context")
        if context is not None and context.rows is not None:
            cached = [row.params for row in context.rows if row.active]
            return self.teacache_indicator_for(cached[0] if cached else None).name
        return self.teacache_indicator_for(self.teacache_params).name

    @property
    def teacache_params(self) -> TeaCacheParams | None:
        """The parameters of the running generation, or None when TeaCache is off."""
        session: TeaCacheSession | None = self.__dict__.get("_teacache_session")
        return session.params if session is not None and session.active else None

    @contextmanager
    def teacache_step(
        self, step_index: int, is_cfg_negative: bool = False, batched_cfg: bool = False
    ) -> Iterator[None]:
        """Declare which denoising step and CFG branch the forward call inside this context computes.

        `batched_cfg=True` declares a call whose batch holds both branches (positive half first). Such a
        call cannot share one branch's cache: unless the model splits it per branch itself, it is refused
        while TeaCache is on.

        Within one generation each branch's step indices must increase. A step whose context exits with an
        exception is not recorded, and the branch's next step computes (its cached state may be half
        updated), so the same step index can be run again.
        """
        step_index = require_int("step_index", step_index, 0, wrong_type=TypeError)
        if not isinstance(is_cfg_negative, bool):
            raise ValueError(f"is_cfg_negative must be True or False, got {is_cfg_negative!r}")
        if not isinstance(batched_cfg, bool):
            raise ValueError(f"batched_cfg must be True or False, got {batched_cfg!r}")
        if batched_cfg and is_cfg_negative:
            raise ValueError("batched_cfg=True covers both branches; leave is_cfg_negative=False")
        session: TeaCacheSession | None = self.__dict__.get("_teacache_session")
        if self.__dict__.get("_teacache_context") is not None:
            raise RuntimeError("teacache_step() contexts cannot be nested")
        if session is not None and not session.closed:
            for row in session.rows or [session]:
                self._check_step_order(row, step_index, (False, True) if batched_cfg else (is_cfg_negative,))
        _prepare_for_compile()
        context = _StepContext(step_index, is_cfg_negative, batched_cfg)
        self.__dict__["_teacache_context"] = context
        try:
            yield
        except BaseException:
            if session is not None:
                for negative in set(context.planned):
                    for row in [session, *(session.rows or ())]:
                        row.branches[negative].forget_step(step_index)
            raise
        finally:
            self.__dict__["_teacache_context"] = None

    @staticmethod
    def _check_step_order(session: TeaCacheSession, step_index: int, branches: tuple[bool, ...]) -> None:
        if step_index >= session.num_inference_steps:
            raise ValueError(
                f"step_index {step_index} is out of range: this generation has "
                f"{session.num_inference_steps} steps (0..{session.num_inference_steps - 1})"
            )
        for negative in branches:
            last = session.branches[negative].last_step
            if last is not None and step_index <= last:
                raise ValueError(
                    f"step_index {step_index} is not after {last}, the last step of the {branch_name(negative)} "
                    "CFG branch: within one generation each branch's step indices must increase; call "
                    "enable_teacache() to start a new generation"
                )

    def new_teacache_row(self, params: TeaCacheParams | None, num_inference_steps: int) -> TeaCacheSession:
        """One request's own TeaCache state, for batching requests step by step (`teacache_rows_step`).

        `params` None: the request runs without the cache (its rows always compute). The state lives as long
        as the caller keeps it; `teacache_row_stats(row)` reads its record.
        """
        if params is not None and not isinstance(params, TeaCacheParams):
            raise TypeError(f"params must be a TeaCacheParams or None, got {type(params).__name__}")
        num_inference_steps = require_int("num_inference_steps", num_inference_steps, 1, wrong_type=TypeError)
        self._check_row_params([dataclasses.replace(params or TeaCacheParams(teacache_thresh=0.0), per_sample=True)])
        if params is None:
            row = TeaCacheSession(TeaCacheParams(teacache_thresh=0.0), (), num_inference_steps, 0, 0, active=False)
            row.monitor = FitMonitor((), None, num_inference_steps, type(self).__name__)
            return row
        return self._new_session(params, num_inference_steps, watched=False)

    @staticmethod
    def teacache_row_stats(row: TeaCacheSession) -> TeaCacheStats:
        """The record of a request state made by `new_teacache_row`."""
        return _session_stats(row, row.active, None)

    @contextmanager
    def teacache_rows_step(
        self, rows: Sequence[TeaCacheSession], step_indices: Sequence[int], is_cfg_negative: bool = False
    ) -> Iterator[None]:
        """Declare a call whose batch row i belongs to the request state `rows[i]` at its step `step_indices[i]`.

        Requests join and leave between calls: each row keeps its own step count, step index and TeaCache
        state (per CFG branch), and decides alone, as under per-sample state. A call that raises is not
        recorded: each row's next step computes.
        """
        rows, step_indices = (
            list(rows),
            [require_int("step_indices[i]", s, 0, wrong_type=TypeError) for s in step_indices],
        )
        if not rows or len(rows) != len(step_indices):
            raise ValueError(
                f"rows and step_indices must be non-empty and as long as each other, got {len(rows)} and "
                f"{len(step_indices)}"
            )
        if not all(isinstance(row, TeaCacheSession) for row in rows) or len({id(r) for r in rows}) != len(rows):
            raise TypeError("rows must be distinct request states made by new_teacache_row()")
        if not isinstance(is_cfg_negative, bool):
            raise ValueError(f"is_cfg_negative must be True or False, got {is_cfg_negative!r}")
        if self.__dict__.get("_teacache_context") is not None:
            raise RuntimeError("teacache_step() contexts cannot be nested")
        for row, step in zip(rows, step_indices, strict=True):
            self._check_step_order(row, step, (is_cfg_negative,))
        indicators = {self.teacache_indicator_for(row.params).name for row in rows if row.active}
        if len(indicators) > 1:
            raise ValueError(
                f"the rows of one call must share the TeaCache indicator (computed once for the batch), got "
                f"{sorted(indicators)}"
            )
        _prepare_for_compile()
        context = _StepContext(min(step_indices), is_cfg_negative, rows=rows, row_steps=step_indices)
        self.__dict__["_teacache_context"] = context
        try:
            yield
        except BaseException:
            if context.planned:
                for row, step in zip(rows, step_indices, strict=True):
                    row.branches[is_cfg_negative].forget_step(step)
            raise
        finally:
            self.__dict__["_teacache_context"] = None

    def claim_batched_cfg_call(self) -> bool:
        """For a model that splits a batched-CFG call itself: True when the current call must be split.

        It consumes the step context (one forward call per context); the model then runs each half of
        the batch inside `teacache_branch(False)` and `teacache_branch(True)`.
        """
        return _helper("_claim_batched_cfg_call")(self)

    def _claim_batched_cfg_call(self) -> bool:
        context: _StepContext | None = self.__dict__.get("_teacache_context")
        if context is None or not context.batched_cfg or not self.teacache_enabled:
            return False
        self._claim(context)
        return True

    @contextmanager
    def teacache_branch(self, is_cfg_negative: bool) -> Iterator[None]:
        """Inside a claimed batched-CFG call, compute one CFG branch's half as that branch's step."""
        outer: _StepContext | None = self.__dict__.get("_teacache_context")
        if outer is None or not outer.batched_cfg or not outer.used:
            raise RuntimeError("teacache_branch() is only for splitting a call claimed by claim_batched_cfg_call()")
        self.__dict__["_teacache_context"] = _StepContext(outer.step_index, is_cfg_negative, planned=outer.planned)
        try:
            yield
        finally:
            self.__dict__["_teacache_context"] = outer

    @staticmethod
    def _claim(context: _StepContext) -> None:
        if context.used:
            raise RuntimeError("one teacache_step() context covers one forward call; open a new context for each call")
        context.used = True

    def teacache_stats(self) -> TeaCacheStats:
        """The latest generation, per branch: the step indices computed and skipped, and any disable reason."""
        session: TeaCacheSession | None = self.__dict__.get("_teacache_session")
        if session is None:
            return TeaCacheStats()
        if session.per_sample and session.active:
            rows = tuple(_session_stats(row, True, None) for row in session.rows or ())
            return TeaCacheStats(True, None, session.num_inference_steps, rows=rows)
        return _session_stats(session, session.active, session.disabled_reason)

    # ---- branch state, under the attribute names of the TeaCache design -------------------------

    def _branch_state(self, is_cfg_negative: bool) -> BranchState | None:
        session: TeaCacheSession | None = self.__dict__.get("_teacache_session")
        return None if session is None else session.branches[is_cfg_negative]

    previous_residual = _branch_property("previous_residual", False, None)
    previous_residual_negative = _branch_property("previous_residual", True, None)
    previous_modulated_input = _branch_property("previous_modulated_input", False, None)
    previous_modulated_input_negative = _branch_property("previous_modulated_input", True, None)
    accumulated_rel_l1_distance = _branch_property("accumulated_rel_l1_distance", False, 0.0)
    accumulated_rel_l1_distance_negative = _branch_property("accumulated_rel_l1_distance", True, 0.0)

    # ---- the cached block stack -----------------------------------------------------------------

    def run_blocks(self, hidden_states: torch.Tensor, **block_inputs: Any) -> torch.Tensor:
        """Run the block stack, or reuse this branch's cached residual when TeaCache decides to skip.

        Inside a `teacache_step()` context the step observers then see the step (`add_teacache_observer`).
        """
        action, residual, observed = _helper("_teacache_plan")(self, hidden_states, block_inputs)
        if action == "rows":
            return self._run_rows(hidden_states, block_inputs, residual)
        if action == "skip":
            output = hidden_states + residual
        else:
            output = self.forward_blocks(hidden_states, **_materialize(block_inputs))
            if action == "compute":
                _helper("_teacache_record")(self, output, hidden_states)
        if observed:
            _helper("_teacache_notify")(self, action == "skip", hidden_states, output)
        return output

    def _teacache_plan(self, hidden_states: torch.Tensor, block_inputs: dict[str, Any]) -> tuple[str, Any, bool]:
        """(action, residual, observed): "run" (a plain call, or TeaCache off), "compute" (run and cache),
        "skip" (reuse the residual) or "rows" (per-sample state: the residual slot holds the `_RowPlan`),
        and whether step observers watch this call."""
        context: _StepContext | None = self.__dict__.get("_teacache_context")
        session: TeaCacheSession | None = self.__dict__.get("_teacache_session")
        observed = context is not None and bool(self.__dict__.get("_teacache_observers"))
        if context is not None and context.rows is not None:
            self._claim(context)
            context.planned.append(context.is_cfg_negative)
            return "rows", self._plan_rows(context.rows, context, hidden_states, block_inputs), observed
        if context is None or session is None or session.closed:
            return "run", None, observed
        self._claim(context)
        if context.batched_cfg and session.active:
            raise ValueError(
                f"{type(self).__name__} cannot cache a call that batches both CFG branches: with TeaCache on, "
                "call the positive and the negative branch separately (is_cfg_negative=False / True)"
            )
        state = session.branches[context.is_cfg_negative]
        context.planned.append(context.is_cfg_negative)
        if session.active and context.is_cfg_negative and not self.supports_cfg_separation:
            self._switch_off(
                session,
                f"{type(self).__name__} cannot keep separate state per CFG branch, so TeaCache runs "
                "only without CFG; it was switched off when a negative-branch step arrived",
            )
        if not session.active:
            state.computed_steps.append(context.step_index)
            return "run", None, observed
        if session.per_sample:
            return (
                "rows",
                self._plan_rows(
                    self._generation_rows(session, hidden_states.shape[0]), context, hidden_states, block_inputs
                ),
                observed,
            )

        indicator = self.teacache_indicator(hidden_states, **block_inputs)
        context.indicator = indicator.detach()
        signature = (_inputs_signature(hidden_states, indicator, block_inputs), self.teacache_weights_key())
        if self._should_skip(session, state, context, signature, indicator):
            state.skipped_steps.append(context.step_index)
            state.consecutive_skips += 1
            return "skip", state.skip_residual(context.step_index, session.params.residual_order), observed
        return "compute", None, observed

    def _generation_rows(self, session: TeaCacheSession, batch: int) -> list[TeaCacheSession]:
        """The row states of a per-sample generation, made at its first call (one per row of its batch)."""
        if session.rows is None:
            session.rows = [
                self._new_session(session.params, session.num_inference_steps, watched=False) for _ in range(batch)
            ]
        if len(session.rows) != batch:
            raise ValueError(
                f"this generation keeps per-sample state for {len(session.rows)} batch rows, but the call's batch "
                f"has {batch}; give enable_teacache() one TeaCacheParams per row of the batch"
            )
        return session.rows

    def _plan_rows(
        self, rows: list[TeaCacheSession], context: _StepContext, hidden_states: torch.Tensor, block_inputs: dict
    ) -> _RowPlan:
        """Each row's own decision, from its own slice of the indicator and its own state."""
        batch = hidden_states.shape[0]
        if len(rows) != batch:
            raise ValueError(f"the step declares {len(rows)} rows, but the call's batch has {batch} (they must match)")
        for name in self.teacache_row_inputs & block_inputs.keys():
            _check_rows(name, block_inputs[name], batch)
        indicator = self.teacache_indicator(hidden_states, **block_inputs).detach()
        signature = _row_signature(hidden_states, indicator, block_inputs, self.teacache_row_inputs)
        plan = _RowPlan(rows, [], {}, [])
        for index, row in enumerate(rows):
            state = row.branches[context.is_cfg_negative]
            step = context.step_index if context.row_steps is None else context.row_steps[index]
            row_context = _StepContext(step, context.is_cfg_negative)
            row_context.indicator = indicator[index : index + 1].clone()
            plan.contexts.append(row_context)
            if not row.active:
                state.computed_steps.append(step)  # no decision: this request runs without the cache
                plan.compute.append(index)
            elif self._should_skip(row, state, row_context, signature, row_context.indicator):
                state.skipped_steps.append(step)
                state.consecutive_skips += 1
                plan.residuals[index] = state.skip_residual(step, row.params.residual_order)
            else:
                plan.compute.append(index)
        return plan

    def _run_rows(self, hidden_states: torch.Tensor, block_inputs: dict[str, Any], plan: _RowPlan) -> torch.Tensor:
        """A per-sample step: the block stack on the computing rows only (gathered, then put back in place),
        each skipped row its own input plus its cached residual; no block runs when every row skips."""
        batch = hidden_states.shape[0]
        computed = None
        if len(plan.compute) == batch:
            computed = self.forward_blocks(hidden_states, **_materialize(block_inputs))  # (B, L, D)
        elif plan.compute:
            index = torch.tensor(plan.compute, device=hidden_states.device)
            inputs = {
                name: _take_rows(value, index) if name in self.teacache_row_inputs else value
                for name, value in _materialize(block_inputs).items()
            }
            computed = self.forward_blocks(hidden_states.index_select(0, index), **inputs)  # (rows, L, D)
        if computed is not None:
            _helper("_teacache_record_rows")(self, plan, hidden_states, computed)
        if computed is not None and len(plan.compute) == batch:
            output = computed
        else:
            parts: list[torch.Tensor] = [None] * batch
            for position, index in enumerate(plan.compute):
                parts[index] = computed[position : position + 1]
            for index, residual in plan.residuals.items():
                parts[index] = hidden_states[index : index + 1] + residual
            output = torch.cat(parts)
        _helper("_teacache_notify_rows")(self, plan, hidden_states, output)
        return output

    def _teacache_record_rows(self, plan: _RowPlan, hidden_states: torch.Tensor, computed: torch.Tensor) -> None:
        for position, index in enumerate(plan.compute):
            row, context = plan.rows[index], plan.contexts[index]
            if not row.active:
                continue
            state = row.branches[context.is_cfg_negative]
            residual = (computed[position : position + 1] - hidden_states[index : index + 1]).detach()
            state.record_residual(residual, context.step_index, row.params.residual_order)
            state.computed_steps.append(context.step_index)

    def _teacache_notify_rows(self, plan: _RowPlan, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """Each row's own observation: to its fit monitor, and to the model's step observers."""
        observers = list(self.__dict__.get("_teacache_observers", {}).values())
        generation = self.__dict__.get("_teacache_generation", -1)
        for index, (row, context) in enumerate(zip(plan.rows, plan.contexts, strict=True)):
            state = row.branches[context.is_cfg_negative]
            observation = StepObservation(
                generation=generation,
                step_index=context.step_index,
                is_cfg_negative=context.is_cfg_negative,
                indicator_name=self.teacache_indicator_name,
                indicator=context.indicator,
                hidden_states=hidden_states[index : index + 1].detach(),
                output=output[index : index + 1].detach(),
                skipped=index in plan.residuals,
                distance=context.distance,
                accumulated_rel_l1_distance=state.accumulated_rel_l1_distance,
                teacache_params=row.params if row.active else None,
                row=index,
            )
            for observer in [row.monitor, *observers]:
                observer(observation)

    def _teacache_notify(self, skipped: bool, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        context: _StepContext = self.__dict__["_teacache_context"]
        session: TeaCacheSession | None = self.__dict__.get("_teacache_session")
        active = session is not None and session.active and not session.closed
        state = session.branches[context.is_cfg_negative] if active else None
        observation = StepObservation(
            generation=self.__dict__.get("_teacache_generation", -1),
            step_index=context.step_index,
            is_cfg_negative=context.is_cfg_negative,
            indicator_name=self.teacache_indicator_name,
            indicator=context.indicator,
            hidden_states=hidden_states.detach(),
            output=output.detach(),
            skipped=skipped,
            distance=context.distance,
            accumulated_rel_l1_distance=None if state is None else state.accumulated_rel_l1_distance,
            teacache_params=session.params if active else None,
        )
        context.indicator = context.distance = None
        for observer in list(self.__dict__.get("_teacache_observers", {}).values()):
            observer(observation)

    def _teacache_record(self, output: torch.Tensor, hidden_states: torch.Tensor) -> None:
        context: _StepContext = self.__dict__["_teacache_context"]
        session: TeaCacheSession = self.__dict__["_teacache_session"]
        state = session.branches[context.is_cfg_negative]
        # Detached: a later skipped step must not reach back into this step's autograd graph.
        residual = (output - hidden_states).detach()
        state.record_residual(residual, context.step_index, session.params.residual_order)
        state.computed_steps.append(context.step_index)

    def _should_skip(
        self,
        session: TeaCacheSession,
        state: BranchState,
        context: _StepContext,
        signature: tuple,
        indicator: torch.Tensor,
    ) -> bool:
        step_index = context.step_index
        previous = state.previous_modulated_input
        forced = (
            step_index < session.first_forced_steps
            or step_index >= session.num_inference_steps - session.last_forced_steps
            or previous is None
            or state.previous_residual is None
            or signature != state.input_signature
        )
        at_limit = state.consecutive_skips >= (session.params.max_consecutive_skips or session.num_inference_steps)
        group = self.__dict__.get("_teacache_group")
        if group is not None:
            forced, distance = _group_distance(indicator, previous, forced, group)
        elif not forced:
            distance = relative_l1_distance(indicator, previous).item()
        state.previous_modulated_input = indicator.detach()
        state.input_signature = signature
        context.distance = None if forced else distance
        if forced:
            state.accumulated_rel_l1_distance = 0.0
            return False
        state.accumulated_rel_l1_distance += evaluate_polynomial(session.coefficients, distance)
        thresh = session.params.teacache_thresh
        # A threshold of 0 never skips, whatever sign the rescaled distance has, so that 0 is exact.
        if thresh > 0 and state.accumulated_rel_l1_distance < thresh:
            if not at_limit:
                return True
            # The skip limit, not the threshold, makes this step compute: recorded apart, so that a schedule
            # the limit alone sets (a fixed interval) is never mistaken for TeaCache's decision.
            state.limit_forced_steps.append(step_index)
        state.accumulated_rel_l1_distance = 0.0
        return False

    def _switch_off(self, session: TeaCacheSession, reason: str) -> None:
        session.active = False
        session.disabled_reason = reason
        session.release_tensors()
        warnings.warn(f"TeaCache disabled: {reason}", RuntimeWarning, stacklevel=_caller_stacklevel())


def _session_stats(session: TeaCacheSession, enabled: bool, disabled_reason: str | None) -> TeaCacheStats:
    positive, negative = session.branches[False], session.branches[True]
    return TeaCacheStats(
        enabled=enabled,
        teacache_thresh=session.params.teacache_thresh,
        num_inference_steps=session.num_inference_steps,
        positive=positive.stats(session.monitor.fit(False)),
        negative=negative.stats(session.monitor.fit(True)),
        disabled_reason=disabled_reason,
    )
