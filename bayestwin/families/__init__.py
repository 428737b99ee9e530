"""Model families: small objects that build one PyMC model each."""

from bayestwin.families.base import Design, Prior
from bayestwin.families.joint import Joint
from bayestwin.families.pk import Pk
from bayestwin.families.progression import Progression
from bayestwin.families.survival import Survival

FAMILIES = {"progression": Progression, "pk": Pk, "survival": Survival, "joint": Joint}


def get_family(name_or_family="progression", **kwargs):
    """A family instance from its name (or pass an instance through)."""
    if not isinstance(name_or_family, str):
        return name_or_family
    try:
        return FAMILIES[name_or_family](**kwargs)
    except KeyError:
        raise ValueError(f"unknown family {name_or_family!r}; known: {sorted(FAMILIES)}") from None


__all__ = ["Design", "FAMILIES", "Joint", "Pk", "Prior", "Progression", "Survival", "get_family"]
