"""Exception and warning types. Errors are part of the API: they name the patient, row and column."""

from __future__ import annotations

import os
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn at the caller's own line: the first frame outside bayestwin, however deep inside the
    package the warning arises (so that Python's default filter says it once per line of *your*
    code, and the traceback shows your call, not bayestwin's internals)."""
    warnings.warn(message, category, skip_file_prefixes=(_PACKAGE,))


def require_whole(name: str, value, least: int) -> None:
    """Refuse ``value`` unless it is a whole number (not a bool, not a string) >= ``least``, by name:
    the check of every count argument (chains, draws, patients, ...)."""
    import numpy as np

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be a whole number >= {least}, not {value!r}")


class BayestwinError(Exception):
    """Base class for every error raised by bayestwin."""


class DataError(BayestwinError, ValueError):
    """Invalid input data, located by patient (pseudonym), row and column.

    Attributes
    ----------
    patient, row, column
        Where the problem is; ``None`` when it does not apply (e.g. a missing column).
    """

    def __init__(self, problem: str, *, patient=None, row=None, column=None):
        self.problem, self.patient, self.row, self.column = problem, patient, row, column
        where = []
        if patient is not None:
            where.append(f"patient {patient}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        super().__init__(problem + (f" ({', '.join(where)})" if where else ""))


class SpecError(BayestwinError, ValueError):
    """An invalid model spec or trial file: the message names the file, the table and the key."""


class ConvergenceWarning(UserWarning):
    """A fit or twin failed the convergence gate; the verdict also travels with the result."""


class OutOfPopulationWarning(UserWarning):
    """A twin's random effects lie outside the population's 99% predictive region: the population
    model may not describe this patient (data error, different disease, or a missing covariate)."""


class KeyWarning(UserWarning):
    """No pseudonymisation key was given and a random one was drawn: results cannot be mapped back
    to the original ids, and rows of the same patients read later with another key will not match."""


class DecisionWarning(UserWarning):
    """A decision function has something to say about its answer: nothing offered meets the target,
    or the recommendation sits at the edge of the options offered."""
