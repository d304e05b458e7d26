"""torch.compile on native models with TeaCache on: same outputs as eager, and no recompilation per step.

The TeaCache decision (step index, branch, accumulator, one synced float) runs outside the graphs, so
a compiled model traces each path (computed step, skipped step) once and then only replays it. The
graphs go to a counting backend that runs them eagerly ("eager"): what is tested is what Dynamo
traces and guards, not Inductor's code generation, which would take minutes on a CPU.
"""

from collections.abc import Callable

import pytest
import torch

from teacache_models import TeaCacheParams
from teacache_models.models import FluxTransformer2DModel, HunyuanVideo15Transformer3DModel
from teacache_models.models.wan import WanTransformer3DModel
from tests.tiny_configs import HUNYUAN_VIDEO15_TINY, WAN_TINY, hunyuan_video15_inputs
from tests.utils import assert_parity, randomize_

FLUX = dict(
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 4, 8),
)
WAN = WAN_TINY
HV15_THRESHOLD = 1.0
# Rescaled distance = raw distance. With these random weights one step moves the indicator by about 0.5-0.8
# (Flux) or 0.7-1.4 (Wan): the thresholds let every other step or so skip.
THRESHOLDS = {"flux": 1.0, "wan": 1.5, "hunyuan_video15": HV15_THRESHOLD}


class CountingBackend:
    """Counts the graphs Dynamo hands over and runs them as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return graph_module.forward


def flux_case() -> tuple[torch.nn.Module, Callable[[float], dict]]:
    model = randomize_(FluxTransformer2DModel(**FLUX), seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 4, generator=generator)
    prompt = torch.randn(1, 6, 32, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)

    def inputs(sigma: float) -> dict:
        return dict(
            hidden_states=latents,
            encoder_hidden_states=prompt,
            pooled_projections=pooled,
            timestep=torch.tensor([sigma]),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(6, 3),
            guidance=torch.tensor([3.5]),
            return_dict=False,
        )

    return model, inputs


def wan_case() -> tuple[torch.nn.Module, Callable[[float], dict]]:
    model = randomize_(WanTransformer3DModel(**WAN), seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 2, 8, 8, generator=generator)
    prompt = torch.randn(1, 7, 16, generator=generator)

    def inputs(sigma: float) -> dict:
        return dict(
            hidden_states=latents,
            timestep=torch.tensor([1000 * sigma]),
            encoder_hidden_states=prompt,
            return_dict=False,
        )

    return model, inputs


def hunyuan_video15_case() -> tuple[torch.nn.Module, Callable[[float], dict]]:
    model = randomize_(HunyuanVideo15Transformer3DModel(**HUNYUAN_VIDEO15_TINY), seed=0).eval()
    # Image-to-video, padded text and glyph masks.
    fixed = hunyuan_video15_inputs(HUNYUAN_VIDEO15_TINY, 1, (2, 3, 3), (4,), 6, (2,), 3, 2, True)

    def inputs(sigma: float) -> dict:
        return dict(fixed, timestep=torch.tensor([1000 * sigma]), return_dict=False)

    return model, inputs


def run_loop(
    model: torch.nn.Module,
    call: torch.nn.Module,
    inputs: Callable[[float], dict],
    steps: int,
    on_step: Callable[[int], None] | None = None,
    params: TeaCacheParams | None = None,
) -> list[torch.Tensor]:
    sigmas = torch.linspace(1.0, 0.05, steps).tolist()
    families = {WanTransformer3DModel: "wan", HunyuanVideo15Transformer3DModel: "hunyuan_video15"}
    thresh = THRESHOLDS[families.get(type(model), "flux")]
    model.enable_teacache(params or TeaCacheParams(teacache_thresh=thresh, coefficients=[1.0, 0.0]), steps)
    outputs = []
    with torch.no_grad():
        for step, sigma in enumerate(sigmas):
            with model.teacache_step(step):
                outputs.append(call(**inputs(sigma))[0])
            if on_step is not None:
                on_step(step)
    return outputs


@pytest.mark.parametrize("case", [flux_case, wan_case, hunyuan_video15_case], ids=["flux", "wan", "hunyuan_video15"])
def test_compiled_model_matches_eager_and_compiles_a_bounded_number_of_graphs(case):
    torch._dynamo.reset()
    model, inputs = case()
    steps = 10
    eager = run_loop(model, model, inputs, steps)
    eager_stats = model.teacache_stats()
    assert 0 < eager_stats.positive.num_skipped < steps - 2, "the threshold must skip some steps, not all"

    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    graphs_after_step = []
    outputs = run_loop(model, compiled, inputs, steps, on_step=lambda _: graphs_after_step.append(backend.graphs))

    assert model.teacache_stats().positive == eager_stats.positive  # the same steps computed and skipped
    for actual, expected in zip(outputs, eager, strict=True):
        assert_parity(actual, expected)
    assert backend.graphs > 0, "nothing was compiled"
    # Both paths have run by the middle of the loop; from then on no step compiles anything new.
    assert graphs_after_step[-1] == graphs_after_step[steps // 2], graphs_after_step
    assert graphs_after_step[-1] <= 12, graphs_after_step


def test_a_second_generation_reuses_the_compiled_graphs():
    torch._dynamo.reset()
    model, inputs = flux_case()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    run_loop(model, compiled, inputs, 8)
    graphs = backend.graphs
    run_loop(model, compiled, inputs, 6)  # another step count, fresh TeaCache state
    assert backend.graphs == graphs


# With the cadence of the first gap (3: steps 0 and 3 compute) and the last two steps forecast: 6 computes by the
# cadence, the one due at 9 is pulled in to 7.
CADENCE_SKIPS = (1, 2, 4, 5, 8, 9)


@pytest.mark.parametrize(
    "slope, cadence, skipped",
    [
        ("steps", False, (1, 2, 4, 8)),
        ("indicator", False, (1, 2, 4, 5, 6, 7, 8, 9)),
        ("indicator", True, CADENCE_SKIPS),
    ],
)
def test_the_forecast_method_compiles_no_graph_per_step(slope, cadence, skipped):
    # Its decision and forecasts run outside the graphs, as TeaCache's: skipped steps that reuse the residual
    # (1, 2: one computed step so far) and that extrapolate it (4 and 8 by the steps' measure of the slope, 4-9
    # by the indicator's) replay the same graphs.
    torch._dynamo.reset()
    model, inputs = flux_case()
    params = TeaCacheParams(
        teacache_thresh=0.8,
        method="forecast",
        residual_order=1,
        extrapolation_scale=0.5,
        end_skipping=0,
        forecast_slope=slope,
        forecast_cadence=cadence,
        forecast_tail=2 * cadence,
    )
    eager = run_loop(model, model, inputs, 10, params=params)
    eager_stats = model.teacache_stats()
    assert eager_stats.positive.skipped_steps == skipped
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    graphs_after_step = []
    outputs = run_loop(model, compiled, inputs, 10, lambda _: graphs_after_step.append(backend.graphs), params)
    assert model.teacache_stats().positive == eager_stats.positive
    for actual, expected in zip(outputs, eager, strict=True):
        assert_parity(actual, expected)
    assert graphs_after_step[-1] == graphs_after_step[4], graphs_after_step
