"""Data entry: validation, pseudonymisation, normalisation."""

from bayestwin.data.cohort import Cohort, Columns, Schema
from bayestwin.data.pseudonym import PSEUDONYMISED, new_key, pseudonymise, reidentify

__all__ = ["PSEUDONYMISED", "Cohort", "Columns", "Schema", "new_key", "pseudonymise", "reidentify"]
