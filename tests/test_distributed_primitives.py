"""Sequence- and CFG-parallel building blocks on 2 CPU ranks (Gloo), and failures that end instead of hanging.

`spawn_ranks` is the harness the other distributed test modules share: it starts the ranks with a
file:// rendezvous and a short collective timeout, runs a module-level function on each inside
`ParallelState.guard()`, and returns what each rank returned. Ranks are forked from a forkserver that
imported torch and the package once, so a rank starts in a fraction of a second instead of re-importing
torch (seconds on a busy machine) the way a spawned process would.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from teacache_models.distributed import (
    CFGParallel,
    ParallelState,
    SequenceParallel,
    init_parallel,
)
from teacache_models.layers.attention import attention

TIMEOUT_S = 20.0
_PRELOAD = ["torch", "torch.distributed", "teacache_models.distributed", "teacache_models.models"]


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _rank_main(
    rank: int, world_size: int, folder: str, fn: Callable, cfg_parallel: bool, sp_degree: int, timeout_s: float
) -> None:
    torch.set_num_threads(1)
    state = init_parallel(
        cfg_parallel,
        sp_degree,
        backend="gloo",
        timeout_s=timeout_s,
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=world_size,
    )
    try:
        with state.guard():
            result = fn(state)
        torch.save(result, f"{folder}/result{rank}.pt")
    finally:
        state.close()


def spawn_ranks(
    fn: Callable[[ParallelState], Any],
    tmp_path: Path,
    world_size: int = 2,
    cfg_parallel: bool = False,
    sp_degree: int | None = None,
    timeout_s: float = TIMEOUT_S,
) -> list[Any]:
    """Run `fn(state)` on `world_size` spawned ranks; a rank's exception fails the test with its traceback."""
    sp_degree = world_size // (2 if cfg_parallel else 1) if sp_degree is None else sp_degree
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _context()
    mp.start_processes(
        _rank_main,
        args=(world_size, str(tmp_path), fn, cfg_parallel, sp_degree, timeout_s),
        nprocs=world_size,
        join=True,
        start_method="forkserver",
    )
    return [torch.load(tmp_path / f"result{rank}.pt", weights_only=False) for rank in range(world_size)]


# ---- Ulysses attention, sharding, CFG exchange ------------------------------------------------------


def _primitives(state: ParallelState) -> dict[str, Any]:
    sp = SequenceParallel(state.sp_group)
    generator = torch.Generator().manual_seed(0)
    batch, length, heads, head_dim, text = 2, 7, 4, 8, 3  # 7 tokens over 2 ranks: one padded row
    q, k, v = (torch.randn(batch, length + text, heads, head_dim, generator=generator) for _ in range(3))
    sp.begin(length)
    assert (sp.shard_length, sp.padded_length, sp.valid_length) == (4, 8, 4 - state.rank)

    # Sharded sequence alone.
    expected = sp.shard(attention(q[:, :length], k[:, :length], v[:, :length]))
    shards = [sp.shard(x[:, :length]) for x in (q, k, v)]
    ours = sp.attention(*shards)
    torch.testing.assert_close(sp.trim(ours), sp.trim(expected), rtol=1e-5, atol=1e-6)

    # Sharded image tokens followed by replicated text tokens, the last text token masked out.
    text_mask = torch.tensor([[True, True, False], [True, False, False]])
    full_mask = torch.cat([torch.ones(batch, length, dtype=torch.bool), text_mask], dim=1)[:, None, None, :]
    full = attention(q, k, v, attn_mask=full_mask)  # (B, L + R, H * D)
    padded_mask = torch.cat([torch.ones(batch, sp.padded_length, dtype=torch.bool), text_mask], dim=1)
    joined = [torch.cat([sp.shard(x[:, :length]), x[:, length:]], dim=1) for x in (q, k, v)]
    ours = sp.attention(*joined, attn_mask=padded_mask[:, None, None, :], replicated=text)
    torch.testing.assert_close(sp.trim(ours[:, : sp.shard_length]), sp.trim(sp.shard(full[:, :length])))
    torch.testing.assert_close(ours[:, sp.shard_length :], full[:, length:], rtol=1e-5, atol=1e-6)

    # Gathering undoes sharding along any axis.
    x = torch.randn(3, length, 5, generator=generator)
    assert torch.equal(sp.gather(sp.shard(x)), x)
    assert torch.equal(sp.gather(sp.shard(x.transpose(0, 1), dim=0), dim=0), x.transpose(0, 1))

    # CFG: each rank contributes its branch; both get both.
    cfg = CFGParallel(state.sp_group)
    mine = torch.full((2, 3), float(state.rank))
    positive, negative = cfg.combine(mine)
    assert torch.equal(positive, torch.zeros(2, 3)) and torch.equal(negative, torch.ones(2, 3))
    shared = cfg.share_positive(None if cfg.is_cfg_negative else torch.full((2,), 7.0, dtype=torch.float64), "cpu")
    assert torch.equal(shared, torch.full((2,), 7.0, dtype=torch.float64))
    assert state.broadcast_object(f"seed of rank {state.rank}") == "seed of rank 0"
    assert cfg.gather_objects(state.rank) == [0, 1]
    with pytest.raises(ValueError, match="heads are not divisible by 2"):
        sp.check_heads(3)
    return {"rank": state.rank, "group_rank": dist.get_rank(state.sp_group)}


def test_ulysses_attention_sharding_and_cfg_exchange_match_one_process(tmp_path):
    results = spawn_ranks(_primitives, tmp_path)
    assert [r["group_rank"] for r in results] == [0, 1]


# ---- failures end the job ---------------------------------------------------------------------------


def _failing_rank(rank: int, folder: str, mode: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    state = init_parallel(
        sp_degree=2,
        backend="gloo",
        timeout_s=timeout_s,
        init_method=f"file://{folder}/rendezvous",
        rank=rank,
        world_size=2,
    )
    dist.barrier()
    waiting = time.monotonic()
    try:
        with state.guard():
            if rank == 1:
                if mode == "raise":
                    raise ValueError("injected failure on rank 1")
                time.sleep(60)  # stalls far past the timeout; the test terminates it
            dist.all_reduce(torch.ones(4), group=state.sp_group)
    except Exception as error:
        Path(folder, f"error{rank}.txt").write_text(f"{time.monotonic() - waiting}\n{type(error).__name__}: {error}")
        raise
    finally:
        state.close()


def _run_failing(tmp_path: Path, mode: str, timeout_s: float) -> tuple[str, float]:
    context = _context()
    ranks = [context.Process(target=_failing_rank, args=(r, str(tmp_path), mode, timeout_s)) for r in range(2)]
    for process in ranks:
        process.start()
    try:
        ranks[0].join(timeout=timeout_s + 60)
        assert not ranks[0].is_alive(), "rank 0 hung instead of ending with an error"
        assert ranks[0].exitcode != 0
    finally:
        for process in ranks:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)
    waited, message = (tmp_path / "error0.txt").read_text().split("\n", 1)
    return message, float(waited)


def test_a_failing_rank_ends_its_peer_with_an_error_naming_the_failure(tmp_path):
    message, waited = _run_failing(tmp_path, "raise", timeout_s=30.0)
    assert message.startswith("DistributedError: rank 0: a collective failed")
    assert "rank 1 failed with ValueError: injected failure on rank 1" in message
    # Gloo notices the closed connection at once: rank 0 does not wait for the timeout.
    assert waited < 15.0


def test_a_stalled_rank_ends_its_peer_after_the_timeout(tmp_path):
    message, waited = _run_failing(tmp_path, "stall", timeout_s=2.0)
    assert message.startswith("DistributedError: rank 0: a collective failed")
    assert "no rank reported an error" in message and "timeout (2 s)" in message
    assert 2.0 <= waited < 2.0 + 6.0  # the timeout and the grace period for a peer's report


# ---- argument checks (no process group needed) -------------------------------------------------------


def test_init_parallel_rejects_bad_layouts():
    with pytest.raises(ValueError, match="needs 4: launch with torchrun --nproc-per-node 4"):
        init_parallel(True, 2, init_method="file:///nonexistent", rank=0, world_size=2)
    with pytest.raises(ValueError, match="sp_degree must be an integer >= 1, got 0"):
        init_parallel(False, 0, init_method="file:///nonexistent", rank=0, world_size=2)
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        init_parallel(timeout_s=0)
    with pytest.raises(TypeError, match="cfg_parallel must be True or False"):
        init_parallel("yes", 1, init_method="file:///nonexistent", rank=0, world_size=2)


def test_init_parallel_outside_torchrun_says_how_to_launch(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun --nproc-per-node N"):
        init_parallel(sp_degree=2)


def test_init_parallel_joins_a_process_group_started_by_the_caller(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="backend must be 'nccl' or 'gloo', got 'mpi'"):
        init_parallel(backend="mpi", init_method="file:///nonexistent", rank=0, world_size=1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="the world has 1 ranks but cfg_parallel=True"):
            init_parallel(cfg_parallel=True)
        state = init_parallel()
        assert (state.rank, state.world_size, state.local_rank, state.backend) == (0, 1, 0, "gloo")
        assert state.device == torch.device("cpu") and state.is_main and not state.owns_process_group
        assert state.cfg is None and state.sp_group is None and state.sp_degree == 1
        state.close()  # not its group: the caller's stays up
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_parallel_helpers_need_an_initialised_process_group():
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialised"):
        SequenceParallel()
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialised"):
        CFGParallel()
