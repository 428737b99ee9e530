"""What every model family shares: prior specs and the design container."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pymc as pm


@dataclass(frozen=True)
class Prior:
    """A named PyMC distribution with its parameters, serialisable to a model card.

    Examples
    --------
    >>> Prior("HalfNormal", sigma=10.0)
    Prior('HalfNormal', sigma=10.0)
    """

    dist: str
    params: dict = field(default_factory=dict)

    def __init__(self, dist: str, **params):
        cls = getattr(pm, dist, None) if isinstance(dist, str) else None
        if not (isinstance(cls, type) and issubclass(cls, pm.Distribution)):
            raise ValueError(f"unknown PyMC distribution {dist!r}")
        # PyMC swallows unknown keywords (HalfNormal(sigm=50) would silently be HalfNormal(1)):
        # every keyword must be a parameter of the distribution itself.
        sig = inspect.signature(cls.dist)
        known = [n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        unknown = [k for k in params if k not in known]
        if unknown:
            raise ValueError(f"{dist} has no parameter {unknown[0]!r}; its parameters: {known}")
        for k, v in params.items():
            x = np.asarray(v)
            if x.dtype == object or not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
                raise ValueError(f"{dist} parameter {k}={v!r} is not a finite number (or array of them)")
        object.__setattr__(self, "dist", dist)
        object.__setattr__(self, "params", params)

    def create(self, name: str, **kwargs):
        """Create the random variable ``name`` in the current model."""
        return getattr(pm, self.dist)(name, **self.params, **kwargs)

    def unnamed(self, **kwargs):
        """An unregistered distribution (``.dist``), e.g. for LKJ ``sd_dist``."""
        return getattr(pm, self.dist).dist(**self.params, **kwargs)

    def to_dict(self) -> dict:
        return {"dist": self.dist, **{k: np.asarray(v).tolist() for k, v in self.params.items()}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"Prior({self.dist!r}{', ' if args else ''}{args})"


def check_prior_names(priors: Mapping, known, family: str) -> None:
    """Refuse prior overrides whose name the family does not have (a typo would be ignored)."""
    unknown = set(priors) - set(known)
    if unknown:
        raise ValueError(f"unknown prior name(s) {sorted(unknown)} for family {family!r}; known: {sorted(known)}")


@dataclass
class Design:
    """Numeric arrays a family's PyMC model is built from (one entry per ``pm.Data``)."""

    patients: list[str]
    data: dict[str, np.ndarray]

    @property
    def n_obs(self) -> int:
        return len(self.data["y_obs"])
