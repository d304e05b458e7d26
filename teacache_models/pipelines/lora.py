"""LoRA on a pipeline, under the names of diffusers' pipeline loaders: `pipe.load_lora_weights(...)` loads
the transformer's part of a file into `pipe.transformer` (Wan2.2 A14B: `load_into_transformer_2=True` for the
low-noise expert), and the other methods act on every transformer holding the named adapters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..lora import LoraSpec, adapter_names_list, read_lora, to_peft_layout

__all__ = ["PipelineLoraMixin"]


class PipelineLoraMixin:
    """diffusers' `load_lora_weights`, `set_adapters`, `fuse_lora`, `unfuse_lora`, `unload_lora_weights`,
    `delete_adapters`, `disable_lora`, `enable_lora`, `get_active_adapters`, `get_list_adapters`."""

    # Provided by `Pipeline`: every transformer by component name (`teacache_models()`).

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        *,
        load_into_transformer_2: bool = False,
        **kwargs: Any,
    ) -> str:
        """Load a LoRA file's transformer part as a new adapter of `pipe.transformer` (of `pipe.transformer_2`
        with `load_into_transformer_2=True`). Keys under `transformer.` are read (as `save_lora_weights`
        writes them); a file without that prefix (as `save_lora_adapter` writes) is read whole. `kwargs`:
        those of the model's `load_lora_adapter` (weight_name, subfolder, download options). Returns the
        adapter's name."""
        models = self.teacache_models()
        name = "transformer_2" if load_into_transformer_2 else "transformer"
        if name not in models:
            raise ValueError(f"{type(self).__name__} has no {name} (load_into_transformer_2 is for Wan2.2 A14B)")
        target = models[name]
        download = {k: kwargs.pop(k) for k in list(kwargs) if k in _READ_OPTIONS}
        lora = read_lora(pretrained_model_name_or_path_or_dict, **download)
        converted, _ = to_peft_layout(target, lora.state_dict)
        prefix = "transformer" if any(k.startswith("transformer.") for k in converted) else None
        lora.state_dict = converted
        return target.load_lora_adapter(lora, prefix=prefix, adapter_name=adapter_name, **kwargs)

    def set_adapters(
        self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float | None] | None = None
    ) -> None:
        """Activate `adapter_names` with their weights in every transformer that holds them."""
        names = adapter_names_list(adapter_names)
        if adapter_weights is None or not isinstance(adapter_weights, list | tuple):
            adapter_weights = [adapter_weights] * len(names)
        if len(adapter_weights) != len(names):
            raise ValueError(f"got {len(adapter_weights)} weights for {len(names)} adapters {names}")
        weights = dict(zip(names, adapter_weights, strict=True))
        for model, held in self._holding(names):
            model.set_adapters(held, [weights[n] for n in held])

    def get_list_adapters(self) -> dict[str, list[str]]:
        """The adapters loaded, per transformer component."""
        return {name: list(model.peft_config) for name, model in self._adapted(named=True)}

    def get_active_adapters(self) -> list[str]:
        """The names of the active adapters (across the transformers)."""
        return sorted({a for model in self._adapted() for a in model.active_adapters()})

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: Sequence[str] | None = None):
        """`fuse_lora` on every transformer holding adapters (see the model's method)."""
        if adapter_names is None:
            for model in self._adapted():
                model.fuse_lora(lora_scale=lora_scale, safe_fusing=safe_fusing)
            return
        for model, held in self._holding(adapter_names_list(adapter_names)):
            model.fuse_lora(lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=held)

    def unfuse_lora(self) -> None:
        self._on_each("unfuse_lora")

    def unload_lora_weights(self) -> None:
        """Remove every adapter from every transformer (fused ones stay in the weights, as in diffusers)."""
        self._on_each("unload_lora")

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        for model, held in self._holding(adapter_names_list(adapter_names)):
            model.delete_adapters(held)

    def disable_lora(self) -> None:
        self._on_each("disable_lora")

    def enable_lora(self) -> None:
        self._on_each("enable_lora")

    def load_loras(self, specs: Sequence[LoraSpec]) -> list[str]:
        """Load several LoRAs and activate them all with their scales (the CLI's `--lora` and a zoo entry's
        `loras`). Returns the adapter names."""
        names = [self.load_lora_weights(s.source, s.adapter_name, weight_name=s.weight_name) for s in specs]
        if names:
            self.set_adapters(names, [s.scale for s in specs])
        return names

    def _adapted(self, named: bool = False):
        items = [(n, m) for n, m in self.teacache_models().items() if m.__dict__.get("peft_config")]
        return items if named else [m for _, m in items]

    def _on_each(self, method: str) -> None:
        """The model's `method` (no arguments) on every transformer holding adapters."""
        for model in self._adapted():
            getattr(model, method)()

    def _holding(self, names: Sequence[str]) -> list[tuple[Any, list[str]]]:
        """Every transformer holding some of the adapters `names`, with those it holds; a name no transformer
        holds is an error."""
        loaded = {a for model in self._adapted() for a in model.peft_config}
        unknown = [n for n in names if n not in loaded]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; loaded adapters: {sorted(loaded)}")
        holding = [(model, [n for n in names if n in model.peft_config]) for model in self._adapted()]
        return [(model, held) for model, held in holding if held]


_READ_OPTIONS = ("weight_name", "subfolder", "cache_dir", "token", "revision", "local_files_only")
