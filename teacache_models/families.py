"""The family registry: every model family this package implements, in one table.

The model zoo (`configs/*.yaml`), the weights manifest and the pipeline loader all read it; adding a
family is one entry here plus its model file (and pipeline file). Classes are named by their import
path and imported only when asked for, so reading the table costs nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["FAMILIES", "Family", "family", "pipeline_classes", "transformer_class"]


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the key zoo entries and manifest entries use ("flux", "wan", ...).
        transformer: the native transformer class, a name exported by `teacache_models.models`.
        pipelines: our pipeline classes for the family, as "module:Class" under `teacache_models.pipelines`
            (each declares the diffusers pipeline class name it stands for in `diffusers_class_name`).
    """

    name: str
    transformer: str
    pipelines: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    entry.name: entry
    for entry in (
        Family("flux", "FluxTransformer2DModel", ("flux:FluxTextToImagePipeline", "demo:FluxDigitsPipeline")),
        Family(
            "wan",
            "WanTransformer3DModel",
            ("wan:WanTextToVideoPipeline", "wan:WanImageToVideoPipeline", "demo:WanDigitsPipeline"),
        ),
        Family("hunyuan_video", "HunyuanVideoTransformer3DModel", ("hunyuan_video:HunyuanVideoTextToVideoPipeline",)),
        Family(
            "hunyuan_video15",
            "HunyuanVideo15Transformer3DModel",
            ("hunyuan_video15:HunyuanVideo15TextToVideoPipeline", "hunyuan_video15:HunyuanVideo15ImageToVideoPipeline"),
        ),
        Family(
            "qwen_image",
            "QwenImageTransformer2DModel",
            (
                "qwen_image:QwenImageTextToImagePipeline",
                "qwen_image_edit:QwenImageEditPipeline",
                "qwen_image_edit:QwenImageEditPlusPipeline",
                "qwen_image_layered:QwenImageLayeredPipeline",
            ),
        ),
        Family("qwen_image21", "QwenImage21Transformer2DModel", ("qwen_image21:QwenImage21TextToImagePipeline",)),
        Family("z_image", "ZImageTransformer2DModel", ("z_image:ZImageTextToImagePipeline",)),
        Family(
            "flux2",
            "Flux2Transformer2DModel",
            (
                "flux2:Flux2ImagePipeline",
                "flux2:Flux2KleinImagePipeline",
                "flux2:Flux2KleinKVImagePipeline",
            ),
        ),
    )
}


def family(name: str) -> Family:
    """The registered family `name`; a ValueError lists the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"family {name!r} is not one of {list(FAMILIES)}")
    return FAMILIES[name]


def transformer_class(name: str) -> type:
    """The native transformer class of family `name`."""
    from . import models

    return getattr(models, family(name).transformer)


def pipeline_classes() -> dict[str, type]:
    """Every family's pipeline classes by the diffusers pipeline class name each stands for."""
    classes = {}
    for entry in FAMILIES.values():
        for path in entry.pipelines:
            module, name = path.split(":")
            cls = getattr(importlib.import_module(f"teacache_models.pipelines.{module}"), name)
            classes[cls.diffusers_class_name] = cls
    return classes
