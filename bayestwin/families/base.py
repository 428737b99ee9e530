"""What every model family shares: prior specs and the design container."""

from __future__ import annotations

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
        if not hasattr(pm, dist):
            raise ValueError(f"unknown PyMC distribution {dist!r}")
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


@dataclass
class Design:
    """Numeric arrays a family's PyMC model is built from (one entry per ``pm.Data``)."""

    patients: list[str]
    data: dict[str, np.ndarray]

    @property
    def n_obs(self) -> int:
        return len(self.data["y_obs"])
