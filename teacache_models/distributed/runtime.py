"""Process groups for CFG and sequence parallelism, started from torchrun's environment, with timeouts.

The world is laid out as `cfg_degree` x `sp_degree` ranks: rank r computes CFG branch r // sp_degree
over token shard r % sp_degree. The ranks of one branch form a sequence-parallel group (consecutive
ranks, so on one machine they share the fastest links); the two ranks holding the same shard of the
two branches form a CFG group.

A failure must end the job, never hang it: every group has a timeout, and `ParallelState.guard()` turns
the error a rank sees when a peer died or stalled into a `DistributedError` naming that peer's own
error (each rank's first error is published in the rendezvous store for the others to read).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .cfg import CFGParallel

__all__ = ["DistributedError", "ParallelState", "init_parallel"]

DEFAULT_TIMEOUT_S = 600.0
# How long a rank whose collective broke waits for the failing peer's report to appear in the store.
_REPORT_GRACE_S = 2.0
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed because another rank failed, died or stalled past the timeout."""


def _is_collective_error(error: BaseException) -> bool:
    """Errors a rank sees when a peer went away or a collective timed out (Gloo and NCCL word them so)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "NCCL", "Timed out", "timed out", "Connection closed", "Connection reset")
    )


@dataclass
class ParallelState:
    """This rank's place in the layout and its groups.

    Attributes:
        rank, world_size, local_rank: from torchrun (or the explicit arguments of `init_parallel`).
        device: the device this rank computes on (its GPU under NCCL, the CPU under Gloo).
        cfg: the CFG pairing of this rank, None without CFG parallelism.
        sp_group: the sequence-parallel group of this rank, None when `sp_degree` is 1.
        sp_degree: ranks per sequence-parallel group.
        timeout: the limit of every collective.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout: datetime.timedelta
    cfg: CFGParallel | None
    sp_group: dist.ProcessGroup | None
    sp_degree: int
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes files and prints summaries."""
        return self.rank == 0

    @property
    def cfg_parallel(self) -> bool:
        return self.cfg is not None

    def enable_sequence_parallel(self, model: torch.nn.Module) -> None:
        """Shard `model`'s token sequence over this rank's sequence-parallel group (no-op without one)."""
        if self.sp_group is None:
            return
        if not hasattr(model, "enable_sequence_parallel"):
            raise ValueError(f"{type(model).__name__} does not support sequence parallelism (--sp-degree 1 only)")
        model.enable_sequence_parallel(self.sp_group)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (e.g. a seed drawn at random, which must be the same everywhere)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    # ---- failures -----------------------------------------------------------------------------------

    def _store(self) -> dist.Store | None:
        try:
            return dist.PrefixStore("teacache_models/failure/", dist.distributed_c10d._get_default_store())
        except Exception:  # no store to share reports through: the plain error still ends the job
            return None

    def _publish(self, error: BaseException) -> None:
        store = self._store()
        if store is None:
            return
        # The store's host may be gone too; this rank's own traceback still names the error then.
        with contextlib.suppress(Exception):
            store.set(str(self.rank), f"{type(error).__name__}: {error}"[:2000])

    def _peer_reports(self) -> list[str]:
        store = self._store()
        if store is None:
            return []
        deadline = time.monotonic() + _REPORT_GRACE_S
        while True:
            reports = []
            try:
                for peer in range(self.world_size):
                    if peer != self.rank and store.check([str(peer)]):
                        reports.append(f"rank {peer} failed with {store.get(str(peer)).decode()}")
            except Exception:
                return reports
            if reports or time.monotonic() > deadline:
                return reports
            time.sleep(0.1)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run distributed work so that any rank's failure ends every rank with an error naming it.

        This rank's own error is published for its peers and re-raised; an error of a collective broken
        by a peer becomes a `DistributedError` naming the peer's error when it reported one.
        """
        try:
            yield
        except DistributedError:
            raise
        except Exception as error:
            if not _is_collective_error(error):
                self._publish(error)
                raise
            reports = self._peer_reports()
            cause = (
                "; ".join(reports)
                if reports
                else f"no rank reported an error: one was killed or stalled for longer than the timeout "
                f"({self.timeout.total_seconds():g} s)"
            )
            raise DistributedError(
                f"rank {self.rank}: a collective failed ({str(error).splitlines()[0][:300]}); cause: {cause}"
            ) from error

    def close(self) -> None:
        """Destroy the process group if `init_parallel` created it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _check_degrees(cfg_parallel: bool, sp_degree: int, world_size: int) -> int:
    if not isinstance(cfg_parallel, bool):
        raise TypeError(f"cfg_parallel must be True or False, got {cfg_parallel!r}")
    if isinstance(sp_degree, bool) or not isinstance(sp_degree, int) or sp_degree < 1:
        raise ValueError(f"sp_degree must be an integer >= 1, got {sp_degree!r}")
    cfg_degree = 2 if cfg_parallel else 1
    if cfg_degree * sp_degree != world_size:
        raise ValueError(
            f"the world has {world_size} ranks but cfg_parallel={cfg_parallel} x sp_degree={sp_degree} needs "
            f"{cfg_degree * sp_degree}: launch with torchrun --nproc-per-node {cfg_degree * sp_degree}"
        )
    return cfg_degree


def init_parallel(
    cfg_parallel: bool = False,
    sp_degree: int = 1,
    *,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: str = "env://",
    rank: int | None = None,
    world_size: int | None = None,
) -> ParallelState:
    """Start (or join) the default process group and build the CFG and sequence-parallel groups.

    Args:
        cfg_parallel: two ranks per token shard, one per CFG branch.
        sp_degree: ranks sharing one branch's token sequence (Ulysses).
        backend: "nccl" or "gloo"; default NCCL when CUDA is available, else Gloo.
        timeout_s: limit of every collective; a rank waiting longer raises instead of hanging.
        init_method: "env://" (torchrun's variables) or e.g. "file:///tmp/rendezvous".
        rank, world_size: required unless torchrun set RANK and WORLD_SIZE.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    owns = not dist.is_initialized()
    if owns:
        place = _place_from_arguments(backend, init_method, rank, world_size)
    else:
        place = _place(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    _check_degrees(cfg_parallel, sp_degree, place["world_size"])
    if owns:
        if place["backend"] == "nccl":
            torch.cuda.set_device(place["device"])
        dist.init_process_group(
            place["backend"],
            init_method=init_method,
            rank=place["rank"],
            world_size=place["world_size"],
            timeout=timeout,
            device_id=place["device"] if place["backend"] == "nccl" else None,
        )
    sp_group, cfg_group = _new_groups(place["rank"], cfg_parallel, sp_degree, timeout)
    return ParallelState(
        **place,
        timeout=timeout,
        cfg=CFGParallel(cfg_group) if cfg_parallel else None,
        sp_group=sp_group,
        sp_degree=sp_degree,
        owns_process_group=owns,
    )


def _place(rank: int, world_size: int, backend: str) -> dict[str, Any]:
    """This rank's place in the world: `ParallelState`'s rank, world_size, local_rank, device and backend."""
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return dict(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def _place_from_arguments(
    backend: str | None, init_method: str, rank: int | None, world_size: int | None
) -> dict[str, Any]:
    """This rank's place in a world it is about to start: `init_parallel`'s arguments, else torchrun's variables."""
    if init_method == "env://" and (rank is None or world_size is None):
        missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"the torchrun environment is missing ({', '.join(missing)}): launch with "
                "torchrun --nproc-per-node N, or pass init_method, rank and world_size"
            )
    rank = int(os.environ["RANK"]) if rank is None else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    return _place(rank, world_size, backend)


def _new_groups(
    rank: int, cfg_parallel: bool, sp_degree: int, timeout: datetime.timedelta
) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """This rank's sequence-parallel and CFG groups (None where that degree is 1)."""
    cfg_degree = 2 if cfg_parallel else 1
    # Every rank creates every group, in the same order, as new_group requires.
    sp_group = cfg_group = None
    if sp_degree > 1:
        for branch in range(cfg_degree):
            group = dist.new_group(list(range(branch * sp_degree, (branch + 1) * sp_degree)), timeout=timeout)
            if rank // sp_degree == branch:
                sp_group = group
    if cfg_parallel:
        for shard in range(sp_degree):
            group = dist.new_group([shard, shard + sp_degree], timeout=timeout)
            if rank % sp_degree == shard:
                cfg_group = group
    return sp_group, cfg_group
