"""Every model-zoo YAML loads, maps onto SamplingParams/TeaCacheParams, and names real pieces."""

import importlib.util
import re
import subprocess
import sys

import pytest
import yaml

import teacache_models.models as models
from teacache_models import SamplingParams, TeaCacheParams
from teacache_models.zoo import ZOO_DIR, list_zoo, load_zoo_entry

MANIFEST = yaml.safe_load((ZOO_DIR.parent / "weights_manifest.yaml").read_text())


def test_zoo_lists_the_shipped_configs():
    assert {"flux1-dev", "flux1-schnell"} <= set(list_zoo())


@pytest.mark.parametrize("name", list_zoo())
def test_every_zoo_entry_is_valid(name):
    entry = load_zoo_entry(name)
    assert entry.name == name
    assert entry.manifest in MANIFEST, f"{name} names manifest entry {entry.manifest!r}, which does not exist"
    assert MANIFEST[entry.manifest]["family"] == entry.family
    model_class = getattr(models, entry.transformer)
    # A preset only where a measured or published point backs its threshold (models without one: none).
    assert set(entry.presets) in ({"slow", "fast"}, {"slow"}, set()) or {"slow", "fast"} <= set(entry.presets)
    for preset in entry.presets.values():
        assert preset.source, "every preset cites where its threshold comes from"
        assert preset.params.indicator is None or preset.params.indicator in model_class.supported_teacache_indicators
    if "fast" in entry.presets:
        assert entry.presets["slow"].params.teacache_thresh <= entry.presets["fast"].params.teacache_thresh
    params = entry.sampling_params()
    default = None if entry.default_preset == "off" else entry.presets[entry.default_preset].params
    assert isinstance(params, SamplingParams) and params.teacache_params == default
    assert entry.sampling_params("off").teacache_params is None
    assert entry.sampling_params("off", seed=3).seed == 3


def test_models_without_a_measured_or_published_threshold_ship_no_guess():
    turbo = load_zoo_entry("z-image-turbo")
    assert turbo.presets == {} and turbo.default_preset == "off" and turbo.sampling.teacache_params is None
    assert set(load_zoo_entry("qwen-image").presets) == {"slow"}
    with pytest.raises(ValueError, match=r"no TeaCache preset 'slow'; choose 'off', 'default' or one of \[\]"):
        turbo.sampling_params("slow")


def test_flux_presets_use_the_published_fit():
    entry = load_zoo_entry("flux1-dev")
    assert entry.sampling.num_inference_steps == 28 and entry.sampling.guidance_scale == 3.5
    # TeaCache4FLUX's published polynomial (see docs/teacache-fits.md).
    published = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
    assert entry.presets["slow"].params.coefficients == published == entry.fits["modulated_input"].coefficients


WAN_LENDERS = {"wan2.2-t2v-a14b": "wan2.1-t2v-14b", "wan2.2-i2v-a14b": "wan2.1-i2v-14b-480p"}
WAN_LENDERS["wan2.2-ti2v-5b"] = "wan2.1-t2v-1.3b"


def test_every_wan_checkpoint_has_both_published_fits_and_says_when_borrowed():
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", *WAN_LENDERS):
        entry = load_zoo_entry(name)
        assert set(entry.fits) == {"temb", "timestep_proj"}
        lender = WAN_LENDERS.get(name)
        assert all(fit.borrowed_from == lender for fit in entry.fits.values())
        if lender is not None:
            assert entry.teacache_fits() == load_zoo_entry(lender).teacache_fits()
            assert all(p.params.coefficients == entry.fits["temb"].coefficients for p in entry.presets.values())
    # Published values (TeaCache4Wan2.1).
    assert load_zoo_entry("wan2.1-t2v-14b").fits["temb"].coefficients[0] == -5784.54975374
    assert load_zoo_entry("wan2.1-i2v-14b-720p").fits["timestep_proj"].coefficients[0] == 8.10705460e03
    assert load_zoo_entry("wan2.1-t2v-1.3b").fits["temb"].coefficients[-1] == 1.37887774e-01
    thresholds = {p.params.teacache_thresh for p in load_zoo_entry("wan2.1-i2v-14b-480p").presets.values()}
    assert {0.13, 0.26} <= thresholds


def test_fits_are_one_per_indicator(tmp_path):
    data = yaml.safe_load((ZOO_DIR / "wan2.1-t2v-1.3b.yaml").read_text())
    data["teacache"]["presets"]["fast"]["coefficients"] = [1.0, 0.0]
    path = tmp_path / "two-fits.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ValueError, match=r"presets\.fast: coefficients \[1\.0, 0\.0\] differ from the entry's fit"):
        load_zoo_entry(path)
    data["teacache"]["presets"]["fast"].pop("coefficients")  # a preset without them takes the entry's fit
    data["teacache"]["fits"] = {"img_mod": {"coefficients": [1.0], "source": "x"}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ValueError, match=r"teacache\.fits: indicator 'img_mod' is not one of"):
        load_zoo_entry(path)
    data["teacache"]["fits"] = {"temb": {"coefficients": [1.0], "source": "x", "borrowed_from": "wan9"}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ValueError, match="borrowed_from 'wan9' is not a zoo entry"):
        load_zoo_entry(path)


def test_unknown_model_and_unknown_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'flux3'"):
        load_zoo_entry("flux3")
    data = yaml.safe_load((ZOO_DIR / "flux1-dev.yaml").read_text())
    data["sampling"]["steps"] = 10
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"sampling has unknown keys \['steps'\]"):
        load_zoo_entry(path)
    data = yaml.safe_load((ZOO_DIR / "flux1-dev.yaml").read_text())
    data["teacache"]["presets"]["slow"]["teacache_thresh"] = -1
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"presets\.slow: teacache_thresh"):
        load_zoo_entry(path)
    with pytest.raises(ValueError, match="no TeaCache preset 'medium'"):
        load_zoo_entry("flux1-dev").sampling_params("medium")


def test_preset_params_are_plain_teacache_params():
    entry = load_zoo_entry("flux1-schnell")
    assert all(isinstance(p.params, TeaCacheParams) for p in entry.presets.values())


def test_video_entries_carry_their_task_and_sampling_extras():
    entry = load_zoo_entry("wan2.2-t2v-a14b")
    assert entry.task == "t2v" and entry.is_video and entry.family == "wan"
    assert entry.sampling.guidance_scale_2 == 3.0 and entry.sampling.fps == 16
    assert load_zoo_entry("wan2.1-i2v-14b-480p").task == "i2v"
    assert load_zoo_entry("flux1-dev").task == "t2i" and not load_zoo_entry("flux1-dev").is_video
    wan = load_zoo_entry("wan2.1-t2v-1.3b")
    assert wan.presets["ret-fast"].params.use_ret_steps and wan.presets["slow"].params.indicator == "temb"
    for name in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"):
        assert all("BORROWED" in p.source for p in load_zoo_entry(name).presets.values())


def test_bad_task_and_bad_extras_are_rejected(tmp_path):
    data = yaml.safe_load((ZOO_DIR / "flux1-dev.yaml").read_text())
    data["task"] = "i2i"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="task 'i2i' is not one of"):
        load_zoo_entry(path)
    data["task"] = "t2i"
    data["sampling"]["fps"] = 0
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="sampling: fps must be an integer >= 1"):
        load_zoo_entry(path)


def _edited_config(tmp_path, edit):
    data = yaml.safe_load((ZOO_DIR / "flux-digits.yaml").read_text())
    edit(data)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d.update(transformer="WanTransformer3DModel"),
            "transformer 'WanTransformer3DModel' is not the flux",
        ),
        (lambda d: d.update(name=[1, 2]), r"name must be a non-empty string, got \[1, 2\]"),
        (lambda d: d.update(manifest=""), "manifest must be a non-empty string"),
        (
            lambda d: d["teacache"]["presets"].update(off={"source": "x"}),
            "teacache.presets: a preset name must be a string other than",
        ),
        (
            lambda d: d["teacache"]["presets"].update({3: {"source": "x"}}),
            "teacache.presets: a preset name must be a string",
        ),
        (lambda d: d["teacache"].update(default=["slow"]), r"teacache.default \['slow'\] is not 'off' or one of"),
        (
            lambda d: d["teacache"].update(presets=[{"slow": {"source": "x"}}]),
            "teacache.presets must be a mapping of preset names, got list",
        ),
        (
            lambda d: d["teacache"]["presets"]["slow"].update(indicator="temb"),
            r"teacache.presets.slow: indicator 'temb' is not offered by FluxTransformer2DModel; "
            r"choose one of \['modulated_input'\]",
        ),
        (
            lambda d: d.update(loras=[{"source": None}]),
            r"loras\[0\]: source must be a non-empty path or Hub id, got None",
        ),
        (lambda d: d.update(loras=[{"source": 3}]), r"loras\[0\]: source must be a non-empty path or Hub id, got 3"),
        (
            lambda d: d.update(loras=[{"source": "a/b", "adapter_name": 3}]),
            r"loras\[0\]: adapter_name of LoRA 'a/b' must be None or a non-empty string, got 3",
        ),
        (
            lambda d: d["teacache"]["threshold_table"]["rows"].append([0.2, 0.5, 40.0]),
            r"teacache.threshold_table: rows\[\d+\] repeats threshold 0.2: one row per threshold",
        ),
    ],
    ids=[
        "transformer",
        "name",
        "manifest",
        "preset-off",
        "preset-int",
        "default-list",
        "presets-list",
        "indicator",
        "lora-source-none",
        "lora-source-int",
        "lora-adapter-name",
        "table-repeated-threshold",
    ],
)
def test_invalid_entries_name_the_file_and_the_key(tmp_path, edit, message):
    path = _edited_config(tmp_path, edit)
    with pytest.raises(ValueError, match=f"edited.yaml: {message}"):
        load_zoo_entry(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: (p / "broken.yaml").write_text("name: x\n  bad: [\n") and p / "broken.yaml", "is not valid YAML"),
        (lambda p: (p / "config.txt").write_text("name: x\n") and p / "config.txt", r"is not a YAML file \(.yaml"),
        (lambda p: p, r"is not a YAML file \(.yaml"),
        (lambda p: p / "missing.yaml", "does not exist"),
        (lambda p: "", "a zoo entry is named by a zoo name or a .yaml path, got ''"),
        (lambda p: None, "a zoo entry is named by a zoo name or a .yaml path, got None"),
        (lambda p: "no-such-model-xyz", r"unknown model 'no-such-model-xyz'\. Known models"),
    ],
    ids=["broken-yaml", "not-yaml", "folder", "missing", "empty", "none", "unknown"],
)
def test_unreadable_configs_are_value_errors(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        load_zoo_entry(make(tmp_path))


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path):
    text = (ZOO_DIR / "flux-digits.yaml").read_text()
    path = tmp_path / "twice.yaml"
    path.write_text(
        text.replace("  num_inference_steps: 20\n", "  num_inference_steps: 20\n  num_inference_steps: 4\n")
    )
    line = path.read_text().splitlines().index("  num_inference_steps: 4") + 1
    with pytest.raises(ValueError, match=rf"twice.yaml repeats the key 'num_inference_steps' \(line {line}\)"):
        load_zoo_entry(path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps": 3}, r"unknown sampling settings \['steps'\]; SamplingParams fields: \["),
        ({"teacache_params": None}, "teacache_params is chosen by teacache="),
    ],
)
def test_sampling_overrides_must_be_fields(overrides, message):
    with pytest.raises(TypeError, match=message):
        load_zoo_entry("flux-digits").sampling_params("off", **overrides)


def test_the_fits_table_cites_exactly_the_zoo_fits():
    """docs/teacache-fits.md lists every zoo entry's fit, and nothing else, with the zoo's numbers."""
    rows = re.findall(
        r"^\| `([^`]+)` \| `([^`]+)` \| ([^|]+) \| ([^|]*) \|",
        (ZOO_DIR.parent / "docs" / "teacache-fits.md").read_text(),
        re.M,
    )
    table = {
        (name, indicator): (tuple(float(c) for c in coefficients.split(",")), lender.strip(" `") or None)
        for name, indicator, coefficients, lender in rows
    }
    zoo = {
        (name, indicator): (fit.coefficients, fit.borrowed_from)
        for name in list_zoo()
        for indicator, fit in load_zoo_entry(name).fits.items()
    }
    assert table == zoo and len(rows) == len(zoo), "regenerate the table: python scripts/fits_table.py"


def test_the_fits_table_script_writes_the_shipped_table_and_refuses_unknown_arguments():
    script = ZOO_DIR.parent / "scripts" / "fits_table.py"
    spec = importlib.util.spec_from_file_location("fits_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.table() == (ZOO_DIR.parent / "docs" / "teacache-fits.md").read_text()
    # An argument it does not know is an error (exit 2), not a silent rewrite of the table.
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unrecognized arguments: --check" in done.stderr


# The sampling defaults the official examples give (the YAML comment of each entry cites the file): steps, the
# guidance or true-CFG scale, the negative prompt (None: the example passes none) and the size (None: the example
# passes none and the pipeline's default applies).
QWEN_2512_NEGATIVE = (
    "低分辨率，低画质，肢体畸形，手指畸形，画面过饱和，蜡像感，"
    "人脸无细节，过度光滑，画面具有AI感。构图混乱。文字模糊，扭曲。"
)
CARD_SAMPLING = {
    "flux2-dev": (50, 4.0, None, None),  # model_cards/FLUX.2-dev.md (black-forest-labs/flux2)
    "flux2-klein-4b": (4, 1.0, None, None),  # src/flux2/util.py FLUX2_MODEL_INFO, fixed for the distilled models
    "flux2-klein-9b": (4, 1.0, None, None),
    "qwen-image-edit": (50, 4.0, " ", None),  # QwenLM/Qwen-Image README.md
    "qwen-image-edit-2509": (40, 4.0, " ", None),
    "qwen-image-2512": (50, 4.0, QWEN_2512_NEGATIVE, (1328, 1328)),
    "qwen-image-layered": (50, 4.0, " ", (640, 640)),  # QwenLM/Qwen-Image-Layered README.md: resolution 640
    "qwen-image-2.1": (40, 1.0, None, (2048, 2048)),  # QwenLM/Qwen-Image-2.1 README.md, "Default Parameters"
}
PIPELINE_DEFAULT_SIZE = (1024, 1024)  # diffusers' Flux2 and Qwen-Image-Edit pipelines without an image to follow


@pytest.mark.parametrize("name", list(CARD_SAMPLING))
def test_new_entries_sample_as_their_official_examples(name):
    steps, guidance, negative, size = CARD_SAMPLING[name]
    params = load_zoo_entry(name).sampling_params("off")
    assert params.num_inference_steps == steps and params.guidance_scale == guidance
    assert params.negative_prompt == negative
    assert (params.height, params.width) == (size or PIPELINE_DEFAULT_SIZE)
