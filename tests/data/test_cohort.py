"""Cohort validation: every bad input gets one clear error naming patient, row and column."""

import numpy as np
import pandas as pd
import pytest

from bayestwin import Cohort, DataError, pseudonymise, reidentify

KEY = b"test-key-0123456789"
TH = ["ctl", "drug"]


def frame(changes=None):
    df = pd.DataFrame(
        {
            "id": ["MRN-A", "MRN-A", "MRN-A", "MRN-B", "MRN-B"],
            "t": [0.0, 1.0, 2.0, 0.0, 1.0],
            "y": [1.0, 1.2, 1.4, 2.0, 2.1],
            "arm": ["ctl", "ctl", "drug", "drug", "drug"],
            "age": [50.0, 50.0, 50.0, 61.0, 61.0],
            "sex": ["F", "F", "F", "M", "M"],
        }
    )
    for (col, row), value in (changes or {}).items():
        df[col] = df[col].astype(object) if not isinstance(value, float) else df[col]
        df.loc[row, col] = value
    return df


def make(df, **kw):
    args = dict(patient="id", time="t", outcome="y", therapy="arm", covariates=["age", "sex"], therapies=TH, key=KEY)
    return Cohort(df, **(args | kw))


def expect(df, message, row, column, patient="MRN-A", **kw):
    with pytest.raises(DataError) as err:
        make(df, **kw)
    e = err.value
    assert message in str(e)
    assert (e.row, e.column) == (row, column)
    if patient is not None:
        assert e.patient == pseudonymise(patient, KEY)
        assert f"patient {pseudonymise(patient, KEY)}" in str(e)
    return e


def test_valid_cohort_is_pseudonymised_sorted_and_standardised():
    df = frame().iloc[::-1]
    c = make(df)
    assert c.n_patients == 2 and len(c) == 5
    assert set(c.patients) == {pseudonymise("MRN-A", KEY), pseudonymise("MRN-B", KEY)}
    assert "MRN-A" not in c.frame["patient"].values and "MRN" not in repr(c)
    assert c.frame.groupby("patient")["time"].apply(lambda s: s.is_monotonic_increasing).all()
    assert c.schema.numeric["age"] == (55.5, 5.5)
    assert c.schema.categorical["sex"] == ("F", "M")
    assert c.schema.design_columns == ["age", "sex[M]"]
    back = reidentify(["MRN-A", "MRN-B"], KEY)
    assert back[c.patients[0]] in {"MRN-A", "MRN-B"}


def test_missing_required_column():
    with pytest.raises(DataError, match=r"missing required column \(column 't'\)"):
        make(frame().drop(columns="t"))


def test_nan_and_inf_outcome_and_time():
    expect(frame({("y", 1): np.nan}), "outcome is NaN or infinite", 1, "y")
    expect(frame({("y", 4): np.inf}), "outcome is NaN or infinite", 4, "y", patient="MRN-B")
    expect(frame({("t", 2): np.nan}), "time is NaN or infinite", 2, "t")


def test_negative_time_is_pre_treatment_and_non_numeric_time_is_refused():
    # A centred time or a visit before randomisation (t < 0) is data the progression maths can
    # model: accepted, with no therapy exposure before time 0.
    from bayestwin.families.progression import Progression

    c = make(frame({("t", 0): -1.0}))
    d = Progression().design(c.frame, c.baseline, c.schema).data
    row = np.flatnonzero(d["time"] == -1.0)[0]
    assert d["exposure"][row].tolist() == [0.0] and d["on_therapy"][row].tolist() == [0.0]
    assert c.schema.time_scale == 2.0
    expect(frame({("t", 3): "yesterday"}), "non-numeric time value 'yesterday'", 3, "t", patient="MRN-B")


def test_wrong_dtype_outcome():
    expect(frame({("y", 2): "high"}), "non-numeric outcome value 'high'", 2, "y")
    df = frame()
    df["y"] = [True, False, True, True, False]
    expect(df, "wrong dtype for outcome", 0, "y")


def test_duplicate_patient_time():
    expect(frame({("t", 1): 0.0}), "duplicate time for this patient", 1, "t")


def test_therapy_not_declared():
    expect(
        frame({("arm", 3): "placebo"}),
        "therapy 'placebo' not in the declared set ['ctl', 'drug']",
        3,
        "arm",
        patient="MRN-B",
    )


def test_covariate_missing_and_changing():
    expect(frame({("age", 4): np.nan}), "covariate missing", 4, "age", patient="MRN-B")
    expect(frame({("age", 1): 51.0}), "baseline covariate changes within the patient", 0, "age")


def test_unseen_categorical_level_and_numeric_type_against_schema():
    schema = make(frame()).schema
    new = frame({("sex", 3): "X", ("sex", 4): "X"})
    expect(new, "level 'X' was not seen in fitting (known: ['F', 'M'])", 3, "sex", patient="MRN-B", schema=schema)
    new = frame({("age", 0): "old", ("age", 1): "old", ("age", 2): "old"})
    expect(new, "non-numeric value in numeric covariate", 0, "age", schema=schema)


def test_patient_with_zero_rows_in_baseline_table():
    base = pd.DataFrame({"id": ["MRN-A", "MRN-B", "MRN-C"], "age": [50.0, 61.0, 70.0], "sex": ["F", "M", "M"]})
    df = frame().drop(columns=["age", "sex"])
    expect(df, "patient has zero outcome rows", 2, "id", patient="MRN-C", baseline=base)
    c = make(df, baseline=base, allow_empty=True)  # conditioning accepts it: population predictive
    assert c.n_patients == 3 and len(c.rows(pseudonymise("MRN-C", KEY))) == 0


def test_rows_without_baseline_entry():
    base = pd.DataFrame({"id": ["MRN-A"], "age": [50.0], "sex": ["F"]})
    expect(
        frame().drop(columns=["age", "sex"]),
        "no baseline row (covariate missing)",
        3,
        "id",
        patient="MRN-B",
        baseline=base,
    )


def test_missing_patient_id_has_no_patient_to_name():
    df = frame()
    df.loc[2, "id"] = None
    e = expect(df, "missing patient id", 2, "id", patient=None)
    assert e.patient is None


def test_key_is_never_shown():
    c = make(frame())
    assert KEY.decode() not in repr(c) and KEY.decode() not in str(vars(c))


def test_restrict_and_with_outcome():
    df = pd.DataFrame({"patient": ["a", "a", "b", "b"], "time": [0.0, 1.0, 0.0, 1.0], "outcome": [1.0, 2.0, 3.0, 4.0]})
    c = Cohort(df, key=b"restrict-test-key-0123")
    first = c.restrict(c.frame[c.frame["time"] == 0.0])
    assert len(first) == 2 and first.patients == c.patients and first.schema is c.schema
    only_a = c.restrict(c.frame.iloc[:2])
    assert only_a.n_patients == 1 and len(c) == 4  # the original is untouched
    with pytest.raises(ValueError, match="restrict\\(\\) takes rows of this cohort's frame; row 9 is not one"):
        c.restrict(c.frame.rename(index={0: 9}))
    sim = c.with_outcome([5.0, 6.0, 7.0, 8.0])
    assert sim.frame["outcome"].tolist() == [5.0, 6.0, 7.0, 8.0] and c.frame["outcome"].tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="with_outcome\\(\\) needs 4 values, one per row; got shape \\(3,\\)"):
        c.with_outcome([1.0, 2.0, 3.0])
    with pytest.raises(DataError, match="non-finite outcome"):
        c.with_outcome([1.0, np.nan, 3.0, 4.0])
