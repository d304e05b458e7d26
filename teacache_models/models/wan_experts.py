"""Wan2.2 A14B: two `WanTransformer3DModel` experts, one for high noise and one for low noise.

The pipeline hands every call to `WanExpertPair`, which routes it by timestep and declares TeaCache steps
to both experts, so that each keeps its own cache per CFG branch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from numbers import Real
from typing import Any

import torch
from torch import nn

from ..cache.state import TeaCacheStats
from ..params import TeaCacheParams
from .wan import WanTransformer3DModel

__all__ = ["WanExpertPair"]

# The schedulers of the released pipelines train on this many timesteps.
_NUM_TRAIN_TIMESTEPS = 1000


class WanExpertPair(nn.Module):
    """Wan2.2 A14B: the high-noise expert `transformer` and the low-noise expert `transformer_2`.

    A call goes to `transformer` when its timestep is >= boundary_ratio * num_train_timesteps, as in the
    diffusers Wan pipelines, else to `transformer_2`. Each expert keeps its own TeaCache state per CFG
    branch, so no residual crosses the switch and the first step of the low-noise expert computes.

    Args:
        transformer: high-noise expert.
        transformer_2: low-noise expert.
        boundary_ratio: in [0, 1]: 0.875 for Wan2.2 T2V A14B, 0.9 for I2V A14B.
        num_train_timesteps: the scheduler's training timesteps.
    """

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        transformer_2: WanTransformer3DModel,
        boundary_ratio: float,
        num_train_timesteps: int = _NUM_TRAIN_TIMESTEPS,
    ) -> None:
        super().__init__()
        for name, expert in (("transformer", transformer), ("transformer_2", transformer_2)):
            if not isinstance(expert, WanTransformer3DModel):
                raise TypeError(f"{name} must be a WanTransformer3DModel, got {type(expert).__name__}")
        if transformer is transformer_2:
            raise ValueError("transformer and transformer_2 must be two models: each expert keeps its own cache")
        for key in ("patch_size", "in_channels", "out_channels", "text_dim"):
            ours, theirs = transformer.config[key], transformer_2.config[key]
            if (tuple(ours) if key == "patch_size" else ours) != (tuple(theirs) if key == "patch_size" else theirs):
                raise ValueError(f"the experts disagree on {key}: {ours!r} (transformer) vs {theirs!r} (transformer_2)")
        # diffusers runs the edge values too: 0 gives every step to `transformer`, 1 every step below t = 1000 to
        # `transformer_2`.
        if isinstance(boundary_ratio, bool) or not isinstance(boundary_ratio, Real) or not 0 <= boundary_ratio <= 1:
            raise ValueError(f"boundary_ratio must be a number in [0, 1] (0.875 T2V, 0.9 I2V), got {boundary_ratio!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_ratio = float(boundary_ratio)
        self.num_train_timesteps = num_train_timesteps

    @property
    def boundary_timestep(self) -> float:
        return self.boundary_ratio * self.num_train_timesteps

    @property
    def experts(self) -> dict[str, WanTransformer3DModel]:
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    def expert_for(self, timestep: torch.Tensor | float) -> WanTransformer3DModel:
        """The expert a call with this timestep goes to.

        A per-token timestep (B, L) counts as its largest entry (conditioning tokens hold 0); every sample
        of a batch must fall on the same side of the boundary.
        """
        if isinstance(timestep, bool) or not isinstance(timestep, torch.Tensor | Real):
            raise TypeError(f"timestep must be a tensor or a number, got {type(timestep).__name__}")
        t = torch.as_tensor(timestep)
        if t.ndim > 2 or t.numel() == 0:
            raise ValueError(f"timestep must be a scalar, (B,) or (B, L) tensor, got shape {tuple(t.shape)}")
        per_sample = t.amax(dim=1) if t.ndim == 2 else t.reshape(-1)
        # The comparison runs in the timestep's dtype, as the pipeline's `t >= boundary_timestep` does.
        high = per_sample >= self.boundary_timestep
        if bool(high.all()):
            return self.transformer
        if not bool(high.any()):
            return self.transformer_2
        raise ValueError(
            f"timestep {t.tolist()} falls on both sides of the expert boundary {self.boundary_timestep:g}: "
            "call each expert's samples separately"
        )

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run the expert of `timestep`; arguments and result as `WanTransformer3DModel.forward`."""
        return self.expert_for(timestep)(hidden_states, timestep, *args, **kwargs)

    def enable_teacache(self, params: TeaCacheParams, num_inference_steps: int) -> None:
        """Start a generation on both experts (each with its own coefficients when params has none)."""
        if isinstance(params, TeaCacheParams):
            # Both experts must accept params before either starts: a refusal leaves neither changed.
            for expert in self.experts.values():
                expert.teacache_schedule(params)
        for expert in self.experts.values():
            expert.enable_teacache(params, num_inference_steps)

    def disable_teacache(self) -> None:
        for expert in self.experts.values():
            expert.disable_teacache()

    @contextmanager
    def teacache_step(
        self, step_index: int, is_cfg_negative: bool = False, batched_cfg: bool = False
    ) -> Iterator[None]:
        """Declare the step and CFG branch of the next call; only the expert that gets it records it."""
        with ExitStack() as stack:
            for expert in self.experts.values():
                stack.enter_context(expert.teacache_step(step_index, is_cfg_negative, batched_cfg))
            yield

    def teacache_stats(self) -> dict[str, TeaCacheStats]:
        """Per expert ("transformer", "transformer_2"): the steps each computed and skipped, per branch."""
        return {name: expert.teacache_stats() for name, expert in self.experts.items()}
