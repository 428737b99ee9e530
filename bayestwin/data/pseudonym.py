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
