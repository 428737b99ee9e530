"""Predictive checks, PSIS-LOO per observation and per patient, and model comparison."""

import warnings

import numpy as np
import pytest

import bayestwin as bt
from bayestwin.families.progression import Progression
from bayestwin.review import predictive
from tests.conftest import KEY


def test_loo_per_observation_and_per_patient(population):
    ll = population.idata.log_likelihood["y"]
    by_obs = predictive.loo(population)
    by_patient = predictive.loo(population, by="patient")
    assert by_obs.pareto_k.sizes == {"obs": ll.sizes["obs"]}
    assert by_patient.pareto_k.sizes == {"patient": 40}
    # the per-patient log-likelihood is the sum over each patient's rows
    grouped = predictive.log_likelihood(population, by="patient").log_likelihood["y"]
    idx = population.idata.constant_data["patient_idx"].to_numpy()
    np.testing.assert_allclose(grouped.isel(patient=7), ll.isel(obs=np.flatnonzero(idx == 7)).sum("obs"))
    # leaving out a whole patient is harder than leaving out one visit
    assert by_patient.elpd < by_obs.elpd
    table = predictive.pareto_k_table(population)
    assert len(table) == 40 and table["pareto_k"].is_monotonic_decreasing
    assert set(table.columns) == {"pareto_k", "elpd_loo", "reliable"}
    with pytest.raises(ValueError, match="by must be one of \\('obs', 'patient'\\), not 'visit'"):
        predictive.loo(population, by="visit")


def test_posterior_and_prior_predictive_checks(population):
    post = predictive.predictive_check(population, draws=200)
    y = post.posterior_predictive["y"]
    obs = post.observed_data["y"]
    assert y.sizes["chain"] * y.sizes["draw"] == 200 and y.sizes["obs"] == obs.sizes["obs"]
    # the replicated data sets look like the data: mean and SD within their predictive spread
    for stat in (np.mean, np.std):
        reps = stat(y.to_numpy().reshape(200, -1), axis=1)
        assert np.quantile(reps, 0.01) < stat(obs.to_numpy()) < np.quantile(reps, 0.99)
    prior = predictive.predictive_check(population, kind="prior", draws=100)
    assert prior.prior_predictive["y"].sizes["draw"] == 100
    # priors are weakly informative: wider than the data, but on their scale
    spread = float(prior.prior_predictive["y"].std())
    assert float(obs.std()) < spread < 100 * float(obs.std())


@pytest.mark.slow
def test_compare_prefers_student_t_residual_with_outliers(simulated):
    train, _, _ = simulated
    rng = np.random.default_rng(4)
    bad = rng.random(len(train)) < 0.05
    noisy = train.assign(outcome=train.outcome + np.where(bad, rng.choice([-1, 1], len(train)) * 25.0, 0.0))
    cohort = bt.Cohort(noisy, covariates=["age", "sex"], key=KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits = {
            "normal": bt.fit(cohort, Progression(), draws=500, tune=500, seed=1),
            "student": bt.fit(cohort, Progression(residual="student"), draws=500, tune=500, seed=1),
        }
        table = predictive.compare(fits)
    print(table.to_string())
    assert table.index[0] == "student"
    assert table.loc["normal", "elpd_diff"] < -4 * table.loc["normal", "dse"]
    with pytest.raises(ValueError, match="variants to compare must be fitted to the same observations"):
        predictive.compare({"all": fits["normal"], "other": _Fake(10)})


class _Fake:
    def __init__(self, n):
        import xarray as xr

        self.idata = xr.DataTree.from_dict(
            {"log_likelihood": xr.Dataset({"y": (("chain", "draw", "obs"), np.zeros((1, 1, n)))})}
        )
