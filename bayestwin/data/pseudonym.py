"""Keyed pseudonymisation of patient identifiers (HMAC-SHA256).

The key belongs to the user. It is never stored in a Cohort's repr, a Population, a Twin or any
artifact: the only way back from a pseudonym to a patient is to pseudonymise your own list of
identifiers with the same key and join (:func:`reidentify`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

import pandas as pd


def new_key() -> bytes:
    """A fresh random 32-byte key, for sessions where re-identification is never needed."""
    return secrets.token_bytes(32)


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
    digest = hmac.new(_as_bytes(key), str(patient_id).encode(), hashlib.sha256).hexdigest()
    return "P" + digest[:12]


def reidentify(patient_ids: Iterable, key: bytes | str) -> pd.Series:
    """Map pseudonyms back to your own identifiers: a Series indexed by pseudonym."""
    ids = list(patient_ids)
    return pd.Series(ids, index=[pseudonymise(i, key) for i in ids], name="patient_id")
