"""Saving native transformers in the diffusers layout: diffusers and our loader both read it back."""

import json

import pytest
import torch

from teacache_models.weights import load_transformer
from teacache_models.weights.saving import parse_shard_size
from tests.test_weights_loading import FAMILIES, assert_same_prediction, predict, shards
from tests.utils import randomize_


def build(family: str, seed: int = 0):
    ours_class, _, config, _ = FAMILIES[family]
    return randomize_(ours_class(**config), seed).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("max_shard_size", ["10GB", "20KB"])
def test_saved_folder_loads_in_diffusers_and_back_in_ours(family, max_shard_size, tmp_path):
    ours_class, reference_class, config, make_inputs = FAMILIES[family]
    model = build(family, seed=3)
    folder = model.save_pretrained(tmp_path / "transformer", max_shard_size=max_shard_size)

    names = [p.name for p in shards(folder)]
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if max_shard_size == "10GB":
        assert names == ["diffusion_pytorch_model.safetensors"] and not index.exists()
    else:
        assert len(names) > 2 and names[0] == f"diffusion_pytorch_model-00001-of-{len(names):05d}.safetensors"
        weight_map = json.loads(index.read_text())["weight_map"]
        assert set(weight_map) == set(model.state_dict()) and set(weight_map.values()) == set(names)

    reference = reference_class.from_pretrained(folder).eval()
    reloaded = ours_class.from_pretrained(tmp_path)
    state = model.state_dict()
    for loaded in (reference, reloaded):
        assert list(loaded.state_dict()) == list(state)
        assert all(torch.equal(value, state[key]) for key, value in loaded.state_dict().items())
    assert dict(reloaded.config) == json.loads(json.dumps(dict(model.config)))  # tuples come back as lists
    inputs = make_inputs(config)
    expected = predict(model, inputs)
    # diffusers' loader may lay weights out in memory otherwise (its own round trip differs by ~3e-7).
    assert_same_prediction(predict(reference, inputs), expected, tol=1e-5)
    assert_same_prediction(predict(reloaded, inputs), expected, tol=0.0)


def test_half_precision_is_saved_as_it_is_and_a_resave_replaces_the_old_shards(tmp_path):
    model = build("flux").to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    model.save_pretrained(tmp_path)  # one file now: the shards and index of the first save are gone
    assert [p.name for p in shards(tmp_path)] == ["diffusion_pytorch_model.safetensors"]
    assert not list(tmp_path.glob("*.index.json"))
    reloaded = load_transformer(tmp_path, type(model), torch_dtype=torch.bfloat16)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())


@pytest.mark.parametrize(
    ("size", "expected"), [(1000, 1000), ("20KB", 20_000), ("1.5GB", 1_500_000_000), ("2GiB", 2 * 2**30)]
)
def test_shard_sizes(size, expected):
    assert parse_shard_size(size) == expected


@pytest.mark.parametrize("size", [0, -5, True, "ten GB", "5XB", "0MB", 1.5])
def test_bad_shard_size_is_refused(size):
    with pytest.raises(ValueError, match="max_shard_size must be"):
        parse_shard_size(size)


def test_bad_save_requests_are_refused(tmp_path):
    model = build("flux")
    with pytest.raises(ValueError, match="safe_serialization must be True"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="must be a folder"):
        model.save_pretrained(tmp_path / "file")
    with torch.device("meta"):
        empty = type(model).from_config(model.config)
    with pytest.raises(ValueError, match="meta device"):
        empty.save_pretrained(tmp_path / "empty")
