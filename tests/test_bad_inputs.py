"""The bad-input catalogue: every reader, decision function, save/load and the command line, fed
broken input. Each case asserts the exception type, the message (and, for a DataError, the
patient / row / column it names where one applies), and that no file in the working folder
changed (SHA-256 and mode of every file, before and after).

No case fits a model: populations come from the shipped zoo artifact (loaded, not refitted).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import bayestwin as bt
from bayestwin import _memory, decision
from bayestwin._atomic import OutputError
from bayestwin.data.nonmem import read_nonmem
from bayestwin.dosing import Regimen, dose_search
from bayestwin.errors import DataError, SpecError
from bayestwin.io import ArtifactError
from bayestwin.review.report import review

KEY = b"catalogue-key-0123456789"


def P(x) -> str:
    return bt.pseudonymise(x, KEY)


# ----------------------------------------------------------------------------- the harness
@dataclass
class Case:
    name: str
    setup: object  # setup(tmp: Path) -> thunk() that must raise
    exc: type | tuple
    fragment: str
    where: dict = field(default_factory=dict)  # expected DataError attributes (patient, row, column)


CASES: list[Case] = []


def case(name, exc, fragment, **where):
    def register(setup):
        CASES.append(Case(name, setup, exc, fragment, where))
        return setup

    return register


def snapshot(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != ".bayestwin.lock":
            out[str(p.relative_to(folder))] = (
                hashlib.sha256(p.read_bytes()).hexdigest(),
                stat.S_IMODE(p.stat().st_mode),
            )
    return out


def changed(df: pd.DataFrame, changes=None, columns=None) -> pd.DataFrame:
    """``df`` with cells set ({(row, column): value}; a new column starts at 0) and whole columns replaced."""
    for k, v in {**(changes or {}), **(columns or {})}.items():
        if isinstance(k, tuple):
            row, col = k
            if col not in df:
                df[col] = 0.0
            df[col] = df[col].astype(object)
            df.loc[row, col] = v
        else:
            df[k] = v
    return df


# ----------------------------------------------------------------------------- NONMEM tables
def nm(changes=None, **columns) -> pd.DataFrame:
    """Two IDs, oral doses then levels; ``changes`` maps (row, column) -> value or column -> list."""
    df = pd.DataFrame(
        {
            "ID": [1, 1, 1, 2, 2, 2],
            "TIME": [0.0, 1.0, 6.0, 0.0, 2.0, 12.0],
            "AMT": [100.0, 0.0, 0.0, 120.0, 0.0, 0.0],
            "DV": [np.nan, 5.0, 2.0, np.nan, 6.0, 1.5],
            "EVID": [1, 0, 0, 1, 0, 0],
            "WT": [70.0, 70.0, 70.0, 80.0, 80.0, 80.0],
        }
    )
    return changed(df, changes, columns)


def rn(df, **kw):
    kw.setdefault("covariates", ["WT"])
    return lambda: read_nonmem(df, key=KEY, **kw)


NM_CASES = [
    ("missing ID", nm().drop(columns="ID"), {}, "missing required column", {"column": "ID"}),
    ("missing TIME", nm().drop(columns="TIME"), {}, "missing required column", {"column": "TIME"}),
    ("missing AMT", nm().drop(columns="AMT"), {}, "missing required column", {"column": "AMT"}),
    ("missing DV", nm().drop(columns="DV"), {}, "missing required column", {"column": "DV"}),
    ("missing EVID", nm().drop(columns="EVID"), {}, "missing required column", {"column": "EVID"}),
    ("missing covariate column", nm().drop(columns="WT"), {}, "missing required column", {"column": "WT"}),
    ("time and TIME", nm().assign(time=1.0), {}, "two columns map to TIME", {}),
    ("unknown column", nm().assign(DATE="2024-01-01"), {}, "column 'DATE' is neither a NONMEM data item", {}),
    ("covariate listed twice", nm(), {"covariates": ["WT", "wt"]}, "WT is listed twice in covariates", {}),
    ("covariate is a data item", nm(), {"covariates": ["CMT"]}, "CMT is a NONMEM data item", {"column": "CMT"}),
    ("ignore a required column", nm(), {"ignore": ["DV"]}, "DV is required and cannot be ignored", {}),
    ("categorical not a covariate", nm(), {"categorical": ["SEX"]}, "declared categorical but not listed", {}),
    ("missing ID value", nm({(2, "ID"): None}), {}, "missing ID", {"row": 2, "column": "ID"}),
    (
        "IDs 1 and '1'",
        nm({(3, "ID"): "1", (4, "ID"): "1", (5, "ID"): "1"}),
        {},
        "written both as a number and as text",
        {"column": "ID"},
    ),
    ("text TIME", nm({(4, "TIME"): "soon"}), {}, "non-numeric value", {"row": 4, "column": "TIME", "patient": P(2)}),
    ("bool TIME", nm(TIME=[True] * 6), {}, "expected numbers, got bool", {"column": "TIME"}),
    ("NaN TIME", nm({(1, "TIME"): np.nan}), {}, "missing TIME", {"row": 1, "column": "TIME"}),
    ("infinite TIME", nm({(2, "TIME"): np.inf}), {}, "TIME is not finite", {"row": 2, "column": "TIME"}),
    ("negative TIME", nm({(0, "TIME"): -1.0}), {}, "negative TIME", {"row": 0, "column": "TIME"}),
    ("text AMT", nm({(0, "AMT"): "lots"}), {}, "non-numeric value", {"row": 0, "column": "AMT"}),
    ("text DV", nm({(1, "DV"): "<LLOQ"}), {}, "non-numeric value", {"row": 1, "column": "DV"}),
    ("text EVID", nm({(1, "EVID"): "obs"}), {}, "non-numeric value", {"row": 1, "column": "EVID"}),
    ("missing EVID value", nm({(1, "EVID"): np.nan}), {}, "missing EVID", {"row": 1, "column": "EVID"}),
    ("EVID 5", nm({(1, "EVID"): 5}), {}, "unknown EVID", {"row": 1, "column": "EVID"}),
    ("EVID 1.5", nm({(1, "EVID"): 1.5}), {}, "unknown EVID", {"row": 1, "column": "EVID"}),
    ("dose AMT 0", nm({(0, "AMT"): 0.0}), {}, "dose with AMT <= 0", {"row": 0, "column": "AMT", "patient": P(1)}),
    ("dose AMT negative", nm({(3, "AMT"): -5.0}), {}, "dose with AMT <= 0", {"row": 3, "patient": P(2)}),
    ("observation with AMT", nm({(1, "AMT"): 10.0}), {}, "observation with AMT", {"row": 1, "column": "AMT"}),
    ("observation without DV", nm({(2, "DV"): np.nan}), {}, "observation without DV", {"row": 2, "column": "DV"}),
    ("infinite DV", nm({(2, "DV"): np.inf}), {}, "DV is not finite", {"row": 2, "column": "DV"}),
    ("negative DV", nm({(5, "DV"): -0.1}), {}, "negative DV", {"row": 5, "column": "DV", "patient": P(2)}),
    ("RATE -1", nm({(0, "RATE"): -1.0}), {}, "modelled RATE (-1, -2) is not supported", {"row": 0, "column": "RATE"}),
    ("RATE without AMT", nm({(1, "RATE"): 5.0}), {}, "RATE without AMT", {"row": 1, "column": "RATE"}),
    ("negative ADDL", nm({(0, "ADDL"): -1, (0, "II"): 12.0}), {}, "ADDL must be a whole number", {"row": 0}),
    ("fractional ADDL", nm({(0, "ADDL"): 1.5, (0, "II"): 12.0}), {}, "ADDL must be a whole number", {"row": 0}),
    ("ADDL without II", nm({(0, "ADDL"): 2}), {}, "ADDL without II", {"row": 0, "column": "II"}),
    ("II on an observation", nm({(1, "II"): 12.0}), {}, "II or ADDL on a row that is not a dose", {"row": 1}),
    (
        "absurd ADDL",
        nm({(0, "ADDL"): 10**9, (0, "II"): 12.0}),
        {},
        "ADDL gives this ID more than 10,000 doses",
        {"row": 0, "column": "ADDL"},
    ),
    ("SS 3", nm({(0, "SS"): 3, (0, "II"): 12.0}), {}, "SS must be 0, 1 or 2", {"row": 0, "column": "SS"}),
    (
        "AMT on a reset",
        nm(EVID=[1, 0, 3, 1, 0, 0], AMT=[100.0, 0, 50.0, 120.0, 0, 0]),
        {},
        "AMT on a record that doses nothing (EVID 2, or EVID 3: a reset; EVID 4 resets and doses)",
        {"row": 2, "column": "AMT"},
    ),
    ("SS on an observation", nm({(1, "SS"): 1}), {}, "SS on a row that is not a dose", {"row": 1, "column": "SS"}),
    ("SS without II", nm({(0, "SS"): 1}), {}, "steady state (SS > 0) needs the dosing interval II > 0", {"row": 0}),
    ("MDV 2", nm({(1, "MDV"): 2}), {}, "MDV must be 0 or 1", {"row": 1, "column": "MDV"}),
    ("MDV 0 on a dose", nm(MDV=[0, 0, 0, 1, 0, 0]), {}, "MDV 0 (an observation) on a record that is not", {"row": 0}),
    ("CMT -1", nm({(0, "CMT"): -1}), {}, "CMT must be a whole number", {"row": 0, "column": "CMT"}),
    ("CMT 1.5", nm({(0, "CMT"): 1.5}), {}, "CMT must be a whole number", {"row": 0, "column": "CMT"}),
    ("BLQ without LLOQ", nm({(2, "BLQ"): 1}), {}, "BLQ observation without LLOQ", {"row": 2, "column": "LLOQ"}),
    ("OCC 1.5", nm(OCC=[1, 1, 1.5, 1, 1, 1]), {}, "OCC must be a whole number", {"row": 2, "column": "OCC"}),
    ("OCC missing", nm(OCC=[1, 1, np.nan, 1, 1, 1]), {}, "missing OCC", {"row": 2, "column": "OCC"}),
    (
        "covariate missing",
        nm({(4, "WT"): np.nan}),
        {},
        "covariate missing",
        {"row": 4, "column": "WT", "patient": P(2)},
    ),
    (
        "covariate with text",
        nm({(4, "WT"): "<40"}),
        {},
        "numeric covariate holds the text '<40'",
        {"row": 4, "column": "WT"},
    ),
    ("covariate with '.' text", nm({(1, "WT"): "unknown"}), {}, "numeric covariate holds the text", {"row": 1}),
    ("infinite covariate", nm({(5, "WT"): np.inf}), {}, "infinite covariate value", {"row": 5, "column": "WT"}),
    ("times go back", nm({(5, "TIME"): 1.0}), {}, "times not sorted within ID", {"row": 5, "column": "TIME"}),
    (
        "ID rows not contiguous",
        nm(
            ID=[1, 1, 2, 2, 1, 2],
            TIME=[0.0, 1.0, 0.0, 2.0, 6.0, 12.0],
            EVID=[1, 0, 1, 0, 0, 0],
            AMT=[100.0, 0, 120, 0, 0, 0],
            DV=[np.nan, 5.0, np.nan, 6.0, 2.0, 1.5],
        ),
        {},
        "rows of an ID are not contiguous",
        {"row": 4, "column": "ID"},
    ),
    ("ID without observations", nm().iloc[[0, 3, 4, 5]], {}, "ID with no observations", {"row": 0, "patient": P(1)}),
    ("empty table", nm().iloc[:0], {}, "the table has no rows", {}),
]

for name, df, kw, fragment, where in NM_CASES:
    CASES.append(
        Case(f"read_nonmem: {name}", (lambda df, kw: lambda tmp: rn(df, **kw))(df, kw), DataError, fragment, where)
    )


@case("read_nonmem: unreadable CSV file", DataError, "not a readable CSV table")
def _(tmp):
    path = tmp / "bad.csv"
    path.write_bytes(b'ID,TIME\n1,"unterminated\n')
    return lambda: read_nonmem(path, key=KEY)


@case("read_nonmem: covariates as a string", TypeError, "covariates must be a list of column names")
def _(tmp):
    return lambda: read_nonmem(nm(), key=KEY, covariates="WT")


@case("read_nonmem: key too short", ValueError, "at least 16 bytes")
def _(tmp):
    return lambda: read_nonmem(nm(), key=b"short", covariates=["WT"])


# --- what the PK family refuses to model (it would otherwise be silently wrong)
def pk_design(df, family=None, **kw):
    ev = read_nonmem(df, key=KEY, **{"covariates": ["WT"], **kw})
    fam = family or bt.Pk()
    return lambda: fam.design(ev.frame, ev.baseline, ev.schema)


PK_CASES = [
    (
        "steady-state infusion longer than its interval",
        nm({(0, "SS"): 1, (0, "II"): 12.0, (0, "RATE"): 5.0}),
        None,
        "a steady-state infusion (SS > 0) that lasts longer than its interval II is not modelled",
        {"row": 0, "column": "RATE"},
    ),
    (
        "time-varying covariate",
        nm({(2, "WT"): 71.0}),
        None,
        "covariate WT changes within the ID",
        {"row": 2, "column": "WT", "patient": P(1)},
    ),
    (
        "occasions without IOV",
        nm(OCC=[1, 1, 2, 1, 1, 1]),
        None,
        "OCC changes within the ID, but this family has no inter-occasion variability",
        {"row": 2, "column": "OCC", "patient": P(1)},
    ),
    (
        "infusion into the depot",
        nm(RATE=[50.0, 0, 0, 0, 0, 0], CMT=[1, 2, 2, 1, 2, 2]),
        None,
        "an infusion goes into the central compartment",
        {"row": 0, "column": "CMT"},
    ),
    (
        "dose into CMT 3",
        nm(CMT=[3, 2, 2, 1, 2, 2]),
        None,
        "other compartments are not modelled",
        {"row": 0, "column": "CMT"},
    ),
    (
        "level of the depot",
        nm(CMT=[1, 1, 2, 1, 2, 2]),
        None,
        "levels are central-compartment concentrations",
        {"row": 1, "column": "CMT"},
    ),
    (
        "IV dose into CMT 2",
        nm(CMT=[2, 1, 1, 1, 1, 1]),
        bt.Pk(route="iv"),
        "a iv dose goes into CMT 1 (central)",
        {"row": 0},
    ),
    (
        "levels without a dose",
        nm(EVID=[2, 0, 0, 1, 0, 0], AMT=[0.0, 0, 0, 120, 0, 0]),
        None,
        "levels of an ID that has no dose record",
        {"row": 1, "patient": P(1)},
    ),
    (
        "every level before the dose",
        nm(TIME=[24.0, 1.0, 6.0, 0.0, 2.0, 12.0], ID=[1, 1, 1, 2, 2, 2]).iloc[[1, 2, 0, 3, 4, 5]],
        None,
        "every level of this ID precedes its first dose",
        {"column": "TIME", "patient": P(1)},
    ),
    (
        "weight not a covariate",
        nm(),
        bt.Pk(weight="BW"),
        "weight='BW' is not a covariate of these events",
        {"column": "BW"},
    ),
    (
        "ODE: SS=2 (superposition)",
        nm({(3, "SS"): 2, (3, "II"): 12.0}),
        bt.Ode("one_compartment", covariates={"CL": [bt.Power("WT", ref=70.0)]}),
        "SS=2 (a steady state added to what is there) assumes superposition",
        {"row": 3, "column": "SS", "patient": P(2)},
    ),
    (
        "ODE: SS=1 without steady_state=True",
        nm({(3, "SS"): 1, (3, "II"): 12.0}),
        bt.Ode("one_compartment", covariates={"CL": [bt.Power("WT", ref=70.0)]}),
        "a steady-state dose (SS=1) needs Ode(..., steady_state=True)",
        {"row": 3, "column": "SS", "patient": P(2)},
    ),
    (
        "ODE: TIME restarted at a reset",
        nm(EVID=[1, 0, 4, 1, 0, 0], TIME=[0.0, 8.0, 0.0, 0.0, 2.0, 12.0], AMT=[100.0, 0, 90.0, 120.0, 0, 0]),
        bt.Ode("one_compartment", covariates={"CL": [bt.Power("WT", ref=70.0)]}),
        "TIME goes back at this reset: the ODE family solves one clock per ID",
        {"row": 2, "column": "TIME", "patient": P(1)},
    ),
]
for name, df, fam, fragment, where in PK_CASES:
    CASES.append(
        Case(f"Pk: {name}", (lambda df, fam: lambda tmp: pk_design(df, fam))(df, fam), DataError, fragment, where)
    )


# ----------------------------------------------------------------------------- Cohort
def lt(changes=None, **columns) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "id": ["A", "A", "A", "B", "B"],
            "t": [0.0, 1.0, 2.0, 0.0, 1.0],
            "y": [1.0, 1.2, 1.4, 2.0, 2.1],
            "arm": ["ctl", "ctl", "drug", "drug", "drug"],
            "age": [50.0, 50.0, 50.0, 61.0, 61.0],
            "sex": ["F", "F", "F", "M", "M"],
        }
    )
    return changed(df, changes, columns)


def co(df, **kw):
    args = dict(
        patient="id", time="t", outcome="y", therapy="arm", covariates=["age", "sex"], therapies=["ctl", "drug"]
    )
    return lambda: bt.Cohort(df, key=KEY, **(args | kw))


COHORT_CASES = [
    ("missing patient column", lt().drop(columns="id"), {}, "missing required column", {"column": "id"}),
    ("missing time column", lt().drop(columns="t"), {}, "missing required column", {"column": "t"}),
    ("missing outcome column", lt().drop(columns="y"), {}, "missing required column", {"column": "y"}),
    ("missing therapy column", lt().drop(columns="arm"), {}, "missing required column", {"column": "arm"}),
    ("missing covariate column", lt().drop(columns="age"), {}, "missing required column", {"column": "age"}),
    (
        "covariate listed twice",
        lt(),
        {"covariates": ["age", "age"]},
        "'age' is listed twice in covariates",
        {"column": "age"},
    ),
    ("therapy listed twice", lt(), {"therapies": ["ctl", "ctl", "drug"]}, "'ctl' is listed twice in therapies", {}),
    ("no therapies", lt(), {"therapies": []}, "therapies is empty", {}),
    (
        "categorical not a covariate",
        lt(),
        {"categorical": ["arm"]},
        "declared categorical but not listed",
        {"column": "arm"},
    ),
    (
        "covariate is the time column",
        lt(),
        {"covariates": ["t"]},
        "a covariate column is also the patient, time",
        {"column": "t"},
    ),
    ("two roles, one column", lt(), {"outcome": "t"}, "one column plays two roles", {}),
    ("missing patient id", lt({(1, "id"): None}), {}, "missing patient id", {"row": 1, "column": "id"}),
    ("ids 1 and '1'", lt(id=[1, 1, 1, "1", "1"]), {}, "written both as a number and as text", {"column": "id"}),
    (
        "text time",
        lt({(3, "t"): "yesterday"}),
        {},
        "non-numeric time value 'yesterday'",
        {"row": 3, "column": "t", "patient": P("B")},
    ),
    ("bool time", lt(t=[True, False, True, False, True]), {}, "wrong dtype for time", {"column": "t"}),
    ("NaN time", lt({(2, "t"): np.nan}), {}, "time is NaN or infinite", {"row": 2, "column": "t"}),
    ("infinite time", lt({(2, "t"): np.inf}), {}, "time is NaN or infinite", {"row": 2, "column": "t"}),
    (
        "dates as time",
        lt(t=pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-01", "2024-01-05"])),
        {},
        "time holds dates",
        {"column": "t"},
    ),
    (
        "durations without a unit",
        lt(t=pd.to_timedelta([0, 1, 2, 0, 1], unit="D")),
        {},
        "say their unit with time_unit=",
        {"column": "t"},
    ),
    (
        "unknown time unit",
        lt(t=pd.to_timedelta([0, 1, 2, 0, 1], unit="D")),
        {"time_unit": "fortnights"},
        "unknown time_unit 'fortnights'",
        {},
    ),
    (
        "time_unit on numbers",
        lt(),
        {"time_unit": "days"},
        "time_unit is only for a time column of durations",
        {"column": "t"},
    ),
    ("text outcome", lt({(2, "y"): "high"}), {}, "non-numeric outcome value 'high'", {"row": 2, "column": "y"}),
    (
        "NaN outcome",
        lt({(4, "y"): np.nan}),
        {},
        "outcome is NaN or infinite",
        {"row": 4, "column": "y", "patient": P("B")},
    ),
    ("infinite outcome", lt({(4, "y"): -np.inf}), {}, "outcome is NaN or infinite", {"row": 4}),
    ("bool outcome", lt(y=[True, False, True, True, False]), {}, "wrong dtype for outcome", {"column": "y"}),
    ("duplicate time", lt({(1, "t"): 0.0}), {}, "duplicate time for this patient", {"row": 1, "column": "t"}),
    ("missing therapy", lt({(2, "arm"): None}), {}, "missing therapy", {"row": 2, "column": "arm"}),
    ("therapy not declared", lt({(2, "arm"): "placebo"}), {}, "therapy 'placebo' not in the declared set", {"row": 2}),
    ("covariate missing", lt({(3, "age"): np.nan}), {}, "covariate missing", {"row": 3, "column": "age"}),
    (
        "covariate with '.'",
        lt({(3, "age"): "."}),
        {},
        "numeric covariate holds the text '.'",
        {"row": 3, "column": "age"},
    ),
    (
        "covariate with 'NA'",
        lt({(0, "age"): "NA", (1, "age"): "NA", (2, "age"): "NA"}),
        {},
        "numeric covariate holds the text 'NA'",
        {"row": 0},
    ),
    (
        "covariate with '<5'",
        lt({(4, "age"): "<5"}),
        {},
        "numeric covariate holds the text '<5'",
        {"row": 4, "column": "age"},
    ),
    ("infinite covariate", lt({(4, "age"): np.inf}), {}, "infinite covariate value", {"row": 4, "column": "age"}),
    (
        "dates as covariate",
        lt(age=pd.to_datetime(["1970-01-01"] * 5)),
        {},
        "dates and durations are not covariate values",
        {"column": "age"},
    ),
    (
        "covariate changes",
        lt({(1, "age"): 51.0}),
        {},
        "baseline covariate changes within the patient",
        {"column": "age"},
    ),
    ("empty table", lt().iloc[:0], {}, "the table has no rows", {}),
    ("at_risk column missing", lt(), {"at_risk": "days"}, "missing required column", {"column": "days"}),
    (
        "at_risk zero",
        lt(days=[2.0, 2.0, 0.0, 2.0, 2.0]),
        {"at_risk": "days"},
        "at_risk must be positive",
        {"row": 2, "column": "days", "patient": P("A")},
    ),
    (
        "at_risk NaN",
        lt(days=[2.0, np.nan, 2.0, 2.0, 2.0]),
        {"at_risk": "days"},
        "at_risk is NaN or infinite",
        {"row": 1},
    ),
    (
        "at_risk as text",
        lt(days=[2.0, 2.0, 2.0, "two", 2.0]),
        {"at_risk": "days"},
        "non-numeric at_risk value 'two'",
        {"row": 3, "column": "days"},
    ),
    ("at_risk is the outcome", lt(), {"at_risk": "y"}, "one column plays two roles", {}),
]
for name, df, kw, fragment, where in COHORT_CASES:
    CASES.append(Case(f"Cohort: {name}", (lambda df, kw: lambda tmp: co(df, **kw))(df, kw), DataError, fragment, where))

BASE = pd.DataFrame({"id": ["A", "B"], "age": [50.0, 61.0], "sex": ["F", "M"]})
BASELINE_CASES = [
    (
        "baseline lacks a covariate",
        BASE.drop(columns="age"),
        {},
        "missing required column in the baseline table",
        {"column": "age"},
    ),
    (
        "baseline repeats a patient",
        pd.concat([BASE, BASE.iloc[:1]], ignore_index=True),
        {},
        "patient appears twice in the baseline table",
        {"row": 2},
    ),
    (
        "baseline lacks a patient",
        BASE.iloc[:1],
        {},
        "patient has outcome rows but no baseline row",
        {"patient": P("B")},
    ),
    (
        "baseline patient without rows",
        pd.concat([BASE, pd.DataFrame({"id": ["C"], "age": [40.0], "sex": ["F"]})], ignore_index=True),
        {},
        "patient has zero outcome rows",
        {"patient": P("C")},
    ),
    (
        "baseline covariate with text",
        BASE.assign(age=[50.0, "old"]),
        {},
        "numeric covariate holds the text 'old'",
        {"row": 1},
    ),
]
for name, base, _kw, fragment, where in BASELINE_CASES:
    CASES.append(
        Case(
            f"Cohort: {name}",
            (lambda base: lambda tmp: co(lt().drop(columns=["age", "sex"]), baseline=base))(base),
            DataError,
            fragment,
            where,
        )
    )


@case("Cohort: not a DataFrame", TypeError, "data must be a pandas DataFrame, not dict")
def _(tmp):
    return lambda: bt.Cohort({"patient": [1]}, key=KEY)


@case("Cohort: new patient's unknown level", DataError, "level 'X' was not seen in fitting", column="sex")
def _(tmp):
    schema = bt.Cohort(
        lt(), patient="id", time="t", outcome="y", therapy="arm", covariates=["age", "sex"], key=KEY
    ).schema
    return co(lt(sex=["X"] * 5), schema=schema)


@case(
    "Cohort: new patient's numeric covariate as text", DataError, "non-numeric value in numeric covariate", column="age"
)
def _(tmp):
    schema = bt.Cohort(
        lt(), patient="id", time="t", outcome="y", therapy="arm", covariates=["age", "sex"], key=KEY
    ).schema
    return co(lt(age=["old"] * 5), schema=schema)


@case("Cohort: new patient's infinite covariate", DataError, "infinite covariate value", column="age")
def _(tmp):
    schema = bt.Cohort(
        lt(), patient="id", time="t", outcome="y", therapy="arm", covariates=["age", "sex"], key=KEY
    ).schema
    return co(lt({(0, "age"): np.inf}), schema=schema)


# ----------------------------------------------------------------------------- survival and joint tables
def surv(changes=None):
    df = pd.DataFrame({"id": ["A", "A", "B"], "start": [0.0, 2.0, 0.0], "stop": [2.0, 5.0, 3.0], "event": [0, 1, 0]})
    for (row, col), v in (changes or {}).items():
        df[col] = df[col].astype(object)
        df.loc[row, col] = v
    return df


def rs(df, **kw):
    return lambda: bt.read_survival(df, patient="id", time="stop", event="event", therapy=None, key=KEY, **kw)


SURV_CASES = [
    ("event 2", surv({(2, "event"): 2}), {}, "event must be 0 or 1", {"row": 2, "column": "event"}),
    ("event as text", surv({(0, "event"): "yes"}), {}, "event must be 0 or 1", {"row": 0}),
    ("missing event column", surv().drop(columns="event"), {}, "missing required column", {"column": "event"}),
    ("negative start", surv({(0, "start"): -1.0}), {"start": "start"}, "negative start", {"row": 0, "column": "start"}),
    (
        "overlapping intervals",
        surv({(1, "start"): 1.0}),
        {"start": "start"},
        "interval starts before the patient's previous interval ends",
        {"row": 1},
    ),
    (
        "interval ends before it starts",
        surv({(2, "stop"): 0.0}),
        {},
        "not after it starts",
        {"row": 2, "column": "stop"},
    ),
]
for name, df, kw, fragment, where in SURV_CASES:
    CASES.append(
        Case(f"read_survival: {name}", (lambda df, kw: lambda tmp: rs(df, **kw))(df, kw), DataError, fragment, where)
    )


def jt(changes=None):
    df = pd.DataFrame(
        {
            "id": ["A", "A", "A", "B", "B"],
            "t": [0.0, 1.0, 3.0, 0.0, 2.0],
            "marker": [1.0, 1.5, np.nan, 2.0, np.nan],
            "event": [np.nan, np.nan, 1.0, np.nan, 0.0],
            "arm": ["ctl"] * 3 + ["drug"] * 2,
        }
    )
    for (row, col), v in (changes or {}).items():
        df[col] = df[col].astype(object)
        df.loc[row, col] = v
    return df


def rj(df):
    return lambda: bt.read_joint(df, patient="id", time="t", therapy="arm", key=KEY)


JOINT_CASES = [
    (
        "row with neither marker nor event",
        jt({(1, "marker"): np.nan}),
        "row has neither a marker value nor an event",
        {"row": 1},
    ),
    ("event 3", jt({(2, "event"): 3.0}), "event must be 0 or 1", {"row": 2, "column": "event"}),
    ("two follow-up rows", jt({(1, "event"): 0.0}), "more than one follow-up (event) row", {"column": "event"}),
    (
        "negative time",
        jt({(0, "t"): -1.0}),
        "negative time: the joint family's clock starts at 0",
        {"row": 0, "column": "t"},
    ),
    (
        "follow-up before the last measurement",
        jt({(2, "t"): 0.5}),
        "follow-up ends before the patient's last measurement",
        {"row": 2},
    ),
]
for name, df, fragment, where in JOINT_CASES:
    CASES.append(Case(f"read_joint: {name}", (lambda df: lambda tmp: rj(df))(df), DataError, fragment, where))


# ----------------------------------------------------------------------------- priors and families
FAMILY_CASES = [
    (
        "Prior keyword typo",
        lambda: bt.Prior("HalfNormal", sigm=50),
        "HalfNormal has no parameter 'sigm'; its parameters: ['sigma', 'tau']",
    ),
    ("Prior unknown distribution", lambda: bt.Prior("HalfNormall", sigma=1), "unknown PyMC distribution 'HalfNormall'"),
    ("Prior not a distribution", lambda: bt.Prior("Model"), "unknown PyMC distribution 'Model'"),
    ("Prior text parameter", lambda: bt.Prior("Normal", mu="0"), "Normal parameter mu='0' is not a finite number"),
    ("Prior infinite parameter", lambda: bt.Prior("Normal", mu=0.0, sigma=np.inf), "is not a finite number"),
    (
        "Progression prior name typo",
        lambda: bt.Progression(priors={"sigm": bt.Prior("HalfNormal", sigma=1)}),
        "unknown prior name(s) ['sigm']",
    ),
    (
        "Pk prior name typo",
        lambda: bt.Pk(priors={"sigma": bt.Prior("HalfNormal", sigma=1)}),
        "unknown prior name(s) ['sigma'] for family 'pk'",
    ),
    (
        "Pk prior of F without bioavailability",
        lambda: bt.Pk(priors={"log_f": bt.Prior("Normal", mu=-0.5, sigma=0.1)}),
        "a prior for log_f needs bioavailability=True (this model has no f)",
    ),
    (
        "Pk prior of the lag time without lag",
        lambda: bt.Pk(priors={"log_tlag": bt.Prior("Normal", mu=-0.5, sigma=0.1)}),
        "a prior for log_tlag needs lag=True (this model has no tlag)",
    ),
    ("Pk 3 compartments", lambda: bt.Pk(compartments=3), "compartments must be 1 or 2"),
    ("Pk route", lambda: bt.Pk(route="im"), "route must be 'oral' or 'iv'"),
    ("Pk error model", lambda: bt.Pk(error="lognormal"), "error must be one of"),
    ("Progression residual", lambda: bt.Progression(residual="cauchy"), "residual must be 'normal' or 'student'"),
]
for name, thunk, fragment in FAMILY_CASES:
    CASES.append(Case(f"family: {name}", (lambda thunk: lambda tmp: thunk)(thunk), ValueError, fragment))


@case("family: Pk weight not a name", TypeError, "weight is the name of the body-weight covariate")
def _(tmp):
    return lambda: bt.Pk(weight=70)


@case("fit: events without the pk family", DataError, "family 'progression' reads a Cohort, not NONMEM-style events")
def _(tmp):
    ev = read_nonmem(nm(), key=KEY, covariates=["WT"])
    return lambda: bt.fit(ev)


@case("fit: a Cohort with the pk family", DataError, "family 'pk' reads NONMEM-style events")
def _(tmp):
    c = co(lt())()
    return lambda: bt.fit(c, bt.Pk())


@case("fit: a raw DataFrame", TypeError, "expected a validated table")
def _(tmp):
    return lambda: bt.fit(lt())


@case(
    "fit: a Cohort with the survival family",
    DataError,
    "family 'survival' reads at-risk intervals, not a Cohort (read its table with bt.read_survival)",
)
def _(tmp):
    c = co(lt())()
    return lambda: bt.fit(c, "survival")


@case("fit: unknown family name", ValueError, "unknown family 'progresion'")
def _(tmp):
    c = co(lt())()
    return lambda: bt.fit(c, "progresion")


# ----------------------------------------------------------------------------- spec files
GOOD_SPEC = '[data]\nsource = "d.csv"\nformat = "longitudinal"\n[family]\nname = "progression"\n[sampler]\nseed = 1\n'
SPEC_CASES = [
    ("not TOML", "[data\nsource=", "not valid TOML"),
    ("unknown top-level key", GOOD_SPEC + "nmae = 'x'\n", "unknown key 'nmae'"),
    (
        "typo covariate",
        GOOD_SPEC.replace("[family]", 'covariate = ["age"]\n[family]'),
        "[data]: unknown key 'covariate'; valid keys",
    ),
    (
        "covariates as a string",
        GOOD_SPEC.replace("[family]", 'covariates = "age"\n[family]'),
        "'covariates' must be list, not str",
    ),
    ("missing source", GOOD_SPEC.replace('source = "d.csv"\n', ""), "[data] needs 'source'"),
    ("format excel", GOOD_SPEC.replace("longitudinal", "excel"), "format must be one of"),
    ("unknown family", GOOD_SPEC.replace('"progression"', '"progresion"'), "unknown family 'progresion'"),
    (
        "unknown family option",
        GOOD_SPEC.replace('name = "progression"', 'name = "progression"\nresidul = "student"'),
        "[family]: unknown key 'residul'",
    ),
    (
        "key and key_env",
        GOOD_SPEC.replace("[family]", 'key = "0123456789abcdefgh"\nkey_env = "K"\n[family]'),
        "give key or key_env, not both",
    ),
    ("unknown sampler key", GOOD_SPEC + "steps = 10\n", "[sampler]: unknown key 'steps'"),
    ("draws as text", GOOD_SPEC + 'draws = "1000"\n', "'draws' must be int, not str"),
    ("missing seed", GOOD_SPEC.replace("seed = 1\n", "draws = 10\n"), "[sampler] needs 'seed'"),
    ("bool as draws", GOOD_SPEC + "draws = true\n", "'draws' must be int, not bool"),
]
for name, text, fragment in SPEC_CASES:

    def _spec(tmp, text=text):
        from bayestwin.zoo import read_spec

        (tmp / "m").mkdir()
        (tmp / "m" / "spec.toml").write_text(text)
        return lambda: read_spec(tmp / "m" / "spec.toml")

    CASES.append(Case(f"spec.toml: {name}", _spec, SpecError, fragment))


@case("spec.toml: no such file", SpecError, "cannot read it")
def _(tmp):
    from bayestwin.zoo import read_spec

    return lambda: read_spec(tmp / "nowhere" / "spec.toml")


# ----------------------------------------------------------------------------- trial files
GOOD_TRIAL = '[design]\ncontrol = "standard"\ntreatment = "drug_a"\nn_per_arm = 20\n'
TRIAL_CASES = [
    ("patiens", "[population]\npatiens = 60\n" + GOOD_TRIAL, "[population]: unknown key 'patiens'"),
    ("trails", GOOD_TRIAL + "[simulation]\ntrails = 100\n", "[simulation]: unknown key 'trails'"),
    ("arms", GOOD_TRIAL + "arms = 3\n", "[design]: unknown key 'arms'"),
    ("unknown table", GOOD_TRIAL + "[analysis]\nx = 1\n", "unknown key 'analysis'"),
    ("no design", "[simulation]\ntrials = 10\n", "no [design] table"),
    ("no treatment arm", GOOD_TRIAL.replace('treatment = "drug_a"\n', ""), "[design] needs 'treatment'"),
    ("n_per_arm as text", GOOD_TRIAL.replace("20", '"20"'), "'n_per_arm' must be int, not str"),
    ("sample_size as text", GOOD_TRIAL + '[simulation]\nsample_size = "yes"\n', "'sample_size' must be bool"),
    ("not TOML", "[design\n", "not valid TOML"),
]
for name, text, fragment in TRIAL_CASES:

    def _trial(tmp, text=text):
        from bayestwin.trials import read_design

        (tmp / "t.toml").write_text(text)
        return lambda: read_design(tmp / "t.toml")

    CASES.append(Case(f"trial file: {name}", _trial, SpecError, fragment))


# ----------------------------------------------------------------------------- FHIR
def _bundle(entries):
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


FHIR_CASES = [
    ("empty bundle", _bundle([]), "the Bundle has no entries"),
    (
        "bundle without a Patient",
        _bundle([{"resource": {"resourceType": "Encounter", "status": "finished"}}]),
        "holds no Patient resource",
    ),
    ("entry without a resource", _bundle([{"fullUrl": "x"}]), "bundle entry without a resource"),
    (
        "entry list is not a list",
        {"resourceType": "Bundle", "type": "collection", "entry": {"a": 1}},
        "Bundle.entry must be a list",
    ),
]
for name, bundle, fragment in FHIR_CASES:
    CASES.append(
        Case(
            f"FHIR: {name}",
            (lambda b: lambda tmp: lambda: bt.read_fhir(b, key=KEY, measures=[]))(bundle),
            DataError,
            fragment,
        )
    )


# ----------------------------------------------------------------------------- decisions
PK_TWIN = SimpleNamespace(population=SimpleNamespace(family=bt.Pk()), patients=["P000000000001"])
R = [Regimen(100, 12), Regimen(200, 12)]
DOSE_CASES = [
    ("unknown metric", dict(target=(5, 15), metric="cmin"), ValueError, "metric must be one of"),
    ("target reversed", dict(target=(15, 5)), ValueError, "target must be (low, high) with low < high"),
    ("target NaN", dict(target=(np.nan, 5)), ValueError, "target must be (low, high)"),
    (
        "max_toxic above 1",
        dict(target=(5, 15), max_toxic=2.0),
        ValueError,
        "max_toxic and min_target are probabilities",
    ),
    (
        "min_target below 0",
        dict(target=(5, 15), min_target=-0.1),
        ValueError,
        "max_toxic and min_target are probabilities",
    ),
    ("negative limit", dict(target=(5, 15), limit=-1.0), ValueError, "limit must be a positive concentration"),
    ("start NaN", dict(target=(5, 15), start=np.nan), ValueError, "start must be a finite time"),
]
for name, kw, exc, fragment in DOSE_CASES:
    CASES.append(
        Case(f"dose_search: {name}", (lambda kw: lambda tmp: lambda: dose_search(PK_TWIN, R, **kw))(kw), exc, fragment)
    )

CASES += [
    Case(
        "dose_search: no regimens",
        lambda tmp: lambda: dose_search(PK_TWIN, [], target=(5, 15)),
        ValueError,
        "no regimens given",
    ),
    Case(
        "dose_search: regimens as numbers",
        lambda tmp: lambda: dose_search(PK_TWIN, [100, 200], target=(5, 15)),
        TypeError,
        "regimens must be Regimen objects",
    ),
    Case(
        "dose_search: a regimen twice",
        lambda tmp: lambda: dose_search(PK_TWIN, R + R[:1], target=(5, 15)),
        ValueError,
        "a regimen is listed twice",
    ),
    Case("Regimen: amount 0", lambda tmp: lambda: Regimen(0, 12), ValueError, "a regimen needs amount > 0"),
    Case(
        "Regimen: negative interval",
        lambda tmp: lambda: Regimen(100, -12),
        ValueError,
        "a regimen needs amount > 0, interval > 0",
    ),
    Case(
        "Regimen: infusion longer than the interval",
        lambda tmp: lambda: Regimen(100, 12, duration=13),
        ValueError,
        "infusion longer than the dosing interval",
    ),
]


def _forecast_draws():
    rng = np.random.default_rng(0)
    return xr.DataArray(
        rng.normal(size=(2, 50, 1, 2, 3)),
        dims=("chain", "draw", "patient", "therapy", "time"),
        coords={"patient": ["P1"], "therapy": ["a", "b"], "time": [0.0, 6.0, 12.0]},
    )


CASES += [
    Case(
        "prob_best: a time not forecast",
        lambda tmp: lambda: decision.prob_best(_forecast_draws(), 99.0),
        ValueError,
        "time 99 is not a forecast time (nearest: 0, 6, 12)",
    ),
    Case(
        "prob_best: direction",
        lambda tmp: lambda: decision.prob_best(_forecast_draws(), 12.0, "down"),
        ValueError,
        "direction must be 'lower' or 'higher'",
    ),
    Case(
        "expected_utility: a time not forecast",
        lambda tmp: lambda: decision.expected_utility(_forecast_draws(), lambda x: x, 7.0),
        ValueError,
        "time 7 is not a forecast time",
    ),
    Case(
        "prob_cross: nothing before by",
        lambda tmp: lambda: decision.prob_cross(_forecast_draws(), 0.0, by=-1.0),
        ValueError,
        "no forecast time at or before -1",
    ),
]


@case("evaluate_regimens: more memory than allowed", _memory.ResourceError, "would need about")
def _(tmp):
    from bayestwin.dosing import evaluate_regimens

    theta = {"cl": np.ones(4000), "v": np.full(4000, 30.0), "ka": np.ones(4000)}
    regimens = [Regimen(a, 12.0) for a in np.arange(1, 2001)]
    os.environ[_memory.ENV] = "1MB"
    return lambda: evaluate_regimens(bt.Pk(), theta, regimens, start=0.0)


@case("TrialDesign: 2.7 patients per arm", ValueError, "n_per_arm must be a whole number >= 2, not 2.7")
def _(tmp):
    from bayestwin.trials import TrialDesign

    return lambda: TrialDesign("standard", "drug_a", n_per_arm=2.7)


@case("TrialDesign: one patient per arm", ValueError, "n_per_arm must be a whole number >= 2, not 1")
def _(tmp):
    from bayestwin.trials import TrialDesign

    return lambda: TrialDesign("standard", "drug_a", n_per_arm=30).with_n(1)


@case("TrialDesign: no allocation", ValueError, "allocation must be > 0, not 0")
def _(tmp):
    from bayestwin.trials import TrialDesign

    return lambda: TrialDesign("standard", "drug_a", n_per_arm=30, allocation=0)


@case("sample_size: a fractional n_min", ValueError, "n_min must be a whole number >= 2, not 4.5")
def _(tmp):
    from bayestwin.trials import TrialDesign, sample_size

    return lambda: sample_size(None, TrialDesign("standard", "drug_a", n_per_arm=30), n_min=4.5)


# ----------------------------------------------------------------------------- artifacts
@pytest.fixture(scope="module")
def zoo_population():
    return bt.load("sleepstudy")


def saved(tmp, pop):
    return bt.save(pop, tmp / "art")


def _edit_card(folder: Path, edit, rechecksum: bool):
    from bayestwin.io import _canonical

    card = json.loads((folder / "card.json").read_text())
    edit(card)
    if rechecksum:
        card.pop("card_sha256", None)
        card["card_sha256"] = hashlib.sha256(_canonical(card)).hexdigest()
    (folder / "card.json").write_text(json.dumps(card))


ART = []  # (name, prepare(tmp, pop) -> thunk, exc, fragment)


def art(name, exc, fragment):
    def register(fn):
        ART.append((name, fn, exc, fragment))
        return fn

    return register


@art("save: not a Population", TypeError, "save() takes a Population or a Twin, not DataFrame")
def _(tmp, pop):
    return lambda: bt.save(lt(), tmp / "x")


@art("save: onto a file", ArtifactError, "exists and is not a folder")
def _(tmp, pop):
    (tmp / "f.csv").write_text("a,b\n1,2\n")
    return lambda: bt.save(pop, tmp / "f.csv")


@art("save: into someone else's folder", ArtifactError, "is a non-empty folder without card.json")
def _(tmp, pop):
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("mine")
    return lambda: bt.save(pop, tmp / "notes")


@art("save: over a foreign card.json", ArtifactError, "card.json is not valid JSON")
def _(tmp, pop):
    (tmp / "other").mkdir()
    (tmp / "other" / "card.json").write_text("{not json")
    return lambda: bt.save(pop, tmp / "other")


@art("save: the disk is full", ArtifactError, "could not save to")
def _(tmp, pop):
    import bayestwin.io as bio

    target = saved(tmp, pop)
    real = bio._Writer.table

    def full(self, *a, **k):
        real(self, *a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    bio._Writer.table = full
    return lambda: bt.save(pop, target)


@art("save: not enough free space", ArtifactError, "not enough free disk space")
def _(tmp, pop):
    import shutil

    import bayestwin.io as bio

    bio.shutil_disk_usage = shutil.disk_usage
    shutil.disk_usage = lambda p: SimpleNamespace(total=10**6, used=10**6 - 10, free=10)
    return lambda: bt.save(pop, tmp / "new")


def _locked_while(path: Path, action):
    """Run ``action`` while another process holds the bayestwin lock file ``path``."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, filelock; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
            "print('locked', flush=True); time.sleep(60)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"

    def run():
        try:
            action()
        finally:
            holder.kill()
            holder.wait()

    return run


@art("save: another process is saving", OutputError, "another process is writing the artifact")
def _(tmp, pop):
    target = saved(tmp, pop)
    return _locked_while(target / ".bayestwin.lock", lambda: bt.save(pop, target))


@art("condition_many: another process is writing the store", OutputError, "another process is writing the store")
def _(tmp, pop):
    from bayestwin.engine.many import condition_many

    (tmp / "store").mkdir()
    rows = pd.DataFrame({"Subject": [1, 1], "Days": [0.0, 1.0], "Reaction": [250.0, 260.0]})
    return _locked_while(
        tmp / "store" / ".bayestwin.lock", lambda: condition_many(pop, rows, key=KEY, out=tmp / "store")
    )


@art("load: no such folder", ArtifactError, "no model 'nowhere-xyz' in the model zoo")
def _(tmp, pop):
    return lambda: bt.load("nowhere-xyz")


@art("load: not an artifact", ArtifactError, "is not a bayestwin artifact: card.json is missing")
def _(tmp, pop):
    (tmp / "empty").mkdir()
    return lambda: bt.load(tmp / "empty")


@art("load: a flipped byte", ArtifactError, "fails its SHA-256 checksum")
def _(tmp, pop):
    target = saved(tmp, pop)
    f = next(p for p in target.iterdir() if p.suffix == ".nc")
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    return lambda: bt.load(target)


@art("load: a truncated file", ArtifactError, "truncated or changed after saving")
def _(tmp, pop):
    target = saved(tmp, pop)
    f = next(p for p in target.iterdir() if p.suffix == ".parquet")
    f.write_bytes(f.read_bytes()[:-10])
    return lambda: bt.load(target)


CARD_EDITS = [  # (name, edit, re-checksummed, fragment)
    ("an edited card", lambda c: c.update(kind="twin"), False, "fails its own checksum"),
    ("a card re-checksummed without its files", lambda c: c.pop("files"), True, "card.json is malformed (KeyError"),
    (
        "a card re-checksummed with a wrong type",
        lambda c: c["population"].update(schema="nope"),
        True,
        "card.json is malformed",
    ),
    ("a card re-checksummed with an unknown kind", lambda c: c.update(kind="model"), True, "unknown kind 'model'"),
    ("schema version 2", lambda c: c.update(schema_version=2), True, "schema version 2"),
    (
        "a file name outside the folder",
        lambda c: c["files"]["population"].update(path="../x.nc"),
        True,
        "is not a plain file name",
    ),
]
for name, edit, rechecksum, fragment in CARD_EDITS:

    def _edited(tmp, pop, edit=edit, rechecksum=rechecksum):
        target = saved(tmp, pop)
        _edit_card(target, edit, rechecksum=rechecksum)
        return lambda: bt.load(target)

    ART.append((f"load: {name}", _edited, ArtifactError, fragment))


@art("review: over a CSV", OutputError, "exists and is not an earlier reviewer report")
def _(tmp, pop):
    (tmp / "results.csv").write_text("a,b\n1,2\n")
    return lambda: review(pop, tmp / "results.csv")


@art("review: onto a device", OutputError, "exists and is not a regular file")
def _(tmp, pop):
    return lambda: review(pop, "/dev/null")


@art("review: into a missing folder", OutputError, "does not exist")
def _(tmp, pop):
    return lambda: review(pop, tmp / "no" / "such" / "r.html")


@art("virtual_cohort: a billion patients", _memory.ResourceError, "would need about")
def _(tmp, pop):
    from bayestwin.trials import virtual_cohort

    return lambda: virtual_cohort(pop, 10**9)


def _visits():
    return pd.DataFrame({"Subject": 1, "Days": [0.0, 1.0, 2.0], "Reaction": [250.0, 262.0, 270.0]})


@art("condition: chains as a string", ValueError, "chains must be a whole number >= 1, not '2'")
def _(tmp, pop):
    return lambda: pop.condition(_visits(), key=b"bad-input-key-0123456", chains="2")


@art("condition: draws = 0", ValueError, "draws must be a whole number >= 1, not 0")
def _(tmp, pop):
    return lambda: pop.condition(_visits(), key=b"bad-input-key-0123456", draws=0)


@art("condition: a negative tune", ValueError, "tune must be a whole number >= 0, not -5")
def _(tmp, pop):
    return lambda: pop.condition(_visits(), key=b"bad-input-key-0123456", tune=-5)


@art("virtual_cohort: n = 0", ValueError, "n must be a whole number >= 1")
def _(tmp, pop):
    from bayestwin.trials import virtual_cohort

    return lambda: virtual_cohort(pop, 0)


@art("virtual_cohort: n as a float", ValueError, "n must be a whole number >= 1, not 10.5")
def _(tmp, pop):
    from bayestwin.trials import virtual_cohort

    return lambda: virtual_cohort(pop, 10.5)


@art("condition_many: batch 0", ValueError, "a whole batch size >= 1")
def _(tmp, pop):
    from bayestwin.engine.many import condition_many

    rows = pd.DataFrame({"Subject": [1, 1], "Days": [0.0, 1.0], "Reaction": [250.0, 260.0]})
    return lambda: condition_many(pop, rows, key=KEY, out=tmp / "store", batch=0)


@art("condition_many: batch 2.5", ValueError, "a whole batch size >= 1")
def _(tmp, pop):
    from bayestwin.engine.many import condition_many

    rows = pd.DataFrame({"Subject": [1, 1], "Days": [0.0, 1.0], "Reaction": [250.0, 260.0]})
    return lambda: condition_many(pop, rows, key=KEY, out=tmp / "store", batch=2.5)


@art("condition_many: into a foreign folder", OutputError, "is a non-empty folder that is not a bayestwin store")
def _(tmp, pop):
    from bayestwin.engine.many import condition_many

    (tmp / "store").mkdir()
    (tmp / "store" / "mine.txt").write_text("keep me")
    rows = pd.DataFrame({"Subject": [1, 1], "Days": [0.0, 1.0], "Reaction": [250.0, 260.0]})
    return lambda: condition_many(pop, rows, key=KEY, out=tmp / "store")


@art("condition_many: a store of another job", ValueError, "holds batches of another job")
def _(tmp, pop):
    from bayestwin.engine.many import condition_many

    (tmp / "store").mkdir()
    (tmp / "store" / "run.json").write_text('{"name": "other"}')
    (tmp / "store" / "rows.parquet").write_bytes(b"old rows")
    rows = pd.DataFrame({"Subject": [1, 1], "Days": [0.0, 1.0], "Reaction": [250.0, 260.0]})
    return lambda: condition_many(pop, rows, key=KEY, out=tmp / "store")


@art("condition: rows with a text outcome", DataError, "non-numeric outcome value 'slow'")
def _(tmp, pop):
    rows = pd.DataFrame({"Subject": [1, 1], "Days": [0.0, 1.0], "Reaction": [250.0, "slow"]})
    return lambda: pop.condition(rows, key=KEY)


@art("condition: NONMEM events for a progression population", DataError, "family 'progression' reads a Cohort")
def _(tmp, pop):
    ev = read_nonmem(nm(), key=KEY, covariates=["WT"])
    return lambda: pop.condition(ev)


# ----------------------------------------------------------------------------- command line
CLI = []  # (name, argv(tmp) -> list, fragment)


def cli(name, fragment):
    def register(fn):
        CLI.append((name, fn, fragment))
        return fn

    return register


def _pk_csv(tmp):
    df = nm().drop(columns="WT")
    df.to_csv(tmp / "pk.csv", index=False)
    return str(tmp / "pk.csv")


DOSE = ["dose", "--patient", "1", "--amounts", "100,200", "--interval", "12", "--target", "5", "15"]
for name, extra, fragment in [
    ("negative interval", ["--interval", "-12"], "a regimen needs amount > 0, interval > 0"),
    ("amounts not numbers", ["--amounts", "100,lots"], "--amounts takes numbers separated by commas"),
    ("target reversed", ["--target", "15", "5"], "--target needs LOW < HIGH"),
    ("max-toxic above 1", ["--max-toxic", "3"], "--max-toxic is a probability in [0, 1]"),
    ("min-target above 1", ["--min-target", "1.5"], "--min-target is a probability"),
    ("negative limit", ["--limit", "-2"], "--limit must be a positive concentration"),
    ("zero doses", ["--doses", "0"], "doses >= 1"),
    ("zero draws", ["--draws", "0"], "--draws must be >= 1, not 0"),
    ("unknown patient", ["--patient", "99"], "patient '99' not found in the ID column"),
    ("unknown covariate", ["--covariates", "SEX"], "missing required column (column 'SEX')"),
]:
    CLI.append((f"dose: {name}", (lambda extra: lambda tmp: [*DOSE, "--data", _pk_csv(tmp), *extra])(extra), fragment))


@cli("dose: no such data file", "no such file")
def _(tmp):
    return [*DOSE, "--data", str(tmp / "missing.csv")]


@cli("dose: a table of one patient", "holds only patient '1'")
def _(tmp):
    nm().drop(columns="WT").iloc[:3].to_csv(tmp / "one.csv", index=False)
    return [*DOSE, "--data", str(tmp / "one.csv")]


@cli("dose: a binary file as data", "is not a readable CSV table")
def _(tmp):
    (tmp / "x.csv").write_bytes(bytes(range(256)) * 4)
    return [*DOSE, "--data", str(tmp / "x.csv")]


@cli("dose: an unmodelled record in the population's rows, by the table's ID", "(patient ID 1, row 0, column 'RATE')")
def _(tmp):
    df = nm().drop(columns="WT").assign(SS=[1, 0, 0, 0, 0, 0], II=[12.0, 0, 0, 0, 0, 0], RATE=[5.0, 0, 0, 0, 0, 0])
    df.to_csv(tmp / "ss.csv", index=False)
    return [*DOSE[:2], "2", *DOSE[3:], "--data", str(tmp / "ss.csv")]


@cli("review: no such file", "no such file")
def _(tmp):
    return ["review", str(tmp / "fit.nc")]


@cli("review: a file that is not netCDF", "is not an ArviZ DataTree in netCDF")
def _(tmp):
    (tmp / "fit.nc").write_text("not netcdf")
    return ["review", str(tmp / "fit.nc"), "-o", str(tmp / "r.html")]


@cli("review: output over a CSV", "exists and is not an earlier reviewer report")
def _(tmp):
    (tmp / "keep.csv").write_text("x\n1\n")
    return ["review", "sleepstudy", "-o", str(tmp / "keep.csv")]


@cli("review: unknown zoo model", "no model 'nosuchmodel' in the model zoo")
def _(tmp):
    return ["review", "nosuchmodel", "-o", str(tmp / "r.html")]


@cli("fit: spec with a typo", "unknown key 'covariate'")
def _(tmp):
    (tmp / "m").mkdir()
    (tmp / "m" / "spec.toml").write_text(GOOD_SPEC.replace("[family]", 'covariate = ["a"]\n[family]'))
    return ["fit", str(tmp / "m" / "spec.toml")]


@cli("fit: no such spec", "cannot read it")
def _(tmp):
    return ["fit", str(tmp / "none.toml")]


@cli("fit: draws 0", "--draws must be >= 1")
def _(tmp):
    return ["fit", "models/sleepstudy/spec.toml", "--draws", "0", "--out", str(tmp / "o")]


def _condition_argv(tmp, *extra, data="x.csv", key_env="BT_CATALOGUE_KEY"):
    os.environ["BT_CATALOGUE_KEY"] = "catalogue-key-0123456789"
    return [
        "condition",
        "--population",
        "sleepstudy",
        "--data",
        data,
        "--out",
        str(tmp / "s"),
        "--key-env",
        key_env,
        *extra,
    ]


CLI += [
    (
        "condition: no key in the environment",
        lambda tmp: _condition_argv(tmp, key_env="BT_NO_SUCH_VAR"),
        "to your pseudonymisation key",
    ),
    ("condition: batch 0", lambda tmp: _condition_argv(tmp, "--batch", "0"), "--batch must be >= 1"),
    ("condition: no such data file", lambda tmp: _condition_argv(tmp, data=str(tmp / "x.csv")), "no such file"),
]


@cli("trial: typo in the file", "unknown key 'trails'")
def _(tmp):
    (tmp / "t.toml").write_text(GOOD_TRIAL + "[simulation]\ntrails = 10\n")
    return ["trial", str(tmp / "t.toml")]


@cli("trial: an arm that is not a therapy", "arm 'drug_z' is not one of the [population] therapies")
def _(tmp):
    (tmp / "t.toml").write_text(GOOD_TRIAL.replace("drug_a", "drug_z"))
    return ["trial", str(tmp / "t.toml")]


@cli("trial: --out over a foreign file", "exists and is not an earlier operating-characteristics table")
def _(tmp):
    (tmp / "t.toml").write_text(GOOD_TRIAL)
    (tmp / "notes.csv").write_text("my,notes\n")
    return ["trial", str(tmp / "t.toml"), "--out", str(tmp / "notes.csv")]


@cli("trial: a pk arm that is not a regimen", "a pk trial arm is a regimen table")
def _(tmp):
    (tmp / "t.toml").write_text('[population]\nfamily = "pk"\n' + GOOD_TRIAL)
    return ["trial", str(tmp / "t.toml")]


@cli("validate: reps 0", "--reps and --twins must be >= 1")
def _(tmp):
    return ["validate", "sbc", "--reps", "0"]


@cli("usage: unknown option", "unrecognized arguments")
def _(tmp):
    return ["demo", "--patinets", "10"]


@cli("usage: missing required option", "the following arguments are required")
def _(tmp):
    return ["dose", "--patient", "1"]


# ----------------------------------------------------------------------------- the tests
def test_the_catalogue_has_at_least_150_cases():
    assert len(CASES) + len(ART) + len(CLI) >= 150, len(CASES) + len(ART) + len(CLI)


@pytest.fixture
def clean_env(monkeypatch):
    """Cases may set variables (memory limit, keys) or patch a writer: undone after each."""
    import shutil

    import bayestwin.io as bio

    monkeypatch.setenv("BAYESTWIN_MEMORY_LIMIT_UNUSED", "1")
    saved_env = {k: os.environ.get(k) for k in (_memory.ENV, "BT_CATALOGUE_KEY")}
    table, usage = bio._Writer.table, shutil.disk_usage
    yield
    bio._Writer.table, shutil.disk_usage = table, usage
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _check(err, c_where):
    for attr, want in c_where.items():
        assert getattr(err, attr) == want, (attr, getattr(err, attr), want)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_clearly(c, tmp_path, clean_env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        thunk = c.setup(tmp_path)
        before = snapshot(tmp_path)
        with pytest.raises(c.exc) as err:
            thunk()
    assert c.fragment in str(err.value), str(err.value)
    _check(err.value, c.where)
    if isinstance(err.value, DataError) and c.where.get("row") is not None:
        assert f"row {c.where['row']}" in str(err.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name, prepare, exc, fragment", ART, ids=[a[0] for a in ART])
def test_bad_artifact_or_output_is_refused_with_nothing_changed(
    name, prepare, exc, fragment, zoo_population, tmp_path, clean_env
):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        thunk = prepare(tmp_path, zoo_population)
        before = snapshot(tmp_path)
        with pytest.raises(exc) as err:
            thunk()
    assert fragment in str(err.value), str(err.value)
    assert snapshot(tmp_path) == before  # and no temporary file left behind
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


@pytest.mark.parametrize("name, argv, fragment", CLI, ids=[c[0] for c in CLI])
def test_command_line_errors_are_one_line_exit_1_before_any_fit(
    name, argv, fragment, tmp_path, capsys, monkeypatch, clean_env
):
    from bayestwin.cli import main

    def no_fit(*a, **k):
        raise AssertionError("a fit started before the arguments were checked")

    monkeypatch.setattr(bt, "fit", no_fit)
    monkeypatch.setattr("bayestwin.population.fit", no_fit)
    monkeypatch.setattr("bayestwin.zoo.fit_spec", no_fit, raising=False)
    args = argv(tmp_path)
    before = snapshot(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(args)
        except SystemExit as e:  # argparse usage errors
            code = e.code
    err = capsys.readouterr().err
    assert code == 1, err
    assert fragment in err, err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_debug_shows_the_traceback(tmp_path):
    from bayestwin.cli import main

    with pytest.raises(ValueError, match="no such file"):
        main(["--debug", "review", str(tmp_path / "missing.nc")])


@pytest.mark.parametrize("levels", ["0.5", 3.0, None, (-1.0,), (0.5, "x"), (0.5, True), (600.0,)])
def test_simulate_friberg_refuses_level_times_that_are_not_hours_in_the_cycle(levels):
    from bayestwin.families.pk_ode import simulate_friberg

    with pytest.raises(ValueError, match=r"levels are hours after the first dose, numbers in \[0, 504\]; not "):
        simulate_friberg(2, levels=levels)
