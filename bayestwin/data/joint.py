"""Joint tables: a longitudinal biomarker and one time-to-event outcome per patient.

One long table with a ``marker`` column (a measurement, or empty) and an ``event`` column
(empty, or on the row that ends the patient's follow-up: 1 for the event, 0 for censoring). A row
may carry both (a measurement at the last visit). Internally each measurement and the follow-up
interval become rows of one frame with a ``kind`` column (0: measurement, 1: at-risk interval
``(start, time]``), so the joint family's one likelihood runs over them and twins pad and batch
them like any other family's rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from bayestwin.data.cohort import PATIENT, THERAPY, TIME, Cohort, Columns, Schema, named_rows
from bayestwin.data.pseudonym import draw_key_if_missing, pseudonymise
from bayestwin.data.survival import START
from bayestwin.errors import DataError

KIND = "kind"


class JointCohort(Cohort):
    """A Cohort of biomarker measurements (``kind`` 0) and follow-up intervals (``kind`` 1)."""

    def extend(self, new: Cohort) -> JointCohort:
        """Add new measurements; a new follow-up row replaces the patient's previous one (the
        patient has now been followed, event-free or not, to the later time)."""
        replaced = set(new.frame.loc[new.frame[KIND] == 1, PATIENT])
        keep = self.frame[~((self.frame[KIND] == 1) & self.frame[PATIENT].isin(replaced))]
        old = (keep[KIND] == 0) & keep.set_index([PATIENT, TIME]).index.isin(
            new.frame.loc[new.frame[KIND] == 0].set_index([PATIENT, TIME]).index
        )
        if old.any():
            i = int(np.argmax(old.to_numpy()))
            raise DataError(
                "new measurement repeats an existing time for this patient",
                patient=keep[PATIENT].iloc[i],
                row=keep.index[i],
                column=self.columns.time,
            )
        unknown = sorted(set(new.patients) - set(self.patients))
        if unknown:
            raise DataError("rows of a patient not in this cohort (was the same key used?)", patient=unknown[0])
        out = object.__new__(JointCohort)
        out.__dict__.update(self.__dict__)
        out.frame = pd.concat([keep, new.frame]).sort_values([PATIENT, TIME, KIND], kind="stable")
        return out


def read_joint(
    data: pd.DataFrame,
    *,
    patient: str = "patient",
    time: str = "time",
    marker: str = "marker",
    event: str = "event",
    therapy: str | None = "therapy",
    covariates: Sequence[str] = (),
    therapies: Sequence[str] | None = None,
    baseline: pd.DataFrame | None = None,
    key: bytes | str | None = None,
    schema: Schema | None = None,
    allow_empty: bool = False,
    categorical: Sequence[str] = (),
) -> JointCohort:
    """Validate a joint biomarker + event table (see the module docstring).

    Each patient has at most one follow-up row (``event`` not empty); it must be at or after the
    patient's last measurement, and a patient's therapy must not change (the biomarker slope and
    the hazard depend on it from time 0). Errors name patient (pseudonym), row and column.
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, not {type(data).__name__}")
    data = named_rows(data)  # rows named by position when the index repeats a label
    for c in (marker, event):
        if c not in data.columns:
            raise DataError("missing required column", column=c)
    key = draw_key_if_missing(key)

    def fail(problem, mask, column, frame=data):
        mask = np.asarray(mask, bool)
        if mask.any():
            i = int(np.argmax(mask))
            pid = frame[patient].iloc[i]
            raise DataError(
                problem, patient=None if pd.isna(pid) else pseudonymise(pid, key), row=frame.index[i], column=column
            )

    if time in data.columns:
        t = pd.to_numeric(data[time], errors="coerce")
        fail("negative time: the joint family's clock starts at 0 (the start of follow-up)", t < 0, time)
    m, e = data[marker], pd.to_numeric(data[event], errors="coerce")
    fail("row has neither a marker value nor an event", m.isna() & data[event].isna(), marker)
    bad = data[event].notna() & ~e.isin([0, 1])
    fail(f"event must be 0 or 1, got {data[event][bad].head(1).tolist()}", bad, event)
    has_event = data[event].notna().to_numpy()
    ends = data[has_event]
    fail("more than one follow-up (event) row for this patient", ends[patient].duplicated(), event, ends)
    cohort_kw = dict(
        patient=patient,
        time=time,
        therapy=therapy,
        covariates=covariates,
        categorical=categorical,
        therapies=therapies,
        key=key,
        schema=schema,
    )
    marks = data[m.notna().to_numpy()]
    base = baseline
    if base is None:  # covariates of every patient, also those without measurements yet
        base = data.drop_duplicates(patient)[[patient, *covariates]]
    markers = Cohort(marks, outcome=marker, baseline=base, allow_empty=True, **cohort_kw)
    follow = Cohort(
        ends.assign(**{event: e.to_numpy()[has_event]}),
        outcome=event,
        baseline=base,
        allow_empty=True,
        **{**cohort_kw, "schema": markers.schema},
    )
    if not allow_empty:
        empty = ~markers.baseline.index.isin(pd.concat([markers.frame[PATIENT], follow.frame[PATIENT]]))
        if empty.any():
            raise DataError("patient has zero rows", patient=markers.baseline.index[int(np.argmax(empty))])
    f = follow.frame.assign(**{START: 0.0, KIND: 1})
    k = markers.frame.assign(**{START: 0.0, KIND: 0})
    last = k.groupby(PATIENT)[TIME].max()
    early = f[TIME].to_numpy() < last.reindex(f[PATIENT]).fillna(-np.inf).to_numpy()
    if early.any():
        i = int(np.argmax(early))
        raise DataError(
            "follow-up ends before the patient's last measurement",
            patient=f[PATIENT].iloc[i],
            row=f.index[i],
            column=time,
        )
    zero = f[TIME].to_numpy() <= 0
    if zero.any():
        i = int(np.argmax(zero))
        raise DataError("follow-up must end after time 0", patient=f[PATIENT].iloc[i], row=f.index[i], column=time)
    frame = pd.concat([k, f]).sort_values([PATIENT, TIME, KIND], kind="stable")
    switched = frame.groupby(PATIENT)[THERAPY].transform("nunique").to_numpy() > 1
    if switched.any():
        i = int(np.argmax(switched))
        raise DataError(
            "therapy changes within the patient (the joint family needs one therapy per patient)",
            patient=frame[PATIENT].iloc[i],
            row=frame.index[i],
            column=therapy,
        )
    out = object.__new__(JointCohort)
    out.__dict__.update(markers.__dict__)
    out.frame = frame
    out.columns = Columns(patient, time, marker, therapy, tuple(covariates), None, event)
    if schema is None:  # the time scale covers the follow-up, not only the measurements
        t_max = float(frame[TIME].max()) if len(frame) else 1.0
        out.schema = dataclasses.replace(markers.schema, time_scale=max(t_max, markers.schema.time_scale))
    return out
