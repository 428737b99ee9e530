"""Cohort: a validated, pseudonymised long/tidy table of patient outcomes, and its Schema.

One row per (patient, time) measurement. The therapy column gives the therapy received during the
interval that *ends* at that row's visit (from the previous visit, or from time 0), so switches are
piecewise constant. Baseline covariates are constant within a patient; they may sit in the long
table or in a separate one-row-per-patient ``baseline`` table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bayestwin.data.pseudonym import check_id_types, draw_key_if_missing, pseudonymise
from bayestwin.errors import DataError

PATIENT, TIME, OUTCOME, THERAPY = "patient", "time", "outcome", "therapy"
#: The frame's column of the time or amount at risk each row's outcome covers (a count's denominator).
AT_RISK = "at_risk"


@dataclass(frozen=True)
class Schema:
    """What a population model learned about the shape of its data; new patients must match it.

    Attributes
    ----------
    therapies
        Therapy labels, reference (control) first; effects are relative to it.
    numeric
        Numeric covariate -> (mean, sd) used to standardise it.
    categorical
        Categorical covariate -> levels, reference first.
    time_scale, outcome_mean, outcome_sd
        Scales used for weakly-informative default priors.
    """

    therapies: tuple[str, ...]
    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)
    categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)
    time_scale: float = 1.0
    outcome_mean: float = 0.0
    outcome_sd: float = 1.0

    @property
    def covariates(self) -> list[str]:
        """Covariate columns as given by the user."""
        return list(self.numeric) + list(self.categorical)

    @property
    def design_columns(self) -> list[str]:
        """Names of the columns of the covariate design matrix (standardised, one-hot)."""
        cols = list(self.numeric)
        for name, levels in self.categorical.items():
            cols += [f"{name}[{lvl}]" for lvl in levels[1:]]
        return cols

    def covariate_matrix(self, baseline: pd.DataFrame) -> np.ndarray:
        """Design matrix (patients x design_columns) from a one-row-per-patient table."""
        cols = [(baseline[n].to_numpy(float) - m) / s for n, (m, s) in self.numeric.items()]
        for name, levels in self.categorical.items():
            values = baseline[name].astype(str).to_numpy()
            cols += [(values == lvl).astype(float) for lvl in levels[1:]]
        return np.column_stack(cols) if cols else np.zeros((len(baseline), 0))

    def baseline_from_matrix(self, X: np.ndarray, columns: list[str] | None = None) -> pd.DataFrame:
        """The covariates as given by users, back from a design matrix (the inverse of
        :meth:`covariate_matrix`): ``columns`` names X's columns (default: ``design_columns``)."""
        columns = list(self.design_columns if columns is None else columns)
        X = np.asarray(X, float).reshape(len(X), len(columns))
        at = {c: j for j, c in enumerate(columns)}
        out = {}
        for name, (m, s) in self.numeric.items():
            if name in at:
                out[name] = X[:, at[name]] * s + m
        for name, levels in self.categorical.items():
            values = np.full(len(X), levels[0], dtype=object)
            for lvl in levels[1:]:
                values[X[:, at[f"{name}[{lvl}]"]] > 0.5] = lvl
            out[name] = values
        return pd.DataFrame(out, index=pd.RangeIndex(len(X)))

    def to_dict(self) -> dict:
        """The schema as plain data (for saved artifacts)."""
        return {
            "therapies": list(self.therapies),
            "numeric": {k: list(v) for k, v in self.numeric.items()},
            "categorical": {k: list(v) for k, v in self.categorical.items()},
            "time_scale": self.time_scale,
            "outcome_mean": self.outcome_mean,
            "outcome_sd": self.outcome_sd,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Schema:
        """The schema back from :meth:`to_dict`."""
        return cls(
            therapies=tuple(d["therapies"]),
            numeric={k: tuple(v) for k, v in d["numeric"].items()},
            categorical={k: tuple(v) for k, v in d["categorical"].items()},
            time_scale=float(d["time_scale"]),
            outcome_mean=float(d["outcome_mean"]),
            outcome_sd=float(d["outcome_sd"]),
        )


@dataclass(frozen=True)
class Columns:
    """How the user's columns map onto bayestwin's roles."""

    patient: str = PATIENT
    time: str = TIME
    outcome: str = OUTCOME
    therapy: str | None = THERAPY
    covariates: tuple[str, ...] = ()
    start: str | None = None  # time-to-event tables: the at-risk interval's start (None: derived)
    event: str | None = None  # joint tables: the event column (the outcome is the biomarker)
    at_risk: str | None = None  # counts: the time or amount at risk each row covers (an exposure offset)


class Cohort:
    """A validated, pseudonymised set of patients and their longitudinal outcomes.

    Parameters
    ----------
    data
        Long table: one row per patient and time.
    patient
        Column of patient identifiers (pseudonymised on reading; never kept).
    time
        Column of measurement times (numbers; time 0 is when therapy starts).
    outcome
        Column of the measured outcome.
    therapy
        Column of the therapy received; ``None`` means every patient is on a single (reference)
        therapy.
    covariates
        Baseline covariate columns. Numeric unless declared in ``categorical``, of pandas
        ``category`` or ``bool`` dtype, or made of text only; a column that mixes numbers and
        text (``"."``, ``"NA"``, ``"<5"``) is refused, naming the row, and so is an infinite value.
    categorical
        Covariates to treat as categorical even if their values are numbers (e.g. codes 1, 2, 3).
    therapies
        Declared therapy set, reference first (each once). Default: the sorted labels found in the data.
    time_unit
        Needed only when the time column holds timedeltas (e.g. ``"days"``, ``"hours"``): they are
        converted to numbers of that unit. Dates (datetime) are refused: give elapsed time, since
        the same origin (e.g. randomisation) for every table of these patients.
    baseline
        Optional one-row-per-patient table holding the covariates (and possibly patients with no
        outcome rows yet).
    key
        Pseudonymisation key (bytes/str, >= 16 bytes). It stays with you: it is used while the
        Cohort is built and then dropped; no object or result keeps it. ``None``: a random key.
    schema
        The schema of a fitted population; new patients are validated against it.
    allow_empty
        Accept baseline patients with no outcome rows (conditioning gives them the population
        predictive). Fitting needs every patient to have data.
    at_risk
        For counts: the column of the time or amount at risk each row's count covers (diary days,
        person-years), positive and finite. Count models add its log to the log rate (an
        exposure offset, as ``offset(log(days))`` in R); forecasts assume the patient's last value.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"patient": ["a", "a", "b"], "time": [0.0, 1.0, 0.0],
    ...                    "outcome": [1.0, 1.5, 0.3], "therapy": ["ctl", "ctl", "drug"]})
    >>> Cohort(df, therapies=["ctl", "drug"], key=b"my-secret-key-123").n_patients
    2
    """

    def __init__(
        self,
        data: pd.DataFrame,
        *,
        patient: str = PATIENT,
        time: str = TIME,
        outcome: str = OUTCOME,
        therapy: str | None = THERAPY,
        covariates: Sequence[str] = (),
        therapies: Sequence[str] | None = None,
        baseline: pd.DataFrame | None = None,
        key: bytes | str | None = None,
        schema: Schema | None = None,
        allow_empty: bool = False,
        categorical: Sequence[str] = (),
        time_unit: str | None = None,
        at_risk: str | None = None,
    ):
        if not isinstance(data, pd.DataFrame):
            raise TypeError(f"data must be a pandas DataFrame, not {type(data).__name__}")
        data = named_rows(data)
        if therapy is not None and therapy not in data.columns and therapies is None and schema is None:
            therapy = None  # no therapy column at all: single-therapy cohort
        covariates = _unique_names(covariates, "covariates")
        categorical = _unique_names(categorical, "categorical")
        for c in categorical:
            if c not in covariates:
                raise DataError("declared categorical but not listed in covariates", column=c)
        roles = [patient, time, outcome] + ([therapy] if therapy is not None else [])
        roles += [at_risk] if at_risk is not None else []
        if len(set(roles)) < len(roles):
            raise DataError(f"one column plays two roles (patient, time, outcome, therapy, at_risk): {roles}")
        for c in covariates:
            if c in roles:
                raise DataError(
                    "a covariate column is also the patient, time, outcome, therapy or at_risk column", column=c
                )
        if therapies is not None:
            therapies = _unique_names([str(t) for t in therapies], "therapies")
            if not therapies:
                raise DataError("therapies is empty: give the reference (control) therapy first")
        self.columns = Columns(patient, time, outcome, therapy, tuple(covariates), at_risk=at_risk)
        key = draw_key_if_missing(key)

        def pseudo(pid):
            return pseudonymise(pid, key)

        # The key is used here and not kept: new rows for these patients need it passed again.
        frame, base = _validate(
            data, baseline, self.columns, therapies, schema, pseudo, allow_empty, set(categorical), time_unit
        )
        self.frame: pd.DataFrame = frame
        self.baseline: pd.DataFrame = base
        self.schema: Schema = schema if schema is not None else _derive_schema(frame, base, self.columns, therapies)

    @property
    def patients(self) -> list[str]:
        """Pseudonymised patient ids, in a stable order."""
        return list(self.baseline.index)

    @property
    def n_patients(self) -> int:
        """Number of patients (pseudonymised) in the cohort."""
        return len(self.baseline)

    def rows(self, patient: str) -> pd.DataFrame:
        """Outcome rows of one patient (by pseudonym)."""
        return self.frame[self.frame[PATIENT] == patient]

    def __len__(self) -> int:
        return len(self.frame)

    def extend(self, new: Cohort) -> Cohort:
        """This cohort plus ``new`` rows of the same patients (validated with the same schema and key).

        Raises DataError if a new row repeats a (patient, time) already present.
        """
        unknown = sorted(set(new.patients) - set(self.patients))
        if unknown:
            raise DataError("rows of a patient not in this cohort (was the same key used?)", patient=unknown[0])
        frame = pd.concat([self.frame, new.frame])
        dup = frame.duplicated([PATIENT, TIME]).to_numpy()
        if dup.any():
            i = int(np.argmax(dup))
            raise DataError(
                "new row repeats an existing time for this patient",
                patient=frame[PATIENT].iloc[i],
                row=frame.index[i],
                column=self.columns.time,
            )
        out = object.__new__(Cohort)
        out.__dict__.update(self.__dict__)
        out.frame = frame.sort_values([PATIENT, TIME], kind="stable")
        return out

    def restrict(self, frame: pd.DataFrame) -> Cohort:
        """This cohort with only the rows of ``frame`` (a subset of ``self.frame``, e.g. each
        patient's first visits); patients left without rows are dropped. Nothing is re-validated.
        """
        extra = frame.index.difference(self.frame.index)
        if len(extra):
            raise ValueError(f"restrict() takes rows of this cohort's frame; row {extra[0]} is not one")
        out = object.__new__(Cohort)
        out.__dict__.update(self.__dict__)
        out.frame = self.frame.loc[frame.index]
        out.baseline = self.baseline.loc[self.baseline.index.isin(out.frame[PATIENT])]
        return out

    def with_outcome(self, values) -> Cohort:
        """This cohort with the outcome column replaced by ``values`` (one per row, in the frame's
        order), e.g. simulated outcomes on the same design. Values must be finite."""
        values = np.asarray(values, float)
        if values.shape != (len(self.frame),):
            raise ValueError(f"with_outcome() needs {len(self.frame)} values, one per row; got shape {values.shape}")
        if not np.isfinite(values).all():
            i = int(np.argmax(~np.isfinite(values)))
            raise DataError("non-finite outcome", patient=self.frame[PATIENT].iloc[i], row=self.frame.index[i])
        out = object.__new__(Cohort)
        out.__dict__.update(self.__dict__)
        out.frame = self.frame.assign(**{OUTCOME: values})
        return out

    def __repr__(self) -> str:
        return (
            f"Cohort({self.n_patients} patients, {len(self.frame)} rows, "
            f"therapies={list(self.schema.therapies)}, covariates={self.schema.covariates})"
        )


def _derive_schema(frame, base, cols: Columns, therapies) -> Schema:
    if therapies is None:
        therapies = sorted(frame[THERAPY].unique()) if cols.therapy is not None else ["none"]
    numeric, categorical = covariate_scales(base, cols.covariates)
    y = frame[OUTCOME].to_numpy(float)
    t = frame[TIME].to_numpy(float)
    return Schema(
        therapies=tuple(str(t_) for t_ in therapies),
        numeric=numeric,
        categorical=categorical,
        time_scale=float(np.abs(t).max()) if len(t) and np.abs(t).max() > 0 else 1.0,
        outcome_mean=float(y.mean()) if len(y) else 0.0,
        outcome_sd=float(y.std()) if len(y) > 1 and y.std() > 0 else 1.0,
    )


def covariate_scales(base: pd.DataFrame, covariates) -> tuple[dict, dict]:
    """(numeric: name -> (mean, sd), categorical: name -> levels, reference first) of a baseline table.

    Levels are sorted, or a pandas Categorical's own order (so its first category is the reference).
    """
    numeric, categorical = {}, {}
    for c in covariates:
        if _is_categorical(base[c]):
            levels = sorted(base[c].astype(str).unique())
            if isinstance(base[c].dtype, pd.CategoricalDtype):
                levels = [str(x) for x in base[c].cat.categories]
            categorical[c] = tuple(levels)
        else:
            x = base[c].to_numpy(float)
            sd = float(x.std()) if len(x) > 1 and x.std() > 0 else 1.0
            numeric[c] = (float(x.mean()), sd)
    return numeric, categorical


def named_rows(data: pd.DataFrame) -> pd.DataFrame:
    """``data`` with rows that can each be named: its own index when no label repeats, else the
    rows' positions (0, 1, ...). A table joined with ``pd.concat`` repeats its parts' labels;
    kept, two rows would share a name in an error message, and rows looked up by label would
    multiply (a PK or survival table failed with a NumPy broadcast error)."""
    return data if data.index.is_unique else data.reset_index(drop=True)


def _is_categorical(s: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)


def _unique_names(names, what: str) -> list:
    if isinstance(names, str):
        raise TypeError(f"{what} must be a list, not the string {names!r}")
    names = list(names)
    dup = [c for c in names if names.count(c) > 1]
    if dup:
        raise DataError(f"{dup[0]!r} is listed twice in {what}", column=dup[0] if what != "therapies" else None)
    return names


def typed_covariate(s: pd.Series, name: str, categorical: bool, fail) -> pd.Series:
    """A covariate column with an explicit type: categorical (as text, or a pandas Categorical)
    when declared, of ``category``/``bool`` dtype, or made of text only; numeric (float) otherwise.
    A column mixing numbers and text, or holding an infinite number, is refused through
    ``fail(problem, mask, column)`` at its first offending row: one stray ``"."`` or ``"<5"``
    must not silently turn a lab value into a category."""
    if categorical or isinstance(s.dtype, pd.CategoricalDtype):
        return s if isinstance(s.dtype, pd.CategoricalDtype) else s.astype(str).where(s.notna(), None)
    if pd.api.types.is_bool_dtype(s):
        return s
    if pd.api.types.is_datetime64_any_dtype(s) or pd.api.types.is_timedelta64_dtype(s):
        fail(
            "dates and durations are not covariate values: convert to a number (e.g. age in years)",
            np.ones(len(s)),
            name,
        )
    if pd.api.types.is_numeric_dtype(s):
        x = s.to_numpy(float)
        fail("infinite covariate value", np.isinf(x), name)
        return s.astype(float)
    num = pd.to_numeric(s, errors="coerce")
    is_num = num.notna().to_numpy()
    given = s.notna().to_numpy()
    if not is_num[given].any():  # text only: the levels of a category
        return s.astype(str).where(s.notna(), None)
    text = given & ~is_num
    if text.any():
        first = s[text].iloc[0]
        fail(
            f"numeric covariate holds the text {first!r} (declare it in categorical= if it is a category, "
            "or fix or remove the value)",
            text,
            name,
        )
    fail("infinite covariate value", np.isinf(num.to_numpy(float)), name)
    return num.astype(float)


def _validate(data, baseline, cols: Columns, therapies, schema, pseudo, allow_empty, categorical=(), time_unit=None):
    """Validate and normalise; raise DataError at the first problem found (patient, row, column)."""
    required = [cols.patient, cols.time, cols.outcome] + ([cols.therapy] if cols.therapy else [])
    required += [cols.at_risk] if cols.at_risk else []
    if baseline is None:
        required += list(cols.covariates)
    for c in required:
        if c not in data.columns:
            raise DataError("missing required column", column=c)
    if schema is not None:
        missing = [c for c in schema.covariates if c not in cols.covariates]
        if missing:
            raise DataError("covariate used by the population model is not given", column=missing[0])

    def fail(problem, mask, column, frame=data):
        mask = np.asarray(mask, bool)
        if mask.any():
            i = int(np.argmax(mask))
            pid = frame[cols.patient].iloc[i]
            raise DataError(problem, patient=None if pd.isna(pid) else pseudo(pid), row=frame.index[i], column=column)

    if len(data) == 0 and not allow_empty:
        raise DataError("the table has no rows")
    fail("missing patient id", data[cols.patient].isna(), cols.patient)
    check_id_types(data[cols.patient], fail, cols.patient)
    tcol = data[cols.time]
    if pd.api.types.is_datetime64_any_dtype(tcol):
        fail(
            "time holds dates: give elapsed time as numbers (e.g. days since randomisation, the same origin "
            "for every table of these patients)",
            np.ones(len(tcol)),
            cols.time,
        )
    if pd.api.types.is_timedelta64_dtype(tcol):
        if time_unit is None:
            fail(
                "time holds durations (timedelta): say their unit with time_unit= (e.g. 'days')",
                np.ones(len(tcol)),
                cols.time,
            )
        try:
            step = pd.Timedelta(1, unit=time_unit)
        except ValueError:
            raise DataError(f"unknown time_unit {time_unit!r} (e.g. 'days', 'hours', 'minutes')") from None
        data = data.assign(**{cols.time: tcol / step})
    elif time_unit is not None:
        raise DataError("time_unit is only for a time column of durations (timedelta)", column=cols.time)
    checked = [(cols.time, "time"), (cols.outcome, "outcome")] + ([(cols.at_risk, "at_risk")] if cols.at_risk else [])
    for col, what in checked:
        s = data[col]
        if pd.api.types.is_bool_dtype(s):
            fail(f"wrong dtype for {what}: expected numbers, got bool", np.ones(len(s)), col)
        num = pd.to_numeric(s, errors="coerce")
        bad = (num.isna() & s.notna()).to_numpy()
        if bad.any():
            fail(f"non-numeric {what} value {s[bad].iloc[0]!r}", bad, col)
        fail(f"{what} is NaN or infinite", ~np.isfinite(num.to_numpy(float)), col)
    t = pd.to_numeric(data[cols.time]).to_numpy(float)  # negative times (centred, pre-randomisation) allowed

    frame = pd.DataFrame(
        {
            PATIENT: [pseudo(p) for p in data[cols.patient]],
            TIME: t,
            OUTCOME: pd.to_numeric(data[cols.outcome]).to_numpy(float),
        },
        index=data.index,
    )
    fail("duplicate time for this patient", frame.duplicated([PATIENT, TIME]).to_numpy(), cols.time)
    if cols.at_risk:
        risk = pd.to_numeric(data[cols.at_risk]).to_numpy(float)
        fail("at_risk must be positive (the time or amount at risk the row's count covers)", risk <= 0, cols.at_risk)
        frame[AT_RISK] = risk

    declared = tuple(schema.therapies) if schema is not None else (tuple(map(str, therapies)) if therapies else None)
    if cols.therapy is not None:
        th = data[cols.therapy].astype(str).where(data[cols.therapy].notna(), None)
        fail("missing therapy", th.isna(), cols.therapy)
        if declared is not None:
            bad = ~th.isin(declared)
            if bad.any():
                fail(f"therapy {th[bad].iloc[0]!r} not in the declared set {list(declared)}", bad, cols.therapy)
        frame[THERAPY] = th.to_numpy()
    else:
        frame[THERAPY] = declared[0] if declared else "none"

    # Baseline covariates: one row per patient.
    if baseline is None:
        source = data
        pid_col = cols.patient
    else:
        if not isinstance(baseline, pd.DataFrame):
            raise TypeError("baseline must be a pandas DataFrame")
        for c in [cols.patient, *cols.covariates]:
            if c not in baseline.columns:
                raise DataError("missing required column in the baseline table", column=c)
        source, pid_col = baseline, cols.patient
        dup = baseline[cols.patient].duplicated().to_numpy()
        fail("patient appears twice in the baseline table", dup, cols.patient, baseline)
    cov = {}
    if baseline is not None:
        check_id_types(baseline[cols.patient], lambda p, m, c: fail(p, m, c, baseline), cols.patient)
        fail("missing patient id", baseline[cols.patient].isna(), cols.patient, baseline)
    for c in cols.covariates:
        s = source[c]
        fail("covariate missing", s.isna(), c, source)
        if schema is None:
            s = typed_covariate(s, c, c in categorical, lambda p, m, col: fail(p, m, col, source))
        else:
            if c in schema.numeric:
                num = pd.to_numeric(s, errors="coerce")
                if _is_categorical(s) and not pd.api.types.is_bool_dtype(s):
                    fail("non-numeric value in numeric covariate", num.isna(), c, source)
                if pd.api.types.is_bool_dtype(s):
                    fail("wrong dtype: numeric covariate got bool", np.ones(len(s)), c, source)
                fail("infinite covariate value", np.isinf(num.to_numpy(float)), c, source)
                s = num
            else:
                levels = schema.categorical[c]
                sv = s.astype(str)
                bad = ~sv.isin(levels)
                if bad.any():
                    fail(f"level {sv[bad].iloc[0]!r} was not seen in fitting (known: {list(levels)})", bad, c, source)
        cov[c] = s
    cov_frame = pd.DataFrame(cov, index=source.index)
    cov_frame[PATIENT] = [pseudo(p) for p in source[pid_col]]
    if baseline is None:
        for c in cols.covariates:
            changed = cov_frame.groupby(PATIENT, sort=False)[c].transform("nunique").to_numpy() > 1
            fail("baseline covariate changes within the patient", changed, c, source)
        base = cov_frame.drop_duplicates(PATIENT).set_index(PATIENT)
    else:
        base = cov_frame.set_index(PATIENT)
        unknown = ~frame[PATIENT].isin(base.index)
        fail("patient has outcome rows but no baseline row (covariate missing)", unknown, cols.patient)
        empty = ~base.index.isin(frame[PATIENT])
        if empty.any() and not allow_empty:
            fail("patient has zero outcome rows", empty, cols.patient, baseline)
    if len(base) == 0:
        raise DataError("the table has no patients")
    base = base[list(cols.covariates)]
    frame = frame.sort_values([PATIENT, TIME], kind="stable")
    return frame, base
