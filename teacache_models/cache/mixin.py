"""`TeaCacheMixin`: the cache every native transformer of this package inherits.

A model provides two pieces:

- `teacache_indicator(hidden_states, **block_inputs)`: the cheap tensor computed at block entry whose
  change between steps predicts the change of the output (for most models the timestep-modulated
  input of block 0);
- `forward_blocks(hidden_states, **block_inputs)`: the block stack between the embeddings and the
  output head, returning the stream the head reads.

A model whose stack begins with a part the default indicator is read after (Z-Image's refiners) also
provides `teacache_prelude`, which `run_blocks` runs before the indicator; an indicator declared
`before_prelude` is read on the prelude's input instead, and a skipped step then skips the prelude too.

Its `forward` then calls `self.run_blocks(hidden_states, **block_inputs)` where it would run the
blocks. The mixin decides, per step and per CFG branch, whether to run them or to add the residual
cached at the branch's last computed step. Which step and branch a call computes is told by the
caller through `with model.teacache_step(step_index, is_cfg_negative): ...` (or diffusers'
`cache_context`, see `context`); a call outside that context runs the blocks and touches no state.
A block input that only the blocks read (rotary tables, projected text) can be passed as
`Deferred(compute, sources)`: it is computed when the blocks run, never on a skipped step.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from ..checks import require_bool, require_int
from ..params import TeaCacheParams, evaluate_polynomial
from .context import CacheContextMixin
from .forecast import FORECAST, forecast_should_skip
from .graphs import outside_graphs, outside_graphs_call, prepare_for_compile
from .inputs import Deferred, inputs_signature, materialize
from .monitor import FitMonitor
from .rows import TeaCacheRowsMixin
from .schedule import TeaCacheIndicator, TeaCacheScheduleMixin
from .state import BranchState, StepContext, StepObservation, TeaCacheSession, TeaCacheStats, branch_name

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


def _caller_stacklevel() -> int:
    """The warnings stack level of the first frame outside this package and torch: the user's call."""
    level, frame = 2, sys._getframe(2)  # 2: the caller of the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_PATHS):
        level, frame = level + 1, frame.f_back
    return level


_INTERNAL_PATHS = (str(Path(__file__).resolve().parents[1]), str(Path(torch.__file__).resolve().parent))


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


class TeaCacheMixin(TeaCacheScheduleMixin, TeaCacheRowsMixin, CacheContextMixin):
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

    # ---- the two pieces a model provides -------------------------------------------------------

    def teacache_indicator(self, hidden_states: torch.Tensor, **block_inputs: Any) -> torch.Tensor:
        """The tensor whose relative change between steps drives the skip decision."""
        raise NotImplementedError(f"{type(self).__name__} must implement teacache_indicator()")

    def forward_blocks(self, hidden_states: torch.Tensor, **block_inputs: Any) -> torch.Tensor:
        """The block stack: returns the stream the output head reads, same shape as `hidden_states`."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_blocks()")

    def teacache_prelude(self, hidden_states: torch.Tensor, **block_inputs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The part of the stack `run_blocks` runs before the indicator is read: returns the stream and the
        inputs that `teacache_indicator` and `forward_blocks` receive. None by default (both get the inputs of
        `run_blocks`). An indicator declared `before_prelude` is read on the prelude's input instead."""
        return hidden_states, block_inputs

    def teacache_prelude_layout(self, hidden_states: torch.Tensor, **block_inputs: Any) -> torch.Tensor:
        """The prelude's input laid out as its output: under a `before_prelude` indicator, the residual of the
        cached stack (prelude and blocks) is taken against it, and a skipped step adds the residual to it."""
        raise NotImplementedError(f"{type(self).__name__} must implement teacache_prelude_layout()")

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
        prepare_for_compile()
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
        fit = self._decision_fit(params)
        monitor = FitMonitor(
            {} if fit is None else {negative: fit.for_branch(negative) for negative in (False, True)},
            None if fit is None else fit.calibrated_range,
            num_inference_steps,
            type(self).__name__,
            lambda: self.__dict__.get("_teacache_group"),
        )
        handle = self.add_teacache_observer(monitor) if watched else None
        return TeaCacheSession(
            params,
            coefficients,
            num_inference_steps,
            first_forced,
            last_forced,
            monitor=monitor,
            monitor_handle=handle,
            coefficients_negative=None if fit is None else fit.coefficients_negative,
        )

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

    def set_teacache_process_group(
        self, group: dist.ProcessGroup | None, trim: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """Share the skip decision with the ranks of `group`, which each hold a shard of the sequence.

        Every rank then computes the distance of the whole indicator, so all ranks skip the same steps.
        None (the default) decides from the local tensor alone. `trim` gives the part of this rank's indicator
        that counts (under sequence parallelism its real tokens, without the shard's padding rows); None: all.
        """
        group_type = getattr(dist, "ProcessGroup", None)
        if group is not None and (group_type is None or not isinstance(group, group_type)):
            raise TypeError(
                f"group must be a torch.distributed.ProcessGroup or None, got {group!r} ({type(group).__name__})"
            )
        if trim is not None and not callable(trim):
            raise TypeError(f"trim must be callable or None, got {type(trim).__name__}")
        self.__dict__["_teacache_group"] = group
        self.__dict__["_teacache_trim"] = trim

    def _local_indicator(self, hidden_states: torch.Tensor, block_inputs: dict[str, Any]) -> torch.Tensor:
        """The model's indicator, as far as this rank holds it (see `set_teacache_process_group`)."""
        indicator = self.teacache_indicator(hidden_states, **block_inputs)
        trim = self.__dict__.get("_teacache_trim")
        return indicator if trim is None else trim(indicator)

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
        return self._teacache_indicator().name

    def _teacache_indicator(self) -> TeaCacheIndicator:
        context: StepContext | None = self.__dict__.get("_teacache_context")
        if context is not None and context.rows is not None:
            cached = [row.params for row in context.rows if row.active]
            return self.teacache_indicator_for(cached[0] if cached else None)
        return self.teacache_indicator_for(self.teacache_params)

    @outside_graphs
    def _teacache_prelude_cached(self) -> bool:
        return self._teacache_indicator().before_prelude

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
        require_bool("is_cfg_negative", is_cfg_negative)
        require_bool("batched_cfg", batched_cfg)
        if batched_cfg and is_cfg_negative:
            raise ValueError("batched_cfg=True covers both branches; leave is_cfg_negative=False")
        session: TeaCacheSession | None = self.__dict__.get("_teacache_session")
        if self.__dict__.get("_teacache_context") is not None:
            raise RuntimeError("teacache_step() contexts cannot be nested")
        if session is not None and not session.closed:
            for row in session.rows or [session]:
                self._check_step_order(row, step_index, (False, True) if batched_cfg else (is_cfg_negative,))
        prepare_for_compile()
        context = StepContext(step_index, is_cfg_negative, batched_cfg)
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

    def claim_batched_cfg_call(self) -> bool:
        """For a model that splits a batched-CFG call itself: True when the current call must be split.

        It consumes the step context (one forward call per context); the model then runs each half of
        the batch inside `teacache_branch(False)` and `teacache_branch(True)`.
        """
        return outside_graphs_call("_claim_batched_cfg_call")(self)

    @outside_graphs
    def _claim_batched_cfg_call(self) -> bool:
        context: StepContext | None = self.__dict__.get("_teacache_context")
        if context is None or not context.batched_cfg or not self.teacache_enabled:
            return False
        self._claim(context)
        return True

    @contextmanager
    def teacache_branch(self, is_cfg_negative: bool) -> Iterator[None]:
        """Inside a claimed batched-CFG call, compute one CFG branch's half as that branch's step."""
        outer: StepContext | None = self.__dict__.get("_teacache_context")
        if outer is None or not outer.batched_cfg or not outer.used:
            raise RuntimeError("teacache_branch() is only for splitting a call claimed by claim_batched_cfg_call()")
        self.__dict__["_teacache_context"] = StepContext(outer.step_index, is_cfg_negative, planned=outer.planned)
        try:
            yield
        finally:
            self.__dict__["_teacache_context"] = outer

    @staticmethod
    def _claim(context: StepContext) -> None:
        if context.used:
            raise RuntimeError("one teacache_step() context covers one forward call; open a new context for each call")
        context.used = True

    def teacache_stats(self) -> TeaCacheStats:
        """The latest generation, per branch: the step indices computed and skipped, and any disable reason."""
        session: TeaCacheSession | None = self.__dict__.get("_teacache_session")
        if session is None:
            return TeaCacheStats()
        if session.per_sample and session.active:
            rows = tuple(row.stats(True, None) for row in session.rows or ())
            return TeaCacheStats(True, None, session.num_inference_steps, rows=rows)
        return session.stats(session.active, session.disabled_reason)

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
        The model's `teacache_prelude` runs first, unless the indicator is read before it: then the prelude is
        part of what a skipped step skips.
        """
        prelude_cached = self._teacache_prelude_may_be_cached and outside_graphs_call("_teacache_prelude_cached")(self)
        if not prelude_cached:
            hidden_states, block_inputs = self.teacache_prelude(hidden_states, **block_inputs)
        action, residual, observed = outside_graphs_call("_teacache_plan")(self, hidden_states, block_inputs)
        if action == "rows":
            return self._run_rows(hidden_states, block_inputs, residual)
        # What the residual is the change of: the stack's input, in the layout of its output.
        base = self.teacache_prelude_layout(hidden_states, **block_inputs) if prelude_cached else hidden_states
        if action == "skip":
            output = base + residual
        else:
            if prelude_cached:
                hidden_states, block_inputs = self.teacache_prelude(hidden_states, **block_inputs)
            output = self.forward_blocks(hidden_states, **materialize(block_inputs))
            if action == "compute":
                outside_graphs_call("_teacache_record")(self, output, base)
        if observed:
            outside_graphs_call("_teacache_notify")(self, action == "skip", base, output)
        return output

    @outside_graphs
    def _teacache_plan(self, hidden_states: torch.Tensor, block_inputs: dict[str, Any]) -> tuple[str, Any, bool]:
        """(action, residual, observed): "run" (a plain call, or TeaCache off), "compute" (run and cache),
        "skip" (reuse the residual) or "rows" (per-sample state: the residual slot holds the `_RowPlan`),
        and whether step observers watch this call."""
        context: StepContext | None = self.__dict__.get("_teacache_context")
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

        indicator = self._local_indicator(hidden_states, block_inputs)
        context.indicator = indicator.detach()
        signature = (inputs_signature(hidden_states, indicator, block_inputs), self.teacache_weights_key())
        if self._should_skip(session, state, context, signature, indicator):
            state.skipped_steps.append(context.step_index)
            state.consecutive_skips += 1
            return "skip", state.skip_residual(context.step_index, session.params), observed
        return "compute", None, observed

    @outside_graphs
    def _teacache_notify(self, skipped: bool, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        context: StepContext = self.__dict__["_teacache_context"]
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

    @outside_graphs
    def _teacache_record(self, output: torch.Tensor, hidden_states: torch.Tensor) -> None:
        context: StepContext = self.__dict__["_teacache_context"]
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
        context: StepContext,
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
        state.input_signature = signature
        if session.params.method == FORECAST:
            skip, distance = forecast_should_skip(session, state, step_index, forced, at_limit, indicator, group)
            context.distance = distance
            return skip
        if group is not None:
            forced, distance = _group_distance(indicator, previous, forced, group)
        elif not forced:
            distance = relative_l1_distance(indicator, previous).item()
        state.previous_modulated_input = indicator.detach()
        context.distance = None if forced else distance
        if forced:
            state.accumulated_rel_l1_distance = 0.0
            return False
        state.accumulated_rel_l1_distance += evaluate_polynomial(
            session.branch_coefficients(context.is_cfg_negative), distance
        )
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
