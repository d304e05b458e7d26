"""The constructor checks `register_config` derives from a model's annotations (`checks.check_typed_arguments`)."""

from __future__ import annotations

from typing import ClassVar

import pytest

from teacache_models.models.base import ConfiguredModel, register_config


class _Model(ConfiguredModel):
    _arguments_checked_by_model: ClassVar[tuple[str, ...]] = ("t_scale",)

    @register_config
    def __init__(
        self,
        width: int = 4,
        num_layers: int = 2,
        out_channels: int = 3,
        image_dim: int | None = None,
        eps: float = 1e-6,
        guidance_embeds: bool = False,
        t_scale: float = 1000.0,
        qk_norm: str = "rms_norm",
    ) -> None:
        super().__init__()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"width": 0}, "width must be a positive integer, got 0"),
        ({"width": 2.0}, "width must be a positive integer, got 2.0"),
        ({"width": True}, "width must be a positive integer, got True"),
        ({"num_layers": -1}, "num_layers must be an integer >= 0, got -1"),
        ({"out_channels": 0}, "out_channels must be None or a positive integer, got 0"),
        ({"image_dim": 0}, "image_dim must be None or a positive integer, got 0"),
        ({"eps": 0.0}, "eps must be a positive number, got 0.0"),
        ({"eps": "small"}, "eps must be a positive number, got 'small'"),
        ({"guidance_embeds": 1}, "guidance_embeds must be True or False, got 1"),
    ],
)
def test_a_typed_argument_out_of_its_range_is_refused(change, match):
    with pytest.raises(ValueError, match=match):
        _Model(**change)


def test_allowed_values_and_arguments_left_to_the_model_pass():
    # A block count may be 0; out_channels may be None whatever its annotation (diffusers reads it as
    # in_channels); t_scale is listed in _arguments_checked_by_model; a str argument is the model's to check.
    model = _Model(num_layers=0, out_channels=None, image_dim=8, t_scale=-1.0, qk_norm="anything")
    assert (model.config.num_layers, model.config.out_channels, model.config.t_scale) == (0, None, -1.0)
