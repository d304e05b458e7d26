"""TeaCache inside diffusers' own pipelines (`apply_teacache`): with the native transformers swapped in and
TeaCache off, every covered pipeline equals diffusers' own run bit for bit; with TeaCache on, the skip
schedule equals the one our own pipeline (or an explicitly declared loop) makes for the same inputs."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from teacache_models import SamplingParams, TeaCacheParams, apply_teacache, remove_teacache
from teacache_models.integrations.diffusers import native_from_diffusers, pipeline_teacache_stats
from teacache_models.pipelines import load_pipeline
from tests.test_pipeline_fixtures import (
    qwen_image_edit_pipeline,
    save_flux,
    save_hunyuan_video,
    save_qwen_image,
    save_wan,
    save_z_image,
)
from tests.test_pipeline_video import reference as video_reference

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT = "a red fox jumps over the lazy dog"
NEGATIVE = "blurry bad quality"
COMPONENTS = ("transformer", "transformer_2")


@dataclass
class Case:
    """One diffusers pipeline on a tiny folder: its call, and the same generation in our own pipeline."""

    folder: str
    pipeline: str
    call: dict[str, Any]
    ours: dict[str, Any] | None  # SamplingParams settings; None: no pipeline of ours, a declared loop instead
    threshold: float = 1.0
    video: bool = False
    image: bool = False
    calls_per_step: int = 2
    steps: int = 0  # of a declared loop
    edit: bool = False  # a Qwen-Image edit pipeline, built in memory around the Qwen-Image folder


def _both(**settings: Any) -> tuple[dict, dict]:
    """The same settings for diffusers' call and for our pipeline, where both name them alike."""
    return settings, dict(settings)


def _wan(steps: int, guidance: float) -> tuple[dict, dict]:
    return _both(
        num_inference_steps=steps, guidance_scale=guidance, negative_prompt=NEGATIVE, height=32, width=48, num_frames=5
    )


TRUE_CFG = dict(num_inference_steps=6, height=32, width=32, true_cfg_scale=4.0, negative_prompt=NEGATIVE)
CASES = {
    "FluxPipeline": Case("flux", "FluxPipeline", *_both(**TRUE_CFG, guidance_scale=3.5)),
    "FluxImg2ImgPipeline": Case(
        "flux", "FluxImg2ImgPipeline", dict(TRUE_CFG, num_inference_steps=8, strength=0.75), None, image=True, steps=6
    ),
    "WanPipeline": Case("wan-t2v", "WanPipeline", *_wan(6, 5.0), video=True),
    "WanPipeline-2.2": Case("wan-t2v-a14b", "WanPipeline", *_wan(8, 4.0), video=True),
    "WanImageToVideoPipeline": Case("wan-i2v", "WanImageToVideoPipeline", *_wan(6, 5.0), video=True, image=True),
    "HunyuanVideoPipeline": Case(
        "hunyuan", "HunyuanVideoPipeline", *_both(**TRUE_CFG, guidance_scale=6.0, num_frames=5), video=True
    ),
    # Our Qwen-Image pipeline names diffusers' true_cfg_scale guidance_scale.
    "QwenImagePipeline": Case(
        "qwen", "QwenImagePipeline", dict(TRUE_CFG), {**TRUE_CFG, "true_cfg_scale": None, "guidance_scale": 4.0}
    ),
    **{
        name: Case("qwen", name, dict(TRUE_CFG), None, image=True, steps=6, edit=True)
        for name in ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
    },
    "ZImagePipeline": Case(
        "z_image",
        "ZImagePipeline",
        *_both(
            num_inference_steps=6, height=32, width=32, guidance_scale=3.0, cfg_truncation=0.6, negative_prompt=NEGATIVE
        ),
        threshold=3.0,  # its distances are smaller on this fixture
    ),
}
SEED = 7


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    builders = {
        "flux": lambda path: save_flux(path, guidance_embeds=True),
        "wan-t2v": lambda path: save_wan(path, "t2v"),
        "wan-t2v-a14b": lambda path: save_wan(path, "t2v-a14b"),
        "wan-i2v": lambda path: save_wan(path, "i2v"),
        "hunyuan": save_hunyuan_video,
        "qwen": save_qwen_image,
        "z_image": save_z_image,
    }
    made: dict[str, Any] = {}

    def folder(name: str):
        if name not in made:
            made[name] = builders[name](tmp_path_factory.mktemp(name))
        return made[name]

    return folder


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def small_edit_images(monkeypatch):
    """The edit pipelines resize their input image to about 1024 x 1024 pixels for the VAE (384 x 384 for the
    vision tower of the Plus pipeline): at this fixture's scale, 64 x 64 and 32 x 32 test the same code."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    resize = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: resize(64 * 64, ratio))
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", 32 * 32)


def diffusers_pipeline(folder, case: Case):
    if case.edit:
        return qwen_image_edit_pipeline(folder, case.pipeline)
    return video_reference(folder, case.pipeline)


def run(pipe, case: Case, image) -> torch.Tensor:
    inputs = {"image": image} if case.image else {}
    out = pipe(
        prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt", **inputs, **case.call
    )
    return out.frames if case.video else out.images


def params_for(case: Case) -> TeaCacheParams:
    return TeaCacheParams(teacache_thresh=case.threshold, coefficients=(1.0, 0.0))


def our_schedule(folder, case: Case, image) -> dict[str, Any]:
    pipe = load_pipeline(folder)
    settings = {"seed": SEED, **case.ours, "teacache_params": params_for(case)}
    inputs = {"image": image} if case.image else {}
    result = pipe(PROMPT, SamplingParams(**settings), **inputs)
    return result.expert_stats or {"transformer": result.teacache_stats}


def declared_schedule(pipe, case: Case, image) -> dict[str, Any]:
    """TeaCache declared without the pipeline's scheduler: a pipeline that opens `cache_context` gets each
    branch's step from the count of its calls (no step source attached); for one that does not, the test
    declares each call, knowing the pipeline makes `calls_per_step` calls per step, positive first."""
    model = pipe.transformer
    model.enable_teacache(params_for(case), case.steps)
    calls, stacks = [0], []

    def before(module, args, kwargs):
        index, calls[0] = calls[0], calls[0] + 1
        stack = ExitStack()
        if module.__dict__.get("_teacache_context") is None:  # no cache_context around this call
            negative = index % case.calls_per_step == 1
            stack.enter_context(module.teacache_step(index // case.calls_per_step, is_cfg_negative=negative))
        stacks.append(stack)

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(lambda *args, **kwargs: stacks.pop().close(), with_kwargs=True),
    ]
    try:
        run(pipe, case, image)
    finally:
        for handle in handles:
            handle.remove()
    assert calls[0] == case.steps * case.calls_per_step
    stats = model.teacache_stats()
    model.disable_teacache()
    return {"transformer": stats}


def schedule(stats) -> tuple:
    return tuple((b.computed_steps, b.skipped_steps) for b in (stats.positive, stats.negative))


@pytest.mark.parametrize("name", list(CASES))
def test_diffusers_pipeline_with_native_transformers(folders, image, small_edit_images, name):
    case = CASES[name]
    folder = folders(case.folder)
    pipe = diffusers_pipeline(folder, case)
    expected = run(pipe, case, image)
    originals = {n: getattr(pipe, n) for n in COMPONENTS if getattr(pipe, n, None) is not None}

    # TeaCache off: the native classes on the same tensors give diffusers' output bit for bit.
    for component, module in originals.items():
        native = native_from_diffusers(module)
        ptrs = [p.data_ptr() for p in module.parameters()]
        assert [p.data_ptr() for p in native.parameters()] == ptrs, "parameters are shared, not copied"
        setattr(pipe, component, native)
    assert torch.equal(run(pipe, case, image), expected)

    # TeaCache on: the schedule of our own pipeline (or of a loop the test declares), per component.
    declared = case.ours is None
    reference_stats = declared_schedule(pipe, case, image) if declared else our_schedule(folder, case, image)
    for component, module in originals.items():
        setattr(pipe, component, module)
    apply_teacache(pipe, params_for(case))
    for component, module in originals.items():
        native = getattr(pipe, component)
        assert type(native).__module__.startswith("teacache_models.")
        assert all(a is b for a, b in zip(native.parameters(), module.parameters(), strict=True))
    cached = run(pipe, case, image)
    stats = pipeline_teacache_stats(pipe)
    assert {k: schedule(v) for k, v in stats.items()} == {k: schedule(v) for k, v in reference_stats.items()}
    assert sum(s.num_skipped for s in stats.values()) > 0, "the threshold should make TeaCache skip"
    assert all(s.num_computed > 0 for s in stats.values())
    assert "computed" in pipe.transformer.teacache_stats().summary()
    assert cached.shape == expected.shape and torch.isfinite(cached).all()

    # A second call is a new generation with fresh state: the same schedule again.
    run(pipe, case, image)
    assert {k: schedule(v) for k, v in pipeline_teacache_stats(pipe).items()} == {
        k: schedule(v) for k, v in stats.items()
    }
    remove_teacache(pipe)
    for component, module in originals.items():
        assert getattr(pipe, component) is module
    assert torch.equal(run(pipe, case, image), expected)
