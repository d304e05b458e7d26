"""A seeded construction draws the weights diffusers draws, with the state_dict keys in diffusers' order.

Code that builds a model under `torch.manual_seed` (random-weight tests, toy runs) then gets the same
model from either class, and a state_dict saved from one lists its keys as the other's does.
"""

import diffusers
import pytest
import torch

from teacache_models import models
from tests import (
    test_flux,
    test_flux2,
    test_hunyuan_video,
    test_hunyuan_video15,
    test_qwen_image,
    test_qwen_image21,
    test_wan,
    test_z_image,
)

FAMILIES = {
    "FluxTransformer2DModel": test_flux.CONFIGS,
    "Flux2Transformer2DModel": test_flux2.CONFIGS,
    "WanTransformer3DModel": test_wan.CONFIGS,
    "HunyuanVideoTransformer3DModel": test_hunyuan_video.CONFIGS,
    "HunyuanVideo15Transformer3DModel": test_hunyuan_video15.CONFIGS,
    "QwenImageTransformer2DModel": test_qwen_image.CONFIGS,
    "QwenImage21Transformer2DModel": test_qwen_image21.CONFIGS,
    "ZImageTransformer2DModel": test_z_image.CONFIGS,
}
CASES = [(name, config) for name, configs in FAMILIES.items() for config in configs]


@pytest.mark.parametrize(("name", "config"), CASES)
def test_seeded_construction_equals_diffusers(name, config):
    arguments = FAMILIES[name][config]
    torch.manual_seed(0)
    reference = getattr(diffusers, name)(**arguments).state_dict()
    torch.manual_seed(0)
    ours = getattr(models, name)(**arguments).state_dict()
    assert list(ours) == list(reference)
    different = [key for key in reference if not torch.equal(ours[key], reference[key])]
    assert not different, f"{len(different)} tensors differ, first {different[:3]}"


def _public(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


@pytest.mark.parametrize(("name", "config"), [*CASES, *((name, None) for name in FAMILIES)])
def test_recorded_config_equals_diffusers(name, config):
    """`model.config` holds what diffusers records, value for value (defaults included, lists stay lists)."""
    arguments = FAMILIES[name][config] if config is not None else {}
    with torch.device("meta"):
        reference = getattr(diffusers, name)(**arguments)
        ours = getattr(models, name)(**arguments)
    assert _public(ours.config) == _public(reference.config)
    for key, value in _public(reference.config).items():
        assert type(ours.config[key]) is type(value), key
