"""The pipeline and `scripts/generate.py` on several CPU ranks, with the shipped Wan-architecture digit model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from teacache_models import TeaCacheParams
from teacache_models.distributed import ParallelState
from tests.test_distributed_primitives import spawn_ranks
from tests.utils import assert_parity

REPO = Path(__file__).resolve().parent.parent
STEPS = 8
# The per-token indicator, so that sequence-parallel ranks must join their shards' distances.
CACHE = TeaCacheParams(teacache_thresh=0.25, coefficients=[1.0, 0.0], indicator="modulated_input")


def _generate(state: ParallelState) -> dict:
    from teacache_models.pipelines import load_pipeline

    pipe = load_pipeline("wan-digits")
    params = dataclasses.replace(
        pipe.default_sampling_params("fast", num_inference_steps=STEPS, seed=3), teacache_params=CACHE
    )
    prompts = ["a digit 3", "a digit 7"]
    alone = pipe(prompts, params)
    pipe.enable_parallel(state)
    together = pipe(prompts, params)
    if state.sp_group is None:
        assert torch.equal(together.images, alone.images)  # CFG parallelism alone changes no arithmetic
    else:
        assert_parity(together.images, alone.images, tol=1e-5)
    assert together.teacache_stats == alone.teacache_stats
    assert alone.teacache_stats.positive.num_skipped > 0
    # CFG truncation (as Z-Image's): late steps run the positive branch only, sent by its rank.
    pipe.cfg_at_step = lambda step, t, params: step < STEPS - 3
    truncated = pipe(prompts, params)
    pipe.enable_parallel(None)
    truncated_alone = pipe(prompts, params)
    pipe.enable_parallel(state)
    assert_parity(truncated.images, truncated_alone.images, tol=0 if state.sp_group is None else 1e-5)
    assert truncated.teacache_stats == truncated_alone.teacache_stats
    assert truncated.teacache_stats.negative.computed_steps[-1] < STEPS - 3
    # Unseeded: every rank still starts from the same noise (rank 0's seed).
    unseeded = pipe(prompts, pipe.default_sampling_params("off", num_inference_steps=1))
    pipe.enable_parallel(None)
    off = pipe.default_sampling_params("off", num_inference_steps=1, guidance_scale=1.0)
    pipe.enable_parallel(state)
    if state.cfg is not None:
        with pytest.raises(ValueError, match="this generation runs no negative branch"):
            pipe(prompts, off)
    return {"seed": unseeded.seed, "images": unseeded.images, "stats": together.teacache_stats}


@pytest.mark.parametrize(
    ("world_size", "cfg_parallel", "sp_degree"),
    [(2, True, 1), (2, False, 2), (4, True, 2)],
    ids=["cfg", "sequence", "cfg-x-sequence"],
)
def test_pipeline_on_several_ranks_equals_one_process(tmp_path, world_size, cfg_parallel, sp_degree):
    ranks = spawn_ranks(_generate, tmp_path, world_size=world_size, cfg_parallel=cfg_parallel, sp_degree=sp_degree)
    assert len({r["seed"] for r in ranks}) == 1
    assert all(torch.equal(r["images"], ranks[0]["images"]) for r in ranks)
    assert all(r["stats"] == ranks[0]["stats"] for r in ranks)


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_generate_cli_under_torchrun_writes_once_from_rank_zero(tmp_path):
    output = tmp_path / "digit.png"
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",  # a free port on this machine
        "--nproc-per-node",
        "2",
        str(REPO / "scripts" / "generate.py"),
        "--model",
        "wan-digits",
        "--prompt",
        "a digit 5",
        "--steps",
        "4",
        "--seed",
        "1",
        "--cfg-parallel",
        "--threads",
        "1",
        "--no-progress",
        "--output",
        str(output),
        "--dist-timeout",
        "60",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if str(output) in line]
    assert len(summaries) == 1, done.stdout  # rank 0 only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digit.json", "digit.png"]
    record = json.loads((tmp_path / "digit.json").read_text())
    assert record["parallel"] == {"world_size": 2, "cfg_parallel": True, "sp_degree": 1, "backend": "gloo"}


def test_generate_cli_without_torchrun_says_how_to_launch(capsys, monkeypatch):
    import importlib.util

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    spec = importlib.util.spec_from_file_location("generate_cli", REPO / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--model", "wan-digits", "--prompt", "a digit 1", "--cfg-parallel", "--sp-degree", "2"]
    assert script.main(argv) == 2
    assert "need 4 ranks: launch with torchrun --nproc-per-node 4" in capsys.readouterr().err
    assert script.main([*argv[:4], "--sp-degree", "0"]) == 2
    assert "--sp-degree must be at least 1, got 0" in capsys.readouterr().err
