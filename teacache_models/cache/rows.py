"""Per-sample TeaCache: each batch row keeps its own state and decides alone.

Two ways in: `TeaCacheParams(per_sample=True)` (or one TeaCacheParams per row) for a whole generation,
and `teacache_rows_step` for requests batched step by step, each with its own state made by
`new_teacache_row`. Either way a step computes the indicator once for the batch, each row decides from
its own slice, and the block stack runs on the computing rows only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..checks import require_bool, require_int
from ..params import TeaCacheParams
from .graphs import outside_graphs, outside_graphs_call, prepare_for_compile
from .inputs import Deferred, materialize, value_signature
from .monitor import FitMonitor
from .state import StepContext, StepObservation, TeaCacheSession, TeaCacheStats

__all__ = ["TeaCacheRowsMixin"]


def _row_signature(
    hidden_states: torch.Tensor, indicator: torch.Tensor, block_inputs: dict[str, Any], row_inputs: frozenset[str]
) -> tuple:
    """`inputs_signature` of one batch row: what a row's cache depends on, whatever the batch size."""
    parts = [value_signature(hidden_states, True), value_signature(indicator, True)]
    parts.extend((name, value_signature(value, name in row_inputs)) for name, value in sorted(block_inputs.items()))
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
    contexts: list[StepContext]


class TeaCacheRowsMixin:
    """The per-sample half of `TeaCacheMixin` (which provides the decision, sessions and step contexts)."""

    teacache_row_inputs: ClassVar[frozenset[str] | None] = None

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
            row.monitor = FitMonitor({}, None, num_inference_steps, type(self).__name__)
            return row
        return self._new_session(params, num_inference_steps, watched=False)

    @staticmethod
    def teacache_row_stats(row: TeaCacheSession) -> TeaCacheStats:
        """The record of a request state made by `new_teacache_row`."""
        return row.stats(row.active, None)

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
        require_bool("is_cfg_negative", is_cfg_negative)
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
        prepare_for_compile()
        context = StepContext(min(step_indices), is_cfg_negative, rows=rows, row_steps=step_indices)
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
        if rows and self.teacache_indicator_for(rows[0]).before_prelude:
            raise ValueError(
                f"per-sample TeaCache state splits the block stack by batch row after {type(self).__name__}'s "
                f"prelude, but the indicator {self.teacache_indicator_for(rows[0]).name!r} is read before it; use "
                "per_sample=False or another indicator"
            )
        return rows

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
        self, rows: list[TeaCacheSession], context: StepContext, hidden_states: torch.Tensor, block_inputs: dict
    ) -> _RowPlan:
        """Each row's own decision, from its own slice of the indicator and its own state."""
        batch = hidden_states.shape[0]
        if len(rows) != batch:
            raise ValueError(f"the step declares {len(rows)} rows, but the call's batch has {batch} (they must match)")
        for name in self.teacache_row_inputs & block_inputs.keys():
            _check_rows(name, block_inputs[name], batch)
        indicator = self._local_indicator(hidden_states, block_inputs).detach()
        signature = _row_signature(hidden_states, indicator, block_inputs, self.teacache_row_inputs)
        plan = _RowPlan(rows, [], {}, [])
        for index, row in enumerate(rows):
            state = row.branches[context.is_cfg_negative]
            step = context.step_index if context.row_steps is None else context.row_steps[index]
            row_context = StepContext(step, context.is_cfg_negative)
            row_context.indicator = indicator[index : index + 1].clone()
            plan.contexts.append(row_context)
            if not row.active:
                state.computed_steps.append(step)  # no decision: this request runs without the cache
                plan.compute.append(index)
            elif self._should_skip(row, state, row_context, signature, row_context.indicator):
                state.skipped_steps.append(step)
                state.consecutive_skips += 1
                plan.residuals[index] = state.skip_residual(step, row.params)
            else:
                plan.compute.append(index)
        return plan

    def _run_rows(self, hidden_states: torch.Tensor, block_inputs: dict[str, Any], plan: _RowPlan) -> torch.Tensor:
        """A per-sample step: the block stack on the computing rows only (gathered, then put back in place),
        each skipped row its own input plus its cached residual; no block runs when every row skips."""
        batch = hidden_states.shape[0]
        computed = None
        if len(plan.compute) == batch:
            computed = self.forward_blocks(hidden_states, **materialize(block_inputs))  # (B, L, D)
        elif plan.compute:
            index = torch.tensor(plan.compute, device=hidden_states.device)
            inputs = {
                name: _take_rows(value, index) if name in self.teacache_row_inputs else value
                for name, value in materialize(block_inputs).items()
            }
            computed = self.forward_blocks(hidden_states.index_select(0, index), **inputs)  # (rows, L, D)
        if computed is not None:
            outside_graphs_call("_teacache_record_rows")(self, plan, hidden_states, computed)
        if computed is not None and len(plan.compute) == batch:
            output = computed
        else:
            parts: list[torch.Tensor] = [None] * batch
            for position, index in enumerate(plan.compute):
                parts[index] = computed[position : position + 1]
            for index, residual in plan.residuals.items():
                parts[index] = hidden_states[index : index + 1] + residual
            output = torch.cat(parts)
        outside_graphs_call("_teacache_notify_rows")(self, plan, hidden_states, output)
        return output

    @outside_graphs
    def _teacache_record_rows(self, plan: _RowPlan, hidden_states: torch.Tensor, computed: torch.Tensor) -> None:
        for position, index in enumerate(plan.compute):
            row, context = plan.rows[index], plan.contexts[index]
            if not row.active:
                continue
            state = row.branches[context.is_cfg_negative]
            residual = (computed[position : position + 1] - hidden_states[index : index + 1]).detach()
            state.record_residual(residual, context.step_index, row.params.residual_order)
            state.computed_steps.append(context.step_index)

    @outside_graphs
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
