"""Time-to-event tables: one row per patient and at-risk interval (counting-process format).

Each row is an interval ``(start, time]`` during which the patient was followed on ``therapy``,
ending in an event (``event = 1``) or not (``0``: censored, or the interval was split at a therapy
change). One row per patient with ``start = 0`` is the usual right-censored survival table;
``start > 0`` on a patient's first row is delayed entry (left truncation: the patient could only
be enrolled because no event happened before ``start``); several rows per patient, each ending
in an event, are recurrent events (repeated admissions), measured on the time since the origin.

The table becomes a :class:`~bayestwin.data.cohort.Cohort` whose outcome is the event indicator,
whose time is the interval's end, with the interval's start in the column ``start``: the same
pseudonymisation, schema and validation as every other family's data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bayestwin.data.cohort import PATIENT, TIME, Cohort, Columns, Schema, named_rows
from bayestwin.data.pseudonym import draw_key_if_missing, pseudonymise
from bayestwin.errors import DataError

START = "start"


def read_survival(
    data: pd.DataFrame,
    *,
    patient: str = "patient",
    time: str = "time",
    event: str = "event",
    start: str | None = None,
    therapy: str | None = "therapy",
    covariates: Sequence[str] = (),
    therapies: Sequence[str] | None = None,
    baseline: pd.DataFrame | None = None,
    key: bytes | str | None = None,
    schema: Schema | None = None,
    allow_empty: bool = False,
    categorical: Sequence[str] = (),
) -> Cohort:
    """Validate a time-to-event table (see the module docstring) into a Cohort.

    Parameters
    ----------
    time, event
        End of the at-risk interval, and 1 if it ended in an event (0: censored).
    start
        Column with the start of each interval (delayed entry, recurrent events). Default: each
        patient's first interval starts at 0 and every later one where the previous one ended.
    baseline, allow_empty
        A one-row-per-patient covariate table, which may list patients without rows (at
        diagnosis: nothing followed yet) when ``allow_empty``.

    Raises
    ------
    DataError
        Naming the patient (pseudonym), row and column: an event that is not 0/1, a negative
        start, an interval that does not end after it starts, overlapping intervals of a patient,
        and everything :class:`Cohort` checks.
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    data = named_rows(data)  # rows named by position when the index repeats a label
    key = draw_key_if_missing(key)
    for c in [event] + ([start] if start else []):
        if c not in data.columns:
            raise DataError("missing required column", column=c)

    def fail(problem, mask, column):
        mask = np.asarray(mask, bool)
        if mask.any():
            i = int(np.argmax(mask))
            pid = data[patient].iloc[i]
            who = None if pd.isna(pid) else pseudonymise(pid, key)
            raise DataError(problem, patient=who, row=data.index[i], column=column)

    ev = pd.to_numeric(data[event], errors="coerce")
    fail(f"event must be 0 or 1, got {data[event][~ev.isin([0, 1])].head(1).tolist()}", ~ev.isin([0, 1]), event)
    cohort = Cohort(
        data.assign(**{event: ev.astype(float)}),
        patient=patient,
        time=time,
        outcome=event,
        therapy=therapy,
        covariates=covariates,
        categorical=categorical,
        therapies=therapies,
        baseline=baseline,
        key=key,
        schema=schema,
        allow_empty=allow_empty,
    )
    frame = cohort.frame  # sorted by patient and time, indexed by the input rows
    stop = frame[TIME].to_numpy(float)
    ids = frame[PATIENT].to_numpy()
    first = np.r_[True, ids[1:] != ids[:-1]] if len(ids) else np.zeros(0, bool)
    previous = np.r_[0.0, stop[:-1]] if len(stop) else stop
    if start is None:
        begin = np.where(first, 0.0, previous)
    else:
        s = pd.to_numeric(data[start], errors="coerce")
        fail(f"non-numeric or missing {start}", s.isna() | ~np.isfinite(s.to_numpy(float)), start)
        fail("negative start", s.to_numpy(float) < 0, start)
        begin = s.loc[frame.index].to_numpy(float)
        overlap = (~first) & (begin < previous)
        if overlap.any():
            i = int(np.argmax(overlap))
            raise DataError(
                "interval starts before the patient's previous interval ends",
                patient=ids[i],
                row=frame.index[i],
                column=start,
            )
    empty = stop <= begin
    if empty.any():
        i = int(np.argmax(empty))
        raise DataError(
            f"interval ends at {stop[i]:g}, not after it starts ({begin[i]:g})",
            patient=ids[i],
            row=frame.index[i],
            column=time,
        )
    cohort.frame = frame.assign(**{START: begin})
    cohort.columns = Columns(patient, time, event, therapy, tuple(covariates), start)
    return cohort
