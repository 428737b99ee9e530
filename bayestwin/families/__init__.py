"""Model families: small objects that build one PyMC model each (the contract: :mod:`.base`)."""

from bayestwin.families.base import (
    FAMILIES,
    Axis,
    Design,
    Family,
    FamilyBase,
    FamilyError,
    Prior,
    from_config,
    register_family,
)
from bayestwin.families.formula import Formula
from bayestwin.families.joint import Joint
from bayestwin.families.model import Model
from bayestwin.families.pk import Pk
from bayestwin.families.pk_ode import Ode, OdeModel
from bayestwin.families.progression import Progression
from bayestwin.families.survival import Survival


def get_family(name_or_family="progression", **kwargs):
    """A family instance from its registered name (or pass an instance through, checked)."""
    if not isinstance(name_or_family, str):
        if not isinstance(name_or_family, Family):
            need = ("name", "inputs", "design", "build_model", "observe")
            missing = [n for n in need if not hasattr(name_or_family, n)]
            raise FamilyError(
                f"{type(name_or_family).__name__} is not a model family (lacks {missing}); "
                "see bayestwin.families.base.Family, or wrap a PyMC model builder in bt.Model"
            )
        return name_or_family
    try:
        return FAMILIES[name_or_family](**kwargs)
    except KeyError:
        raise ValueError(f"unknown family {name_or_family!r}; known: {sorted(FAMILIES)}") from None


__all__ = [
    "Axis",
    "Design",
    "FAMILIES",
    "Family",
    "FamilyBase",
    "FamilyError",
    "Formula",
    "Joint",
    "Model",
    "Ode",
    "OdeModel",
    "Pk",
    "Prior",
    "Progression",
    "Survival",
    "from_config",
    "get_family",
    "register_family",
]
