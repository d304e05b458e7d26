"""CFG parallelism: the two classifier-free-guidance branches of a step run on two ranks at once.

Rank 0 of the CFG group computes the positive (conditional) branch, rank 1 the negative one; one
all-gather then gives both ranks both predictions, and each applies the guidance rule and the scheduler
step itself, so the latents stay identical on the two ranks without further communication. Each rank's
model only ever sees its own branch, so it keeps exactly that branch's TeaCache state.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .sequence import all_gather_tensor

__all__ = ["CFGParallel"]

T = TypeVar("T")


class CFGParallel:
    """The two ranks of `group` (None: the default group) split the positive and negative branch."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call teacache_models.distributed.init_parallel() first"
            )
        self.group = group if group is not None else dist.group.WORLD
        size = dist.get_world_size(self.group)
        if size != 2:
            raise ValueError(f"CFG parallelism needs a group of exactly 2 ranks (positive, negative), got {size}")
        self.rank = dist.get_rank(self.group)

    def __repr__(self) -> str:
        return f"CFGParallel(branch={'negative' if self.is_cfg_negative else 'positive'})"

    @property
    def is_cfg_negative(self) -> bool:
        """The branch this rank computes: rank 1 of the group the negative one."""
        return self.rank == 1

    def select(self, positive: T, negative: T) -> T:
        """This rank's branch of a pair (its conditioning, for example)."""
        return negative if self.is_cfg_negative else positive

    def combine(self, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's prediction -> (positive, negative) on both ranks, in one all-gather."""
        both = all_gather_tensor(prediction, self.group)  # (2, *S)
        return both[0], both[1]

    def share_positive(self, prediction: torch.Tensor | None, device: torch.device | str) -> torch.Tensor:
        """A step without CFG: the positive rank's prediction, sent to the negative rank.

        The positive rank passes its prediction, the negative rank None (it receives on `device`).
        Shape and dtype travel first, so the receiving rank needs to know nothing about the prediction.
        """
        if not self.is_cfg_negative and prediction is None:
            raise ValueError("the positive rank must pass its prediction to share_positive()")
        header = [None if prediction is None else (tuple(prediction.shape), prediction.dtype)]
        dist.broadcast_object_list(header, group_src=0, group=self.group, device=device)
        if self.is_cfg_negative:
            shape, dtype = header[0]
            prediction = torch.empty(shape, dtype=dtype, device=device)
        prediction = prediction.contiguous()
        dist.broadcast(prediction, group_src=0, group=self.group)
        return prediction

    def gather_objects(self, value: Any) -> list[Any]:
        """Any picklable value of each rank -> [positive rank's, negative rank's] (e.g. TeaCache stats)."""
        values: list[Any] = [None, None]
        dist.all_gather_object(values, value, group=self.group)
        return values
