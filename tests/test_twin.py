"""Twins: no-data patients, sequential updates, forecasts and decisions."""

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin import decision
from tests.conftest import KEY, THERAPIES


@pytest.fixture(scope="module")
def twin(population, simulated):
    _, held, _ = simulated
    return population.condition(held, key=KEY, seed=3)


def test_twin_is_labelled_and_converged(twin, simulated):
    _, held, truth = simulated
    post = twin.posterior
    assert set(post["patient_intercept"].dims) == {"chain", "draw", "patient"}
    assert post.sizes["chain"] == 4 and post.sizes["draw"] == 1000
    assert twin.verdict.converged, str(twin.verdict)
    assert set(twin.verdict.table.columns) >= {"rhat", "ess_bulk", "ess_tail", "divergences", "bfmi_min"}
    # True parameters lie within 4 posterior SDs (3 visits: weakly informed but unbiased).
    for pid in held.patient.unique():
        p = bt.pseudonymise(pid, KEY)
        for name in ("patient_intercept", "patient_slope"):
            d = post[name].sel(patient=p)
            assert abs(float(d.mean()) - truth[name][pid]) < 4 * float(d.std())


def test_patient_without_rows_gets_population_predictive(population, simulated):
    _, held, _ = simulated
    pid = held.patient.unique()[0]
    rows = held[held.patient == pid]
    base = rows[["patient", "age", "sex"]].drop_duplicates()
    empty = population.condition(rows.iloc[:0].drop(columns=["age", "sex"]), baseline=base, key=KEY, seed=1)
    assert empty.verdict.table.loc[bt.pseudonymise(pid, KEY), "n_obs"] == 0
    # Population predictive of the intercept: intercept + X beta + u, u ~ N(0, tau0^2).
    pop = population.posterior
    x = population.schema.covariate_matrix(empty.cohort.baseline)[0]
    a = pop["intercept"] + (pop["beta_level"] * x).sum("covariate")
    pred_sd = np.sqrt(float(a.var()) + float((pop["re_chol_stds"].sel(effect="intercept") ** 2).mean()))
    tw = empty.posterior["patient_intercept"]
    assert abs(float(tw.mean()) - float(a.mean())) < 0.1 * pred_sd
    assert 0.9 < float(tw.std()) / pred_sd < 1.1


def test_update_equals_conditioning_on_all_rows(population, simulated):
    _, held, _ = simulated
    pid = held.patient.unique()[1]
    rows = held[held.patient == pid].sort_values("time")
    first = population.condition(rows.iloc[:2], key=KEY, seed=1, draws=2000)
    updated = first.update(rows.iloc[2:], key=KEY, seed=2)
    once = population.condition(rows, key=KEY, seed=3, draws=2000)
    assert updated.verdict.table["n_obs"].iloc[0] == 3
    for name in ("patient_intercept", "patient_slope"):
        u, o = updated.posterior[name], once.posterior[name]
        assert abs(float(u.mean()) - float(o.mean())) < 0.1 * float(o.std())
        assert 0.9 < float(u.std()) / float(o.std()) < 1.1
    # The update sharpened the posterior relative to two visits.
    assert float(updated.posterior["patient_slope"].std()) < float(first.posterior["patient_slope"].std())


@pytest.mark.filterwarnings("ignore::bayestwin.ConvergenceWarning")
def test_update_rejects_repeated_time(population, simulated):
    _, held, _ = simulated
    rows = held[held.patient == held.patient.unique()[1]]
    first = population.condition(rows, key=KEY, seed=1, draws=200, tune=200)
    with pytest.raises(bt.DataError, match="new row repeats an existing time for this patient"):
        first.update(rows.iloc[:1], key=KEY)
    later = rows.iloc[:1].assign(time=99.0)
    with pytest.raises(bt.DataError, match=r"rows of a patient not in this cohort \(was the same key used\?\)"):
        first.update(later, key=b"another-key-0123456789")


def test_forecast_dims_summary_and_decisions(twin, population):
    fc = twin.predict(times=[6.0, 12.0, 18.0])
    pp = fc.idata.posterior_predictive
    assert set(pp["mean"].dims) == {"chain", "draw", "patient", "therapy", "time"}
    assert list(pp["mean"].therapy.values) == THERAPIES
    table = fc.summary()
    assert list(table.columns) == [
        "patient",
        "therapy",
        "time",
        "quantity",
        "mean",
        "q05",
        "q25",
        "median",
        "q75",
        "q95",
    ]
    assert len(table) == 3 * 3 * 3 * 2
    assert (table["q05"] <= table["median"]).all() and (table["median"] <= table["q95"]).all()
    # At the start time every therapy shares the same history; later the drugs bend the slope down,
    # as in the fitted therapy effects.
    at6 = table[(table.time == 6.0) & (table.quantity == "mean")].groupby("therapy")["mean"].mean()
    assert np.ptp(at6.to_numpy()) < 1e-8
    # Per draw, the forecast's slope difference is exactly the twin's own drug_b effect draw.
    m = pp["mean"].sel(time=18.0) - pp["mean"].sel(time=6.0)
    diff = (m.sel(therapy="drug_b") - m.sel(therapy="standard")) / 12.0
    own = twin.posterior["therapy_slope"].isel(therapy_effect=1)
    np.testing.assert_allclose(diff.transpose("chain", "draw", "patient").to_numpy(), own.to_numpy(), rtol=1e-8)
    # ... and the twin's effect stays close to the population's (one patient moves it little).
    pop_effect = population.posterior["therapy_slope"].sel(therapy_effect="drug_b")
    assert abs(float(own.mean()) - float(pop_effect.mean())) < 0.2 * float(pop_effect.std())
    best = fc.prob_best(time=18.0, direction="lower")
    np.testing.assert_allclose(best.sum(axis=1), 1.0)
    worst = fc.prob_best(time=18.0, direction="higher")
    assert (best["drug_b"] > worst["drug_b"]).all()
    cross = fc.prob_cross(threshold=-1e9, by=18.0, direction="above")
    assert (cross == 1.0).all().all()
    eu = fc.expected_utility(lambda y: -y, time=18.0)
    expected = -pp["mean"].sel(time=18.0).mean(["chain", "draw"]).transpose("patient", "therapy").to_pandas()
    pd.testing.assert_frame_equal(eu, expected)


def test_decision_errors_are_clear(twin):
    fc = twin.predict(times=[6.0, 12.0])
    with pytest.raises(ValueError, match="direction must be 'lower' or 'higher'"):
        fc.prob_best(12.0, direction="down")
    with pytest.raises(ValueError, match="no forecast time at or before 1.0"):
        decision.prob_cross(fc.draws["mean"], 0.0, by=1.0)
    with pytest.raises(ValueError, match="therapy 'surgery' not in the population's therapies"):
        twin.predict(therapies=["surgery"])


def test_switch_mid_history_enters_exposure():
    from bayestwin.families.progression import exposure

    cum, cur = exposure(np.array([0.0, 2.0, 5.0, 9.0]), np.array([3.0, np.inf]), np.array([0, 2]), 3)
    np.testing.assert_allclose(cum, [[0, 0, 0], [2, 0, 0], [3, 0, 2], [3, 0, 6]])
    np.testing.assert_allclose(cur.argmax(1), [0, 0, 2, 2])


def test_importance_path_gate_and_fallback(population, simulated, twin):
    from bayestwin.review.convergence import Thresholds

    _, held, _ = simulated
    fast = population.condition(held, key=KEY, seed=3, method="importance")
    table = fast.verdict.table
    assert fast.verdict.converged and (table["method"] == "importance").all()
    assert (table["khat"] <= 0.7).all() and (table["ess_bulk"] >= 400).all()
    assert fast.idata.sample_stats["khat"].sizes == {"chain": 4, "patient": 3}
    # Same target as NUTS: the two agree within Monte-Carlo error (ESS >= 400 on each side).
    for name in ("patient_intercept", "patient_slope"):
        a, b = twin.posterior[name], fast.posterior[name]
        sd = a.std(["chain", "draw"])
        assert (abs(a.mean(["chain", "draw"]) - b.mean(["chain", "draw"])) < 0.25 * sd).all()
    # Twins failing the gate are redone by NUTS (preconditioned by their importance proposal):
    # the same posterior as plain NUTS, within Monte-Carlo error.
    strict = population.condition(held, key=KEY, seed=3, method="importance", thresholds=Thresholds(khat=-1.0))
    assert (strict.verdict.table["method"] == "nuts").all() and strict.verdict.converged
    assert (strict.verdict.table["ess_bulk"] >= 400).all()
    for name in ("patient_intercept", "patient_slope"):
        a, b = twin.posterior[name], strict.posterior[name]
        sd = a.std(["chain", "draw"])
        assert (abs(a.mean(["chain", "draw"]) - b.mean(["chain", "draw"])) < 0.25 * sd).all()
        assert (abs(b.std(["chain", "draw"]) / sd - 1) < 0.15).all()
    # An update stays on the fast path.
    pid = held.patient.unique()[0]
    later = held[held.patient == pid].iloc[-1:].assign(time=9.0)
    assert (fast.update(later, key=KEY).verdict.table["method"] == "importance").all()
    with pytest.raises(ValueError, match="method must be 'nuts' or 'importance', not 'laplace'"):
        population.condition(held, key=KEY, method="laplace")


def test_out_of_population_flag(population, simulated, twin):
    """A patient whose level sits 10 population SDs above anyone else's is flagged (and warned
    about); the held-out patients drawn from the population, and a patient without data, are not."""
    from scipy.stats import chi2

    _, held, _ = simulated
    table = twin.verdict.table
    assert not table["out_of_population"].any()
    assert (table["re_distance2"] < chi2.ppf(0.99, 2)).all()
    pid = held.patient.unique()[0]
    sd0 = float(population.posterior["re_chol_stds"].sel(effect="intercept").mean())
    odd = held[held.patient == pid].assign(outcome=lambda d: d.outcome + 10 * sd0)
    with pytest.warns(bt.OutOfPopulationWarning, match=r"1 twin\(s\) outside the population's 99% predictive region"):
        flagged = population.condition(odd, key=KEY, seed=1, method="importance")
    row = flagged.verdict.table.loc[bt.pseudonymise(pid, KEY)]
    assert row["out_of_population"] and row["re_distance2"] > chi2.ppf(0.99, 2)
    assert "1 out of population" in repr(flagged)
    assert bool(flagged.summary()[("gate", "out_of_population")].iloc[0])
    rows = held[held.patient == pid]
    base = rows[["patient", "age", "sex"]].drop_duplicates()
    empty = population.condition(rows.iloc[:0].drop(columns=["age", "sex"]), baseline=base, key=KEY, seed=1)
    assert not empty.verdict.table["out_of_population"].any()


def test_a_first_twin_compiles_only_its_own_shapes_program():
    """The population's Gaussian approximation reuses the batch's program (its blocks) instead of
    compiling one more for a shape no patient has (0.4-0.5 s of a first twin)."""
    pop = bt.load("sleepstudy")
    rows = pd.DataFrame({"Subject": 1, "Days": [0.0, 1.0, 2.0], "Reaction": [250.0, 262.0, 270.0]})
    pop.condition(rows, key=KEY, seed=1, draws=100)
    assert list(pop._programs) == [(4,)]  # 3 rows, padded to 4: one program, no other
