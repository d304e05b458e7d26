"""TeaCache under sequence parallelism: ranks holding shards of the tokens all make the global decision."""

import dataclasses
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from teacache_models import TeaCacheParams
from tests.test_teacache_core import WIDTH, TinyModel

STEPS = 8
TOKENS = 6


class TokenIndicatorModel(TinyModel):
    """Its indicator differs per token, so each shard alone would see another distance than the whole."""

    def teacache_indicator(self, hidden_states: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return hidden_states * t.reshape(-1, 1, 1)


def trajectory() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(1, TOKENS, WIDTH, generator=generator)
    # Later tokens move much more than earlier ones: the two halves disagree about the distance.
    drift = torch.linspace(0.01, 1.0, TOKENS).reshape(1, TOKENS, 1)
    return [base + step * drift * torch.randn(1, TOKENS, WIDTH, generator=generator) for step in range(STEPS)]


TEACACHE = TeaCacheParams(teacache_thresh=0.6, coefficients=[1.0, 0.0])
# The forecast method reduces two distances per step (its forecast's error, and the change the fit monitor reads).
FORECAST = TeaCacheParams(
    teacache_thresh=1.0, method="forecast", residual_order=1, extrapolation_scale=0.5, end_skipping=0
)
# With the slope measured on the indicator, one more reduction per step: the indicator's projection on the slope.
MEASURED = dataclasses.replace(FORECAST, forecast_slope="indicator")
# The cadence and the forecast tail read only the step index and the computed steps, which every rank shares.
CADENCE = dataclasses.replace(MEASURED, teacache_thresh=0.5, forecast_cadence=True, forecast_tail=2)


def decide(
    model: TinyModel, inputs: list[torch.Tensor], params: TeaCacheParams = TEACACHE
) -> tuple[tuple[int, ...], list[torch.Tensor]]:
    model.enable_teacache(params, STEPS)
    outputs = []
    for step, x in enumerate(inputs):
        with torch.no_grad(), model.teacache_step(step):
            outputs.append(model(x, torch.tensor([1.0 - step / STEPS])))
    return model.teacache_stats().positive.skipped_steps, outputs


def _worker(rank: int, world_size: int, init_file: str, results: dict, params: TeaCacheParams) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        model = TokenIndicatorModel()
        model.set_teacache_process_group(dist.group.WORLD)
        shard = TOKENS // world_size
        inputs = [x[:, rank * shard : (rank + 1) * shard] for x in trajectory()]
        skipped, outputs = decide(model, inputs, params)
        results[rank] = (skipped, [o.clone() for o in outputs])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "params", [TEACACHE, FORECAST, MEASURED, CADENCE], ids=["teacache", "forecast", "measured-slope", "cadence"]
)
def test_sequence_parallel_ranks_make_the_global_decision(tmp_path, params):
    full_skipped, full_outputs = decide(TokenIndicatorModel(), trajectory(), params)
    local_skipped, _ = decide(TokenIndicatorModel(), [x[:, : TOKENS // 2] for x in trajectory()], params)
    assert full_skipped != local_skipped, "the shards alone must disagree, or the test proves nothing"

    manager = mp.Manager()
    results = manager.dict()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), results, params), nprocs=2, join=True)
    assert results[0][0] == results[1][0] == full_skipped
    for rank in range(2):
        shard = slice(rank * TOKENS // 2, (rank + 1) * TOKENS // 2)
        for ours, full in zip(results[rank][1], full_outputs, strict=True):
            torch.testing.assert_close(ours, full[:, shard], rtol=1e-5, atol=1e-6)
