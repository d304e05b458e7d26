"""FLUX.2 pipelines ([dev], [klein] distilled and base, [klein] KV): bit-identical to diffusers' pipelines with
the cache off (text-to-image and editing with one or more reference images), TeaCache through the loop, and
clear errors for bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from teacache_models import SamplingParams, TeaCacheParams
from teacache_models.pipelines import load_pipeline
from tests.flux2_fixtures import reference_image, save_flux2

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

PROMPTS = ["a red fox jumps over the lazy dog", "a cat on the mat"]
# Short prompts keep the tiny runs fast; both pipelines read the same number of tokens.
MAX_LENGTH = 32
SKIP_ALL = TeaCacheParams(teacache_thresh=1e6, coefficients=(1.0, 0.0))
ZERO = TeaCacheParams(teacache_thresh=0.0, coefficients=(1.0, 0.0))  # must equal the cache off
REFERENCE_CLASSES = {
    "dev": "Flux2Pipeline",
    "klein": "Flux2KleinPipeline",
    "klein-base": "Flux2KleinPipeline",
    "klein-kv": "Flux2KleinKVPipeline",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = save_flux2(tmp_path_factory.mktemp(kind), kind)
        return cache[kind]

    return get


def ours(folder):
    pipe = load_pipeline(folder)
    pipe.max_sequence_length = MAX_LENGTH
    return pipe


def run_reference(folder, kind: str, seed: int, **kwargs) -> torch.Tensor:
    import diffusers

    pipe = getattr(diffusers, REFERENCE_CLASSES[kind]).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(generator=generator, output_type="pt", max_sequence_length=MAX_LENGTH, **kwargs).images


def references(count: int) -> list:
    sizes = [(64, 80), (72, 64), (64, 64)]
    return [reference_image(*sizes[i], seed=i) for i in range(count)]


# ---- fidelity: TeaCache off equals diffusers, bit for bit ---------------------------------------------


@pytest.mark.parametrize(
    ("kind", "guidance", "num_references", "height", "width"),
    [
        ("dev", 3.5, 0, 32, 48),
        ("dev", 2.5, 2, 24, 40),
        ("klein", 1.0, 1, 32, 32),
        ("klein-base", 4.0, 0, 24, 32),
        ("klein-base", 3.0, 3, 32, 24),
        ("klein-kv", 1.0, 2, 32, 48),
    ],
    ids=["dev-t2i", "dev-2-references", "klein-1-reference", "klein-base-cfg", "klein-base-3-references", "kv"],
)
def test_matches_diffusers_bit_for_bit(folders, kind, guidance, num_references, height, width):
    folder = folders(kind)
    images = references(num_references) or None
    settings = dict(num_inference_steps=3, height=height, width=width)
    result = ours(folder)(
        PROMPTS, SamplingParams(seed=7, guidance_scale=guidance, teacache_params=None, **settings), image=images
    )
    if kind != "klein-kv":  # the KV pipeline takes no guidance_scale
        settings["guidance_scale"] = guidance
    expected = run_reference(folder, kind, 7, prompt=PROMPTS, image=images, **settings)
    assert result.images.shape == (2, 3, height, width)
    assert torch.equal(result.images, expected)
    stats = result.teacache_stats
    assert stats.positive.computed_steps == (0, 1, 2)
    assert stats.negative.computed_steps == ((0, 1, 2) if kind == "klein-base" else ())


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_without_a_size_the_first_reference_sets_it_as_in_diffusers(folders, kind):
    folder, images = folders(kind), references(2)
    pipe = ours(folder)
    height, width = pipe.output_size(images)
    assert (height, width) == (80, 64)  # the first reference is 64 x 80 (width x height), a multiple of 16
    guidance = 1.0 if kind == "klein" else 2.5
    result = pipe(
        PROMPTS[0],
        SamplingParams(
            seed=3, num_inference_steps=2, guidance_scale=guidance, height=height, width=width, teacache_params=None
        ),
        image=images,
    )
    expected = run_reference(
        folder, kind, 3, prompt=PROMPTS[0], image=images, num_inference_steps=2, guidance_scale=guidance
    )
    assert torch.equal(result.images, expected)


def test_a_large_first_reference_is_shrunk_to_a_megapixel_before_it_sets_the_size(folders):
    pipe = ours(folders("dev"))
    height, width = pipe.output_size(reference_image(2000, 1000, 0))
    multiple = pipe.size_multiple()
    assert height % multiple == 0 and width % multiple == 0
    assert height * width <= 1024 * 1024 and abs(width / height - 2.0) < 0.05


def test_reference_images_change_the_edit(folders):
    pipe = ours(folders("klein"))
    params = SamplingParams(
        seed=2, guidance_scale=1.0, num_inference_steps=2, height=32, width=32, teacache_params=None
    )
    plain = pipe(PROMPTS[0], params).images
    one = pipe(PROMPTS[0], params, image=references(1)).images
    two = pipe(PROMPTS[0], params, image=references(2)).images
    assert not torch.equal(plain, one) and not torch.equal(one, two)
    # One image given bare or in a list is the same call.
    assert torch.equal(pipe(PROMPTS[0], params, image=references(1)[0]).images, one)


# ---- TeaCache through the loop ----------------------------------------------------------------------


def off_zero_and_skipping(pipe, params: SamplingParams, images: list):
    """The same edit with the cache off, at threshold 0 (which must equal off, bit for bit) and skipping all
    it may; returns the uncached and the skipping results."""
    runs = [
        pipe(PROMPTS[0], dataclasses.replace(params, teacache_params=cache), image=images)
        for cache in (None, ZERO, SKIP_ALL)
    ]
    assert torch.equal(runs[0].images, runs[1].images)
    return runs[0], runs[2]


def test_teacache_keeps_the_cfg_branches_apart_with_reference_images(folders):
    params = SamplingParams(seed=3, guidance_scale=3.0, num_inference_steps=5, height=24, width=24)
    off, cached = off_zero_and_skipping(ours(folders("klein-base")), params, references(1))
    for branch in (cached.teacache_stats.positive, cached.teacache_stats.negative):
        assert branch.computed_steps == (0, 4) and branch.skipped_steps == (1, 2, 3)
    assert not torch.equal(cached.images, off.images)


def test_teacache_with_the_kv_cache(folders):
    """The first step fills the KV cache and computes; the second computes too (its inputs lack the reference
    tokens, so the first step's residual cannot stand in); the rest may skip."""
    params = SamplingParams(seed=4, guidance_scale=1.0, num_inference_steps=5, height=24, width=24)
    off, cached = off_zero_and_skipping(ours(folders("klein-kv")), params, references(1))
    assert cached.teacache_stats.positive.computed_steps == (0, 1, 4)
    assert cached.teacache_stats.positive.skipped_steps == (2, 3)
    assert not torch.equal(cached.images, off.images)


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "settings", "inputs", "error", "match"),
    [
        ("dev", {}, {"image": torch.rand(3, 64, 64)}, TypeError, "image must be a PIL image"),
        ("dev", {}, {"image": [None]}, TypeError, r"image\[0\] must be a PIL image"),
        ("dev", {}, {"image": "tiny"}, ValueError, r"image is 48x64: both sides"),
        ("dev", {}, {"image": "wide"}, ValueError, "aspect ratio must be at most 8:1"),
        ("dev", {}, {"image": []}, ValueError, "non-empty list"),
        ("klein", {"guidance_scale": 1.0}, {"image": "five"}, ValueError, "5 reference images; .* at most 4"),
        ("dev", {}, {"mask": None}, TypeError, r"takes only image=\.\.\. \(reference images\), got \['mask'\]"),
        ("dev", {"negative_prompt": "blurry"}, {}, ValueError, "negative_prompt='blurry' has no effect"),
        ("klein", {"guidance_scale": 4.0}, {}, ValueError, "guidance_scale=4.0 has no effect: .*step-distilled"),
        ("klein", {"guidance_scale": 1.0, "true_cfg_scale": 2.0}, {}, ValueError, "true_cfg_scale"),
        ("dev", {"height": 2}, {}, ValueError, "height must be a multiple of 4 .* got 2; try 4"),
    ],
    ids=[
        "tensor",
        "list-of-none",
        "tiny",
        "wide",
        "empty-list",
        "too-many",
        "unknown-input",
        "negative",
        "distilled-cfg",
        "extra",
        "size",
    ],
)
def test_bad_input_gives_a_clear_error(folders, kind, settings, inputs, error, match):
    pipe = ours(folders(kind))
    if inputs.get("image") == "tiny":
        inputs = {"image": reference_image(48, 64, 0)}
    elif inputs.get("image") == "wide":
        inputs = {"image": reference_image(640, 64, 0)}
    elif inputs.get("image") == "five":
        inputs = {"image": [reference_image(64, 64, i) for i in range(5)]}
    params = SamplingParams(**{"seed": 0, "num_inference_steps": 1, "height": 16, "width": 16, **settings})
    with pytest.raises(error, match=match):
        pipe(PROMPTS[0], dataclasses.replace(params, teacache_params=None), **inputs)


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_a_size_off_the_multiple_is_rounded_down_with_a_warning_as_in_diffusers(folders, kind):
    folder = folders(kind)
    guidance = 1.0 if kind == "klein" else 2.5
    params = SamplingParams(
        seed=5, num_inference_steps=2, guidance_scale=guidance, height=35, width=22, teacache_params=None
    )
    with pytest.warns(UserWarning, match="got 35 and 22: generating 32 x 20"):
        result = ours(folder)(PROMPTS[0], params)
    assert (result.sampling_params.height, result.sampling_params.width) == (32, 20)
    expected = run_reference(
        folder, kind, 5, prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=guidance, height=35, width=22
    )
    assert result.images.shape == (1, 3, 32, 20)
    assert torch.equal(result.images, expected)


def test_kv_pipeline_refuses_a_base_checkpoint(folders):
    from teacache_models.pipelines.flux2 import Flux2KleinKVImagePipeline

    base = ours(folders("klein-base"))
    pipe = Flux2KleinKVImagePipeline(
        base.transformer, base.scheduler, base.vae, is_distilled=False, **base.text_components
    )
    params = SamplingParams(seed=0, guidance_scale=1.0, num_inference_steps=1, height=16, width=16)
    with pytest.raises(ValueError, match="KV-cache pipeline runs without CFG"):
        pipe(PROMPTS[0], params)
    with pytest.raises(TypeError, match="is_distilled must be True, False or None"):
        Flux2KleinKVImagePipeline(base.transformer, base.scheduler, base.vae, is_distilled=1, **base.text_components)


# ---- apply_teacache inside diffusers' own FLUX.2 pipelines ------------------------------------------------


@pytest.mark.parametrize(("kind", "guidance"), [("klein-base", 3.0), ("klein-kv", 1.0), ("dev", 2.5)])
def test_apply_teacache_to_diffusers_flux2_pipelines(folders, kind, guidance):
    """Native transformer swapped in: TeaCache at threshold 0 gives diffusers' own images bit for bit, and a
    real threshold gives the images and per-branch decisions of our own pipeline."""
    import diffusers

    from teacache_models import apply_teacache
    from teacache_models.integrations.diffusers import pipeline_teacache_stats

    folder = folders(kind)
    images = references(1)
    settings = dict(num_inference_steps=5, height=24, width=24)
    call = dict(settings, prompt=PROMPTS[0], image=images, output_type="pt", max_sequence_length=MAX_LENGTH)
    if kind != "klein-kv":
        call["guidance_scale"] = guidance

    def run(pipe):
        return pipe(generator=torch.Generator("cpu").manual_seed(6), **call).images

    pipe = getattr(diffusers, REFERENCE_CLASSES[kind]).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    plain = run(pipe)
    apply_teacache(pipe, ZERO)
    assert torch.equal(run(pipe), plain)
    apply_teacache(pipe, SKIP_ALL)
    cached = run(pipe)
    stats = pipeline_teacache_stats(pipe)["transformer"]

    mine = ours(folder)(
        PROMPTS[0], SamplingParams(seed=6, guidance_scale=guidance, teacache_params=SKIP_ALL, **settings), image=images
    )
    assert torch.equal(cached, mine.images)
    assert stats.positive == mine.teacache_stats.positive
    assert stats.negative == mine.teacache_stats.negative
    assert stats.positive.skipped_steps == ((2, 3) if kind == "klein-kv" else (1, 2, 3))


def test_cli_passes_repeated_reference_images(folders, tmp_path):
    """`scripts/generate.py --image A --image B` on a FLUX.2 folder gives the Python API's edit with [A, B]."""
    import numpy as np
    from PIL import Image

    from tests.utils import load_script

    folder = folders("klein")
    images = references(2)
    paths = [tmp_path / f"reference{i}.png" for i in range(2)]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    output = tmp_path / "edit.png"
    argv = ["--model", str(folder), "--prompt", PROMPTS[0], "--height", "16", "--width", "16", "--steps", "2"]
    argv += ["--guidance-scale", "1", "--seed", "3", "--teacache", "off", "--linear-kernel", "aten", "--no-progress"]
    argv += ["--output", str(output)]
    argv += [arg for path in paths for arg in ("--image", str(path))]
    assert load_script("generate").main(argv) == 0
    expected = load_pipeline(folder)(
        PROMPTS[0],
        SamplingParams(seed=3, guidance_scale=1.0, num_inference_steps=2, height=16, width=16, teacache_params=None),
        image=images,
    )
    written = np.asarray(Image.open(output))
    assert np.array_equal(written, expected.to_uint8()[0].numpy())


# ---- FLUX.2 [dev] in the released layout: the PixtralProcessor without torchvision ---------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Per kind, the in-memory diffusers pipeline ([dev]'s tokenizer a plain fast tokenizer) and the same
    components saved in the released layout ([dev]: tokenizer/ holding a PixtralProcessor's parts)."""
    from tests.flux2_fixtures import flux2_pipeline, save_released_flux2

    cache = {}

    def get(kind: str):
        if kind not in cache:
            reference = flux2_pipeline(kind, seed=1)
            reference.set_progress_bar_config(disable=True)
            cache[kind] = reference, save_released_flux2(reference, tmp_path_factory.mktemp(f"released-{kind}"))
        return cache[kind]

    return get


@pytest.fixture
def released_dev(released):
    return released("dev")


def test_the_pixtral_processor_tokenizes_prompts_as_the_released_one(released_dev):
    """Loaded without torchvision, FLUX.2 [dev]'s processor gives the token ids and mask of the processor built in
    memory, for the batched chat messages Flux2Pipeline sends (padded, and truncated when too long); it saves back
    with its Pixtral settings and refuses images, and a prompt holding the image token, clearly."""
    import importlib.util

    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input

    from tests.flux2_fixtures import PIXTRAL_SETTINGS

    assert importlib.util.find_spec("torchvision") is None, "this test checks the loader without torchvision"
    reference, folder = released_dev
    processor = load_pipeline(folder).text_components["tokenizer"]
    assert type(processor).__name__ == "PixtralProcessor"
    assert processor.chat_template == reference.tokenizer.chat_template
    assert (processor.patch_size, processor.spatial_merge_size) == (14, 2)
    long_prompt = " ".join(PROMPTS * 8)
    for prompts, length in [(PROMPTS, 64), ([long_prompt, PROMPTS[1]], 24)]:
        call = dict(add_generation_prompt=False, tokenize=True, return_dict=True, return_tensors="pt")
        call |= dict(padding="max_length", truncation=True, max_length=length)
        messages = format_input(prompts=prompts, system_message=SYSTEM_MESSAGE)
        ours_ids, expected = (
            processor.apply_chat_template(messages, **call),
            reference.tokenizer.apply_chat_template(messages, **call),
        )
        assert ours_ids["input_ids"].shape == (2, length)
        assert torch.equal(ours_ids["input_ids"], expected["input_ids"])
        assert torch.equal(ours_ids["attention_mask"], expected["attention_mask"])
    # The BOS token once: the template writes it, so the processor adds no special tokens of its own.
    bos = reference.tokenizer.bos_token_id
    assert ours_ids["input_ids"][1, 0] == bos and (ours_ids["input_ids"] == bos).sum() == 2
    with pytest.raises(ValueError, match=r"prompts only .*torchvision"):
        processor(text=PROMPTS[0], images=reference_image(64, 64, 0))
    with pytest.raises(ValueError, match=r"\[IMG\]"):
        processor(text="a [IMG] here")
    resaved = folder.parent / "resaved"
    processor.save_pretrained(resaved)
    again = type(processor).from_pretrained(resaved)
    assert {key: getattr(again, key) for key in PIXTRAL_SETTINGS if key != "processor_class"} == {
        key: value for key, value in PIXTRAL_SETTINGS.items() if key != "processor_class"
    }


@pytest.mark.parametrize("num_references", [0, 1], ids=["t2i", "1-reference"])
def test_a_released_dev_folder_equals_diffusers_bit_for_bit(released_dev, num_references):
    """`load_pipeline` on the released layout (no torchvision) equals the in-memory diffusers Flux2Pipeline."""
    reference, folder = released_dev
    ours_pipe = ours(folder)
    images = references(num_references) or None
    settings = dict(num_inference_steps=2, height=32, width=48)
    result = ours_pipe(
        PROMPTS, SamplingParams(seed=5, guidance_scale=3.0, teacache_params=None, **settings), image=images
    )
    generator = torch.Generator("cpu").manual_seed(5)
    expected = reference(
        prompt=PROMPTS,
        image=images,
        guidance_scale=3.0,
        generator=generator,
        output_type="pt",
        max_sequence_length=MAX_LENGTH,
        **settings,
    ).images
    assert torch.equal(result.images, expected)


@pytest.mark.parametrize(("kind", "config", "guidance"), [("dev", "flux2-dev", 4.0), ("klein", "flux2-klein-4b", 1.0)])
def test_the_cli_runs_a_released_folder_with_the_zoo_config(released, kind, config, guidance, tmp_path):
    """`scripts/generate.py --model FOLDER --config configs/<entry>.yaml` on the released layout ([dev]: the
    PixtralProcessor without torchvision; [klein]: Qwen2TokenizerFast) writes what the in-memory diffusers pipeline
    generates, with a reference image, at the entry's guidance."""
    import numpy as np
    from PIL import Image

    from tests.test_pipeline_fixtures import png_pixels
    from tests.utils import load_script

    reference, folder = released(kind)
    tokenizer = load_pipeline(folder).text_components["tokenizer"]
    assert type(tokenizer).__name__ == ("PixtralProcessor" if kind == "dev" else "Qwen2Tokenizer")
    image = references(1)[0]
    image.save(tmp_path / "reference.png")
    output = tmp_path / "edit.png"
    argv = ["--model", str(folder), "--config", f"configs/{config}.yaml", "--prompt", PROMPTS[0]]
    argv += ["--height", "32", "--width", "32", "--steps", "2", "--seed", "4", "--teacache", "off"]
    argv += ["--device", "cpu", "--dtype", "float32", "--linear-kernel", "aten", "--no-progress"]
    argv += ["--image", str(tmp_path / "reference.png"), "--output", str(output)]
    assert load_script("generate").main(argv) == 0
    generator = torch.Generator("cpu").manual_seed(4)
    expected = reference(
        prompt=PROMPTS[0],
        image=[image],
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=guidance,
        generator=generator,
        output_type="pt",
    ).images
    with Image.open(output) as written:
        assert np.array_equal(np.asarray(written), png_pixels(expected[0]))
