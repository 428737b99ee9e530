"""Keyed pseudonymisation of patient identifiers (HMAC-SHA256).

The key belongs to the user. It is never stored in a Cohort's repr, a Population, a Twin or any
artifact: the only way back from a pseudonym to a patient is to pseudonymise your own list of
identifiers with the same key and join (:func:`reidentify`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable

import numpy as np
import pandas as pd


class _AlreadyPseudonymised:
    """Key sentinel for tables whose ids are pseudonyms already (e.g. from :func:`read_fhir`)."""

    def __repr__(self) -> str:
        return "PSEUDONYMISED"


#: Pass as ``key`` when the patient ids are pseudonyms made with your key already (FHIR import):
#: they are kept as they are, and anything that is not a pseudonym is refused.
PSEUDONYMISED = _AlreadyPseudonymised()
_PATTERN = re.compile(r"P[0-9a-f]{12}")


def new_key() -> bytes:
    """A fresh random 32-byte key, for sessions where re-identification is never needed."""
    return secrets.token_bytes(32)


def draw_key_if_missing(key):
    """``key`` checked (bytes or str of >= 16 bytes, or PSEUDONYMISED); ``None`` draws a random key
    and says so at once: results made with it cannot be mapped back to your ids, and rows of the
    same patients read later (with another key) will not match."""
    if key is None:
        from bayestwin.errors import KeyWarning, warn

        warn(
            "no pseudonymisation key given: a random key was drawn for this table. Pass key= (e.g. "
            "bt.new_key(), kept safe) to map results back to your ids and to add rows of these patients later.",
            KeyWarning,
        )
        return new_key()
    if key is not PSEUDONYMISED:
        _as_bytes(key)
    return key


def _as_bytes(key: bytes | str) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes) or len(key) < 16:
        raise ValueError("the pseudonymisation key must be bytes or str of at least 16 bytes")
    return key


def pseudonymise(patient_id, key: bytes | str) -> str:
    """Pseudonym of one patient identifier under ``key``.

    Examples
    --------
    >>> pseudonymise("MRN-0001", b"0123456789abcdef") == pseudonymise("MRN-0001", b"0123456789abcdef")
    True
    """
    if key is PSEUDONYMISED:
        if not _PATTERN.fullmatch(str(patient_id)):
            raise ValueError("key=PSEUDONYMISED, but a patient id is not a pseudonym (P + 12 hex digits)")
        return str(patient_id)
    digest = hmac.new(_as_bytes(key), str(patient_id).encode(), hashlib.sha256).hexdigest()
    return "P" + digest[:12]


def reidentify(patient_ids: Iterable, key: bytes | str) -> pd.Series:
    """Map pseudonyms back to your own identifiers: a Series indexed by pseudonym."""
    ids = list(patient_ids)
    return pd.Series(ids, index=[pseudonymise(i, key) for i in ids], name="patient_id")


def own_ids(pseudonyms: Iterable[str], ids) -> list:
    """Your identifiers for ``pseudonyms``, from ``ids`` (a mapping pseudonym -> your id, e.g.
    ``bt.reidentify(table.patient, key)``); a pseudonym it lacks is an error, not a silent gap."""
    if not hasattr(ids, "items"):
        raise TypeError(
            f"ids must map pseudonyms to your ids (e.g. bt.reidentify(your_ids, key)), not {type(ids).__name__}"
        )
    ids = dict(ids.items())
    missing = [p for p in pseudonyms if p not in ids]
    if missing:
        raise KeyError(
            f"pseudonym {missing[0]} is not among the {len(ids)} ids given: were they pseudonymised "
            "with this key (bt.reidentify(your_ids, key))?"
        )
    return [ids[p] for p in pseudonyms]


def _kind(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, float, np.integer, np.floating)):
        return "number"
    return type(v).__name__


def check_id_types(ids: pd.Series, fail, column: str = "ID") -> None:
    """Refuse ids that collide once written as text (1 and "1" would merge two patients);
    ``fail(problem, mask, column)`` locates the first offending row."""
    if ids.dtype != object:  # one numeric or string dtype: no mixture possible
        return
    text = ids.map(lambda v: str(v)).to_numpy()
    kinds = ids.map(_kind).to_numpy()
    df = pd.DataFrame({"text": text, "kind": kinds})
    mixed = df.groupby("text")["kind"].transform("nunique").to_numpy() > 1
    fail("this id is written both as a number and as text (e.g. 1 and '1'): they would merge", mixed, column)
