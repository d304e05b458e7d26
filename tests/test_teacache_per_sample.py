"""Per-sample TeaCache state: each batch row decides alone, and only the computing rows run the blocks.

A batch of rows with their own thresholds must give every row the schedule and the output of its run
alone; a step where every row skips runs no block.
"""

import pytest
import torch
from torch import nn

from teacache_models import TeaCacheMixin, TeaCacheParams
from teacache_models.models import (
    FluxTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from tests.test_flux import TINY as FLUX_BASE
from tests.test_qwen_image import TINY as QWEN_TINY
from tests.test_z_image import TINY as Z_IMAGE_TINY
from tests.tiny_configs import HUNYUAN_VIDEO15_TINY, HUNYUAN_VIDEO_TINY, WAN_TINY, hunyuan_video15_inputs
from tests.utils import randomize_

# The toy indicators are no calibrated model's: the fit monitor's warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore:TeaCache's coefficients do not fit")

WIDTH = 8


class RowModel(nn.Module, TeaCacheMixin):
    """Its indicator is each row's timestep broadcast over the tokens: every row's distances are known."""

    teacache_row_inputs = frozenset({"t"})

    def __init__(self) -> None:
        super().__init__()
        self.set_teacache_fits({"modulated_input": (1.0, 0.0)})
        generator = torch.Generator().manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(2)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        self.block_batches: list[int] = []

    def teacache_indicator(self, hidden_states: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, 1, 1).expand_as(hidden_states)

    def forward_blocks(self, hidden_states: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.block_batches.append(hidden_states.shape[0])
        for block in self.blocks:
            hidden_states = hidden_states + torch.tanh(block(hidden_states)) * t.reshape(-1, 1, 1)
        return hidden_states

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.run_blocks(x, t=t)


# Each row's timesteps: rows 0 and 2 change slowly, row 1 fast.
ROW_TIMESTEPS = torch.tensor(
    [
        [1.0, 0.98, 0.96, 0.94, 0.92, 0.90, 0.88, 0.86],
        [1.0, 0.80, 0.60, 0.40, 0.30, 0.20, 0.10, 0.05],
        [1.0, 0.99, 0.97, 0.90, 0.89, 0.88, 0.70, 0.69],
    ]
)


def run_rows(model, params, timesteps, negative=False, x=None):
    """Steps of a batch whose row r has timesteps[r]; returns the outputs and the stats."""
    steps = timesteps.shape[1]
    if x is None:
        x = torch.randn(timesteps.shape[0], 3, WIDTH, generator=torch.Generator().manual_seed(3))
    model.enable_teacache(params, num_inference_steps=steps)
    outputs = []
    for step in range(steps):
        with torch.no_grad(), model.teacache_step(step, is_cfg_negative=negative):
            outputs.append(model(x, timesteps[:, step]))
    return outputs, model.teacache_stats()


def branch(stats, negative=False):
    return stats.negative if negative else stats.positive


@pytest.mark.parametrize("negative", [False, True])
def test_each_row_keeps_the_schedule_and_output_of_its_run_alone(negative):
    model = RowModel()
    thresholds = (0.1, 0.1, 0.25)
    params = [TeaCacheParams(teacache_thresh=t, per_sample=True) for t in thresholds]
    x = torch.randn(3, 3, WIDTH, generator=torch.Generator().manual_seed(3))
    outputs, stats = run_rows(model, params, ROW_TIMESTEPS, negative, x)
    assert len(stats.rows) == 3 and stats.positive.num_computed == stats.negative.num_computed == 0
    schedules = []
    for row, thresh in enumerate(thresholds):
        solo_params = TeaCacheParams(teacache_thresh=thresh)
        solo, solo_stats = run_rows(model, solo_params, ROW_TIMESTEPS[row : row + 1], negative, x[row : row + 1])
        assert branch(stats.rows[row], negative) == branch(solo_stats, negative)
        assert stats.rows[row].teacache_thresh == thresh
        for step, output in enumerate(outputs):
            torch.testing.assert_close(output[row : row + 1], solo[step], rtol=1e-6, atol=1e-6)
        schedules.append(branch(solo_stats, negative).computed_steps)
    # The rows really differ: the fast row computes every step, the slow ones skip some.
    assert len(set(schedules)) == 3
    assert len(schedules[1]) == 8 and len(schedules[0]) < 8 and len(schedules[2]) < 8


def test_only_the_computing_rows_run_the_blocks_and_an_all_skip_step_runs_none():
    model = RowModel()
    params = TeaCacheParams(teacache_thresh=0.1, per_sample=True)
    _, stats = run_rows(model, params, ROW_TIMESTEPS[[0, 2]])  # the two slow rows
    computing = [sum(step in row.positive.computed_steps for row in stats.rows) for step in range(8)]
    assert model.block_batches == [n for n in computing if n]  # one call per step with a computing row
    assert 0 in computing  # some step had every row skip: no block call for it
    assert any(0 < n < 2 for n in computing)  # and some ran on a subset


def test_branches_and_generations_stay_apart():
    model = RowModel()
    params = TeaCacheParams(teacache_thresh=0.1, per_sample=True)
    x = torch.randn(3, 3, WIDTH, generator=torch.Generator().manual_seed(3))
    model.enable_teacache(params, num_inference_steps=8)
    interleaved = {False: [], True: []}
    for step in range(8):
        for negative in (False, True):
            timesteps = ROW_TIMESTEPS.flip(0) if negative else ROW_TIMESTEPS
            with torch.no_grad(), model.teacache_step(step, is_cfg_negative=negative):
                interleaved[negative].append(model(x, timesteps[:, step]))
    both = model.teacache_stats()
    positive, positive_stats = run_rows(model, params, ROW_TIMESTEPS, x=x)
    negative, negative_stats = run_rows(model, params, ROW_TIMESTEPS.flip(0), negative=True, x=x)
    for row in range(3):
        assert both.rows[row].positive == positive_stats.rows[row].positive
        assert both.rows[row].negative == negative_stats.rows[row].negative
    assert all(torch.equal(a, b) for a, b in zip(interleaved[False], positive, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(interleaved[True], negative, strict=True))
    # A new generation starts every row afresh (the previous generation's rows are gone).
    assert positive_stats.rows[0].negative.num_computed == 0


def test_batch_shared_decision_stays_the_default():
    model = RowModel()
    _, stats = run_rows(model, TeaCacheParams(teacache_thresh=0.1), ROW_TIMESTEPS)
    assert stats.rows == () and stats.positive.num_computed > 0
    assert set(model.block_batches) == {3}


def test_per_sample_stats_summary_and_dict():
    model = RowModel()
    params = [TeaCacheParams(teacache_thresh=t, per_sample=True) for t in (0.1, 0.2, 0.3)]
    _, stats = run_rows(model, params, ROW_TIMESTEPS)
    assert stats.summary().startswith("row 0: positive: ")
    data = stats.as_dict()
    assert [row["teacache_thresh"] for row in data["rows"]] == [0.1, 0.2, 0.3]
    assert stats.num_computed == sum(row.num_computed for row in stats.rows)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ([], ValueError, "empty sequence"),
        ([TeaCacheParams(per_sample=True), "fast"], TypeError, r"params\[1\] must be a TeaCacheParams"),
        ([TeaCacheParams(per_sample=True), TeaCacheParams()], ValueError, r"params\[1\] has per_sample=False"),
        (
            [TeaCacheParams(per_sample=True), TeaCacheParams(per_sample=True, indicator="modulated_input")],
            ValueError,
            "share the indicator",
        ),
    ],
)
def test_row_parameters_are_checked_at_the_boundary(params, error, match):
    with pytest.raises(error, match=match):
        RowModel().enable_teacache(params, num_inference_steps=8)


def test_per_sample_flag_must_be_a_bool():
    with pytest.raises(ValueError, match="per_sample must be True or False"):
        TeaCacheParams(per_sample=1)


def test_a_batch_of_another_size_than_the_rows_is_refused():
    model = RowModel()
    params = [TeaCacheParams(per_sample=True)] * 2
    with pytest.raises(ValueError, match="per-sample state for 2 batch rows, but the call's batch has 3"):
        run_rows(model, params, ROW_TIMESTEPS)


def test_a_model_whose_inputs_cannot_be_split_by_row_refuses_per_sample_state():
    class SharedInputs(RowModel):
        teacache_row_inputs = None

    with pytest.raises(ValueError, match="SharedInputs cannot keep per-sample TeaCache state"):
        SharedInputs().enable_teacache(TeaCacheParams(per_sample=True), num_inference_steps=8)
    with pytest.raises(ValueError, match="ZImageTransformer2DModel cannot keep per-sample"):
        z_image = ZImageTransformer2DModel(**Z_IMAGE_TINY)
        z_image.enable_teacache(TeaCacheParams(coefficients=(1.0, 0.0), per_sample=True), num_inference_steps=4)


# ---- the families ----------------------------------------------------------------------------------------

FLUX_TINY = dict(FLUX_BASE, guidance_embeds=True)


def flux_case(batch: int) -> tuple[nn.Module, dict, frozenset[str], float]:
    model = randomize_(FluxTransformer2DModel(**FLUX_TINY), 0).eval()
    generator = torch.Generator().manual_seed(5)
    ids = torch.zeros(4, 4, 3)
    ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
    inputs = dict(
        hidden_states=torch.randn(batch, 16, 4, generator=generator),
        encoder_hidden_states=torch.randn(batch, 5, 32, generator=generator),
        pooled_projections=torch.randn(batch, 32, generator=generator),
        img_ids=ids.reshape(16, 3),
        txt_ids=torch.zeros(5, 3),
        guidance=torch.full((batch,), 3.5),
    )
    return model, inputs, frozenset({"img_ids", "txt_ids"}), 1.0


def wan_case(batch: int) -> tuple[nn.Module, dict, frozenset[str], float]:
    model = randomize_(WanTransformer3DModel(**WAN_TINY), 0).eval()
    generator = torch.Generator().manual_seed(5)
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 2, 4, 4, generator=generator),
        encoder_hidden_states=torch.randn(batch, 7, WAN_TINY["text_dim"], generator=generator),
    )
    return model, inputs, frozenset(), 1000.0


def qwen_case(batch: int) -> tuple[nn.Module, dict, frozenset[str], float]:
    model = randomize_(QwenImageTransformer2DModel(**QWEN_TINY), 0).eval()
    generator = torch.Generator().manual_seed(5)
    inputs = dict(
        hidden_states=torch.randn(batch, 16, 16, generator=generator),
        encoder_hidden_states=torch.randn(batch, 6, 16, generator=generator),
        encoder_hidden_states_mask=(torch.arange(6)[None, :] < torch.tensor([6, 4, 2][:batch])[:, None]).long(),
        img_shapes=[[(1, 4, 4)]] * batch,
    )
    return model, inputs, frozenset(), 1.0


def hunyuan_video_case(batch: int) -> tuple[nn.Module, dict, frozenset[str], float]:
    model = randomize_(HunyuanVideoTransformer3DModel(**HUNYUAN_VIDEO_TINY), 0).eval()
    generator = torch.Generator().manual_seed(5)
    inputs = dict(
        hidden_states=torch.randn(batch, 4, 2, 4, 4, generator=generator),
        encoder_hidden_states=torch.randn(batch, 6, 16, generator=generator),
        encoder_attention_mask=(torch.arange(6)[None, :] < torch.tensor([6, 4, 2][:batch])[:, None]).long(),
        pooled_projections=torch.randn(batch, 8, generator=generator),
        guidance=torch.full((batch,), 6000.0),
    )
    return model, inputs, frozenset(), 1000.0


def hunyuan_video15_case(batch: int) -> tuple[nn.Module, dict, frozenset[str], float]:
    model = randomize_(HunyuanVideo15Transformer3DModel(**HUNYUAN_VIDEO15_TINY), 0).eval()
    inputs = hunyuan_video15_inputs(HUNYUAN_VIDEO15_TINY, batch, (2, 3, 3), (5, 3, 1), 5, (2, 0, 1), 3, 2, True)
    del inputs["timestep"]
    return model, inputs, frozenset(), 1000.0


def denoise(model, params, inputs, scale, steps=10):
    """A flow-matching Euler loop: TeaCache decides on the model's own trajectory."""
    x = inputs["hidden_states"]
    model.enable_teacache(params, num_inference_steps=steps)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for step in range(steps):
        timestep = sigmas[step].expand(x.shape[0]) * scale
        with torch.no_grad(), model.teacache_step(step):
            velocity = model(**{**inputs, "hidden_states": x}, timestep=timestep, return_dict=False)[0]
        # HunyuanVideo-1.5 predicts the noisy channels only; the condition channels after them stay.
        noisy = x[:, : velocity.shape[1]] + (sigmas[step + 1] - sigmas[step]) * velocity
        x = torch.cat([noisy, x[:, velocity.shape[1] :]], dim=1)
    return x, model.teacache_stats()


FAMILY_CASES = [flux_case, wan_case, qwen_case, hunyuan_video_case, hunyuan_video15_case]


@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda case: case.__name__.removesuffix("_case"))
def test_family_rows_match_their_solo_runs(case):
    model, inputs, shared, scale = case(3)
    thresholds = (0.0, 1.0, 2.0)
    params = [TeaCacheParams(teacache_thresh=t, coefficients=(1.0, 0.0), per_sample=True) for t in thresholds]
    batched, stats = denoise(model, params, inputs, scale)
    schedules = set()
    for row, thresh in enumerate(thresholds):
        solo_inputs = {k: v if k in shared else v[row : row + 1] for k, v in inputs.items()}
        solo_params = TeaCacheParams(teacache_thresh=thresh, coefficients=(1.0, 0.0))
        solo, solo_stats = denoise(model, solo_params, solo_inputs, scale)
        assert stats.rows[row].positive == solo_stats.positive
        torch.testing.assert_close(batched[row : row + 1], solo, rtol=1e-5, atol=1e-5)
        schedules.add(solo_stats.positive.computed_steps)
    assert len(schedules) == 3  # the thresholds gave three different schedules


def test_qwen_image_condition_tokens_cannot_be_split_by_row():
    config = dict(QWEN_TINY, zero_cond_t=True)
    model = randomize_(QwenImageTransformer2DModel(**config), 0).eval()
    model.enable_teacache(TeaCacheParams(coefficients=(1.0, 0.0), per_sample=True), num_inference_steps=2)
    generator = torch.Generator().manual_seed(5)
    inputs = dict(
        hidden_states=torch.randn(2, 32, 16, generator=generator),
        encoder_hidden_states=torch.randn(2, 6, 16, generator=generator),
        timestep=torch.rand(2, generator=generator),
        img_shapes=[[(1, 4, 4), (1, 4, 4)]] * 2,
    )
    refusal = pytest.raises(ValueError, match=r"block input 'temb'.*per_sample=False")
    with torch.no_grad(), model.teacache_step(0), refusal:
        model(**inputs, return_dict=False)


def test_rows_at_their_own_steps_match_their_solo_runs_and_bad_calls_are_refused():
    model = RowModel()
    x = torch.randn(2, 3, WIDTH, generator=torch.Generator().manual_seed(3))
    rows = [model.new_teacache_row(TeaCacheParams(teacache_thresh=0.1, per_sample=True), 8) for _ in range(2)]
    outputs = {0: [], 1: []}
    for tick in range(10):  # row 1 joins two steps after row 0
        steps = [s for s in (tick, tick - 2) if 0 <= s < 8]
        live = [i for i, s in ((0, tick), (1, tick - 2)) if 0 <= s < 8]
        t = torch.stack([ROW_TIMESTEPS[i, s] for i, s in zip(live, steps, strict=True)])
        with torch.no_grad(), model.teacache_rows_step([rows[i] for i in live], steps):
            out = model(x[live], t)
        for position, i in enumerate(live):
            outputs[i].append(out[position : position + 1])
    for i in (0, 1):
        solo, solo_stats = run_rows(
            model, TeaCacheParams(teacache_thresh=0.1), ROW_TIMESTEPS[i : i + 1], x=x[i : i + 1]
        )
        assert model.teacache_row_stats(rows[i]).positive == solo_stats.positive
        assert all(torch.equal(a, b) for a, b in zip(outputs[i], solo, strict=True))
    with pytest.raises(ValueError, match="as long as each other"), model.teacache_rows_step(rows, [0]):
        pass
    with pytest.raises(ValueError, match="is not after 7"), model.teacache_rows_step(rows[:1], [7]):
        pass
