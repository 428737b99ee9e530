"""Covariate models of pharmacometrics: how a subject's covariates move a typical parameter value.

Each effect multiplies a parameter's typical value (it adds to its log), with the reference
subject (every numeric covariate at ``ref``, every categorical at its first level) at the typical
value itself:

==============================  ===========================  ======================================
effect                          log-scale term               written in NONMEM
==============================  ===========================  ======================================
``Power("WT", ref=70, 0.75)``   0.75 log(WT / 70)            ``TVCL = THETA(1) * (WT/70)**0.75``
``Power("WT", ref=70)``         θ log(WT / 70), θ estimated  ``(WT/70)**THETA(4)``
``Linear("CRCL", ref=100)``     log(1 + θ (CRCL - 100))      ``(1 + THETA(5)*(CRCL-100))``
``Exponential("AGE", ref=40)``  θ (AGE - 40)                 ``EXP(THETA(6)*(AGE-40))``
``Categorical("CYP2D6")``       θ_level (0 for the first)    ``THETA(7)**PM`` etc., one per level
==============================  ===========================  ======================================

Coefficients are named ``cov_<parameter>_<COLUMN>`` in the model (a ``Categorical`` one has a dim
``<COLUMN>_level`` over the non-reference levels), and take prior overrides under those names.
An estimated power exponent is centred on allometric theory (0.75 for clearances, 1 for volumes,
0 otherwise; SD 0.5); linear and exponential slopes on a change of one SD of the covariate moving
the parameter by about ±40% (log-scale SD 0.35 per covariate SD); categorical effects N(0, 1)
on the log scale. Mappings in, mappings out (:func:`effect_from_dict`), so a family's card
round-trips.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

#: Allometric theory for an estimated power exponent's prior mean (by parameter).
ALLOMETRY = {"cl": 0.75, "q": 0.75, "v": 1.0, "v1": 1.0, "v2": 1.0}


def _check(column, ref=None):
    if not isinstance(column, str) or not column:
        raise TypeError(f"a covariate effect needs a column name, not {column!r}")
    if ref is not None and not (isinstance(ref, (int, float)) and np.isfinite(ref)):
        raise ValueError(f"ref must be a finite number, not {ref!r}")


@dataclass(frozen=True)
class Power:
    """(x / ref) ** exponent; ``exponent=None`` estimates it. ``x`` must be positive."""

    column: str
    ref: float
    exponent: float | None = None

    def __post_init__(self):
        _check(self.column, self.ref)
        if self.ref <= 0:
            raise ValueError(f"Power({self.column!r}) needs ref > 0, not {self.ref!r}")
        if self.exponent is not None and not (isinstance(self.exponent, (int, float)) and np.isfinite(self.exponent)):
            raise ValueError(f"exponent must be a finite number or None (estimated), not {self.exponent!r}")

    kind = "power"


@dataclass(frozen=True)
class Linear:
    """1 + slope (x - ref), slope estimated (kept above 1e-6: a parameter stays positive)."""

    column: str
    ref: float

    def __post_init__(self):
        _check(self.column, self.ref)

    kind = "linear"


@dataclass(frozen=True)
class Exponential:
    """exp(slope (x - ref)), slope estimated."""

    column: str
    ref: float

    def __post_init__(self):
        _check(self.column, self.ref)

    kind = "exponential"


@dataclass(frozen=True)
class Categorical:
    """exp(effect of the level), the first level (the reference) at 0; one effect per other level."""

    column: str

    def __post_init__(self):
        _check(self.column)

    kind = "categorical"


EFFECTS = {cls.kind: cls for cls in (Power, Linear, Exponential, Categorical)}
Effect = Power | Linear | Exponential | Categorical


def effect_to_dict(effect: Effect) -> dict:
    return {"kind": effect.kind, **asdict(effect)}


def effect_from_dict(d: Mapping | Effect) -> Effect:
    """An effect from :func:`effect_to_dict`'s mapping (an effect is returned as it is)."""
    if isinstance(d, tuple(EFFECTS.values())):
        return d
    if not isinstance(d, Mapping) or d.get("kind") not in EFFECTS:
        raise TypeError(
            f"a covariate effect is bt.Power, bt.Linear, bt.Exponential or bt.Categorical (or its card's mapping), "
            f"not {d!r}"
        )
    fields = {k: v for k, v in d.items() if k != "kind"}
    return EFFECTS[d["kind"]](**fields)


def coefficient_name(parameter: str, effect: Effect) -> str:
    return f"cov_{parameter}_{effect.column}"


def log_effect(xp, effect: Effect, x, coef):
    """The effect's term on the log scale of the parameter, for values ``x`` (raw numbers, or for a
    ``Categorical`` the one-hot columns of its non-reference levels, last axis) and coefficient
    ``coef`` (a number, or one per non-reference level)."""
    if effect.kind == "power":
        return coef * xp.log(x / effect.ref)
    if effect.kind == "exponential":
        return coef * (x - effect.ref)
    if effect.kind == "linear":
        return xp.log(xp.maximum(1.0 + coef * (x - effect.ref), 1e-6))
    return (x * coef).sum(axis=-1)


def prior(parameter: str, effect: Effect, sd: float):
    """The default prior of an effect's coefficient (``sd``: the covariate's SD in the data)."""
    from bayestwin.families.base import Prior

    if effect.kind == "power":
        return Prior("Normal", mu=ALLOMETRY.get(parameter, 0.0), sigma=0.5)
    if effect.kind in ("linear", "exponential"):
        return Prior("Normal", mu=0.0, sigma=0.35 / (sd if sd > 0 else 1.0))
    return Prior("Normal", mu=0.0, sigma=1.0)


__all__ = ["Categorical", "Exponential", "Linear", "Power", "effect_from_dict", "effect_to_dict", "log_effect"]
