"""The diffusers model API user code relies on: from_pretrained's options, save_pretrained's variants,
mapping-like outputs, a config diffusers' from_config accepts, and diffusers' class-level data."""

import copy
import pickle
from collections import OrderedDict

import diffusers
import pytest
import torch

from teacache_models import models
from teacache_models.models.base import ModelConfig
from teacache_models.weights import CheckpointError
from tests import test_flux, test_hunyuan_video, test_hunyuan_video15, test_qwen_image, test_wan, test_z_image

TINY = {
    "FluxTransformer2DModel": test_flux.TINY,
    "WanTransformer3DModel": test_wan.TINY,
    "HunyuanVideoTransformer3DModel": test_hunyuan_video.TINY,
    "HunyuanVideo15Transformer3DModel": test_hunyuan_video15.TINY,
    "QwenImageTransformer2DModel": test_qwen_image.TINY,
    "ZImageTransformer2DModel": test_z_image.TINY,
}
CLASS_ATTRIBUTES = (
    "_keep_in_fp32_modules",
    "_no_split_modules",
    "_skip_layerwise_casting_patterns",
    "_repeated_blocks",
)


def _same_weights(model: torch.nn.Module, other: torch.nn.Module) -> bool:
    """Same keys in the same order, each tensor equal once both are float32."""
    ours, theirs = model.state_dict(), other.state_dict()
    return list(ours) == list(theirs) and all(torch.equal(ours[k].float(), theirs[k].float()) for k in ours)


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(models, name)(**TINY[name]).eval()


@pytest.mark.parametrize("name", TINY)
def test_class_attributes_and_parameter_counts_equal_diffusers(name):
    ours, reference_class = getattr(models, name), getattr(diffusers, name)
    for attribute in CLASS_ATTRIBUTES:
        assert getattr(ours, attribute) == getattr(reference_class, attribute), attribute
    torch.manual_seed(0)
    reference = reference_class(**TINY[name])
    model = _build(name)
    model.requires_grad_(False)
    next(model.parameters()).requires_grad_(True)
    reference.requires_grad_(False)
    next(reference.parameters()).requires_grad_(True)
    for options in ({}, {"only_trainable": True}, {"exclude_embeddings": True}):
        assert model.num_parameters(**options) == reference.num_parameters(**options), options


@pytest.mark.parametrize("name", TINY)
def test_config_is_accepted_by_diffusers_from_config_and_names_its_class(name):
    model = _build(name)
    assert model.config["_class_name"] == name
    assert isinstance(model.config, dict)
    reference = getattr(diffusers, name).from_config(model.config)
    public = {k: v for k, v in model.config.items() if not k.startswith("_")}
    assert {k: v for k, v in reference.config.items() if not k.startswith("_")} == public
    rebuilt = type(model).from_config(model.config)
    assert rebuilt.config == model.config
    assert copy.deepcopy(model.config) == model.config
    assert pickle.loads(pickle.dumps(model.config)) == model.config


def test_config_is_read_only_and_from_config_takes_overrides():
    model = _build("FluxTransformer2DModel")
    with pytest.raises(TypeError, match="read-only"):
        model.config["num_layers"] = 3
    with pytest.raises(TypeError, match="read-only"):
        model.config.update(num_layers=3)
    with pytest.raises(AttributeError, match="no field"):
        _ = model.config.not_a_field
    assert model.config.num_layers == TINY["FluxTransformer2DModel"]["num_layers"]
    assert type(model).from_config(model.config, num_layers=2).config.num_layers == 2
    with pytest.raises(ValueError, match="does not accept"):
        type(model).from_config(model.config, depth=2)
    assert isinstance(ModelConfig({"a": 1}), dict)


def test_outputs_behave_like_diffusers_outputs():
    config = test_flux.TINY
    model = _build("FluxTransformer2DModel")
    with torch.no_grad():
        out = model(**test_flux.make_inputs(config, 1, 4, 4, 5))
    assert out.sample is out["sample"] is out[0] is out.to_tuple()[0]
    assert list(out.keys()) == ["sample"] and next(iter(out.values())) is out.sample
    assert dict(out.items()) == {"sample": out.sample}
    assert out[:1] == (out.sample,)
    with pytest.raises(KeyError):
        out["samples"]
    replacement = torch.zeros(1)
    out.sample = replacement
    assert out["sample"] is replacement
    # diffusers' outputs are ordered dicts too: code that checks for a mapping accepts both.
    assert isinstance(out, OrderedDict) and isinstance(diffusers.utils.BaseOutput.__mro__[1](), OrderedDict)


def _saved(tmp_path, model, **options):
    model.save_pretrained(tmp_path / "transformer", **options)
    return tmp_path


def test_from_pretrained_accepts_diffusers_options(tmp_path):
    model = _build("FluxTransformer2DModel")
    folder = _saved(tmp_path, model)
    cls = type(model)
    for options in (
        {"torch_dtype": torch.bfloat16},
        {"dtype": torch.bfloat16},
        {"dtype": "bfloat16", "torch_dtype": torch.bfloat16},
    ):
        loaded = cls.from_pretrained(folder, **options)
        assert loaded.dtype == torch.bfloat16, options
    for device_map in (None, "cpu", torch.device("cpu"), {"": "cpu"}):
        loaded = cls.from_pretrained(folder, device_map=device_map, low_cpu_mem_usage=False)
        assert loaded.device == torch.device("cpu")
        assert _same_weights(loaded, model)
    loaded = cls.from_pretrained(
        folder / "transformer",
        subfolder=None,
        revision="main",
        cache_dir=tmp_path / "cache",
        local_files_only=True,
        token=None,
        low_cpu_mem_usage=True,
    )
    assert loaded.config["num_layers"] == model.config["num_layers"]
    assert _same_weights(loaded, model)
    # diffusers' own loader reads the same folder.
    reference = diffusers.FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    assert _same_weights(reference, model)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"force_download": True}, TypeError, "force_download"),
        ({"dtype": torch.bfloat16, "torch_dtype": torch.float16}, ValueError, "disagree"),
        ({"device_map": "auto"}, ValueError, "several devices"),
        ({"device_map": {"blocks": "cpu", "head": "cpu"}}, ValueError, "one device"),
        ({"device_map": "cpu", "device": "meta"}, ValueError, "meta"),
        ({"low_cpu_mem_usage": "yes"}, TypeError, "low_cpu_mem_usage"),
        ({"use_safetensors": False}, ValueError, "pickle"),
        ({"variant": ""}, ValueError, "variant"),
    ],
)
def test_from_pretrained_refuses_what_it_cannot_honour(tmp_path, options, error, match):
    model = _build("FluxTransformer2DModel")
    folder = _saved(tmp_path, model)
    with pytest.raises(error, match=match):
        type(model).from_pretrained(folder, **options)


@pytest.mark.parametrize("max_shard_size", ["10GB", 20_000])
def test_variants_are_saved_and_loaded_by_name_as_diffusers_does(tmp_path, max_shard_size):
    model = _build("FluxTransformer2DModel")
    half = copy.deepcopy(model).to(torch.float16)
    half.save_pretrained(tmp_path / "transformer", variant="fp16", max_shard_size=max_shard_size)
    model.save_pretrained(tmp_path / "transformer", max_shard_size=max_shard_size)
    names = sorted(p.name for p in (tmp_path / "transformer").iterdir())
    assert any(n.startswith("diffusion_pytorch_model.fp16") for n in names)
    assert any(n.startswith("diffusion_pytorch_model.safetensors") or "-of-" in n for n in names)
    cls = type(model)
    assert cls.from_pretrained(tmp_path).state_dict()["x_embedder.weight"].dtype == torch.float32
    loaded = cls.from_pretrained(tmp_path, variant="fp16")
    assert _same_weights(loaded, half) and loaded.dtype == torch.float32
    reference = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer", variant="fp16")
    assert _same_weights(reference, half)
    with pytest.raises(CheckpointError, match="no 'bf16' variant"):
        cls.from_pretrained(tmp_path, variant="bf16")


def test_save_pretrained_refuses_pickles_and_skips_other_processes(tmp_path):
    model = _build("FluxTransformer2DModel")
    with pytest.raises(ValueError, match="safe_serialization must be True"):
        model.save_pretrained(tmp_path / "a", safe_serialization=False)
    model.save_pretrained(tmp_path / "b", is_main_process=False)
    assert not (tmp_path / "b").exists()


def test_a_folder_of_variants_only_is_an_oserror_naming_them(tmp_path):
    model = _build("FluxTransformer2DModel")
    model.save_pretrained(tmp_path, variant="fp16")
    with pytest.raises(OSError, match="only the variants \\['fp16'\\]"):
        type(model).from_pretrained(tmp_path)
    assert type(model).from_pretrained(tmp_path, variant="fp16").config["num_layers"] == model.config["num_layers"]


def test_config_fields_read_as_attributes_warn_and_unknown_names_raise():
    model = _build("FluxTransformer2DModel")
    model.register_to_config(test_attribute=5)
    assert model.config["test_attribute"] == 5
    with pytest.warns(FutureWarning, match="model.config.num_layers"):
        assert model.num_layers == model.config["num_layers"]
    with pytest.raises(AttributeError, match=r"^'FluxTransformer2DModel' object has no attribute 'does_not_exist'$"):
        _ = model.does_not_exist


def test_kept_float32_modules_warn_on_a_cast_and_may_be_one_name(tmp_path, caplog, monkeypatch):
    model = _build("WanTransformer3DModel")
    with caplog.at_level("WARNING"):
        model.to(torch.float16)
    assert "should be kept in float32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        _build("FluxTransformer2DModel").to(torch.float16)
    assert caplog.text == ""
    model = _build("WanTransformer3DModel")
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(type(model), "_keep_in_fp32_modules", "scale_shift_table")
    loaded = type(model).from_pretrained(tmp_path, torch_dtype=torch.float16)
    for key, parameter in loaded.named_parameters():
        assert parameter.dtype == (torch.float32 if "scale_shift_table" in key.split(".") else torch.float16), key
