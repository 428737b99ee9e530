"""Property tests (Hypothesis): random tables and files give a valid object or a clear error.

For ``Cohort``, ``read_nonmem``, ``read_survival`` and the spec / trial-file readers, any input
(mixed types, NaN, infinities, stray strings, typos in keys) ends in exactly one of two ways:
a valid object whose invariants hold, or the reader's own error type (``DataError`` for tables,
``SpecError`` for files). Any other exception is a bug. Fixed seed (``derandomize``): not flaky.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bayestwin as bt
from bayestwin.data.nonmem import read_nonmem
from bayestwin.errors import DataError, SpecError

KEY = b"property-key-0123456789"
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

MESSY = st.one_of(
    st.integers(-3, 30),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([".", "NA", "<5", "1", "a", "", " ", "ctl", "drug", "F", "M"]),
    st.none(),
    st.booleans(),
)


def labels(draw, n: int) -> list:
    """Index labels for a table of n rows: 0..n-1, repeated ones (a table joined with pd.concat),
    or shuffled text; the readers name rows by label, or by position when a label repeats."""
    kind = draw(st.sampled_from(["range", "repeated", "text"]))
    if kind == "repeated":
        return [i % 2 for i in range(n)]
    if kind == "text":
        return [f"r{i}" for i in draw(st.permutations(range(n)))]
    return list(range(n))


def column(n, clean):
    """A column of n values: mostly a clean draw (so valid tables occur), sometimes messy."""
    return st.one_of(st.lists(clean, min_size=n, max_size=n), st.lists(MESSY, min_size=n, max_size=n))


@st.composite
def long_tables(draw):
    n = draw(st.integers(0, 8))
    return pd.DataFrame(
        {
            "id": draw(column(n, st.sampled_from(["a", "b", "c"]))),
            "t": draw(column(n, st.floats(-2, 10, allow_nan=False))),
            "y": draw(column(n, st.floats(-5, 5, allow_nan=False))),
            "arm": draw(column(n, st.sampled_from(["ctl", "drug"]))),
            "age": draw(column(n, st.floats(20, 80, allow_nan=False))),
            "sex": draw(column(n, st.sampled_from(["F", "M"]))),
        },
        index=labels(draw, n),
    )


@given(long_tables(), st.booleans())
@SETTINGS
def test_cohort_is_valid_or_a_data_error(df, declare):
    try:
        c = bt.Cohort(
            df,
            patient="id",
            time="t",
            outcome="y",
            therapy="arm",
            covariates=["age", "sex"],
            therapies=["ctl", "drug"] if declare else None,
            key=KEY,
        )
    except DataError:
        return
    assert len(c.frame) == len(df) and c.frame.index.is_unique and c.n_patients >= 1
    assert np.isfinite(c.frame["time"].to_numpy(float)).all()
    assert np.isfinite(c.frame["outcome"].to_numpy(float)).all()
    assert not c.frame.duplicated(["patient", "time"]).any()
    assert set(c.frame["therapy"]) <= set(c.schema.therapies)
    for name in c.schema.numeric:
        assert np.isfinite(c.baseline[name].to_numpy(float)).all()
    assert set(c.schema.covariates) == {"age", "sex"}


@st.composite
def event_tables(draw):
    n = draw(st.integers(0, 8))
    cols = {
        "ID": draw(column(n, st.sampled_from([1, 2]))),
        "TIME": draw(column(n, st.floats(0, 24, allow_nan=False))),
        "AMT": draw(column(n, st.sampled_from([0.0, 100.0]))),
        "DV": draw(column(n, st.floats(0, 20, allow_nan=False))),
        "EVID": draw(column(n, st.sampled_from([0, 1, 2]))),
    }
    for extra, values in (
        ("MDV", [0, 1]),
        ("CMT", [0, 1, 2]),
        ("RATE", [0.0, 50.0]),
        ("II", [0.0, 12.0]),
        ("ADDL", [0, 2]),
        ("SS", [0, 1]),
    ):
        if draw(st.booleans()):
            cols[extra] = draw(column(n, st.sampled_from(values)))
    if draw(st.booleans()):
        cols["WT"] = draw(column(n, st.floats(40, 120, allow_nan=False)))
    return pd.DataFrame(cols, index=labels(draw, n))


@given(event_tables(), st.booleans())
@SETTINGS
def test_read_nonmem_is_valid_or_a_data_error(df, lenient):
    covariates = ["WT"] if "WT" in df and lenient else []
    try:
        ev = read_nonmem(
            df,
            key=KEY,
            covariates=covariates,
            ignore=["WT"] if "WT" in df and not lenient else [],
            allow_no_observations=lenient,
        )
    except DataError:
        return
    f = ev.frame
    assert len(f) == len(df) and f.index.is_unique
    assert set(f["EVID"]).issubset({0, 1, 2, 3, 4})
    obs = f[f["EVID"] == 0]
    assert (obs["MDV"] == 0).all() and ((obs["DV"] >= 0) | obs["BLQ"].astype(bool)).all()
    assert (f.loc[f["EVID"].isin([1, 4]), "AMT"] > 0).all()
    assert np.isfinite(f["TIME"].to_numpy(float)).all()
    doses = ev.doses()
    assert len(doses) == int((f["ADDL"] + 1)[f["EVID"].isin([1, 4])].sum())
    # what the PK family cannot model is refused there, never ignored
    try:
        bt.Pk().check(f, ev.covariates)
    except DataError:
        pass


@st.composite
def survival_tables(draw):
    n = draw(st.integers(0, 6))
    return pd.DataFrame(
        {
            "id": draw(column(n, st.sampled_from(["a", "b"]))),
            "start": draw(column(n, st.floats(0, 5, allow_nan=False))),
            "stop": draw(column(n, st.floats(0, 10, allow_nan=False))),
            "event": draw(column(n, st.sampled_from([0, 1]))),
        },
        index=labels(draw, n),
    )


@given(survival_tables(), st.booleans())
@SETTINGS
def test_read_survival_is_valid_or_a_data_error(df, with_start):
    try:
        c = bt.read_survival(
            df, patient="id", time="stop", event="event", start="start" if with_start else None, therapy=None, key=KEY
        )
    except DataError:
        return
    f = c.frame
    assert len(f) == len(df) and f.index.is_unique
    assert (f["time"].to_numpy(float) > f["start"].to_numpy(float)).all()
    assert set(f["outcome"]) <= {0.0, 1.0}


# ----------------------------------------------------------------------------- files
def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def toml_text(tables: dict) -> str:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


VALUES = st.one_of(
    st.integers(-5, 5000),
    st.floats(allow_nan=False, allow_infinity=False, width=32).filter(math.isfinite),
    st.booleans(),
    st.sampled_from(
        ["progression", "pk", "survival", "longitudinal", "nonmem", "excel", "d.csv", "standard", "drug_a", "age", ""]
    ),
    st.lists(st.sampled_from(["age", "sex", "WT"]), max_size=3),
)


def tables(keys):
    return st.dictionaries(st.sampled_from(keys), VALUES, max_size=6)


SPEC_KEYS = {
    "data": ["source", "format", "patient", "time", "outcome", "covariates", "covariate", "key", "key_env", "ignore"],
    "family": ["name", "residual", "compartments", "route", "residul"],
    "sampler": ["seed", "draws", "tune", "chains", "steps", "target_accept"],
    "extra": ["x"],
}
TRIAL_KEYS = {
    "population": ["family", "patients", "patiens", "draws", "seed", "therapies"],
    "design": ["control", "treatment", "n_per_arm", "visits", "endpoint", "arms", "alpha"],
    "simulation": ["trials", "trails", "seed", "sample_size", "target"],
    "analysis": ["x"],
}


@given(st.fixed_dictionaries({}, optional={k: tables(v) for k, v in SPEC_KEYS.items()}))
@SETTINGS
def test_spec_reader_is_valid_or_a_spec_error(tmp_path_factory, tables):
    from bayestwin.zoo import SPEC_SCHEMA, read_spec

    folder = tmp_path_factory.mktemp("spec")
    (folder / "spec.toml").write_text(toml_text(tables))
    try:
        spec = read_spec(folder)
    except SpecError:
        return
    for section, table in spec.items():  # every key that was accepted is one the schema knows
        if isinstance(table, dict) and section in ("data", "sampler"):
            assert set(table) <= set(SPEC_SCHEMA[section])
    assert spec["data"]["format"] in ("longitudinal", "nonmem", "survival")


@given(st.fixed_dictionaries({}, optional={k: tables(v) for k, v in TRIAL_KEYS.items()}))
@SETTINGS
def test_trial_reader_is_valid_or_a_spec_error(tables):
    from bayestwin.trials import read_design
    from bayestwin.trials.design import TRIAL_SCHEMA

    try:
        spec = read_design(text=toml_text(tables))
    except SpecError:
        return
    for section, table in spec.items():
        assert set(table) <= set(TRIAL_SCHEMA[section])
    assert {"control", "treatment", "n_per_arm"} <= set(spec["design"])


def test_the_strategies_reach_valid_objects():
    """The property tests are not vacuous: clean draws of each strategy give valid objects."""
    df = pd.DataFrame(
        {
            "id": ["a", "a"],
            "t": [-1.0, 2.0],
            "y": [0.1, 0.2],
            "arm": ["ctl", "drug"],
            "age": [50.0] * 2,
            "sex": ["F"] * 2,
        }
    )
    assert (
        bt.Cohort(df, patient="id", time="t", outcome="y", therapy="arm", covariates=["age", "sex"], key=KEY).n_patients
        == 1
    )
    ev = pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 1.0], "AMT": [100.0, 0.0], "DV": [0.0, 5.0], "EVID": [1, 0]})
    assert len(read_nonmem(ev, key=KEY).patients) == 1
    sv = pd.DataFrame({"id": ["a"], "start": [0.0], "stop": [2.0], "event": [1]})
    assert len(bt.read_survival(sv, patient="id", time="stop", event="event", therapy=None, key=KEY).frame) == 1
    with pytest.raises(SpecError, match="unknown key 'trails'"):
        from bayestwin.trials import read_design

        read_design(text='[design]\ncontrol = "a"\ntreatment = "b"\nn_per_arm = 5\n[simulation]\ntrails = 3\n')
