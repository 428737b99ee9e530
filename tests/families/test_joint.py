"""Family joint: a biomarker linked to the event hazard, on simulated data with known truth."""

import warnings

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.families.joint import simulate
from tests.conftest import KEY

HELD = "jt-0080"


@pytest.fixture(scope="module")
def joint():
    """81 simulated patients (biomarker every year until the event or censoring); the last
    one is held out. The fit excludes it."""
    df, truth = simulate(81, sigma=2.0, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cohort = bt.read_joint(df[df.patient != HELD], covariates=["age"], key=KEY)
        pop = bt.fit(cohort, bt.Joint(pieces=3), draws=1000, tune=1000, seed=0, progressbar=False)
    return df, truth, pop


def rows(pid, marks, end, event=0):
    r = [(pid, float(t), float(m), np.nan, "control", 60.0) for t, m in marks]
    r.append((pid, float(end), np.nan, event, "control", 60.0))
    return pd.DataFrame(r, columns=["patient", "time", "marker", "event", "therapy", "age"])


def test_read_joint_errors():
    ok = rows("a", [(0, 10), (1, 11)], 1.5)
    pa = bt.pseudonymise("a", KEY)
    cohort = bt.read_joint(ok, therapy=None, key=KEY)
    assert cohort.frame["kind"].tolist() == [0, 0, 1]
    with pytest.raises(bt.DataError, match=rf"follow-up ends before the patient's last measurement \(patient {pa}"):
        bt.read_joint(rows("a", [(0, 10), (2, 11)], 1.5), therapy=None, key=KEY)
    with pytest.raises(bt.DataError, match=rf"more than one follow-up \(event\) row for this patient \(patient {pa}"):
        bt.read_joint(pd.concat([ok, ok.tail(1).assign(time=3.0)], ignore_index=True), therapy=None, key=KEY)
    with pytest.raises(bt.DataError, match=r"row has neither a marker value nor an event \(patient .*, row 1"):
        bt.read_joint(ok.assign(marker=[10.0, np.nan, np.nan]), therapy=None, key=KEY)
    switched = pd.concat([ok.assign(therapy="control"), rows("a", [(3, 12)], 3.5).assign(therapy="drug")])
    with pytest.raises(bt.DataError, match="more than one follow-up|therapy changes within the patient"):
        bt.read_joint(switched.iloc[[0, 1, 3, 4]].reset_index(drop=True), therapies=["control", "drug"], key=KEY)


def test_joint_fit_recovers_the_association_and_the_therapy_effect(joint):
    _, truth, pop = joint
    assert pop.verdict.converged
    s = pop.summary()
    print(s.loc[["alpha", "therapy_slope[drug]", "log_hr[drug]", "sigma", "slope"], ["mean", "sd"]])
    for name, true in [
        ("alpha", truth["alpha"]),
        ("therapy_slope[drug]", truth["therapy_slope"]["drug"]),
        ("log_hr[drug]", truth["log_hr"]["drug"]),
        ("sigma", truth["sigma"]),
        ("slope", truth["slope"]),
    ]:
        assert abs(s.loc[name, "mean"] - true) < 3 * s.loc[name, "sd"], (name, s.loc[name, "mean"], true)
    assert s.loc["alpha", "mean"] - 2 * s.loc["alpha", "sd"] > 0  # the biomarker's link is detected


def test_joint_twin_matches_a_full_refit(joint):
    """The held-out patient's twin (biomarker readings and follow-up) against a refit with them."""
    df, truth, pop = joint
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        full = bt.fit(
            bt.read_joint(df, covariates=["age"], key=KEY), bt.Joint(pieces=3), draws=500, seed=1, progressbar=False
        )
    mine = df[df.patient == HELD]
    twin = pop.condition(mine, key=KEY, method="importance", draws=2000)
    assert twin.verdict.converged
    ps = bt.pseudonymise(HELD, KEY)
    for name in ("patient_intercept", "patient_slope"):
        ref = full.posterior[name].sel(patient=ps).to_numpy().ravel()
        x = twin.posterior[name].to_numpy().ravel()
        print(name, "dmean/SD", (x.mean() - ref.mean()) / ref.std(), "SD ratio", x.std() / ref.std())
        # Monte-Carlo SE of the difference of means ~0.03 ref SD (ESS >= 1,000 on each side)
        assert abs(x.mean() - ref.mean()) < 0.15 * ref.std(), name
        assert 0.85 < x.std() / ref.std() < 1.15, name
        assert abs(x.mean() - truth[name][HELD]) < 3 * x.std(), name


def test_new_biomarker_readings_update_the_event_risk(joint):
    """Two patients alike up to year 2; at years 3 and 4 one biomarker keeps its pace, the other
    rises fast. Updating the twins moves their risks of an event by year 6 apart."""
    _, _, pop = joint
    first = pd.concat([rows("steady", [(0, 10), (1, 11), (2, 12)], 2), rows("rising", [(0, 10), (1, 11), (2, 12)], 2)])
    twin = pop.condition(first.reset_index(drop=True), key=KEY, method="importance")
    before = twin.predict(times=np.linspace(2, 6, 21)).risk(6)["mean"].unstack("therapy")
    steady, rising = bt.pseudonymise("steady", KEY), bt.pseudonymise("rising", KEY)
    assert before.loc[steady, "control"] == pytest.approx(before.loc[rising, "control"], abs=0.03)  # same data

    new = pd.concat([rows("steady", [(3, 13), (4, 14)], 4), rows("rising", [(3, 18), (4, 22)], 4)])
    updated = twin.update(new.reset_index(drop=True), key=KEY)
    assert updated.verdict.converged
    # the follow-up row was replaced (event-free to year 4), not added: one interval per patient
    assert (updated.cohort.frame.groupby("patient")["kind"].sum() == 1).all()
    fc = updated.predict(times=np.linspace(4, 6, 11))
    after = fc.risk(6)["mean"].unstack("therapy")
    print(before, after, sep="\n")
    assert after.loc[rising, "control"] > after.loc[steady, "control"] + 0.2
    slope = updated.posterior["patient_slope"]
    # the fast riser's slope is above the steady patient's 95% posterior quantile
    assert slope.sel(patient=rising).mean() > slope.sel(patient=steady).quantile(0.95)
    # switching to the drug at year 4 lowers the biomarker's slope, and with it the risk
    assert (after["drug"] < after["control"]).all()
