"""What a model's TeaCache decision rests on: the indicators it offers and the fits that rescale them.

`TeaCacheScheduleMixin` holds a model's class data (`teacache_indicators`, each a `TeaCacheIndicator`) and
resolves `TeaCacheParams` against it: which indicator a generation reads, which rescaling polynomial turns
the indicator's change into an estimate of the output's, and which first and last steps are forced.
`TeaCacheMixin` inherits it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ..params import RescalingFit, TeaCacheParams
from .forecast import FORECAST

__all__ = ["TeaCacheIndicator", "TeaCacheScheduleMixin"]


@dataclass(frozen=True)
class TeaCacheIndicator:
    """An indicator a model offers, and how the steps of a schedule on it are forced.

    Attributes:
        name: the value of `TeaCacheParams.indicator` that picks it.
        ret_steps: it is the indicator `use_ret_steps=True` selects (at most one per model); the two
            fields below shape the forced steps of that mode (picked by name alone, it is forced as any).
        first_forced_steps: at least this many first steps always compute, whatever `start_skipping` says
            (Wan's ret-steps mode: 5).
        free_last_steps: an `end_skipping` up to this many forces no last step (Wan's ret-steps mode leaves
            the last step free: 1).
        before_prelude: it is read before the model's `teacache_prelude` runs, so a skipped step skips the
            prelude too (Z-Image's refiners); any other indicator is read after it, and the prelude runs at
            every step.
    """

    name: str
    ret_steps: bool = False
    first_forced_steps: int = 0
    free_last_steps: int = 0
    before_prelude: bool = False


class TeaCacheScheduleMixin:
    """The indicators a model offers (class data) and the per-instance fits; resolves a generation's
    `TeaCacheParams` into the indicator, the fit and the forced steps."""

    teacache_indicators: ClassVar[tuple[TeaCacheIndicator, ...]] = (TeaCacheIndicator("modulated_input"),)
    supported_teacache_indicators: ClassVar[tuple[str, ...]] = ("modulated_input",)
    supports_ret_steps: ClassVar[bool] = False
    _teacache_prelude_may_be_cached: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        indicators = cls.teacache_indicators
        assert indicators and sum(i.ret_steps for i in indicators) <= 1, f"{cls.__name__}.teacache_indicators"
        cls.supported_teacache_indicators = tuple(i.name for i in indicators)
        cls.supports_ret_steps = any(i.ret_steps for i in indicators)
        cls._teacache_prelude_may_be_cached = any(i.before_prelude for i in indicators)

    def teacache_weights_key(self) -> Any:
        """What the block stack's output depends on besides its inputs, e.g. the LoRA adapters and their
        weights: when it changes, the cached residuals are stale and every branch's next step computes."""
        return None

    def set_teacache_fits(self, fits: Mapping[str, Sequence[float] | RescalingFit]) -> None:
        """Give this instance its checkpoint's rescaling polynomials, {indicator name: coefficients (highest
        degree first) or a `RescalingFit` (per-branch polynomials, calibrated range)}: what
        `TeaCacheParams(coefficients=None)` uses. Replaces any earlier fits."""
        if not isinstance(fits, Mapping):
            raise TypeError(f"fits must be a mapping of indicator name to coefficients, got {type(fits).__name__}")
        checked = {}
        for name, coefficients in fits.items():
            if name not in self.supported_teacache_indicators:
                raise ValueError(
                    f"fits names indicator {name!r}, which {type(self).__name__} does not offer; "
                    f"choose among {list(self.supported_teacache_indicators)}"
                )
            checked[name] = coefficients if isinstance(coefficients, RescalingFit) else RescalingFit(coefficients)
        self.__dict__["_teacache_fits"] = checked

    @property
    def teacache_fits(self) -> dict[str, tuple[float, ...]]:
        """The instance's rescaling polynomials per indicator (empty unless a loader or the user set them); the
        positive branch's where the branches have their own (`teacache_rescaling_fits`)."""
        return {name: fit.coefficients for name, fit in self.teacache_rescaling_fits.items()}

    @property
    def teacache_rescaling_fits(self) -> dict[str, RescalingFit]:
        """The instance's fits per indicator, with each one's negative-branch polynomial and calibrated range."""
        return dict(self.__dict__.get("_teacache_fits", {}))

    @classmethod
    def teacache_indicator_for(cls, params: TeaCacheParams | None) -> TeaCacheIndicator:
        """The indicator `params` chooses (the default one for None), checked against what the model offers."""
        by_name = {i.name: i for i in cls.teacache_indicators}
        if params is None:
            return cls.teacache_indicators[0]
        if params.indicator is not None and params.indicator not in by_name:
            raise ValueError(
                f"indicator {params.indicator!r} is not offered by {cls.__name__}; choose one of {list(by_name)}"
            )
        if not params.use_ret_steps:
            return by_name[params.indicator] if params.indicator else cls.teacache_indicators[0]
        ret_steps = next((i for i in cls.teacache_indicators if i.ret_steps), None)
        if ret_steps is None:
            raise ValueError(
                f"use_ret_steps=True is not available for {cls.__name__}: it has no alternative "
                "indicator; use use_ret_steps=False"
            )
        if params.indicator not in (None, ret_steps.name):
            raise ValueError(
                f"use_ret_steps=True uses the {ret_steps.name!r} indicator, but indicator={params.indicator!r} "
                f"was given; leave indicator=None (or {ret_steps.name!r}) with use_ret_steps=True, or set "
                "use_ret_steps=False"
            )
        return ret_steps

    def teacache_schedule(self, params: TeaCacheParams) -> tuple[tuple[float, ...], int, int]:
        """Resolve `params` for this model: (coefficients, first forced steps, last forced steps).

        The coefficients are `params.coefficients`, else the instance's fit for the chosen indicator (the
        forecast method, which needs none, gets () without either); in the
        ret-steps mode the indicator's `first_forced_steps` and `free_last_steps` bound the forced windows.
        """
        indicator = self.teacache_indicator_for(params)
        fit = self._decision_fit(params)
        coefficients = () if fit is None else fit.coefficients
        if not params.use_ret_steps:
            return tuple(coefficients), params.start_skipping, params.end_skipping
        first_forced = max(indicator.first_forced_steps, params.start_skipping)
        last_forced = params.end_skipping if params.end_skipping > indicator.free_last_steps else 0
        return tuple(coefficients), first_forced, last_forced

    def teacache_fit_for(self, params: TeaCacheParams) -> RescalingFit:
        """The polynomial of each CFG branch and the calibrated range a generation with `params` uses:
        `params.coefficients` (and `coefficients_negative`), else the instance's fit for the chosen indicator;
        `params.calibrated_range`, else that fit's when the fit is used."""
        indicator = self.teacache_indicator_for(params).name
        if params.coefficients is not None:
            return RescalingFit(params.coefficients, params.coefficients_negative, params.calibrated_range)
        fit = self.teacache_rescaling_fits.get(indicator)
        if fit is None:
            fitted = sorted(self.teacache_fits)
            raise ValueError(
                f"{type(self).__name__} has no TeaCache coefficients for indicator {indicator!r}"
                + (f" (its fits are for {fitted})" if fitted else "")
                + ": pass TeaCacheParams(coefficients=[...]) (highest degree first), or load the model "
                "through a zoo entry with a fit for that indicator"
            )
        return replace(fit, calibrated_range=params.calibrated_range or fit.calibrated_range)

    def _decision_fit(self, params: TeaCacheParams) -> RescalingFit | None:
        """`teacache_fit_for(params)`; None for the forecast method, which needs no fit, where there is none."""
        indicator = self.teacache_indicator_for(params).name
        fitted = params.coefficients is not None or indicator in self.teacache_rescaling_fits
        return self.teacache_fit_for(params) if fitted or params.method != FORECAST else None
