"""TOML files checked against a declared schema: model specs (``spec.toml``) and trial files.

A typo in a key (``covariate =``, ``patiens =``) must not leave a run on its defaults: every
table's keys are checked against the schema, unknown keys are an error that lists the valid
ones, and every value's type is checked. Schemas are plain dicts: key -> a type (or a tuple of
types), or a nested dict for a sub-table; ``ANY_TABLE`` accepts a table of any keys (checked
elsewhere, e.g. a family's options against its constructor).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from bayestwin.errors import SpecError

ANY_TABLE = dict  # a table whose keys are checked by its consumer


def read_toml(path) -> dict:
    """The parsed TOML file at ``path``; :class:`SpecError` for a missing, unreadable or invalid file."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as err:
        raise SpecError(f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        return tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path}: not valid TOML: {err}") from None


def check(table: dict, schema: dict, where: str) -> None:
    """Raise :class:`SpecError` naming ``where`` and the key for an unknown key or a wrong type."""
    if not isinstance(table, dict):
        raise SpecError(f"{where} must be a table, not {type(table).__name__}")
    for key, value in table.items():
        if key not in schema:
            raise SpecError(f"{where}: unknown key {key!r}; valid keys: {sorted(schema)}")
        want = schema[key]
        if isinstance(want, dict):
            check(value, want, f"{where} [{key}]")
            continue
        types = want if isinstance(want, tuple) else (want,)
        if float in types and int not in types:
            types = (*types, int)
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            names = " or ".join(t.__name__ for t in types)
            raise SpecError(f"{where}: {key!r} must be {names}, not {type(value).__name__} {value!r}")


def require(table: dict, keys, where: str) -> None:
    """Raise :class:`SpecError` if one of ``keys`` is missing from ``table``."""
    for k in keys:
        if k not in table:
            raise SpecError(f"{where} needs {k!r}")


def check_options(options: dict, cls, where: str) -> None:
    """Check a table of constructor options against ``cls.__init__`` (keyword names only; the
    constructor checks the values)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    known = sorted(n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    for key in options:
        if key not in known:
            raise SpecError(f"{where}: unknown key {key!r}; valid keys: {known}")
