"""TeaCache inside diffusers' own pipelines: `apply_teacache(pipe, TeaCacheParams(...))`.

The pipeline's transformers (`transformer`, and `transformer_2` for Wan2.2's low-noise expert) are
replaced by the native classes of this package holding the very same parameter tensors (no copy: the
device, the dtype and the memory stay those of the diffusers model). The pipeline then runs its own
denoising loop unchanged, and each call is declared to TeaCache from what the pipeline itself says:

- the generation: a pipeline call sets its scheduler's timesteps (`set_timesteps` makes a new tensor),
  so a call that finds new timesteps starts a generation, with TeaCache on for that many steps
  (counted from the scheduler's `begin_index`, which image-to-image pipelines set) and fresh state;
- the step: `step_index` from the pipeline's `cache_context` where it gives one, else the scheduler's
  own `step_index` (the step it will take after this call);
- the branch: the name of the pipeline's `cache_context` ("cond", "uncond"). Pipelines that call the
  transformer without one (FluxImg2ImgPipeline, ZImagePipeline) tell it by their layout: a call whose
  batch is two equal halves while the pipeline runs CFG holds both branches, positive half first (Z-Image
  splits it per branch); otherwise the first call at a scheduler step computes the positive branch and a
  second call at the same step the negative one, which is how these pipelines order their calls.

`remove_teacache(pipe)` puts the diffusers transformers back.
"""

from __future__ import annotations

import re
import weakref
from contextlib import ExitStack
from typing import Any

import torch

from ..cache import TeaCacheMixin, TeaCacheStats
from ..models.base import ConfiguredModel
from ..params import TeaCacheParams

__all__ = ["apply_teacache", "native_from_diffusers", "pipeline_teacache_stats", "remove_teacache"]

TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")
# A local folder of the Hugging Face cache names its repository: .../models--Owner--Name/snapshots/<commit>.
_CACHED_REPO = re.compile(r"models--([^/\\]+)--([^/\\]+)[/\\]snapshots")


# ---- the model: the same tensors under the native class ------------------------------------------


def native_class_for(module: torch.nn.Module) -> type[ConfiguredModel]:
    """The native class of a diffusers transformer, by its class name."""
    from .. import models

    name = type(module).__name__
    native = getattr(models, name, None)
    if not (isinstance(native, type) and issubclass(native, ConfiguredModel) and issubclass(native, TeaCacheMixin)):
        supported = sorted(
            n
            for n in models.__all__
            if isinstance(getattr(models, n), type) and issubclass(getattr(models, n), TeaCacheMixin)
        )
        raise TypeError(f"no native class for {name}: TeaCache covers the diffusers transformers {supported}")
    return native


def native_from_diffusers(module: torch.nn.Module) -> ConfiguredModel:
    """The native model of a diffusers transformer, sharing its parameters and persistent buffers.

    Nothing is copied: the native model's parameters are the diffusers model's `Parameter` objects, so
    they keep their device, dtype and `requires_grad`, and training one trains the other.
    """
    native_class = native_class_for(module)
    config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    from ..weights.loading import parameters_on_meta

    with parameters_on_meta():
        native = native_class.from_config(config)
    theirs = module.state_dict(keep_vars=True)
    ours = native.state_dict(keep_vars=True)
    ignored = [re.compile(p) for p in getattr(native, "_keys_to_ignore_on_load_unexpected", None) or ()]
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours and not any(p.search(k) for p in ignored)]
    mismatched = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{type(module).__name__} does not map onto the native class (adapters or quantized layers are not "
            f"shared): missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {mismatched[:5]}"
        )
    on_meta = [k for k in ours if theirs[k].is_meta]
    if on_meta:
        raise ValueError(
            f"{type(module).__name__} has weights on the meta device (offloaded?), e.g. {on_meta[:3]}: load it "
            "fully before apply_teacache"
        )
    native.load_state_dict({k: theirs[k] for k in ours}, strict=True, assign=True)
    device = next(iter(theirs.values())).device
    for submodule in native.modules():
        for name, buffer in submodule._buffers.items():
            if buffer is not None and buffer.device != device:
                submodule._buffers[name] = buffer.to(device)
    return native.train(module.training)


# ---- the step source: the pipeline's scheduler and layout -----------------------------------------


class PipelineTeaCache:
    """TeaCache for one diffusers pipeline: starts generations and declares each transformer call."""

    def __init__(self, pipe: Any, models: dict[str, ConfiguredModel], params: TeaCacheParams) -> None:
        self._pipe = weakref.ref(pipe)
        self.models = models
        self.params = params
        self.originals: dict[str, torch.nn.Module] = {}
        self._generation: tuple[Any, Any] | None = None  # (scheduler, its timesteps tensor)
        self._calls_at_step: dict[int, tuple[int, int]] = {}  # id(model) -> (step, calls so far)
        self._open: dict[int, tuple[ExitStack, tuple[int, int] | None]] = {}  # id(model) -> (context, count before)
        self._handles: list[Any] = []

    @property
    def pipe(self) -> Any:
        pipe = self._pipe()
        if pipe is None:
            raise RuntimeError("the pipeline this TeaCache was applied to no longer exists")
        return pipe

    def attach(self) -> None:
        for model in self.models.values():
            model.attach_step_source(self)
            self._handles.append(model.register_forward_pre_hook(self._before_call, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._after_call, with_kwargs=True, always_call=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for model in self.models.values():
            model.attach_step_source(None)
            model.disable_teacache()

    # StepSource

    def begin_call(self, model: Any) -> None:
        scheduler = self.pipe.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        if self._generation is not None and self._generation[0] is scheduler and self._generation[1] is timesteps:
            return
        if timesteps is None:
            raise RuntimeError("the pipeline's scheduler has no timesteps: call the transformer from the pipeline")
        if getattr(scheduler, "order", 1) != 1:
            raise ValueError(
                f"{type(scheduler).__name__} calls the transformer {scheduler.order} times per step; TeaCache "
                "with diffusers pipelines needs a first-order scheduler (flow-matching Euler, UniPC)"
            )
        steps = len(timesteps) - self._begin_index(scheduler)
        for each in self.models.values():
            each.enable_teacache(self.params, steps)
        self._generation = (scheduler, timesteps)
        self._calls_at_step.clear()

    def step_index(self, model: Any) -> int:
        scheduler = self.pipe.scheduler
        begin = self._begin_index(scheduler)
        index = getattr(scheduler, "step_index", None)
        return (begin if index is None else index) - begin

    @staticmethod
    def _begin_index(scheduler: Any) -> int:
        return getattr(scheduler, "begin_index", None) or 0

    # Calls made without cache_context

    def _before_call(self, model: Any, args: tuple, kwargs: dict) -> None:
        if model.__dict__.get("_teacache_context") is not None:
            return  # the pipeline's cache_context declared it
        self.begin_call(model)
        if not model.teacache_enabled:
            return
        step = self.step_index(model)
        batched = self._holds_both_branches(args, kwargs)
        counted = self._calls_at_step.get(id(model))
        calls = 0
        if not batched:
            last, calls = counted or (None, 0)
            calls = calls + 1 if last == step else 1
            if calls > 2:
                raise RuntimeError(
                    f"a third transformer call at step {step}: TeaCache keeps two CFG branches; open "
                    "cache_context('cond') / cache_context('uncond') around each call"
                )
        stack = ExitStack()
        stack.enter_context(model.teacache_step(step, is_cfg_negative=calls == 2, batched_cfg=batched))
        if not batched:  # counted once the step is declared
            self._calls_at_step[id(model)] = (step, calls)
        self._open[id(model)] = (stack, counted)

    def _after_call(self, model: Any, args: tuple, kwargs: dict, result: Any) -> None:
        opened = self._open.pop(id(model), None)
        if opened is None:
            return
        stack, counted = opened
        if result is not None:
            stack.close()
            return
        # A failed call does not count: the same branch's call at this step comes again.
        if counted is None:
            self._calls_at_step.pop(id(model), None)
        else:
            self._calls_at_step[id(model)] = counted
        # No result: the forward raised (torch still calls this hook). The step context forgets the step and
        # re-raises what it is given, which stays here: the forward's own exception propagates.
        failed = RuntimeError("the transformer call raised")
        try:
            stack.__exit__(RuntimeError, failed, None)
        except RuntimeError as raised:
            if raised is not failed:
                raise

    def _holds_both_branches(self, args: tuple, kwargs: dict) -> bool:
        """A call whose batch is two equal halves while the pipeline runs CFG (ZImagePipeline's layout)."""
        if not getattr(self.pipe, "do_classifier_free_guidance", False):
            return False
        latents = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
        if isinstance(latents, torch.Tensor):
            latents = list(latents.unbind(0))
        if not isinstance(latents, list | tuple) or len(latents) < 2 or len(latents) % 2:
            return False
        half = len(latents) // 2
        return all(
            isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
            for a, b in zip(latents[:half], latents[half:], strict=True)
        )


# ---- coefficients ---------------------------------------------------------------------------------


def pipeline_repository(pipe: Any) -> str | None:
    """The Hub repository a pipeline was loaded from (`_name_or_path`, or the one a cache folder names)."""
    name = (getattr(pipe, "config", None) or {}).get("_name_or_path")
    if not isinstance(name, str) or not name:
        return None
    cached = _CACHED_REPO.search(name)
    return f"{cached.group(1)}/{cached.group(2)}" if cached else name


def zoo_entry_for(repository: str | None) -> Any:
    """The zoo entry whose weights come from the Hub repository `repository`, None when the zoo has none."""
    if repository is None:
        return None
    from ..weights.manifest import load_manifest
    from ..zoo import list_zoo, load_zoo_entry

    manifests = {name for name, entry in load_manifest().items() if entry.repo == repository}
    entries = (load_zoo_entry(name) for name in list_zoo()) if manifests else ()
    return next((entry for entry in entries if entry.manifest in manifests), None)


def family_fits(model: TeaCacheMixin) -> dict[str, tuple[float, ...]]:
    """The family's fit per indicator: the one every released checkpoint of the model's family in the zoo
    shares (FLUX.1, HunyuanVideo, Qwen-Image, Z-Image); none where they differ (Wan: one per checkpoint) or
    where a checkpoint has none (FLUX.2: [dev]'s fit is not [klein]'s)."""
    from ..families import FAMILIES
    from ..weights.manifest import load_manifest
    from ..zoo import list_zoo, load_zoo_entry

    names = {f.name for f in FAMILIES.values() if f.transformer == type(model).__name__}
    released = {name for name, entry in load_manifest().items() if entry.repo is not None}
    entries = [load_zoo_entry(name) for name in list_zoo()]
    fits = [entry.teacache_fits() for entry in entries if entry.family in names and entry.manifest in released]
    found: dict[str, set[tuple[float, ...]]] = {}
    for checkpoint in fits:
        for indicator, coefficients in checkpoint.items():
            found.setdefault(indicator, set()).add(tuple(coefficients))
    return {
        indicator: shared.pop()
        for indicator, shared in found.items()
        if len(shared) == 1 and all(indicator in checkpoint for checkpoint in fits)
    }


# ---- the public surface ---------------------------------------------------------------------------


def apply_teacache(pipe: Any, params: TeaCacheParams) -> Any:
    """Run TeaCache inside a diffusers pipeline; returns the pipeline.

    Each transformer of the pipeline is replaced by the native class sharing its tensors, and every call
    of the pipeline runs one generation with TeaCache on for its step count (see the module docstring).
    `params.coefficients=None` takes the zoo's fit for the checkpoint when the pipeline was loaded from a
    repository the zoo knows, else the model family's (see `family_fits`). Applying again replaces the
    parameters.
    """
    if not isinstance(params, TeaCacheParams):
        raise TypeError(f"params must be a TeaCacheParams, got {type(params).__name__}")
    present = {name: getattr(pipe, name, None) for name in TRANSFORMER_COMPONENTS}
    present = {name: module for name, module in present.items() if isinstance(module, torch.nn.Module)}
    if not present or not hasattr(pipe, "scheduler"):
        raise TypeError(
            f"apply_teacache takes a diffusers pipeline with a scheduler and a transformer, got {type(pipe).__name__}"
        )
    previous = _driver_of(pipe)
    originals = dict(previous.originals) if previous is not None else {}
    natives: dict[str, ConfiguredModel] = {}
    for name, module in present.items():
        if isinstance(module, TeaCacheMixin):
            natives[name] = module
        else:
            natives[name] = native_from_diffusers(module)
            originals[name] = module
    entry = zoo_entry_for(pipeline_repository(pipe))
    if entry is not None:
        entry.install_teacache_fits(natives, stacklevel=3)
    for name, native in natives.items():
        if entry is None and (name in originals or not native.teacache_fits):
            native.set_teacache_fits(family_fits(native))
        native.teacache_schedule(params)  # refused here, before the pipeline changes
    if previous is not None:
        previous.detach()
    driver = PipelineTeaCache(pipe, natives, params)
    driver.originals = originals
    for name, native in natives.items():
        setattr(pipe, name, native)
    driver.attach()
    return pipe


def remove_teacache(pipe: Any) -> Any:
    """Undo `apply_teacache`: the diffusers transformers return (on the device the pipeline moved to)."""
    driver = _driver_of(pipe)
    if driver is None:
        raise ValueError(f"TeaCache is not applied to this {type(pipe).__name__}")
    driver.detach()
    for name, original in driver.originals.items():
        native = driver.models[name]
        device = next(native.parameters()).device
        setattr(pipe, name, original.to(device))
    return pipe


def pipeline_teacache_stats(pipe: Any) -> dict[str, TeaCacheStats]:
    """The latest generation's TeaCache record per transformer component ("transformer", "transformer_2")."""
    driver = _driver_of(pipe)
    if driver is None:
        raise ValueError(f"TeaCache is not applied to this {type(pipe).__name__}")
    return {name: model.teacache_stats() for name, model in driver.models.items()}


def _driver_of(pipe: Any) -> PipelineTeaCache | None:
    for name in TRANSFORMER_COMPONENTS:
        model = getattr(pipe, name, None)
        source = model.step_source if isinstance(model, TeaCacheMixin) else None
        if isinstance(source, PipelineTeaCache) and source._pipe() is pipe:
            return source
    return None
