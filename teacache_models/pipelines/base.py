"""The shared pipeline: prompt -> text encoding -> our denoising loop -> VAE decode -> images or frames.

A family module subclasses `Pipeline` and provides the steps that differ between families: prompt
encoding, latent preparation, the timestep schedule, one transformer call, the guidance rule and
decoding. The loop itself lives here, once: it tells the transformer which step and CFG branch each
call computes (`with transformer.teacache_step(step, is_cfg_negative=...)`), calls the positive and the
negative branch separately, and switches TeaCache on and off around the generation.

Text encoders, tokenizers, VAE and scheduler come from diffusers and transformers (the `pipelines`
extra); they are imported lazily, so importing this package does not import diffusers.
"""

from __future__ import annotations

import dataclasses
import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..cache import TeaCacheStats
from ..cache.state import BranchStats
from ..checks import require_int
from ..layers.linear import set_linear_kernel
from ..models.base import compute_dtype
from ..params import OPTIONAL_SAMPLING_FIELDS, SamplingParams
from ..zoo import check_sampling_overrides
from .lora import PipelineLoraMixin
from .result import Conditioning, PipelineResult, check_finite_latents, merge_stats
from .shared import refuse_unknown_inputs

if TYPE_CHECKING:
    from ..distributed import ParallelState

__all__ = ["Conditioning", "Pipeline", "PipelineResult", "ProgressCallback"]

ProgressCallback = Callable[[int, int], None]
"""Called after every denoising step with (steps done, total steps)."""

_MAX_SEED = 2**63 - 1
# Latent tokens per sample (height / size multiple x width / size multiple x latent frames): 8x HunyuanVideo's
# 720p 129-frame grid, the largest of the released settings; a larger grid is a typo, not a generation.
MAX_TOKENS = 2**20
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}

# diffusers' call keywords that our pipelines take in another form: what to use instead.
_ELSEWHERE = {
    "generator": "the noise is drawn from SamplingParams(seed=...)",
    "max_sequence_length": "set pipe.max_sequence_length before the call",
    "callback_on_step_end": "progress=<callable(steps done, total)> is called after every step",
    "true_cfg_scale": "SamplingParams(true_cfg_scale=...) where the family reads it (Flux, HunyuanVideo); Qwen-Image's "
    "pipelines take their CFG scale as SamplingParams(guidance_scale=...)",
}


class Pipeline(PipelineLoraMixin):
    """Base class of the family pipelines. Components are passed directly (diffusers-style) or loaded
    with `from_pretrained` / `teacache_models.pipelines.load_pipeline`.

    Class attributes a family sets:

    - `family`: the zoo family name; `diffusers_class_name`: the diffusers pipeline of the same
      checkpoint layout (its `model_index.json` `_class_name`), whose `encode_prompt` we reuse.
    - `transformer_class`: our native transformer; `text_component_names`: the text encoders and
      tokenizers the family needs.
    - `sampling_extras`: the optional `SamplingParams` fields the family reads; any other set field is
      an error, so a setting is never silently ignored.
    - `default_negative_prompt`: the negative prompt used when `SamplingParams.negative_prompt` is None.
    - `cfg_rule`: when the negative branch runs, in words (for the errors about settings it would ignore).
    - `call_inputs`: the keywords a call takes besides `image=` (a layered model's `layers=`).
    - `max_images`: how many input images `image=` may hold (a list of several where above 1), for a
      pipeline whose `takes_image()` is not "no".
    - `rounds_size`: a call rounds a height or width off the size multiple down to it with a warning, as the
      family's diffusers pipeline does (`fit_params`); otherwise such a size is refused.
    - `reads_max_sequence_length`: whether the prompt encoding reads `max_sequence_length` (a changed value is
      refused where it does not).
    - `per_sample_timesteps`: `predict` takes one timestep per sample and one transformer runs every step,
      so requests at different steps can share a batch (`teacache_models.server.batching`).
    - `captions_blank_prompts`: a blank prompt is filled in from the input image (`complete_prompts`) rather
      than encoded as it is.
    - `broadcasts_negative`: the negative prompt is encoded once for a batch of prompts and the transformer
      broadcasts it over the batch, as the family's diffusers pipeline does (Flux and HunyuanVideo's true CFG).
    - `batches_cfg`: with the cache off, a step with CFG computes both branches in one transformer call
      (`predict_both`, declared with `teacache_step(step, batched_cfg=True)`), as the family's diffusers pipeline
      does (Z-Image); with the cache on each branch is its own call, as its own TeaCache state needs.
    """

    family: ClassVar[str]
    diffusers_class_name: ClassVar[str]
    transformer_class: ClassVar[type]
    text_component_names: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")
    sampling_extras: ClassVar[frozenset[str]] = frozenset()
    default_negative_prompt: ClassVar[str | None] = None
    cfg_rule: ClassVar[str] = "CFG runs when guidance_scale > 1"
    is_video: ClassVar[bool] = False
    max_images: ClassVar[int] = 1
    call_inputs: ClassVar[tuple[str, ...]] = ()
    per_sample_timesteps: ClassVar[bool] = False
    captions_blank_prompts: ClassVar[bool] = False
    broadcasts_negative: ClassVar[bool] = False
    batches_cfg: ClassVar[bool] = False
    # Text encoding reads at most this many tokens (the diffusers pipeline's default).
    max_sequence_length: int = 512
    # The largest `max_sequence_length` the family's reference pipeline accepts; None: no cap.
    max_sequence_length_limit: ClassVar[int | None] = None
    # Whether the prompt encoding reads `max_sequence_length`: False where the reference pipeline has no such
    # argument (its encoders' lengths are fixed), so a changed value would be silently ignored.
    reads_max_sequence_length: ClassVar[bool] = True
    # Whether a call rounds a height or width off `size_multiple()` down to it, with a warning, as the family's
    # diffusers pipeline does (False: refused, as diffusers refuses it).
    rounds_size: ClassVar[bool] = False

    def __init__(
        self,
        transformer: torch.nn.Module,
        scheduler: Any,
        vae: torch.nn.Module | None,
        zoo_entry: Any = None,
        **text_components: Any,
    ) -> None:
        if not isinstance(transformer, self.transformer_class):
            raise TypeError(
                f"transformer must be a {self.transformer_class.__name__} (teacache_models.models), "
                f"got {type(transformer).__name__}"
            )
        if scheduler is None or not hasattr(scheduler, "step"):
            raise TypeError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}")
        unknown = sorted(set(text_components) - set(self.text_component_names))
        missing = sorted(set(self.text_component_names) - set(text_components))
        if unknown or missing:
            raise TypeError(
                f"{type(self).__name__} takes text components {list(self.text_component_names)}; "
                f"missing {missing}, unexpected {unknown}"
            )
        self.transformer = transformer
        self.scheduler = scheduler
        self.vae = vae
        self.zoo_entry = zoo_entry
        self._install_teacache_fits({"transformer": transformer})
        self.text_components = dict(text_components)
        self._text_helper: Any = None
        self.parallel: ParallelState | None = None

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: Any,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        zoo_entry: Any = None,
    ) -> Pipeline:
        """Load every component from a diffusers-layout folder (`model_index.json` and subfolders)."""
        from .loading import load_components

        components = load_components(path, cls, torch_dtype=torch_dtype, device=device)
        return cls(**components, **cls.folder_settings(Path(path)), zoo_entry=zoo_entry)

    @classmethod
    def folder_settings(cls, path: Path) -> dict[str, Any]:
        """Constructor arguments a family reads from the folder besides its components (none by default)."""
        return {}

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype, which its inputs are cast to (modules kept in float32 aside)."""
        return compute_dtype(self.transformer)

    def default_sampling_params(
        self, teacache: str = "default", target_speedup: float | None = None, **overrides: Any
    ) -> SamplingParams:
        """The zoo entry's sampling defaults (generic `SamplingParams` ones without an entry), TeaCache off
        when the model has no preset; `target_speedup` picks the threshold from the entry's threshold table."""
        check_sampling_overrides(overrides)
        if self.zoo_entry is not None:
            return self.zoo_entry.sampling_params(teacache, target_speedup=target_speedup, **overrides)
        if target_speedup is not None:
            raise ValueError("this pipeline has no zoo entry, so no threshold table to meet target_speedup from")
        if teacache not in ("off", "default"):
            raise ValueError(f"this pipeline has no zoo entry, so no TeaCache preset {teacache!r}; use 'off'")
        return SamplingParams(teacache_params=None, **overrides)

    def enable_parallel(self, state: ParallelState | None) -> None:
        """Generate on the ranks of `state` (from `teacache_models.distributed.init_parallel`), None: alone.

        With CFG parallelism each rank of a CFG pair computes one branch and the two predictions are
        exchanged every step; with sequence parallelism every transformer splits its tokens over the
        sequence-parallel group and shares its TeaCache decisions with it. Every rank ends with the same
        latents and the same result.
        """
        for model in self.teacache_models().values():
            if state is not None:
                state.enable_sequence_parallel(model)
            elif getattr(model, "sequence_parallel", None) is not None:
                model.disable_sequence_parallel()
        self.parallel = state

    # ---- the family's pieces --------------------------------------------------------------------

    def text_helper(self) -> Any:
        """The diffusers pipeline of this family built from the text components only: its `encode_prompt`
        is the reference prompt encoding, reused as is."""
        if self._text_helper is None:
            import diffusers

            helper_class = getattr(diffusers, self.diffusers_class_name)
            self._text_helper = helper_class(transformer=None, vae=None, scheduler=None, **self.text_components)
        return self._text_helper

    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along height and width."""
        raise NotImplementedError

    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor times the transformer's patch size)."""
        raise NotImplementedError

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Conditioning:
        raise NotImplementedError

    def uses_cfg(self, params: SamplingParams) -> bool:
        """Whether a negative branch runs at all in this generation."""
        raise NotImplementedError

    def prepare_latents(
        self, batch: int, params: SamplingParams, generator: torch.Generator, **inputs: Any
    ) -> torch.Tensor:
        raise NotImplementedError

    def make_timesteps(self, scheduler: Any, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        raise NotImplementedError

    def predict(
        self, transformer: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, condition: Conditioning
    ) -> torch.Tensor:
        """One transformer call (the caller has opened the step's `teacache_step` context)."""
        raise NotImplementedError

    def predict_both(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        t: torch.Tensor,
        condition: Conditioning,
        negative: Conditioning,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both CFG branches' predictions from one transformer call (a family with `batches_cfg`)."""
        raise NotImplementedError

    @staticmethod
    def call_transformer(
        transformer: torch.nn.Module,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        condition: Conditioning,
        **extra,
    ) -> torch.Tensor:
        """The prediction of one transformer call on the step's conditioning tensors (and `extra` keywords)."""
        return transformer(
            hidden_states=hidden_states, timestep=timestep, return_dict=False, **extra, **condition.tensors
        )[0]

    def cfg_at_step(self, step: int, t: torch.Tensor, params: SamplingParams) -> bool:
        """Whether the negative branch runs at this step (Z-Image's CFG truncation turns it off late)."""
        return True

    def guide(
        self, positive: torch.Tensor, negative: torch.Tensor | None, step: int, t: torch.Tensor, params: SamplingParams
    ) -> torch.Tensor:
        """The family's guidance rule; `negative` is None when CFG is off at this step.

        The default is classifier-free guidance, negative + scale * (positive - negative), with the
        family's `cfg_scale`.
        """
        if negative is None:
            return positive
        return negative + self.cfg_scale(t, params) * (positive - negative)

    def cfg_scale(self, t: torch.Tensor, params: SamplingParams) -> float:
        """The CFG scale at timestep `t` (default: `guidance_scale`)."""
        return params.guidance_scale

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Latents -> pixels in [0, 1], (B, 3, H, W) or (B, F, 3, H, W)."""
        raise NotImplementedError

    def transformer_for_step(self, t: torch.Tensor) -> torch.nn.Module:
        """The transformer computing timestep `t` (one, except for two-expert models)."""
        return self.transformer

    def _install_teacache_fits(self, models: dict[str, torch.nn.Module]) -> None:
        """The zoo entry's fits go to the transformers (`set_teacache_fits`): what `TeaCacheParams` without
        coefficients uses. A fit borrowed from another checkpoint is announced once, with a UserWarning."""
        if self.zoo_entry is not None:
            self.zoo_entry.install_teacache_fits(models, stacklevel=4)

    def teacache_models(self) -> dict[str, torch.nn.Module]:
        """Every transformer whose cache a generation switches on, by component name."""
        return {"transformer": self.transformer}

    def set_linear_kernel(self, kernel: str) -> None:
        """Run the linear layers of every transformer on `kernel`: "aten" (default) or "onednn" (float32
        CPU inference through oneDNN, equal to float32 rounding; see `teacache_models.layers.linear`)."""
        for transformer in self.teacache_models().values():
            set_linear_kernel(transformer, kernel)

    def make_scheduler(self, params: SamplingParams) -> Any:
        """A fresh scheduler per generation, so no state leaks between calls; `flow_shift` overrides the
        scheduler's shift."""
        # UniPC (Wan's checkpoints) names the shift `flow_shift`; flow-matching Euler names it `shift`.
        key = "flow_shift" if "flow_shift" in self.scheduler.config else "shift"
        overrides = {key: params.flow_shift} if params.flow_shift is not None else {}
        return type(self.scheduler).from_config(self.scheduler.config, **overrides)

    # ---- checks ---------------------------------------------------------------------------------

    def check_params(self, params: SamplingParams) -> None:
        unsupported = sorted(set(params.extras()) - self.sampling_extras)
        if unsupported:
            raise ValueError(
                f"{type(self).__name__} does not use sampling settings {unsupported}; it reads "
                f"{sorted(self.sampling_extras) or 'none'} of {list(OPTIONAL_SAMPLING_FIELDS)}"
            )
        multiple = self.size_multiple()
        for name in ("height", "width"):
            value = getattr(params, name)
            if value % multiple:
                raise ValueError(
                    f"{name} must be a multiple of {multiple} for this model (VAE factor x patch size), "
                    f"got {value}; try {max(multiple, value // multiple * multiple)}"
                )
        if not self.is_video and params.num_frames != 1:
            raise ValueError(f"num_frames must be 1 for an image model, got {params.num_frames}")
        self._check_token_count(params, multiple)
        # A flow-matching schedule stretched to end at `shift_terminal` (Qwen-Image's) divides 0 by 0 when its
        # only sigma is 1: one step would denoise with a NaN sigma and return a NaN image.
        terminal = (getattr(self.scheduler, "config", None) or {}).get("shift_terminal")
        if terminal and params.num_inference_steps < 2:
            raise ValueError(
                f"num_inference_steps must be >= 2 with this scheduler (its shift_terminal={terminal} stretches "
                f"the schedule to end there, which one step cannot), got {params.num_inference_steps}"
            )
        # A settable attribute, not a SamplingParams field: checked here so that a bad value fails before the
        # text encoder, not inside it.
        length = require_int("max_sequence_length", self.max_sequence_length, 1)
        default = type(self).max_sequence_length
        if not self.reads_max_sequence_length and length != default:
            raise ValueError(
                f"max_sequence_length={length} has no effect on {type(self).__name__}: its prompt encoding (as "
                f"diffusers' {self.diffusers_class_name}, which takes no max_sequence_length) uses fixed lengths; "
                f"leave it at {default}"
            )
        limit = self.max_sequence_length_limit
        if limit is not None and length > limit:
            raise ValueError(f"max_sequence_length must be at most {limit} for {type(self).__name__}, got {length}")
        self._check_settings_take_effect(params)

    def _check_token_count(self, params: SamplingParams, multiple: int) -> None:
        """A size whose latent grid no transformer call could hold is refused before any tensor is allocated
        (it would otherwise end the process for lack of memory)."""
        frames = params.num_frames
        temporal = getattr(self, "temporal_scale_factor", None)
        if self.is_video and callable(temporal):
            frames = (frames - 1) // temporal() + 1
        tokens = (params.height // multiple) * (params.width // multiple) * frames
        if tokens > MAX_TOKENS:
            raise ValueError(
                f"height={params.height}, width={params.width}, num_frames={params.num_frames} make {tokens:,} "
                f"latent tokens per sample; at most {MAX_TOKENS:,} are allowed (the largest released settings use "
                "about 120,000): lower the size or the frame count"
            )

    def _check_settings_take_effect(self, params: SamplingParams) -> None:
        """An optional setting (one that is None unless given: a negative prompt, a true CFG scale) set to other
        than the model's default (the zoo entry's) that this generation would not read is an error. One left at
        the entry's default is not (a zoo entry's negative prompt with CFG turned off by the caller's guidance
        scale), nor a setting that always has a value (`guidance_scale`): whether the caller chose it is
        unknowable here; the CLI and the server refuse those when given explicitly."""
        defaults = self.zoo_entry.sampling if self.zoo_entry is not None else SamplingParams()
        for name, reason in self.ignored_settings(params).items():
            value, default = getattr(params, name), getattr(defaults, name)
            if _FIELD_DEFAULTS[name] is None and value != default:
                raise ValueError(f"{name}={value!r} has no effect: {reason}; leave it at the default {default!r}")

    def fit_params(self, params: SamplingParams) -> SamplingParams:
        """The settings a call generates with: where the family's diffusers pipeline rounds a setting it cannot
        generate at (`rounds_size`: a height or width off the size multiple, down to it), the rounded value, with a
        UserWarning naming both; anything else as given (`check_params` judges it). The CLI and the server check
        sizes before they call and refuse such sizes instead."""
        return self._rounded_size(params) if self.rounds_size else params

    def _rounded_size(self, params: SamplingParams) -> SamplingParams:
        """`params` with height and width rounded down to `size_multiple()`, with a UserWarning naming both (for the
        caller of `__call__`, whose `fit_params` calls this); as given where on it already or where a side would
        round to 0 (`check_params` refuses that)."""
        multiple = self.size_multiple()
        height, width = params.height // multiple * multiple, params.width // multiple * multiple
        if (height, width) == (params.height, params.width) or min(height, width) == 0:
            return params
        warnings.warn(
            f"height and width must be multiples of {multiple} for this model (VAE factor x patch size), got "
            f"{params.height} and {params.width}: generating {height} x {width}, each rounded down as diffusers' "
            f"{self.diffusers_class_name} does",
            UserWarning,
            stacklevel=4,
        )
        return dataclasses.replace(params, height=height, width=width)

    def ignored_settings(self, params: SamplingParams) -> dict[str, str]:
        """The set `SamplingParams` fields this generation would not read, each with the reason: a negative
        prompt while no negative branch runs, and the family's own cases."""
        ignored = {}
        if params.negative_prompt is not None and not self.uses_cfg(params):
            ignored["negative_prompt"] = f"no negative branch runs ({self.cfg_rule})"
        return ignored

    @staticmethod
    def _prompts(prompt: str | Sequence[str]) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, list | tuple) else None
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        return prompts

    # ---- the generation -------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        sampling_params: SamplingParams | None = None,
        *,
        progress: ProgressCallback | None = None,
        **inputs: Any,
    ) -> PipelineResult:
        """Generate from `prompt` with `sampling_params` (default: the zoo entry's defaults)."""
        params = self.default_sampling_params() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams or None, got {type(params).__name__}")
        prompts = self._prompts(prompt)
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be None or a callable (steps done, total), got {type(progress).__name__}")
        params = self.fit_params(params)
        self.check_params(params)
        self._refuse_diffusers_keywords(inputs)
        self.check_inputs(params, **inputs)
        seed = params.seed if params.seed is not None else random.SystemRandom().randint(0, _MAX_SEED)
        if self.parallel is not None:
            seed = self.parallel.broadcast_object(seed)  # every rank must start from the same noise
        # Noise is drawn on the CPU and moved, as diffusers does with a CPU generator: the same seed
        # gives the same image on every device.
        generator = torch.Generator("cpu").manual_seed(seed)
        timings: dict[str, float] = {}
        started = time.perf_counter()

        with torch.no_grad():
            self._sync()
            prompts = self.complete_prompts(prompts)
            condition = self.encode_prompt(prompts, params)
            negative = None
            if self.uses_cfg(params):
                negative_prompt = params.negative_prompt
                if negative_prompt is None:
                    negative_prompt = self.default_negative_prompt or ""
                # One encoding that the transformer broadcasts over the batch where the family's diffusers pipeline
                # does so (its rounding differs from a batch of copies), one copy per prompt otherwise.
                copies = 1 if self.broadcasts_negative else len(prompts)
                negative = self.encode_prompt([negative_prompt] * copies, params)
            self._sync()
            timings["text_encoding"] = time.perf_counter() - started

            mark = time.perf_counter()
            latents = self.prepare_latents(len(prompts), params, generator, **inputs)
            scheduler = self.make_scheduler(params)
            timesteps = self.make_timesteps(scheduler, latents, params)
            latents, stats, expert_stats = self._denoise(
                scheduler, latents, timesteps, condition, negative, params, progress
            )
            check_finite_latents(latents, params, self.dtype)
            self._sync()
            timings["denoising"] = time.perf_counter() - mark

            mark = time.perf_counter()
            pixels = self.decode(latents, params).float().cpu()
            self._sync()
            timings["decoding"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - started
        return PipelineResult(
            images=None if self.is_video else pixels,
            frames=pixels if self.is_video else None,
            seed=seed,
            sampling_params=params,
            timings=timings,
            teacache_stats=stats,
            prompt=prompts,
            expert_stats=expert_stats,
        )

    def _refuse_diffusers_keywords(self, inputs: dict[str, Any]) -> None:
        """A diffusers call keyword that our call takes in another form is refused with where it goes: the
        `SamplingParams` fields, the seed, the pipeline's settings. Other unknown keywords are the family's
        `check_inputs` to refuse."""
        name = type(self).__name__
        for key in sorted(inputs):
            if key in _ELSEWHERE:
                raise TypeError(f"{name} takes no {key}=...: {_ELSEWHERE[key]}")
            if key in _FIELD_DEFAULTS:
                raise TypeError(
                    f"{name} takes no {key}=...: it is a sampling setting, pass pipe(prompt, SamplingParams({key}=...))"
                )

    def complete_prompts(self, prompts: list[str]) -> list[str]:
        """The prompts the generation encodes, after `check_inputs`: as given, unless the family fills in blank
        ones (Qwen-Image-Layered captions its input image). The result records them."""
        return prompts

    def check_inputs(self, params: SamplingParams, **inputs: Any) -> None:
        """Family-specific inputs beyond the prompt (an image for I2V); none by default."""
        refuse_unknown_inputs(self, inputs, "no inputs besides the prompt, sampling_params and progress", ())

    def takes_image(self) -> str:
        """Whether `image=` is "required" (image-to-video, editing), "optional" (TI2V) or refused ("no")."""
        return "no"

    def output_size(self, image: Any) -> tuple[int, int] | None:
        """(height, width) to generate at for the input image(s) `image` when no size is asked for (an editing
        model follows its input's aspect ratio); None: the sampling parameters' size."""
        return None

    def _denoise(
        self,
        scheduler: Any,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        condition: Conditioning,
        negative: Conditioning | None,
        params: SamplingParams,
        progress: ProgressCallback | None,
    ) -> tuple[torch.Tensor, TeaCacheStats, dict[str, TeaCacheStats]]:
        num_steps = len(timesteps)
        named_models = self.teacache_models()
        models = list(named_models.values())
        cache = params.teacache_params
        # Without the cache: which transformer computed which step of each branch.
        computed = {name: {False: [], True: []} for name in named_models}
        names = {id(model): name for name, model in named_models.items()}
        cfg = self.parallel.cfg if self.parallel is not None else None
        if cfg is not None and negative is None:
            raise ValueError(
                "CFG parallelism splits the positive and the negative branch between two ranks, but this "
                "generation runs no negative branch (CFG is off for these sampling settings): run without it"
            )
        if cache is not None:
            for model in models:
                model.enable_teacache(cache, num_steps)
        try:
            for step, t in enumerate(timesteps):
                transformer = self.transformer_for_step(t)
                if cfg is not None:
                    positive, negative_prediction = self._cfg_parallel_predict(
                        cfg,
                        transformer,
                        latents,
                        t,
                        step,
                        condition,
                        negative,
                        params,
                        computed[names[id(transformer)]],
                    )
                elif cache is None and self.batches_cfg and negative is not None and self.cfg_at_step(step, t, params):
                    # Both branches in one call, the positive half first, as the family's diffusers pipeline does
                    # (with the cache on, each branch is its own call, which its own state needs).
                    with transformer.teacache_step(step, batched_cfg=True):
                        positive, negative_prediction = self.predict_both(transformer, latents, t, condition, negative)
                    computed[names[id(transformer)]][False].append(step)
                    computed[names[id(transformer)]][True].append(step)
                else:
                    with transformer.teacache_step(step, is_cfg_negative=False):
                        positive = self.predict(transformer, latents, t, condition)
                    computed[names[id(transformer)]][False].append(step)
                    negative_prediction = None
                    if negative is not None and self.cfg_at_step(step, t, params):
                        with transformer.teacache_step(step, is_cfg_negative=True):
                            negative_prediction = self.predict(transformer, latents, t, negative)
                        computed[names[id(transformer)]][True].append(step)
                prediction = self.guide(positive, negative_prediction, step, t, params)
                latents = self.step_latents(scheduler, prediction, t, latents)
                if progress is not None:
                    progress(step + 1, num_steps)
            if cache is None:
                per_model = {
                    name: TeaCacheStats(
                        num_inference_steps=num_steps,
                        positive=BranchStats(tuple(steps[False])),
                        negative=BranchStats(tuple(steps[True])),
                    )
                    for name, steps in computed.items()
                }
            else:
                per_model = {name: model.teacache_stats() for name, model in named_models.items()}
            if cfg is not None:
                # Each rank recorded its own branch: the positive rank's positive, the negative rank's negative.
                positive_side, negative_side = cfg.gather_objects(per_model)
                per_model = {
                    name: dataclasses.replace(stats, negative=negative_side[name].negative)
                    for name, stats in positive_side.items()
                }
            stats = merge_stats(list(per_model.values()))
        finally:
            if cache is not None:
                for model in models:
                    model.disable_teacache()
        return latents, stats, per_model if len(per_model) > 1 else {}

    def _cfg_parallel_predict(
        self,
        cfg: Any,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        t: torch.Tensor,
        step: int,
        condition: Conditioning,
        negative: Conditioning,
        params: SamplingParams,
        computed: dict[bool, list[int]],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step of a CFG pair: this rank's branch, then both predictions by one exchange."""
        if not self.cfg_at_step(step, t, params):
            # No negative branch at this step: the positive rank computes and sends its prediction.
            positive = None
            if not cfg.is_cfg_negative:
                with transformer.teacache_step(step, is_cfg_negative=False):
                    positive = self.predict(transformer, latents, t, condition)
                computed[False].append(step)
            return cfg.share_positive(positive, latents.device), None
        mine = cfg.is_cfg_negative
        with transformer.teacache_step(step, is_cfg_negative=mine):
            prediction = self.predict(transformer, latents, t, cfg.select(condition, negative))
        computed[mine].append(step)
        return cfg.combine(prediction)

    def step_latents(self, scheduler: Any, prediction: torch.Tensor, t: torch.Tensor, latents: torch.Tensor):
        return scheduler.step(prediction, t, latents, return_dict=False)[0]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
