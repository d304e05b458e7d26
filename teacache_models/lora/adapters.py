"""`LoraMixin`: LoRA adapters on a native transformer, with diffusers' `PeftAdapterMixin` API and meaning.

PEFT does the work, as in diffusers: `inject_adapter_in_model` wraps each adapted `nn.Linear` (or
convolution) in a `peft.tuners.lora` layer holding one `lora_A` / `lora_B` pair per adapter, and the
layer adds `scale * lora_B(lora_A(x))` to the base layer's output. What this module adds:

- Everything a file holds is checked against the model before anything is injected: a key naming no
  module of the model, a module that is not a linear layer, a rank or shape that does not fit are all
  listed in one ValueError, and the model is left untouched ("nothing half-applied").
- `fuse_lora` keeps the weights it overwrites, so `unfuse_lora` restores them bit for bit (PEFT subtracts
  the delta again, which is exact only up to float rounding).
- Every change of the adapters or of their weights moves `lora_state_key`, which TeaCache compares
  before it reuses a residual: the next step of every CFG branch then computes.
- A scale that is not a finite number is refused wherever one is given.
- `load_lora_adapter(..., hotswap=True)` replaces a loaded adapter's weights in place (PEFT's hotswap), with
  `enable_lora_hotswap(target_rank=...)` first where the ranks differ or the model will be compiled.
- DoRA adapters (`use_dora`, PEFT's `lora_magnitude_vector`) load and fuse like LoRAs.
- LoKr adapters in PEFT's layout (`lokr.py`) load, weight and fuse like LoRAs; a model holds one kind.

PEFT is imported when an adapter is loaded; a model without adapters never imports it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .config import _fill_missing_biases, _listed, _lora_config, _shape_problems, _without_prefix_keys
from .files import read_lora
from .formats import PEFT_KEY, to_peft_layout
from .hotswap import hotswap_adapter
from .lokr import is_lokr, lokr_adapter

__all__ = ["LoraMixin", "adapter_names_list", "check_lora_scale", "lora_scale_from"]

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)
_CHECK_COMPILED = ("error", "warn", "ignore")
_ADAPTER_PART = re.compile(r"\.(?:lora|lokr)_")
_ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PEFT_INSTALL = "LoRA adapters need PEFT: pip install peft (or the package's 'lora' extra)"


def adapter_names_list(adapter_names: Any) -> list[str]:
    """`adapter_names` (one name or a sequence of names) as a list, or the TypeError naming what is allowed."""
    if isinstance(adapter_names, str):
        return [adapter_names]
    if isinstance(adapter_names, list | tuple) and all(isinstance(n, str) for n in adapter_names):
        return list(adapter_names)
    raise TypeError(f"adapter_names must be an adapter name or a list of names (strings), got {adapter_names!r}")


def check_adapter_name(adapter_name: Any) -> str:
    """A new adapter's name, or the error naming what is allowed: PEFT registers the adapter under this name in
    each adapted layer's `nn.ModuleDict`s, so it must be a non-empty name without '.' that is no attribute of
    `nn.ModuleDict` (`train`, `to`, `forward` ...: torch would answer with a bare KeyError)."""
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a string, got {type(adapter_name).__name__}")
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty name without '.', got {adapter_name!r}")
    if hasattr(nn.ModuleDict, adapter_name):
        raise ValueError(
            f"adapter_name {adapter_name!r} is the name of a torch.nn.ModuleDict attribute, under which PEFT cannot "
            "register the adapter's layers: choose another name"
        )
    return adapter_name


def check_lora_scale(name: str, value: Any) -> float:
    """`value` as a float: a real, finite number (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _tuner_layer_class() -> type:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        raise ImportError(_PEFT_INSTALL) from None
    return BaseTunerLayer


def lora_scale_from(kwargs_name: str) -> Callable[[F], F]:
    """Decorate a model's `forward` so that a `scale` in its `kwargs_name` dict (diffusers' `attention_kwargs`
    or `joint_attention_kwargs`) multiplies every active adapter's weight for that call, as diffusers'
    `apply_lora_scale` does. The weights are restored exactly afterwards, also when the call fails."""

    def decorator(forward: F) -> F:
        signature = inspect.signature(forward)

        @functools.wraps(forward)
        def wrapper(self: LoraMixin, *args: Any, **kwargs: Any) -> Any:
            if not self.__dict__.get("peft_config"):
                return forward(self, *args, **kwargs)
            value = signature.bind(self, *args, **kwargs).arguments.get(kwargs_name)
            scale = value.get("scale", 1.0) if isinstance(value, Mapping) else 1.0
            scale = check_lora_scale(f"{kwargs_name}['scale']", scale)
            with self._scaled_for_call(scale):
                return forward(self, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


class LoraMixin:
    """LoRA adapters for an `nn.Module`, under the names and with the meaning of diffusers' `PeftAdapterMixin`.

    `peft_config` maps each loaded adapter's name to its `peft.LoraConfig` (absent while none is loaded).
    """

    # ---- loading -------------------------------------------------------------------------------

    def load_lora_adapter(
        self,
        pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, torch.Tensor],
        prefix: str | None = "transformer",
        *,
        adapter_name: str | None = None,
        weight_name: str | None = None,
        subfolder: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        network_alphas: Mapping[str, float] | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        force_download: bool = False,
        use_safetensors: bool | None = None,
        safe_serialization: bool | None = None,
        low_cpu_mem_usage: bool = True,
        hotswap: bool = False,
        _pipeline: Any = None,
    ) -> str:
        """Load a LoRA as a new adapter, active beside the others with weight 1. Returns its name.

        Args:
            pretrained_model_name_or_path_or_dict: a state dict, a `.safetensors` file, a folder holding one,
                or a Hub id. Pickle files are refused. The PEFT layout `save_lora_weights` writes (LoRA, DoRA,
                LoKr) and the community layouts of the model's family (see `teacache_models.lora.formats`) are
                read.
            prefix: only keys starting with `prefix + "."` are read, without it; None reads every key (a
                file written by `save_lora_adapter`, whose keys carry no prefix).
            adapter_name: a new name (default: `default_<n>`, n the number of adapters loaded).
            weight_name, subfolder: which file of a folder or repository.
            metadata: the adapter's `LoraConfig` fields; default: those stored in the file, else derived from
                the tensors (rank from `lora_B`, alpha from `<module>.alpha` keys, else equal to the rank).
            network_alphas: alpha per module (`<prefix>.<module>.alpha` keys), as diffusers' argument.
            cache_dir, token, revision, local_files_only, force_download: Hub download options.
            use_safetensors, safe_serialization: None or True (only safetensors are read; False is an error).
            low_cpu_mem_usage: build the adapter's layers empty and assign the file's tensors (cast to each
                layer's dtype and device) instead of initialising them first.
            hotswap: replace the weights of the loaded adapter `adapter_name` with this file's, in place (no new
                modules, so a compiled model is not recompiled), as diffusers does. The file may adapt the same
                modules or fewer (the others then add nothing), with the same DoRA / bias / dropout settings; where
                its ranks differ or the model is compiled, call `enable_lora_hotswap(target_rank=...)` before the
                first load. The adapter's weight (`set_adapters`) is 1 again afterwards.
            _pipeline: what diffusers' pipeline loaders pass (for their offloading hooks, which these models
                do not have): accepted and unused, so `pipe.load_lora_weights` of a diffusers pipeline whose
                transformer is ours (`apply_teacache`) works.

        Raises ValueError (the model is then unchanged) for a name in use (or, with hotswap, not loaded), a
        file of another architecture (every unmatched key is named), a rank or shape that does not fit, an
        unknown layout (the layouts tried are named); TypeError for a stored config PEFT cannot read;
        FileNotFoundError for a missing file; ImportError without PEFT.
        """
        base_tuner = _tuner_layer_class()
        if adapter_name is not None:
            check_adapter_name(adapter_name)
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string or None, got {type(prefix).__name__}")
        for option, value in (("use_safetensors", use_safetensors), ("safe_serialization", safe_serialization)):
            if value is False:
                raise ValueError(f"{option}=False: only safetensors LoRAs are read (a pickle file can run code)")
        loaded = self.__dict__.get("peft_config") or {}
        if hotswap and adapter_name not in loaded:
            raise ValueError(
                f"Trying to hotswap LoRA adapter {adapter_name!r} but there is no existing adapter by that name; "
                f"hotswap=True needs the name of a loaded adapter (loaded: {list(loaded)})"
            )
        if not hotswap and adapter_name in loaded:
            raise ValueError(
                f"adapter name {adapter_name!r} is already in use (loaded: {list(loaded)}); choose another name, "
                "delete_adapters() it first, or pass hotswap=True to replace its weights"
            )
        lora = read_lora(
            pretrained_model_name_or_path_or_dict,
            weight_name,
            subfolder,
            cache_dir,
            token,
            revision,
            local_files_only,
            force_download,
        )
        state_dict, layout = to_peft_layout(self, lora.state_dict)
        state_dict = self._without_prefix(state_dict, prefix, lora.source)
        if metadata is None and lora.metadata is not None:
            metadata = _without_prefix_keys(lora.metadata, prefix)
        if network_alphas and metadata is not None:
            raise ValueError(
                "network_alphas and a LoraConfig (metadata, given or stored in the file) both set the alphas; "
                "pass one of them"
            )
        if is_lokr(state_dict):
            self._check_one_kind("LoKr", "LoKrConfig", hotswap or bool(network_alphas))
            config, weights = lokr_adapter(self, state_dict, metadata, lora.source)
        else:
            self._check_one_kind("LoRA", "LoraConfig", False)
            alphas = {k.removesuffix(".alpha"): float(v) for k, v in state_dict.items() if k.endswith(".alpha")}
            if network_alphas:
                alphas.update({_strip(k, prefix).removesuffix(".alpha"): float(v) for k, v in network_alphas.items()})
            weights = {k: v for k, v in state_dict.items() if not k.endswith(".alpha")}
            targets = self._checked_targets(weights, base_tuner, lora.source, layout)
            weights = {k: v.to(*targets[PEFT_KEY.fullmatch(k)["module"]]) for k, v in weights.items()}
            _fill_missing_biases(weights)
            config = _lora_config(weights, alphas, metadata)
        if adapter_name is None:
            adapter_name = next(
                f"default_{n}" for n in range(len(loaded), 2 * len(loaded) + 1) if f"default_{n}" not in loaded
            )
        if hotswap:
            hotswap_adapter(self, config, adapter_name, weights, base_tuner)
        else:
            self._inject(config, adapter_name, weights, low_cpu_mem_usage, base_tuner)
            self._prepare_hotswap(config)
        self._lora_changed()
        return adapter_name

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        """Add a new adapter from a `peft.LoraConfig` with PEFT's initial weights (PEFT's and diffusers' entry point
        for training one) and make it the only active adapter. The config is copied: changing it afterwards does
        not change the adapter. Raises TypeError for another kind of config, ValueError for a name in use or
        target modules the model lacks (the model is then unchanged)."""
        base_tuner = _tuner_layer_class()
        from peft import LoraConfig

        if not isinstance(adapter_config, LoraConfig):
            raise TypeError(
                f"adapter_config must be a peft.LoraConfig (LoRA or DoRA adapters), got {type(adapter_config).__name__}"
            )
        check_adapter_name(adapter_name)
        loaded = self.__dict__.get("peft_config") or {}
        if adapter_name in loaded:
            raise ValueError(f"adapter name {adapter_name!r} is already in use (loaded: {list(loaded)})")
        self._check_one_kind("LoRA", "LoraConfig", False)
        config = copy.deepcopy(adapter_config)
        config.base_model_name_or_path = None
        self._inject(config, adapter_name, None, False, base_tuner)
        self.set_adapter(adapter_name)

    def _check_one_kind(self, kind: str, config_class: str, unsupported_option: bool) -> None:
        """A model holds adapters of one kind (PEFT would wrap one kind's layers in the other's); LoKr adapters
        take neither hotswap (PEFT swaps LoRA weights only) nor network_alphas (their alpha is in the weights)."""
        if unsupported_option:
            raise ValueError("hotswap=True and network_alphas are for LoRA adapters, not LoKr adapters")
        others = sorted(
            n for n, c in (self.__dict__.get("peft_config") or {}).items() if type(c).__name__ != config_class
        )
        if others:
            raise ValueError(
                f"this is a {kind} adapter and the model holds adapters of another kind ({others}); one model holds "
                "LoRA / DoRA adapters or LoKr adapters: delete_adapters() or unload_lora() them first"
            )

    def _without_prefix(self, state_dict: dict[str, torch.Tensor], prefix: str | None, source: str) -> dict:
        if prefix is None:
            return state_dict
        kept = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        if not kept:
            heads = sorted({k.split(".")[0] for k in state_dict})
            raise ValueError(
                f"{source}: no LoRA key starts with {prefix + '.'!r} (the keys start with {heads}); pass "
                "prefix=None for a file whose keys carry no prefix (as save_lora_adapter writes)"
            )
        others = sorted({k.split(".")[0] for k in state_dict if not k.startswith(f"{prefix}.")})
        if others:
            warnings.warn(
                f"{source}: keys under {others} are for other components and were not loaded into "
                f"{type(self).__name__}",
                UserWarning,
                stacklevel=3,
            )
        return kept

    def _checked_targets(
        self, weights: dict[str, torch.Tensor], base_tuner: type, source: str, layout: str
    ) -> dict[str, tuple[torch.device, torch.dtype]]:
        """Check every LoRA tensor against the module it adapts; all problems in one ValueError. Returns the
        device and dtype of each adapted module's weight."""
        modules = dict(self.named_modules())
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            match = PEFT_KEY.fullmatch(key)
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        unmatched, wrong_kind, problems = [], [], []
        for name, found in parts.items():
            module = modules.get(name)
            if module is None:
                unmatched.append(name)
                continue
            base = module.get_base_layer() if isinstance(module, base_tuner) else module
            if not isinstance(base, _ADAPTABLE):
                wrong_kind.append(f"{name} ({type(base).__name__})")
                continue
            problems.extend(_shape_problems(name, base, found))
        if unmatched:
            problems.insert(
                0,
                f"{len(unmatched)} of its {len(parts)} adapted modules are not in {type(self).__name__} (a LoRA for "
                f"another family or size?): {_listed(sorted(unmatched))}",
            )
        if wrong_kind:
            problems.append(f"modules that are not linear or convolution layers: {_listed(wrong_kind)}")
        if problems:
            raise ValueError(
                f"{source} ({layout} layout) does not fit this model; nothing was loaded: " + "; ".join(problems)
            )
        return {name: (modules[name].weight.device, modules[name].weight.dtype) for name in parts}

    def _inject(
        self,
        config: Any,
        adapter_name: str,
        weights: dict[str, torch.Tensor] | None,
        low_cpu_mem_usage: bool,
        base_tuner: type,
    ) -> None:
        """Inject `config`'s layers as `adapter_name` and load `weights` into them (None: keep PEFT's initial
        weights); on any failure the adapter is taken out again."""
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        from ..layers.linear import linear_kernel_of, set_linear_kernel

        kernel = linear_kernel_of(self)
        if "peft_config" not in self.__dict__:
            self.__dict__["_lora_base_requires_grad"] = {n: p.requires_grad for n, p in self.named_parameters()}
        try:
            with warnings.catch_warnings():
                # PEFT warns that a second adapter joins the first: that is what loading several means here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
                inject_adapter_in_model(
                    config, self, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=weights
                )
            if weights is not None:
                result = set_peft_model_state_dict(self, weights, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
                missing = [k for k in result.missing_keys if _ADAPTER_PART.search(k) and f".{adapter_name}." in k]
                if result.unexpected_keys or missing:
                    raise RuntimeError(f"PEFT left keys unloaded: {result.unexpected_keys or missing}")
        except BaseException:
            for module in self.modules():
                if isinstance(module, base_tuner) and _holds(module, adapter_name):
                    module.delete_adapter(adapter_name)
            (self.__dict__.get("peft_config") or {}).pop(adapter_name, None)
            if not self.__dict__.get("peft_config"):
                self.unload_lora()
            raise
        if kernel is not None:
            set_linear_kernel(self, kernel)  # the adapter's own linear layers run on the model's kernel

    def save_lora_adapter(
        self,
        save_directory: str | Path,
        adapter_name: str = "default",
        upcast_before_saving: bool = False,
        safe_serialization: bool = True,
        weight_name: str | None = None,
    ) -> Path:
        """Write one adapter as diffusers' `save_lora_adapter` does: safetensors keys in the PEFT layout without
        a prefix (load them with `prefix=None`) and the adapter's `LoraConfig` in the file's metadata. Returns
        the file written (`pytorch_lora_weights.safetensors` unless `weight_name` is given).
        `upcast_before_saving` writes float32 tensors (the model itself is not cast); `safe_serialization=False`
        (a pickle file) is refused."""
        import json

        from safetensors.torch import save_file

        from .files import DEFAULT_WEIGHT_NAME, METADATA_KEY

        if not safe_serialization:
            raise ValueError("safe_serialization=False is refused: adapters are written as safetensors only")
        (name,) = self._checked_names([adapter_name])
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_directory {str(folder)!r} is a file; give a folder")
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in self.peft_config[name].to_dict().items()}
        dtype = torch.float32 if upcast_before_saving else None
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in self.get_adapter_state_dict(name).items()}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (weight_name or DEFAULT_WEIGHT_NAME)
        save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(config, sort_keys=True)})
        return path

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """One adapter's tensors in the PEFT layout without a prefix, as `save_lora_adapter` writes them (default:
        the first active adapter)."""
        from peft.utils import get_peft_model_state_dict

        (name,) = self._checked_names([adapter_name if adapter_name is not None else self.active_adapters()[0]])
        return get_peft_model_state_dict(self, adapter_name=name)

    # ---- hotswapping ----------------------------------------------------------------------------

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """Prepare hotswapping adapters of different ranks (up to `target_rank`) or on a compiled model: the first
        adapter loaded afterwards is padded to `target_rank`, and its scales become tensors, so that a later
        `load_lora_adapter(..., hotswap=True)` changes values only. Call it before the first adapter is loaded;
        after that, `check_compiled` decides: "error" raises RuntimeError, "warn" logs a warning, "ignore" does
        neither (the next adapter loaded is then the one padded)."""
        if check_compiled not in _CHECK_COMPILED:
            raise ValueError(f"check_compiled must be one of {list(_CHECK_COMPILED)}, got {check_compiled!r}")
        if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank < 1:
            raise ValueError(f"target_rank must be a positive integer, got {target_rank!r}")
        loaded = list(self.__dict__.get("peft_config") or {})
        if loaded and check_compiled == "error":
            raise RuntimeError(
                f"Call `enable_lora_hotswap` before loading the first adapter. Loaded adapters: {loaded} (pass "
                "check_compiled='warn' or 'ignore' to prepare the next adapter loaded instead)"
            )
        if loaded and check_compiled == "warn":
            log.warning(
                "It is recommended to call `enable_lora_hotswap` before loading the first adapter to avoid "
                "recompilation. The next adapter loaded is the one prepared."
            )
        self.__dict__["_lora_hotswap_target"] = {"target_rank": target_rank, "check_compiled": check_compiled}

    def _prepare_hotswap(self, config: Any) -> None:
        prepare = self.__dict__.pop("_lora_hotswap_target", None)
        if prepare is not None:
            from peft.utils.hotswap import prepare_model_for_compiled_hotswap

            prepare_model_for_compiled_hotswap(self, config=config, **prepare)

    # ---- choosing and weighting adapters ---------------------------------------------------------

    def set_adapters(
        self, adapter_names: str | Sequence[str], weights: float | Sequence[float | None] | None = None
    ) -> None:
        """Make `adapter_names` the active adapters, each scaled by its weight (None: 1.0); the others stay
        loaded but inactive. `weights` is one number for all, or one per name."""
        names = self._checked_names(adapter_names)
        if weights is None or not isinstance(weights, list | tuple):
            weights = [weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} weights for {len(names)} adapters {names}: give one per adapter")
        values = [
            1.0 if w is None else check_lora_scale(f"the weight of adapter {n!r}", w)
            for n, w in zip(names, weights, strict=True)
        ]
        for module in self._tuner_layers():
            module.set_adapter(names)
            for name, value in zip(names, values, strict=True):
                module.set_scale(name, value)
        self._lora_changed()

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make `adapter_name` (one name or several) the active adapters, keeping their weights; the others stay
        loaded but inactive (diffusers' / PEFT's `set_adapter`)."""
        names = self._checked_names(adapter_name)
        for module in self._tuner_layers():
            module.set_adapter(names)
        self._lora_changed()

    def active_adapters(self) -> list[str]:
        """The names of the active adapters."""
        self._checked_names([])
        layer = next(self._tuner_layers(), None)
        return list(layer.active_adapters) if layer is not None else []

    def disable_lora(self) -> None:
        """Run the base model only; the adapters stay loaded (`enable_lora` brings them back)."""
        self._enable(False)

    def enable_lora(self) -> None:
        """Run the active adapters again after `disable_lora`."""
        self._enable(True)

    def disable_adapters(self) -> None:
        """PEFT's name for `disable_lora`."""
        self._enable(False)

    def enable_adapters(self) -> None:
        """PEFT's name for `enable_lora`."""
        self._enable(True)

    def _enable(self, enabled: bool) -> None:
        self._checked_names([])
        for module in self._tuner_layers():
            module.enable_adapters(enabled)
        self._lora_changed()

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove the named adapters and their layers; once none is left, the model is as before loading."""
        names = self._checked_names(adapter_names)
        fused = sorted({a for m in self._tuner_layers() for a in m.merged_adapters} & set(names))
        if fused:
            raise ValueError(f"adapters {fused} are fused into the weights: call unfuse_lora() before deleting them")
        for module in self._tuner_layers():
            for name in names:
                if _holds(module, name):
                    module.delete_adapter(name)
        for name in names:
            self.peft_config.pop(name)
        if not self.peft_config:
            self.unload_lora()
        self._lora_changed()

    # ---- fusing ----------------------------------------------------------------------------------

    def fuse_lora(
        self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: Sequence[str] | None = None
    ) -> None:
        """Add the active adapters (or `adapter_names`) into the base weights, after multiplying their weights by
        `lora_scale` (which, as in diffusers, stays applied to them afterwards). The weights replaced are kept
        so that `unfuse_lora` restores them exactly. `safe_fusing` checks the result for NaNs first."""
        scale = check_lora_scale("lora_scale", lora_scale)
        names = self._checked_names(adapter_names) if adapter_names is not None else None
        saved: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = self.__dict__.setdefault("_lora_unfused", {})
        try:
            for name, module in self.named_modules():
                if not isinstance(module, _tuner_layer_class()):
                    continue
                base = module.get_base_layer()
                if name not in saved:
                    bias = base.bias.detach().clone() if getattr(base, "bias", None) is not None else None
                    saved[name] = (base.weight.detach().clone(), bias)
                module.scale_layer(scale)
                module.merge(safe_merge=bool(safe_fusing), adapter_names=names)
        except BaseException:
            self.unfuse_lora()
            raise
        finally:
            self._lora_changed()

    def unfuse_lora(self) -> None:
        """Take the fused adapters out of the base weights again: the weights are those before `fuse_lora`, bit
        for bit, and the adapters run unfused."""
        saved: dict = self.__dict__.pop("_lora_unfused", {})
        modules = dict(self.named_modules())
        with torch.no_grad():
            for name, (weight, bias) in saved.items():
                module = modules[name]
                base = module.get_base_layer()
                base.weight.data.copy_(weight)
                if bias is not None:
                    base.bias.data.copy_(bias)
                module.merged_adapters.clear()
                getattr(module, "_caches", {}).clear()  # DoRA's weight norms of the fused adapters
        self._lora_changed()

    # ---- removing everything ---------------------------------------------------------------------

    def unload_lora(self) -> None:
        """Remove every adapter: the model's modules, parameters and `requires_grad` flags are those before the
        first `load_lora_adapter`. Fused adapters stay in the weights (diffusers' "fuse, then unload")."""
        if "peft_config" not in self.__dict__ and "_lora_base_requires_grad" not in self.__dict__:
            return
        base_tuner = _tuner_layer_class()
        for name, module in list(self.named_modules()):
            if isinstance(module, base_tuner):
                parent_name, _, child = name.rpartition(".")
                parent = self.get_submodule(parent_name) if parent_name else self
                setattr(parent, child, module.get_base_layer())
        self.__dict__.pop("peft_config", None)
        self.__dict__.pop("_lora_unfused", None)
        flags = self.__dict__.pop("_lora_base_requires_grad", {})
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(flags.get(name, parameter.requires_grad))
        self._lora_changed()

    # ---- the key TeaCache compares ---------------------------------------------------------------

    def lora_state_key(self) -> tuple[int, float]:
        """Changes whenever the adapters or their weights change (also for one call's `scale`)."""
        return self.__dict__.get("_lora_version", 0), self.__dict__.get("_lora_call_scale", 1.0)

    def teacache_weights_key(self) -> tuple[int, float]:
        return self.lora_state_key()

    # ---- helpers -------------------------------------------------------------------------------

    def _lora_changed(self) -> None:
        self.__dict__["_lora_version"] = self.__dict__.get("_lora_version", 0) + 1

    def _tuner_layers(self) -> Iterator[Any]:
        if "peft_config" not in self.__dict__:
            return iter(())
        base_tuner = _tuner_layer_class()
        return (m for m in self.modules() if isinstance(m, base_tuner))

    def _checked_names(self, adapter_names: str | Sequence[str]) -> list[str]:
        loaded = list(self.__dict__.get("peft_config") or {})
        if not loaded:
            raise ValueError(f"{type(self).__name__} has no LoRA adapter loaded: call load_lora_adapter() first")
        names = adapter_names_list(adapter_names)
        unknown = [n for n in names if n not in loaded]
        if unknown:
            raise ValueError(
                f"Adapter name {', '.join(map(str, unknown))} not found in the model. Loaded adapters: {loaded}"
            )
        return names

    @contextmanager
    def _scaled_for_call(self, scale: float) -> Iterator[None]:
        if scale == 1.0:
            yield
            return
        layers = list(self._tuner_layers())
        # Scales are tensors after enable_lora_hotswap, which scale_layer multiplies in place: keep copies.
        kept = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.scaling.items()} for m in layers]
        for module in layers:
            module.scale_layer(scale)
        self.__dict__["_lora_call_scale"] = scale
        try:
            yield
        finally:
            for module, scaling in zip(layers, kept, strict=True):
                module.scaling.clear()
                module.scaling.update(scaling)
            self.__dict__["_lora_call_scale"] = 1.0


def _holds(layer: Any, adapter_name: str) -> bool:
    """Whether a PEFT layer (LoRA or LoKr) has weights of `adapter_name`."""
    return any(adapter_name in getattr(layer, part, {}) for part in layer.adapter_layer_names)


def _strip(key: str, prefix: str | None) -> str:
    return key.removeprefix(f"{prefix}.") if prefix else key
