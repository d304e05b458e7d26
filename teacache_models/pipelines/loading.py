"""Loading a pipeline: zoo name, local folder or Hub id -> the family pipeline with every component.

The folder is the diffusers layout: `model_index.json` names the pipeline class and, per component, the
library and class to load from the subfolder of the same name. The transformer(s) are ours (the same
state-dict keys as diffusers); everything else is loaded with its own library's `from_pretrained`. A
pipeline class may load its folder itself (the pixel-space demo's `from_pretrained`).

A vision-language processor (the Qwen-Image editing models' `Qwen2VLProcessor`, Qwen-Image-2.1's
`Qwen3VLProcessor`) is loaded without its video processor: transformers' video processors need torchvision,
and these pipelines read images only. Its image processor, tokenizer and chat template come from the folder
as transformers would load them (the image processor on torchvision where it is installed, else on PIL).

FLUX.2 [dev]'s `tokenizer` is transformers' `PixtralProcessor`, whose module cannot be imported without
torchvision at all. Without torchvision the loader builds `pixtral_prompt_processor()` from the same saved parts:
a processor that formats and tokenizes prompts exactly as `PixtralProcessor` does (transformers' own
`ProcessorMixin` path, which Pixtral's only changes for images) and refuses images, which only diffusers' prompt
upsampling gives it and which our pipeline never does. With torchvision installed the released class is used.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..families import pipeline_classes
from ..weights.loading import resolve_device
from ..zoo import ZooEntry, list_zoo, load_zoo_entry

__all__ = [
    "image_only_processor",
    "load_components",
    "load_pipeline",
    "pipeline_class_for",
    "pixtral_prompt_processor",
    "read_model_index",
    "resolve_device",
]

_TRANSFORMER_KEYS = ("transformer", "transformer_2")


def read_model_index(path: Path) -> dict[str, Any]:
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a pipeline folder: it has no model_index.json (the diffusers layout: "
            "model_index.json plus one subfolder per component)"
        )
    try:
        with index_path.open() as handle:
            model_index = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{index_path} is not valid JSON: {error}") from None
    if not isinstance(model_index, dict):
        raise ValueError(f"{index_path} must hold a JSON object, got {type(model_index).__name__}")
    return model_index


def pipeline_class_for(model_index: dict[str, Any], where: str) -> type:
    """Our pipeline class for the diffusers pipeline class named in `model_index.json`."""
    name = model_index.get("_class_name")
    registry = pipeline_classes()
    if name not in registry:
        raise ValueError(f"{where}: pipeline class {name!r} is not supported; supported: {sorted(registry)}")
    return registry[name]


def _to_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    from ..weights import TORCH_DTYPES

    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in TORCH_DTYPES:
        return TORCH_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in TORCH_DTYPES.values():
        return dtype
    raise ValueError(f"torch_dtype must be None, one of {list(TORCH_DTYPES)} or the torch dtype, got {dtype!r}")


def _load_transformer(folder: Path, model_class: type, dtype: torch.dtype | None, device: torch.device) -> Any:
    from ..weights import load_transformer

    return load_transformer(folder.parent, model_class, subfolder=folder.name, torch_dtype=dtype, device=device)


@functools.cache
def image_only_processor(processor_class: type) -> type:
    """`processor_class` (a transformers `ProcessorMixin` with a video processor) without the video processor:
    it loads, saves and runs with its image processor, tokenizer and chat template only."""

    class ImageOnlyProcessor(processor_class):
        # transformers finds a processor's parts in its constructor's signature, which names no video processor.
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    # The class's name is what a saved processor records as its `processor_class`: the released one's.
    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    ImageOnlyProcessor.__doc__ = image_only_processor.__doc__
    return ImageOnlyProcessor


@functools.cache
def pixtral_prompt_processor() -> type:
    """A `PixtralProcessor` for prompts that needs no torchvision: it loads and saves the released processor's
    parts (the image processor, the tokenizer, the chat template and the Pixtral settings of processor_config.json)
    and its `apply_chat_template` / `__call__` give the token ids `PixtralProcessor` gives for text. Images are
    refused: placing image tokens is what needs the released class (and torchvision)."""
    from transformers import ProcessorMixin

    class PixtralProcessor(ProcessorMixin):
        text_kwargs: ClassVar[dict[str, Any]] = {"return_tensors": "pt"}  # the released class's default

        def __init__(
            self,
            image_processor: Any = None,
            tokenizer: Any = None,
            patch_size: int = 16,
            spatial_merge_size: int = 1,
            chat_template: Any = None,
            image_token: str = "[IMG]",
            image_break_token: str = "[IMG_BREAK]",
            image_end_token: str = "[IMG_END]",
        ):
            super().__init__(image_processor, tokenizer, chat_template=chat_template)
            # Kept so that the processor saves back as it was loaded; a prompt holding `image_token` is refused
            # (it has no image), as by the released class.
            self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
            self.image_token = image_token
            self.image_break_token, self.image_end_token = image_break_token, image_end_token

        def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
            if images is not None or kwargs.get("videos") is not None:
                raise ValueError(
                    "this PixtralProcessor tokenizes prompts only (images need transformers' PixtralProcessor, "
                    "which needs torchvision: pip install torchvision)"
                )
            return super().__call__(text=text, **kwargs)

    PixtralProcessor.__doc__ = pixtral_prompt_processor.__doc__
    return PixtralProcessor


def _library_class(library: str, class_name: str) -> type:
    """The class `model_index.json` names; transformers' PixtralProcessor without torchvision is ours."""
    pixtral = (library, class_name) == ("transformers", "PixtralProcessor")
    if pixtral and importlib.util.find_spec("torchvision") is None:
        return pixtral_prompt_processor()
    try:
        return getattr(importlib.import_module(library), class_name)
    except ImportError as error:
        raise ValueError(f"model_index.json names library {library!r}, which cannot be imported: {error}") from None
    except AttributeError:
        raise ValueError(f"model_index.json names class {class_name!r}, which {library!r} does not have") from None


def _load_library_component(library: str, class_name: str, folder: Path, dtype: torch.dtype | None) -> Any:
    component_class = _library_class(library, class_name)
    if isinstance(component_class, type) and issubclass(component_class, torch.nn.Module):
        # diffusers models take `torch_dtype`; transformers 5 models take `dtype`.
        key = "torch_dtype" if library == "diffusers" else "dtype"
        kwargs = {key: dtype} if dtype is not None else {}
        return component_class.from_pretrained(str(folder), **kwargs)
    parts = getattr(component_class, "get_attributes", None)  # a transformers processor's parts
    if callable(parts) and "video_processor" in parts():
        component_class = image_only_processor(component_class)
    return component_class.from_pretrained(str(folder))


def _component_entry(model_index: dict[str, Any], name: str, path: Path) -> tuple[str, str] | None:
    """Component `name`'s (library, class name) from `model_index.json`; None where the folder has none."""
    entry = model_index.get(name)
    if entry is None or (isinstance(entry, list | tuple) and list(entry) == [None, None]):
        return None
    if not (isinstance(entry, list | tuple) and len(entry) == 2 and all(isinstance(e, str) and e for e in entry)):
        raise ValueError(
            f"{str(path)!r}: model_index.json entry {name!r} must be [library, class name] (two strings) or "
            f"[null, null], got {entry!r}"
        )
    return entry[0], entry[1]


def load_components(
    path: str | Path,
    pipeline_class: type,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Every component `pipeline_class` takes, loaded from the diffusers-layout folder `path`."""
    path = Path(path)
    model_index = read_model_index(path)
    dtype = _to_dtype(torch_dtype)
    device = resolve_device(device)
    wanted = {"transformer", "scheduler", "vae", *pipeline_class.text_component_names}
    wanted |= set(getattr(pipeline_class, "extra_component_names", ()))
    components: dict[str, Any] = {}
    for name in sorted(wanted):
        entry = _component_entry(model_index, name, path)
        if entry is None:
            components[name] = None
            continue
        folder = path / name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{str(path)!r}: model_index.json names component {name!r}, but {folder} is missing"
            )
        if name in _TRANSFORMER_KEYS:
            components[name] = _load_transformer(folder, pipeline_class.transformer_class, dtype, device)
            continue
        component = _load_library_component(*entry, folder, dtype)
        components[name] = component.to(device).eval() if isinstance(component, torch.nn.Module) else component
    if components.get("transformer") is None:
        raise FileNotFoundError(f"{str(path)!r}: model_index.json names no transformer")
    return components


def _resolve_path(name_or_path: str | Path) -> tuple[Path, ZooEntry | None]:
    if not isinstance(name_or_path, str | Path):
        raise TypeError(
            f"name_or_path must be a zoo name, a zoo YAML, a local folder or a Hub id (str or Path), got "
            f"{type(name_or_path).__name__}"
        )
    text = str(name_or_path)
    if not text.strip():
        raise ValueError(
            f"name_or_path is empty: give a zoo name ({', '.join(list_zoo())}), a zoo YAML, a local folder or a Hub id"
        )
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml"):
        entry = load_zoo_entry(path)
        return _zoo_weights(entry), entry
    if path.is_dir():
        return path, None
    if text in list_zoo():
        entry = load_zoo_entry(text)
        return _zoo_weights(entry), entry
    if text.count("/") == 1 and not path.exists() and not text.startswith((".", "/", "~")):
        return _resolve_weights(text), None
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # a filesystem path, not a name
        what = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"{text!r} {what}: a local pipeline is a diffusers-layout folder (model_index.json plus one subfolder "
            "per component)"
        )
    close = difflib.get_close_matches(text, list_zoo(), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown model {text!r}: not a zoo name, a local pipeline folder or a Hub id (owner/name).{hint} "
        f"Zoo models: {list_zoo()}"
    )


def _resolve_weights(name: str) -> Path:
    from ..weights import resolve_weights

    return Path(resolve_weights(name))


def _zoo_weights(entry: ZooEntry) -> Path:
    return _resolve_weights(entry.manifest)


def load_pipeline(
    name_or_path: str | Path,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    zoo_entry: ZooEntry | None = None,
) -> Any:
    """The family pipeline for a zoo name (e.g. "flux1-dev"), a zoo YAML, a local diffusers-layout folder
    or a Hub id, with all components loaded on `device` in `torch_dtype` (None: as stored).

    `zoo_entry` supplies the sampling defaults and TeaCache presets for a folder (a zoo name brings its
    own); the LoRAs the entry lists are loaded and active at their scales.
    """
    if zoo_entry is not None and not isinstance(zoo_entry, ZooEntry):
        raise TypeError(
            f"zoo_entry must be a ZooEntry (teacache_models.zoo.load_zoo_entry) or None, got {type(zoo_entry).__name__}"
        )
    _to_dtype(torch_dtype)
    device = resolve_device(device)
    path, entry = _resolve_path(name_or_path)
    entry = zoo_entry or entry
    model_index = read_model_index(path)
    pipeline_class = pipeline_class_for(model_index, str(path))
    if entry is not None and entry.family != pipeline_class.family:
        raise ValueError(
            f"zoo entry {entry.name!r} is a {entry.family} model, but {str(path)!r} holds a "
            f"{model_index.get('_class_name')} ({pipeline_class.family})"
        )
    pipe = pipeline_class.from_pretrained(path, torch_dtype=torch_dtype, device=device, zoo_entry=entry)
    if entry is not None and entry.loras:
        pipe.load_loras(entry.loras)
    return pipe
