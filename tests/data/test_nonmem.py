"""NONMEM-style event tables: parsing, ADDL expansion, and one exact error per bad input."""

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.data.nonmem import read_nonmem

KEY = b"nonmem-test-key-0123"


def events(changes=None):
    """Two IDs: oral dose then levels (ID 1 with a pre-dose level and a weight covariate)."""
    df = pd.DataFrame(
        {
            "ID": [1, 1, 1, 1, 2, 2, 2],
            "TIME": [0.0, 0.0, 1.0, 6.0, 0.0, 2.0, 12.0],
            "AMT": [0.0, 320.0, 0.0, 0.0, 300.0, 0.0, 0.0],
            "DV": [0.1, ".", 7.2, 5.1, ".", 8.0, 2.2],
            "EVID": [0, 1, 0, 0, 1, 0, 0],
            "CMT": [2, 1, 2, 2, 1, 2, 2],
            "WT": [70.0, 70.0, 70.0, 71.0, 80.0, 80.0, 80.0],
        }
    )
    for (row, col), value in (changes or {}).items():
        df[col] = df[col].astype(object)
        df.loc[row, col] = value
    return df


def test_reads_flags_and_pseudonymises(tmp_path):
    ev = read_nonmem(events(), covariates=["WT"], key=KEY)
    assert ev.patients == [bt.pseudonymise(1, KEY), bt.pseudonymise(2, KEY)]
    obs = ev.observations()
    assert len(obs) == 5 and obs["before_first_dose"].tolist() == [True, False, False, False, False]
    assert obs["WT"].tolist() == [70.0, 70.0, 71.0, 80.0, 80.0]  # time-varying covariate kept
    assert ev.frame["MDV"].tolist() == [0, 1, 0, 0, 1, 0, 0]
    path = tmp_path / "events.csv"
    events().to_csv(path, index=False)  # "." for missing DV, as NONMEM writes it
    pd.testing.assert_frame_equal(read_nonmem(path, covariates=["wt"], key=KEY).frame, ev.frame)


def test_addl_and_infusions_expand_to_single_doses():
    df = pd.DataFrame(
        {
            "ID": [7, 7, 7],
            "TIME": [0.0, 0.0, 30.0],
            "AMT": [500.0, 0.0, 0.0],
            "DV": [np.nan, np.nan, 12.0],
            "EVID": [1, 2, 0],
            "RATE": [250.0, 0.0, 0.0],
            "II": [12.0, 0.0, 0.0],
            "ADDL": [3, 0, 0],
        }
    )
    doses = read_nonmem(df, key=KEY).doses()
    np.testing.assert_allclose(doses["TIME"], [0, 12, 24, 36])
    np.testing.assert_allclose(doses["AMT"], 500.0)
    np.testing.assert_allclose(doses["DURATION"], 2.0)


def test_a_table_joined_with_repeated_index_labels_reads_as_with_fresh_ones():
    """pd.concat of per-patient tables repeats index labels (0, 1, 2, 0, 1, 2): the readers name
    rows by position then; before, the PK and survival readers failed with a NumPy broadcast
    error (rows looked up by label multiplied)."""
    from bayestwin.families.pk import Pk

    base = events().assign(WT=[70.0] * 4 + [80.0] * 3)  # weight fixed within each ID
    one, two = base.iloc[:4], base.iloc[4:].reset_index(drop=True)
    joined = pd.concat([one, two])  # labels 0 1 2 3 0 1 2
    assert not joined.index.is_unique
    fresh = joined.reset_index(drop=True)
    a, b = (read_nonmem(t, key=KEY, covariates=["WT"]) for t in (joined, fresh))
    pd.testing.assert_frame_equal(a.frame, b.frame)
    pd.testing.assert_frame_equal(a.doses(), b.doses())
    design_a = Pk(weight="WT").design(a.frame, a.baseline, a.schema)
    design_b = Pk(weight="WT").design(b.frame, b.baseline, b.schema)
    for name in design_b.data:
        np.testing.assert_array_equal(np.asarray(design_a.data[name]), np.asarray(design_b.data[name]), err_msg=name)
    # an error names the row by its position in such a table
    bad = pd.concat([one, two.assign(TIME=[0.0, -2.0, 12.0])])
    with pytest.raises(bt.DataError) as err:
        read_nonmem(bad, key=KEY, covariates=["WT"])
    assert (err.value.row, err.value.column) == (5, "TIME")

    surv = pd.DataFrame({"patient": [1, 1], "start": [0.0, 2.0], "time": [2.0, 5.0], "event": [1, 0], "therapy": "a"})
    joined = pd.concat([surv, surv.assign(patient=2, start=[0.0, 1.0], time=[1.0, 7.0], event=[1, 1])])
    kw = dict(start="start", key=KEY, therapies=["a"])
    got, want = bt.read_survival(joined, **kw), bt.read_survival(joined.reset_index(drop=True), **kw)
    pd.testing.assert_frame_equal(got.frame, want.frame)

    # the joint reader names the row of the whole table, not of its marker or event part
    marks = pd.DataFrame({"patient": 1, "time": [0.0, 1.0, 2.0, 3.0], "marker": [1.0, 1.2, 1.4, np.nan]})
    marks = marks.assign(event=[np.nan, np.nan, np.nan, 1.0], therapy="a")
    late = marks.assign(patient=2, time=[0.0, 1.0, 5.0, 3.0], event=[np.nan, np.nan, np.nan, 0.0])
    for table in (pd.concat([marks, late]), pd.concat([marks, late], ignore_index=True)):
        with pytest.raises(bt.DataError, match="follow-up ends before the patient's last measurement") as err:
            bt.read_joint(table, key=KEY, therapies=["a"])
        assert (err.value.row, err.value.column) == (7, "time")


def test_reset_may_restart_time_and_ends_the_doses_before_it():
    df = events()
    df.loc[4:, "ID"] = 1
    df.loc[4, "EVID"] = 4  # reset and dose: a new occasion for the same subject, its clock restarted
    ev = read_nonmem(df, key=KEY, ignore=["WT"])
    assert ev.patients == [bt.pseudonymise(1, KEY)]
    assert not ev.observations()["before_first_dose"].iloc[1:].any()
    fam = bt.Pk()
    d = fam.design(ev.frame, ev.baseline, ev.schema).data
    np.testing.assert_array_equal(d["episode"], [0, 0, 0, 1, 1])  # levels at 0, 1, 6 | 2, 12
    np.testing.assert_array_equal(d["dose_episode"][0], [0, 1])
    theta = {"cl": 2.0, "v": 30.0, "ka": 1.0}
    t = d["time"][:, None]
    per_dose = fam.concentration(np, theta, t, d["t_dose"], d["amt"], d["duration"], d["infusion"])
    conc = np.where(d["episode"][:, None] == d["dose_episode"], per_dose, 0.0).sum(-1)
    # after the reset only the 300 given at the restarted time 0 acts (the 320 would still add at t = 2)
    alone = fam.concentration(np, theta, np.array([[2.0], [12.0]]), 0.0, 300.0, 1.0, 0.0).sum(-1)
    np.testing.assert_allclose(conc[3:], alone, rtol=1e-12)
    assert per_dose[3, 0] > 0.1 * conc[3]  # without the reset the first dose would still count


P1, P2 = bt.pseudonymise(1, KEY), bt.pseudonymise(2, KEY)
UNKNOWN_EVID = "unknown EVID (known: 0 observation, 1 dose, 2 other, 3 reset, 4 reset and dose)"
UNSORTED = "times not sorted within ID (only a reset, EVID 3 or 4, may restart time)"


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {(2, "EVID"): 7},
            f"{UNKNOWN_EVID} (patient {P1}, row 2, column 'EVID')",
        ),
        ({(1, "AMT"): 0.0}, f"dose with AMT <= 0 (patient {P1}, row 1, column 'AMT')"),
        ({(4, "AMT"): -5.0}, f"dose with AMT <= 0 (patient {P2}, row 4, column 'AMT')"),
        ({(2, "AMT"): 10.0}, f"observation with AMT (patient {P1}, row 2, column 'AMT')"),
        ({(3, "DV"): -1.0}, f"negative DV (patient {P1}, row 3, column 'DV')"),
        (
            {(6, "TIME"): 1.0},
            f"{UNSORTED} (patient {P2}, row 6, column 'TIME')",
        ),
        ({(5, "TIME"): "soon"}, f"non-numeric value (patient {P2}, row 5, column 'TIME')"),
        ({(3, "WT"): np.nan}, f"covariate missing (patient {P1}, row 3, column 'WT')"),
        ({(2, "DV"): np.nan}, f"observation without DV (patient {P1}, row 2, column 'DV')"),
    ],
)
def test_errors_name_id_row_and_column(changes, message):
    with pytest.raises(bt.DataError) as err:
        read_nonmem(events(changes), covariates=["WT"], key=KEY)
    assert str(err.value) == message


def test_rate_without_amt_addl_without_ii_and_missing_column():
    df = events().assign(RATE=[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(bt.DataError, match=rf"^RATE without AMT \(patient {P1}, row 2, column 'RATE'\)$"):
        read_nonmem(df, key=KEY, ignore=["WT"])
    df = events().assign(ADDL=[0, 2, 0, 0, 0, 0, 0])
    with pytest.raises(bt.DataError, match=rf"^ADDL without II \(patient {P1}, row 1, column 'II'\)$"):
        read_nonmem(df, key=KEY, ignore=["WT"])
    with pytest.raises(bt.DataError, match=r"^missing required column \(column 'EVID'\)$"):
        read_nonmem(events().drop(columns="EVID"), key=KEY)


def test_id_without_observations():
    df = events().iloc[:5]  # ID 2 keeps only its dose
    with pytest.raises(bt.DataError, match=rf"^ID with no observations \(patient {P2}, row 4, column 'EVID'\)$"):
        read_nonmem(df, key=KEY, ignore=["WT"])
    assert len(read_nonmem(df, key=KEY, allow_no_observations=True, ignore=["WT"]).patients) == 2


def test_extend_appends_records_of_the_same_ids_in_order():
    ev = read_nonmem(events(), covariates=["WT"], key=KEY)
    level = pd.DataFrame({"ID": [2, 1], "TIME": [24.0, 12.0], "AMT": [0.0, 0.0], "DV": [1.1, 2.5], "EVID": [0, 0]})
    level["WT"] = [80.0, 71.0]
    more = ev.extend(read_nonmem(level, covariates=["WT"], key=KEY))
    p1, p2 = ev.patients
    assert more.patients == [p1, p2]
    assert more.frame["ID"].tolist() == [p1] * 5 + [p2] * 4
    assert more.frame.loc[more.frame.ID == p2, "TIME"].tolist() == [0.0, 2.0, 12.0, 24.0]
    assert not more.frame["before_first_dose"].iloc[1:].any()
    assert len(ev.frame) == 7  # the original is unchanged


def test_extend_rejects_going_back_in_time_and_unknown_ids():
    ev = read_nonmem(events(), covariates=["WT"], key=KEY)
    p2 = bt.pseudonymise(2, KEY)
    back = pd.DataFrame({"ID": [2], "TIME": [6.0], "AMT": [0.0], "DV": [3.0], "EVID": [0], "WT": [80.0]}, index=[7])
    message = f"new records go back in time for this ID \\(patient {p2}, row 7, column 'TIME'\\)"
    with pytest.raises(bt.DataError, match=message):
        ev.extend(read_nonmem(back, covariates=["WT"], key=KEY))
    other = back.assign(ID=3, TIME=20.0)
    with pytest.raises(bt.DataError, match="records of an ID not in these events"):
        ev.extend(read_nonmem(other, covariates=["WT"], key=KEY))
