"""What issue 17 made the readers and decisions *do* (the refusals are in test_bad_inputs.py):
FHIR statuses honoured and counted, the dose-search floor and edge flag, reports that replace
only earlier reports with ordinary permissions, a warning when a key is drawn, centred times."""

import os
import stat
import warnings

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.dosing import Regimen, regimen_table
from bayestwin.errors import DecisionWarning, KeyWarning

KEY = b"trust-tests-key-0123456"


def _bundle():
    from bayestwin.data.fhir_example import LOINC

    def obs(i, status, value):
        return {
            "resource": {
                "resourceType": "Observation",
                "id": f"o{i}",
                "status": status,
                "code": {"coding": [{"system": LOINC, "code": "14682-9"}]},
                "subject": {"reference": "Patient/p1"},
                "effectiveDateTime": f"2024-01-0{i}T08:00:00Z",
                "valueQuantity": {
                    "value": value,
                    "unit": "umol/L",
                    "system": "http://unitsofmeasure.org",
                    "code": "umol/L",
                },
            }
        }

    def condition(status):
        return {
            "resource": {
                "resourceType": "Condition",
                "subject": {"reference": "Patient/p1"},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                "verificationStatus": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": status}]
                },
            }
        }

    entries = [{"resource": {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-01-01"}}]
    entries += [
        obs(1, "final", 80.0),
        obs(2, "entered-in-error", 900.0),
        obs(3, "cancelled", 5.0),
        obs(4, "amended", 85.0),
    ]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}, condition


def test_fhir_statuses_are_honoured_and_counted():
    bundle, condition = _bundle()
    measures = [bt.Measure("14682-9", "creatinine", "umol/L")]
    data = bt.read_fhir(bundle, key=KEY, measures=measures, conditions={"44054006": "diabetes"})
    assert data.observations["value"].tolist() == [80.0, 85.0]  # the erroneous 900 and the cancelled 5 are not data
    assert data.report.excluded == {
        "Observation with status entered-in-error": 1,
        "Observation with status cancelled": 1,
    }
    assert "excluded by status" in set(data.report.table()["action"])
    for status, flag in (("confirmed", 1), ("refuted", 0), ("entered-in-error", 0)):
        b = {**bundle, "entry": [*bundle["entry"], condition(status)]}
        d = bt.read_fhir(b, key=KEY, measures=measures, conditions={"44054006": "diabetes"})
        assert d.baseline["diabetes"].tolist() == [flag], status


def _values(p_target_draws):
    """Metric draws (1 patient, regimens, 1000 draws) with a given P(target) in [5, 15] per regimen."""
    draws = []
    for p in p_target_draws:
        k = int(round(p * 1000))
        draws.append(np.r_[np.full(k, 10.0), np.full(1000 - k, 30.0)])
    x = np.stack(draws)[None]
    return {"trough": x, "peak": x, "auc": x}


R = [Regimen(100, 12), Regimen(200, 12), Regimen(300, 12)]


def table(p, **kw):
    return regimen_table(_values(p), R, ["P1"], metric="trough", target=(5, 15), limit=None, max_toxic=0.1, **kw)


def test_a_recommendation_needs_the_floor_and_the_edge_is_flagged():
    t = table([0.2, 0.9, 0.4])
    assert t["recommended"].tolist() == [False, True, False] and not t["edge"].any() and t.attrs["notes"] == []
    t = table([0.0, 0.0, 0.0])  # unreachable target: nothing recommended, the best shown in a note
    assert not t["recommended"].any()
    assert t.attrs["notes"][0].startswith("patient P1: no regimen offered meets the target")
    t = table([0.1, 0.3, 0.45])
    assert not t["recommended"].any() and "P(target) = 0.450 < 0.5" in t.attrs["notes"][0]
    assert table([0.1, 0.3, 0.45], min_target=0.4)["recommended"].tolist() == [False, False, True]
    t = table([0.1, 0.3, 0.8])  # the largest amount offered: the best dose may be beyond the grid
    assert t["recommended"].tolist() == [False, False, True] and t["edge"].tolist() == [False, False, True]
    assert "is the largest amount offered" in t.attrs["notes"][0]


def test_reports_replace_only_earlier_reports_with_ordinary_permissions(tmp_path):
    from bayestwin._atomic import OutputError
    from bayestwin.review.report import review

    pop = bt.load("sleepstudy")
    old = os.umask(0o022)
    try:
        path = review(pop, tmp_path / "r.html")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        first = path.read_bytes()
        review(pop, path, title="again")  # an earlier report: replaced without asking
        assert path.read_bytes() != first
        (tmp_path / "data.csv").write_text("keep\n")
        with pytest.raises(OutputError):
            review(pop, tmp_path / "data.csv")
        review(pop, tmp_path / "data.csv", overwrite=True)
        assert "bayestwin review" in (tmp_path / "data.csv").read_text()
    finally:
        os.umask(old)


def test_a_drawn_key_is_announced():
    df = pd.DataFrame({"patient": ["a", "a"], "time": [0.0, 1.0], "outcome": [1.0, 2.0]})
    with pytest.warns(KeyWarning, match="no pseudonymisation key given"):
        bt.Cohort(df)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bt.Cohort(df, key=KEY)


def test_dose_search_says_so_when_nothing_meets_the_target():
    """End to end on a twin whose posterior is known exactly (every draw CL 2, V 30, ka 1.2)."""
    import xarray as xr

    from bayestwin.dosing import dose_search

    rows = pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 2.0], "AMT": [100.0, 0.0], "DV": [np.nan, 2.5], "EVID": [1, 0]})
    events = bt.read_nonmem(rows, key=KEY)
    p = events.patients
    post = xr.Dataset(
        {
            f"patient_{k}": (("chain", "draw", "patient"), np.full((2, 50, 1), v))
            for k, v in (("cl", 2.0), ("v", 30.0), ("ka", 1.2))
        },
        coords={"patient": p},
    )
    twin = type(
        "T",
        (),
        {"population": type("Pop", (), {"family": bt.Pk()})(), "patients": p, "posterior": post, "cohort": events},
    )()
    regimens = [Regimen(a, 12.0) for a in (100.0, 200.0)]
    with pytest.warns(DecisionWarning, match="no regimen offered meets the target"):
        t = dose_search(twin, regimens, target=(500.0, 600.0))  # unreachable: troughs are a few mg/L
    assert not t["recommended"].any() and (t["P(target)"] == 0).all()
    with pytest.warns(DecisionWarning, match="amount offered; the best dose may lie beyond the grid"):
        t = dose_search(twin, regimens, target=(1.0, 1000.0), metric="peak")
    assert t["recommended"].tolist() == [True, False] or t["recommended"].tolist() == [False, True]
    assert t.loc[t["recommended"], "edge"].all()


def test_covariate_types_are_explicit():
    df = pd.DataFrame(
        {
            "patient": ["a", "b", "c"],
            "time": [0.0] * 3,
            "outcome": [1.0, 2.0, 3.0],
            "grade": [1, 2, 3],
            "sex": list("FMF"),
        }
    )
    c = bt.Cohort(df, covariates=["grade", "sex"], key=KEY)
    assert list(c.schema.numeric) == ["grade"] and list(c.schema.categorical) == ["sex"]
    c = bt.Cohort(df, covariates=["grade", "sex"], categorical=["grade"], key=KEY)
    assert c.schema.categorical["grade"] == ("1", "2", "3")
    timed = df.assign(time=pd.to_timedelta([0, 12, 36], unit="h"))
    assert bt.Cohort(timed, time_unit="days", key=KEY).frame["time"].tolist() == [0.0, 0.5, 1.5]
