"""Loading native transformers from diffusers-format folders written by diffusers itself, and every way it fails."""

import json
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel as ReferenceFlux
from diffusers import HunyuanVideo15Transformer3DModel as ReferenceHunyuanVideo15
from diffusers import HunyuanVideoTransformer3DModel as ReferenceHunyuanVideo
from diffusers import QwenImage21Transformer2DModel as ReferenceQwenImage21
from diffusers import QwenImageTransformer2DModel as ReferenceQwenImage
from diffusers import WanTransformer3DModel as ReferenceWan
from diffusers import ZImageTransformer2DModel as ReferenceZImage
from safetensors.torch import load_file, save_file

from teacache_models.models import (
    FluxTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    QwenImage21Transformer2DModel,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from teacache_models.weights import CheckpointError, load_transformer
from teacache_models.weights import loading as loading_module
from tests import (
    test_flux,
    test_hunyuan_video,
    test_hunyuan_video15,
    test_qwen_image,
    test_qwen_image21,
    test_wan,
    test_z_image,
)
from tests.utils import assert_parity, randomize_

# family -> (ours, diffusers class, tiny config, inputs)
FAMILIES = {
    "flux": (
        FluxTransformer2DModel,
        ReferenceFlux,
        dict(test_flux.TINY, guidance_embeds=True),
        lambda c: test_flux.make_inputs(c, 2, 3, 4, 5),
    ),
    "wan-t2v": (WanTransformer3DModel, ReferenceWan, test_wan.TINY, lambda c: test_wan.make_inputs(c, 2, (2, 2, 3))),
    "wan-i2v": (WanTransformer3DModel, ReferenceWan, test_wan.I2V, lambda c: test_wan.make_inputs(c, 1, (1, 2, 2))),
    "hunyuan_video": (
        HunyuanVideoTransformer3DModel,
        ReferenceHunyuanVideo,
        test_hunyuan_video.TINY,
        lambda c: test_hunyuan_video.make_inputs(c, 2, (1, 2, 3), (3, 5), 5),
    ),
    "hunyuan_video15": (
        HunyuanVideo15Transformer3DModel,
        ReferenceHunyuanVideo15,
        test_hunyuan_video15.TINY,
        lambda c: test_hunyuan_video15.make_inputs(c, *test_hunyuan_video15.CASES["batch2-i2v-glyph-padding"]),
    ),
    "qwen_image": (
        QwenImageTransformer2DModel,
        ReferenceQwenImage,
        test_qwen_image.TINY,
        lambda c: test_qwen_image.make_inputs(c, 2, [[(1, 2, 3)]] * 2, 5),
    ),
    "qwen_image21": (
        QwenImage21Transformer2DModel,
        ReferenceQwenImage21,
        test_qwen_image21.TINY,
        lambda c: test_qwen_image21.make_inputs(c, *test_qwen_image21.CASES["one-condition-padded"]),
    ),
    "z_image": (
        ZImageTransformer2DModel,
        ReferenceZImage,
        test_z_image.TINY,
        lambda c: test_z_image.make_inputs(c, [(1, 4, 4), (1, 2, 6)], [5, 7]),
    ),
}


def save_reference(family: str, root, seed: int = 0, dtype=torch.float32, max_shard_size="20KB"):
    """A random diffusers model saved with its own save_pretrained under root/transformer."""
    _, reference_class, config, _ = FAMILIES[family]
    reference = randomize_(reference_class(**config), seed).eval()
    reference.to(dtype).save_pretrained(root / "transformer", max_shard_size=max_shard_size)
    return reference.float()


def predict(model, inputs: dict):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def assert_same_prediction(actual, expected, tol=1e-5):
    if isinstance(expected, list):  # Z-Image returns one tensor per sample
        for a, e in zip(actual, expected, strict=True):
            assert_parity(a, e, tol)
    else:
        assert_parity(actual, expected, tol)


def shards(folder):
    return sorted(folder.glob("*.safetensors"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sharded_diffusers_folder_loads_and_predicts_as_diffusers(family, tmp_path):
    ours_class, _, config, make_inputs = FAMILIES[family]
    reference = save_reference(family, tmp_path)
    assert len(shards(tmp_path / "transformer")) > 2, "the checkpoint should be sharded"
    model = ours_class.from_pretrained(tmp_path)
    assert not model.training
    expected_state = reference.state_dict()
    assert set(model.state_dict()) == set(expected_state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected_state[key]), key
    inputs = make_inputs(config)
    assert_same_prediction(predict(model, inputs), predict(reference, inputs), tol=0.0)


def test_subfolder_itself_and_single_file_layouts(tmp_path):
    reference = save_reference("flux", tmp_path, max_shard_size="10GB")
    folder = tmp_path / "transformer"
    assert [p.name for p in shards(folder)] == ["diffusion_pytorch_model.safetensors"]
    for path, subfolder in ((tmp_path, "transformer"), (folder, "transformer"), (folder, None)):
        model = load_transformer(path, FluxTransformer2DModel, subfolder=subfolder)
        assert torch.equal(model.x_embedder.weight, reference.x_embedder.weight)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("requested", [None, "float32", torch.bfloat16, "float16"])
def test_dtype_choice(stored, requested, tmp_path):
    reference = save_reference("flux", tmp_path, dtype=stored)
    model = load_transformer(tmp_path, FluxTransformer2DModel, torch_dtype=requested)
    target = {None: torch.float32, "float32": torch.float32, "float16": torch.float16}.get(requested, requested)
    assert {p.dtype for p in model.parameters()} == {target}
    expected = reference.to(stored).x_embedder.weight.to(target)
    assert torch.equal(model.x_embedder.weight, expected)


def test_wan_bfloat16_keeps_fp32_modules_as_diffusers_does(tmp_path):
    # diffusers' from_pretrained needs accelerate for this; its rule is applied here by hand instead: a
    # name of `_keep_in_fp32_modules` among a key's dotted parts keeps that tensor in float32.
    reference = save_reference("wan-i2v", tmp_path, seed=3)
    keep = ReferenceWan._keep_in_fp32_modules
    for name, tensor in (*reference.named_parameters(), *reference.named_buffers()):
        if not any(part in name.split(".") for part in keep):
            tensor.data = tensor.data.to(torch.bfloat16)
    expected = {k: v.dtype for k, v in reference.state_dict().items()}
    model = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {k: v.dtype for k, v in model.state_dict().items()} == expected
    assert torch.float32 in expected.values() and torch.bfloat16 in expected.values()
    # The model's dtype is the one it computes in, not that of its first (float32) parameter.
    assert next(model.parameters()).dtype == torch.float32
    assert model.dtype == reference.dtype == torch.bfloat16
    inputs = test_wan.make_inputs(test_wan.I2V, 1, (1, 2, 2))
    inputs = {k: v.to(torch.bfloat16) if k != "timestep" else v for k, v in inputs.items()}
    assert_parity(predict(model, inputs), predict(reference, inputs), tol=0.0)


def test_non_persistent_buffers_are_built_not_left_on_meta(tmp_path):
    """Wan's RoPE tables are in no checkpoint: the loaded model matches an eagerly built one and moves freely."""
    reference = save_reference("wan-t2v", tmp_path, seed=5)
    model = WanTransformer3DModel.from_pretrained(tmp_path)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    eager = WanTransformer3DModel(**test_wan.TINY).eval()
    eager.load_state_dict(reference.state_dict())
    for name, buffer in eager.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    inputs = test_wan.make_inputs(test_wan.TINY, 1, (2, 2, 2))
    assert_parity(predict(model.to("cpu").double().float(), inputs), predict(eager, inputs), tol=0.0)


def test_keys_to_ignore_on_load_unexpected_are_dropped(tmp_path):
    save_reference("wan-t2v", tmp_path, max_shard_size="10GB")
    path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["blocks.0.attn2.norm_added_q.weight"] = torch.ones(24)
    save_file(state, path)
    model = load_transformer(tmp_path, WanTransformer3DModel)
    assert "blocks.0.attn2.norm_added_q.weight" not in model.state_dict()


# ---- bad input: each fails with a clear error before any tensor data is read ------------------------


@pytest.fixture
def count_reads(monkeypatch):
    calls = []
    original = loading_module.read_tensor

    def counting(info, handle):
        calls.append(info)
        return original(info, handle)

    monkeypatch.setattr(loading_module, "read_tensor", counting)
    return calls


def test_truncated_shard(tmp_path, count_reads):
    save_reference("flux", tmp_path)
    last = shards(tmp_path / "transformer")[-1]
    last.write_bytes(last.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=rf"{last.name} holds .* bytes of tensor data .* truncated"):
        load_transformer(tmp_path, FluxTransformer2DModel)
    assert count_reads == []


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda data: data[:5], "less than its 8-byte header length"),
        (lambda data: (10**9).to_bytes(8, "little") + data[8:], "truncated or not a safetensors file"),
        (lambda data: data[:8] + b"{garbage" + data[16:], "corrupted safetensors header"),
        (lambda data: data + b"\0" * 16, "truncated or corrupted"),
    ],
)
def test_corrupted_safetensors(corrupt, match, tmp_path, count_reads):
    save_reference("flux", tmp_path)
    first = shards(tmp_path / "transformer")[0]
    first.write_bytes(corrupt(first.read_bytes()))
    with pytest.raises(CheckpointError, match=match):
        load_transformer(tmp_path, FluxTransformer2DModel)
    assert count_reads == []


def test_index_naming_a_missing_shard(tmp_path, count_reads):
    save_reference("flux", tmp_path)
    missing = shards(tmp_path / "transformer")[1]
    missing.unlink()
    with pytest.raises(CheckpointError, match=rf"names shards that are missing .*{missing.name}.*incomplete"):
        load_transformer(tmp_path, FluxTransformer2DModel)
    assert count_reads == []


@pytest.mark.parametrize("shard", [3, None, "", "../transformer/x.safetensors", "/etc/hostname"])
def test_index_with_a_shard_that_is_no_file_name_beside_it(tmp_path, count_reads, shard):
    save_reference("flux", tmp_path)
    index_path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"malformed weight_map: shard names must be file names beside the index"):
        load_transformer(tmp_path, FluxTransformer2DModel)
    assert count_reads == []


def test_index_mapping_a_key_to_the_wrong_shard(tmp_path):
    save_reference("flux", tmp_path)
    index_path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    other = shards(tmp_path / "transformer")[0].name
    key = next(k for k, v in index["weight_map"].items() if v != other)
    index["weight_map"][key] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"maps tensors to shards that do not hold them: {key}"):
        load_transformer(tmp_path, FluxTransformer2DModel)


def test_config_for_another_architecture(tmp_path, count_reads):
    save_reference("wan-t2v", tmp_path)
    with pytest.raises(
        CheckpointError, match=r"holds a WanTransformer3DModel checkpoint .* not a FluxTransformer2DModel"
    ):
        load_transformer(tmp_path, FluxTransformer2DModel)
    config_path = tmp_path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    del config["_class_name"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not build a FluxTransformer2DModel: .*does not accept"):
        load_transformer(tmp_path, FluxTransformer2DModel)
    assert count_reads == []


def test_strict_loading_names_missing_unexpected_and_mismatched_keys(tmp_path, count_reads):
    save_reference("flux", tmp_path, max_shard_size="10GB")
    path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["proj_out.bias"]
    state["x_embedder.extra"] = torch.zeros(2)
    state["context_embedder.weight"] = torch.zeros(32, 31)
    save_file(state, path)
    with pytest.raises(CheckpointError) as caught:
        load_transformer(tmp_path, FluxTransformer2DModel)
    message = str(caught.value)
    assert "missing keys: proj_out.bias" in message
    assert "unexpected keys: x_embedder.extra" in message
    assert "shape mismatches: context_embedder.weight (32, 31) (model (32, 32))" in message
    assert count_reads == []


def test_integer_tensors_for_float_weights_are_refused(tmp_path, count_reads):
    save_reference("flux", tmp_path, max_shard_size="10GB")
    path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["proj_out.weight"] = state["proj_out.weight"].to(torch.int8)
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"integer or boolean tensors for float weights .*: proj_out.weight"):
        load_transformer(tmp_path, FluxTransformer2DModel)
    assert count_reads == []


def test_config_overrides_are_checked_against_the_weights(tmp_path):
    save_reference("flux", tmp_path)
    with pytest.raises(CheckpointError, match=r"missing keys: .*single_transformer_blocks.1"):
        load_transformer(tmp_path, FluxTransformer2DModel, config={"num_single_layers": 2})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(torch_dtype="float64"), ValueError, r"torch_dtype must be one of \['float32', 'bfloat16', 'float16'\]"),
        (dict(torch_dtype=torch.int8), ValueError, "torch_dtype must be one of"),
        (dict(model_class=torch.nn.Linear), TypeError, "model_class must be a native model class"),
        (dict(config=[1]), TypeError, "config must be a mapping"),
        (dict(device="gpu0"), ValueError, r"device must be 'cpu', 'cuda', 'cuda:N'"),
        (dict(device="meta"), ValueError, "device 'meta' holds no data"),
    ],
)
def test_bad_arguments(kwargs, error, match, tmp_path):
    save_reference("flux", tmp_path)
    arguments = dict(model_class=FluxTransformer2DModel) | kwargs
    with pytest.raises(error, match=match):
        load_transformer(tmp_path, **arguments)


def test_missing_paths_configs_and_pickles(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_transformer(tmp_path / "nowhere", FluxTransformer2DModel)
    with pytest.raises(CheckpointError, match=r"no transformer/ folder and no config.json"):
        load_transformer(tmp_path, FluxTransformer2DModel)
    save_reference("flux", tmp_path)
    folder = tmp_path / "transformer"
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json to build the model from"):
        load_transformer(tmp_path, FluxTransformer2DModel)
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weights .*pickle checkpoints are not loaded"):
        load_transformer(tmp_path, FluxTransformer2DModel)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_refused_before_any_download(monkeypatch):
    from teacache_models.weights import download

    def no_download(*args, **kwargs):
        raise AssertionError("resolve_weights was reached")

    monkeypatch.setattr(download, "resolve_weights", no_download)
    with pytest.raises(ValueError, match="device 'cuda' is not available on this machine"):
        FluxTransformer2DModel.from_pretrained("flux1-dev", device="cuda")
