"""NONMEM-style event tables: the dosing and observation records every pharmacometric tool reads.

One row per event. Columns (matched case-insensitively):

========  ==========================================================================
ID        subject identifier (pseudonymised on entry with your key, as in a Cohort)
TIME      event time (non-decreasing within an ID, except at a reset, EVID 3 or 4)
AMT       dose amount (doses only)
DV        dependent variable: the measured concentration (observations only)
EVID      0 observation, 1 dose, 2 other (e.g. a covariate change), 3 reset, 4 reset and dose
MDV       optional; 1 for rows without an observation (derived from EVID if absent). An EVID 0
          row with MDV 1 is an observation the analyst excluded: it is read as an EVID 2 record
          (no data), as NONMEM does; MDV 0 on a dose or other record is an error
CMT       optional compartment (0 or absent: the default one). The PK family routes doses by it
          (oral: 1 depot, 2 central; iv: 1 central) and refuses what it cannot model
RATE      optional zero-order infusion rate (0: bolus / oral)
II, ADDL  optional dosing interval and number of additional doses (repeated doses)
SS        optional steady-state flag: 1 the dose is the latest of an infinite train every II,
          given after a reset; 2 the same without a reset (added to what is there); 0 none
BLQ/LLOQ  optional: 1 if the observation is below the lower limit of quantification / that limit
OCC       optional occasion number (a whole number >= 0) for inter-occasion variability; a
          family without it refuses an OCC that changes within an ID
========  ==========================================================================

plus covariate columns, which may vary with time here (a family that cannot model a
time-varying covariate refuses it). **Every other column is refused** (NONMEM's ``$INPUT``
drops a column only when told to): name it in ``ignore=`` to leave it out. Missing values may
be written as ``.`` (the NONMEM convention) or left empty. Every problem raises
:class:`~bayestwin.errors.DataError` naming the ID (pseudonym), the row (the input's index label;
for a CSV, the 0-based data row) and the column. An observation before the first dose is allowed
(e.g. a pre-dose baseline level) and flagged in ``Events.frame["before_first_dose"]``; the PK
family refuses an ID whose every level precedes its first dose, or that has levels and no dose
(a unit or time-origin error far more often than a study design).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bayestwin.data.cohort import named_rows, typed_covariate
from bayestwin.data.pseudonym import check_id_types, draw_key_if_missing, pseudonymise
from bayestwin.errors import DataError

REQUIRED = ("ID", "TIME", "AMT", "DV", "EVID")
OPTIONAL = {
    "MDV": np.nan,
    "CMT": 0,
    "RATE": 0.0,
    "II": 0.0,
    "ADDL": 0,
    "SS": 0,
    "BLQ": 0,
    "LLOQ": np.nan,
    "OCC": 0,
}
#: Most single doses one ID may have once ADDL is expanded: more is an input error (ADDL = 10**9
#: would ask for gigabytes), not a regimen.
MAX_DOSES = 10_000
EVIDS = {0: "observation", 1: "dose", 2: "other", 3: "reset", 4: "reset and dose"}


@dataclass
class Events:
    """A validated NONMEM-style event table.

    Attributes
    ----------
    frame
        The records in input order with upper-case column names, ``ID`` replaced by the pseudonym,
        optional columns filled with their defaults, and a ``before_first_dose`` flag.
    covariates
        Covariate columns (time-varying allowed).
    """

    frame: pd.DataFrame
    covariates: list[str]

    @property
    def patients(self) -> list[str]:
        """Pseudonymised IDs, in order of first appearance."""
        return list(pd.unique(self.frame["ID"]))

    @property
    def n_patients(self) -> int:
        """Number of IDs (as a Cohort's ``n_patients``)."""
        return int(self.frame["ID"].nunique())

    def doses(self) -> pd.DataFrame:
        """Every dose as its own row, ADDL expanded (time + k·II, k = 1..ADDL).

        Columns ID, TIME, AMT, CMT, RATE, DURATION (AMT/RATE for infusions, 0 otherwise), SS_II
        (a steady-state dose's interval, 0 otherwise) and EPISODE (:func:`episodes`), sorted by
        ID, episode and time.
        """
        return expand_doses(self.frame)

    def observations(self) -> pd.DataFrame:
        """Observation rows: ID, TIME, DV, CMT, BLQ (bool), LLOQ, before_first_dose, covariates."""
        f = self.frame[self.frame["EVID"] == 0]
        cols = ["ID", "TIME", "DV", "CMT", "BLQ", "LLOQ", "before_first_dose", *self.covariates]
        out = f[cols].copy()
        out["BLQ"] = out["BLQ"].astype(bool)
        return out

    @property
    def baseline(self) -> pd.DataFrame:
        """One row per ID (index: pseudonym): each covariate's first value (its baseline)."""
        first = self.frame.groupby("ID", sort=False)[self.covariates].first() if self.covariates else None
        index = pd.Index(self.patients, name="ID")
        return first.reindex(index) if first is not None else pd.DataFrame(index=index)

    @property
    def schema(self):
        """Covariate standardisation and data scales, as a Cohort's (no therapies: doses say it)."""
        from bayestwin.data.cohort import Schema, covariate_scales

        numeric, categorical = covariate_scales(self.baseline, self.covariates)
        obs = self.frame[self.frame["EVID"] == 0]
        y, t = obs["DV"].dropna().to_numpy(float), self.frame["TIME"].to_numpy(float)
        return Schema(
            therapies=(),
            numeric=numeric,
            categorical=categorical,
            time_scale=float(t.max()) if len(t) and t.max() > 0 else 1.0,
            outcome_mean=float(y.mean()) if len(y) else 0.0,
            outcome_sd=float(y.std()) if len(y) > 1 and y.std() > 0 else 1.0,
        )

    columns = None  # NONMEM column names are fixed

    def with_outcome(self, values) -> Events:
        """These events with the levels (DV of the observation rows, in order) replaced by
        ``values``, e.g. simulated levels on the same design; BLQ flags are cleared (simulated
        levels are uncensored). Not re-validated: a simulated level may be negative."""
        obs = (self.frame["EVID"] == 0).to_numpy()
        values = np.asarray(values, float)
        if values.shape != (int(obs.sum()),):
            raise ValueError(f"with_outcome() needs {int(obs.sum())} levels, one per observation; got {values.shape}")
        frame = self.frame.copy()
        frame.loc[obs, "DV"] = values
        frame.loc[obs, "BLQ"] = 0
        return Events(frame=frame, covariates=self.covariates)

    def extend(self, new: Events) -> Events:
        """These records plus ``new`` ones of the same IDs (read with the same key), e.g. a new level.

        Each ID's new records go after its existing ones and may not go back in time (unless
        they start with a reset, EVID 3 or 4). Raises :class:`DataError` naming the ID, row and
        column otherwise.
        """
        unknown = sorted(set(new.patients) - set(self.patients))
        if unknown:
            raise DataError("records of an ID not in these events (was the same key used?)", patient=unknown[0])
        if set(new.covariates) != set(self.covariates):
            raise DataError(f"covariates {new.covariates} differ from {self.covariates}", column="covariates")
        last = self.frame.groupby("ID")["TIME"].max()
        first = new.frame.groupby("ID", sort=False).head(1)
        back = (first["TIME"].to_numpy() < last.reindex(first["ID"]).to_numpy()) & ~first["EVID"].isin([3, 4])
        if back.any():
            i = int(np.argmax(back))
            where = {"patient": first["ID"].iloc[i], "row": first.index[i], "column": "TIME"}
            raise DataError("new records go back in time for this ID", **where)
        order = {p: k for k, p in enumerate(self.patients)}
        both = pd.concat([self.frame, new.frame[self.frame.columns]])
        rank = both["ID"].map(order).to_numpy()
        frame = both.iloc[np.argsort(rank, kind="stable")].copy()
        frame["before_first_dose"] = _before_first_dose(frame)
        return Events(frame=frame, covariates=self.covariates)

    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        obs = int((self.frame["EVID"] == 0).sum())
        doses = int(self.frame["EVID"].isin([1, 4]).sum())
        return (
            f"Events({len(self.patients)} IDs, {doses} dose records, {obs} observations, covariates={self.covariates})"
        )


def _before_first_dose(frame: pd.DataFrame) -> np.ndarray:
    """Observations with no dose before them in their ID's episode (a reset, EVID 3/4, starts over)."""
    ids, evid = frame["ID"].to_numpy(), frame["EVID"].to_numpy()
    same = np.r_[False, ids[1:] == ids[:-1]]
    episode = np.cumsum(~same | np.isin(evid, [3, 4]))
    dosed = pd.Series(np.isin(evid, [1, 4])).groupby(episode).cummax().to_numpy()
    return (evid == 0) & ~dosed


def episodes(frame: pd.DataFrame) -> np.ndarray:
    """Each record's episode within its ID (0, 1, ...): a reset starts a new one.

    Resets are EVID 3 (reset), EVID 4 (reset, then the record's dose) and a steady-state dose with
    SS = 1 (reset, then the steady state). Doses act only on the observations of their own
    episode, so what a reset wipes out is gone whatever the clock does after it (TIME may restart
    at a reset), and additional doses (ADDL) due after a reset are cancelled, as in NONMEM. An
    observation at the same TIME as a reset belongs to the episode its record's order puts it in.
    """
    ids, evid = frame["ID"].to_numpy(), frame["EVID"].to_numpy()
    ss = frame["SS"].to_numpy() if "SS" in frame else np.zeros(len(frame))
    reset = np.isin(evid, [3, 4]) | (np.isin(evid, [1, 4]) & (ss == 1))
    return pd.Series(reset.astype(int)).groupby(ids, sort=False).cumsum().to_numpy()


def occasions(frame: pd.DataFrame, by: str = "OCC") -> np.ndarray:
    """Each record's occasion within its ID (0, 1, ...), for inter-occasion variability.

    ``by="OCC"``: the OCC column, numbered by order of first appearance within the ID (OCC 1, 2,
    3 -> 0, 1, 2; a frame without OCC is one occasion). ``by="dose"``: each dose record (EVID 1
    or 4; its ADDL copies belong to it) starts a new occasion, records before the first dose are
    in the first.
    """
    ids = frame["ID"].to_numpy()
    if by == "dose":
        dose = frame["EVID"].isin([1, 4]).to_numpy().astype(int)
        n = pd.Series(dose).groupby(ids, sort=False).cumsum().to_numpy()
        return np.maximum(n - 1, 0)
    if by != "OCC":
        raise ValueError(f"occasions come from 'OCC' or 'dose', not {by!r}")
    if "OCC" not in frame:
        return np.zeros(len(frame), int)
    occ = pd.Series(frame["OCC"].to_numpy())
    return occ.groupby(ids, sort=False).transform(lambda s: pd.factorize(s)[0]).to_numpy(int)


def expand_doses(frame: pd.DataFrame) -> pd.DataFrame:
    """Dose rows of a validated event frame, one per dose (ADDL expanded), with DURATION, SS_II
    (the interval of a steady-state train for the first dose of an SS record, 0 otherwise) and
    EPISODE (see :func:`episodes`)."""
    is_dose = frame["EVID"].isin([1, 4]).to_numpy()
    f = frame[is_dose]
    episode = episodes(frame)[is_dose]  # by position: an extended frame may repeat index labels
    reps = f["ADDL"].to_numpy(int) + 1
    out = f.iloc[np.repeat(np.arange(len(f)), reps)][["ID", "TIME", "AMT", "CMT", "RATE"]].reset_index(drop=True)
    k = np.concatenate([np.arange(r) for r in reps]) if len(reps) else np.zeros(0)
    out["TIME"] = out["TIME"].to_numpy(float) + k * np.repeat(f["II"].to_numpy(float), reps)
    rate = out["RATE"].to_numpy(float)
    out["DURATION"] = np.where(rate > 0, out["AMT"].to_numpy(float) / np.where(rate > 0, rate, 1.0), 0.0)
    ss = f["SS"].to_numpy(float) if "SS" in f else np.zeros(len(f))
    # only the SS record's own dose is the steady state; its ADDL copies are ordinary doses after it
    out["SS_II"] = np.where((k == 0) & (np.repeat(ss, reps) > 0), np.repeat(f["II"].to_numpy(float), reps), 0.0)
    out["EPISODE"] = np.repeat(episode, reps)
    return out.sort_values(["ID", "EPISODE", "TIME"], kind="stable").reset_index(drop=True)


def read_nonmem(
    data: pd.DataFrame | str | os.PathLike,
    *,
    covariates: Sequence[str] = (),
    key: bytes | str | None = None,
    allow_no_observations: bool = False,
    ignore: Sequence[str] = (),
    categorical: Sequence[str] = (),
) -> Events:
    """Read and validate a NONMEM-style event table from a DataFrame or a CSV path.

    Parameters
    ----------
    data
        The records, or the path of a CSV file holding them.
    covariates
        Covariate columns to keep (numeric or categorical; may change over time within an ID).
    key
        Your pseudonymisation key (the same key maps results back with ``bt.reidentify``).
    allow_no_observations
        Accept IDs without observations (a new patient before the first level is drawn).
    categorical
        Covariates to treat as categorical although their values are numbers (codes). Otherwise
        a covariate is numeric unless of ``category``/``bool`` dtype or made of text only; one
        that mixes numbers and text is refused (see :func:`~bayestwin.data.cohort.typed_covariate`).
    ignore
        Columns to leave out (e.g. ``["DATE", "C"]``). Any column that is neither a NONMEM data
        item read here, nor a declared covariate, nor ignored is refused.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"ID": [1, 1, 1], "TIME": [0.0, 1.0, 4.0], "AMT": [320.0, 0, 0],
    ...                    "DV": [".", 7.2, 5.1], "EVID": [1, 0, 0]})
    >>> read_nonmem(df, key=b"0123456789abcdef")
    Events(1 IDs, 1 dose records, 2 observations, covariates=[])
    """
    if isinstance(data, (str, os.PathLike)):
        try:
            data = pd.read_csv(data, na_values=["."], keep_default_na=True)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise DataError(f"not a readable CSV table: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame or a CSV path, not {type(data).__name__}")
    data = named_rows(data)  # rows named by position when the index repeats a label
    key = draw_key_if_missing(key)
    upper = {c: str(c).upper() for c in data.columns}
    seen: dict[str, object] = {}
    for c, u in upper.items():
        if u in seen:
            raise DataError(f"two columns map to {u}: {seen[u]!r} and {c!r} (names are matched case-insensitively)")
        seen[u] = c
    frame = data.rename(columns=upper)
    covariates = _names(covariates, "covariates")
    ignore = _names(ignore, "ignore")
    roles = set(REQUIRED) | set(OPTIONAL)
    for c in covariates:
        if c in roles:
            raise DataError(f"{c} is a NONMEM data item, not a covariate", column=c)
    for c in (*REQUIRED, *covariates):
        if c not in frame.columns:
            raise DataError("missing required column", column=c)
    for c in ignore:
        if c in set(REQUIRED):
            raise DataError(f"{c} is required and cannot be ignored", column=c)
    unknown = [c for c in frame.columns if c not in roles and c not in covariates and c not in ignore]
    if unknown:
        raise DataError(
            f"column {unknown[0]!r} is neither a NONMEM data item read here ({', '.join([*REQUIRED, *OPTIONAL])}) nor "
            f"a declared covariate: declare it in covariates=, or leave it out with ignore={unknown!r}",
            column=unknown[0],
        )
    frame = frame.drop(columns=[c for c in ignore if c in frame.columns])
    if len(frame) == 0:
        raise DataError("the table has no rows")

    ids = frame["ID"]

    def fail(problem: str, mask, column: str):
        mask = np.asarray(mask, bool)
        if mask.any():
            i = int(np.argmax(mask))
            pid = ids.iloc[i]
            raise DataError(
                problem, patient=None if pd.isna(pid) else pseudonymise(pid, key), row=frame.index[i], column=column
            )

    fail("missing ID", ids.isna(), "ID")
    check_id_types(ids, fail)
    numeric = {}
    for c in ("TIME", "AMT", "DV", "EVID", *[c for c in OPTIONAL if c in frame.columns]):
        s = frame[c].replace(".", np.nan) if frame[c].dtype == object else frame[c]
        if pd.api.types.is_bool_dtype(s) and c != "BLQ":
            fail("wrong dtype: expected numbers, got bool", np.ones(len(s)), c)
        values = pd.to_numeric(s, errors="coerce")
        fail("non-numeric value", values.isna() & s.notna(), c)
        numeric[c] = values.to_numpy(float)
    for c, default in OPTIONAL.items():
        if c not in numeric:
            numeric[c] = np.full(len(frame), default, float)
    time, amt, dv, evid = numeric["TIME"], numeric["AMT"], numeric["DV"], numeric["EVID"]
    fail("missing TIME", np.isnan(time), "TIME")
    fail("TIME is not finite", ~np.isfinite(time), "TIME")
    fail("negative TIME", time < 0, "TIME")
    fail("missing EVID", np.isnan(evid), "EVID")
    fail(
        f"unknown EVID (known: {', '.join(f'{k} {v}' for k, v in EVIDS.items())})", ~np.isin(evid, list(EVIDS)), "EVID"
    )
    mdv = numeric["MDV"]
    fail("MDV must be 0 or 1", ~np.isnan(mdv) & ~np.isin(mdv, [0, 1]), "MDV")
    fail("MDV 0 (an observation) on a record that is not an observation (EVID != 0)", (mdv == 0) & (evid != 0), "MDV")
    evid = np.where((evid == 0) & (mdv == 1), 2.0, evid)  # an excluded level: a record without data
    dose = np.isin(evid, [1, 4])
    obs = evid == 0
    fail("dose with AMT <= 0", dose & ~(amt > 0), "AMT")
    fail("observation with AMT", obs & ~np.isnan(amt) & (amt != 0), "AMT")
    fail(
        "AMT on a record that doses nothing (EVID 2, or EVID 3: a reset; EVID 4 resets and doses)",
        np.isin(evid, [2, 3]) & ~np.isnan(amt) & (amt != 0),
        "AMT",
    )
    blq = np.nan_to_num(numeric["BLQ"]) > 0
    fail("observation without DV", obs & np.isnan(dv) & ~blq, "DV")
    fail("DV is not finite", obs & np.isinf(dv), "DV")
    fail("negative DV", obs & (dv < 0), "DV")
    rate = np.nan_to_num(numeric["RATE"])
    fail("modelled RATE (-1, -2) is not supported: give the infusion rate", rate < 0, "RATE")
    fail("RATE without AMT", (rate > 0) & ~(dose & (amt > 0)), "RATE")
    addl, ii = np.nan_to_num(numeric["ADDL"]), np.nan_to_num(numeric["II"])
    fail("ADDL must be a whole number >= 0", (addl < 0) | (addl != np.round(addl)), "ADDL")
    fail("ADDL without II", (addl > 0) & ~(ii > 0), "II")
    fail("II or ADDL on a row that is not a dose", ((addl > 0) | (ii > 0)) & ~dose, "II")
    ss = np.nan_to_num(numeric["SS"])
    fail("SS must be 0, 1 or 2", ~np.isin(ss, [0, 1, 2]), "SS")
    fail("SS on a row that is not a dose", (ss > 0) & ~dose, "SS")
    fail("steady state (SS > 0) needs the dosing interval II > 0", (ss > 0) & ~(ii > 0), "II")
    cmt = np.nan_to_num(numeric["CMT"])
    fail("CMT must be a whole number >= 0", (cmt < 0) | (cmt != np.round(cmt)), "CMT")
    fail("BLQ observation without LLOQ", obs & blq & np.isnan(numeric["LLOQ"]), "LLOQ")
    occ = numeric["OCC"]
    fail("missing OCC (give every record its occasion)", np.isnan(occ), "OCC")
    fail("OCC must be a whole number >= 0", (occ < 0) | (occ != np.round(occ)), "OCC")
    categorical = _names(categorical, "categorical")
    for c in categorical:
        if c not in covariates:
            raise DataError("declared categorical but not listed in covariates", column=c)
    typed = {}
    for c in covariates:
        fail("covariate missing", frame[c].isna().to_numpy(), c)
        typed[c] = typed_covariate(frame[c], c, c in categorical, fail)

    pseudo = ids.map(lambda p: pseudonymise(p, key)).to_numpy()
    per_id = pd.Series(np.where(dose, addl + 1, 0)).groupby(pseudo).transform("sum").to_numpy()
    fail(
        f"ADDL gives this ID more than {MAX_DOSES:,} doses (an input error, or write the regimen out)",
        dose & (per_id > MAX_DOSES),
        "ADDL",
    )
    # Within an ID, times may not go back except at a reset.
    same = np.r_[False, pseudo[1:] == pseudo[:-1]]
    back = same & (np.r_[np.inf, np.diff(time)] < 0) & ~np.isin(evid, [3, 4])
    fail("times not sorted within ID (only a reset, EVID 3 or 4, may restart time)", back, "TIME")
    seen = pd.Series(pseudo).duplicated().to_numpy() & ~same  # an ID that reappears after another
    fail("rows of an ID are not contiguous", seen, "ID")

    out = pd.DataFrame(
        {
            "ID": pseudo,
            "TIME": time,
            "AMT": np.where(dose, amt, 0.0),
            "DV": np.where(obs, dv, np.nan),
            "EVID": evid.astype(int),
            "MDV": (~obs).astype(int),
            "CMT": cmt.astype(int),
            "RATE": rate,
            "II": ii,
            "ADDL": addl.astype(int),
            "SS": ss.astype(int),
            "BLQ": blq.astype(int),
            "LLOQ": numeric["LLOQ"],
            "OCC": occ.astype(int),
        },
        index=frame.index,
    )
    for c in covariates:
        out[c] = typed[c].array  # keeps a pandas Categorical's order (its first level is the reference)
    out["before_first_dose"] = _before_first_dose(out)
    if not allow_no_observations:
        has_obs = pd.Series(obs).groupby(pseudo).transform("any").to_numpy()
        fail("ID with no observations", ~has_obs, "EVID")
    return Events(frame=out, covariates=covariates)


def _names(names, what: str) -> list[str]:
    """Upper-cased column names, each once."""
    if isinstance(names, str):
        raise TypeError(f"{what} must be a list of column names, not the string {names!r}")
    out = [str(c).upper() for c in names]
    dup = [c for c in out if out.count(c) > 1]
    if dup:
        raise DataError(f"{dup[0]} is listed twice in {what}", column=dup[0])
    return out
