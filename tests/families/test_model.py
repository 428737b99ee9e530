"""bt.Model: a user's own hierarchical PyMC model as a family.

The count model of :func:`bayestwin.families.glmm.poisson_glmm` (centred patient intercepts) is
fitted to 40 simulated patients; a held-out patient's twin must match a full refit that includes
it (tolerances as for the built-in families, justified in tests/engine/test_refit_agreement.py).
Then what the graph reading refuses, with the messages a user sees.
"""

import warnings

import numpy as np
import pandas as pd
import pymc as pm
import pytest

import bayestwin as bt
from bayestwin.families import FamilyError
from bayestwin.families.glmm import negbin_glmm, poisson_glmm, simulate_counts
from bayestwin.families.model import ModelData
from tests.agreement import assert_twin_matches_refit
from tests.conftest import KEY

THERAPIES = ["placebo", "drug"]


@pytest.fixture(scope="module")
def counts():
    df, truth = simulate_counts(43, seed=7)
    ids = df.patient.unique()
    return df[df.patient.isin(ids[:40])], df[df.patient.isin(ids[40:]) & (df.time <= 2)], truth


@pytest.fixture(scope="module")
def population(counts):
    train, _, _ = counts
    cohort = bt.Cohort(train, covariates=["age"], therapies=THERAPIES, key=KEY)
    return bt.fit(cohort, bt.Model(poisson_glmm), draws=2000, tune=1000, seed=1, progressbar=False)


def test_population_recovers_the_simulated_truth(population, counts):
    _, _, truth = counts
    assert population.verdict.converged
    post = population.posterior
    for name, true in (("intercept", truth["intercept"]), ("tau", truth["tau"])):
        x = post[name]
        assert abs(float(x.mean()) - true) < 3 * float(x.std()), name
    rr = post["therapy_coef"].sel(therapy_effect="drug")
    assert abs(float(rr.mean()) - truth["log_rr"]) < 3 * float(rr.std())
    # the roles read from the graph
    fam = population.family
    assert fam.patient_vars == ("u",) and fam.patient_outputs == ("u", "patient_level")
    assert fam.observed == "y" and fam.prediction == "expected_y"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nuts", "importance"])
def test_twin_of_a_count_model_matches_a_full_refit(population, counts, method):
    train, held, _ = counts
    pid = held.patient.unique()[0]
    rows = held[held.patient == pid]
    twin = population.condition(rows, key=KEY, draws=2000, seed=5, method=method)
    full = bt.Cohort(pd.concat([train, rows]), covariates=["age"], therapies=THERAPIES, key=KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = bt.fit(full, bt.Model(poisson_glmm), draws=2000, tune=1000, seed=2, progressbar=False)
    assert ref.verdict.converged and twin.verdict.converged
    # u is centred (Normal(0, tau)): the twin samples u / tau and reports u itself
    assert_twin_matches_refit(ref, twin, bt.pseudonymise(pid, KEY), ("u", "patient_level"))


def test_forecasts_are_counts_with_the_model_rate(population, counts):
    _, held, _ = counts
    twin = population.condition(held, key=KEY, draws=500, seed=3, method="importance")
    fc = twin.predict(times=[3.0, 4.0])
    d = fc.draws
    assert set(d["therapy"].values) == set(THERAPIES)
    obs = d["observation"].to_numpy()
    assert np.all(obs >= 0) and np.all(obs == np.round(obs))
    # E[observation] = the expected rate, to Monte-Carlo error (Poisson: SD of a draw = sqrt(rate))
    rate = d["mean"].mean(["chain", "draw"])
    mc = np.sqrt(d["mean"].mean(["chain", "draw"]) / (d.sizes["chain"] * d.sizes["draw"]))
    assert (np.abs(d["observation"].mean(["chain", "draw"]) - rate) < 5 * mc + 0.05 * rate).all()
    # the drug lowers the rate for every patient: P(best = lower count) favours it
    best = fc.prob_best(time=4.0, direction="lower")
    assert (best["drug"] > 0.5).all()


def test_a_model_saves_and_loads_by_import_path(population, counts, tmp_path):
    _, held, _ = counts
    population.save(tmp_path / "pop")
    loaded = bt.load(tmp_path / "pop")
    assert loaded.family.config() == {
        "family": "model",
        "build": "bayestwin.families.glmm:poisson_glmm",
        "prediction": None,
    }
    a = population.condition(held, key=KEY, draws=300, seed=4, method="importance").posterior["u"]
    b = loaded.condition(held, key=KEY, draws=300, seed=4, method="importance").posterior["u"]
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy())


def test_a_negative_binomial_model_fits_and_forecasts_overdispersed_counts():
    df, _ = simulate_counts(30, seed=5, alpha=3.0)
    cohort = bt.Cohort(df, covariates=["age"], therapies=THERAPIES, key=KEY)
    pop = bt.fit(cohort, bt.Model(negbin_glmm), draws=500, tune=500, chains=2, extend=0, seed=1, progressbar=False)
    assert pop.family.observation_params == ("y_param_0", "y_param_1")
    twin = pop.condition(df[df.patient == "ct-0000"], key=KEY, draws=300, method="importance")
    fc = twin.predict(times=[4.0])
    obs, mean = fc.draws["observation"], fc.draws["mean"]
    assert float(obs.var()) > float(mean.mean())  # overdispersed beyond Poisson


@pytest.mark.parametrize(
    ("law", "params"),
    [
        ("normal", (1.5, 2.0)),
        ("t", (5.0, 1.5, 2.0)),
        ("lognormal", (0.3, 0.5)),
        ("poisson", (3.5,)),
        ("bernoulli", (0.3,)),
        ("binomial", (10, 0.3)),
        ("negative_binomial", (2.0, 0.4)),
        ("categorical", (np.array([0.2, 0.5, 0.3]),)),
    ],
)
def test_each_observation_law_draws_with_the_expectation_forecasts_report(law, params):
    """The JAX draws (forecast observations) and the pytensor expectation (forecast means) are
    the same law: the mean of 200,000 draws is within 5 Monte-Carlo SEs of the expectation."""
    import jax
    import pytensor.tensor as pt

    from bayestwin.families.model import LAWS, _draw

    expected = float(np.asarray(LAWS[law](*[pt.as_tensor(np.asarray(p, float)) for p in params]).eval()))
    x = np.asarray(_draw(law, jax.random.key(0), [np.asarray(p, float) for p in params], (200_000,)))
    se = x.std() / np.sqrt(len(x))
    assert abs(x.mean() - expected) < 5 * se, (x.mean(), expected)


# ------------------------------------------------------------------- refusals
def _cohort():
    df, _ = simulate_counts(6, seed=1)
    return bt.Cohort(df, covariates=["age"], therapies=THERAPIES, key=KEY)


def _base(data, *, extra=None, patient="normal", observe="data", law="poisson"):
    with pm.Model(coords=data.coords) as model:
        idx = pm.Data("patient_idx", data["patient_idx"], dims="obs")
        pm.Data("time", data["time"], dims="obs")
        y = pm.Data("y_obs", data["y_obs"], dims="obs")
        if extra:
            pm.Data(extra, np.zeros(3))
        tau = pm.HalfNormal("tau", 1.0)
        u = pm.Gamma("u", 2.0, 2.0, dims="patient") if patient == "gamma" else pm.Normal("u", 0, tau, dims="patient")
        rate = pm.math.exp(u[idx])
        obs = y if observe == "data" else np.asarray(data["y_obs"])
        if law == "poisson":
            pm.Poisson("y", rate, observed=obs, dims="obs")
        else:
            pm.Exponential("y", rate, observed=obs, dims="obs")
    return model


def _only_population(data):
    with pm.Model(coords=data.coords) as model:
        pm.Data("patient_idx", data["patient_idx"], dims="obs")
        pm.Data("time", data["time"], dims="obs")
        y = pm.Data("y_obs", data["y_obs"], dims="obs")
        pm.Poisson("y", pm.HalfNormal("rate", 5.0), observed=y, dims="obs")
    return model


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda d: _base(d, extra="dose"), "pm.Data 'dose' is not one of the arrays bt.Model provides"),
        (lambda d: _base(d, patient="gamma"), "patient variable 'u' is Gamma: twins condition on Normal or MvNormal"),
        (lambda d: _base(d, observe="numpy"), "the observed variable 'y' must observe pm.Data('y_obs', data['y_obs'])"),
        (lambda d: _base(d, law="exponential"), "the observation law of 'y' (ExponentialRV) is not one bt.Model"),
        (_only_population, "no free variable has a leading 'patient' dim"),
        (lambda d: 42, "returned int, not a pm.Model"),
    ],
)
def test_a_model_the_engine_cannot_condition_is_refused_before_fitting(build, message):
    with pytest.raises(FamilyError) as err:
        bt.fit(_cohort(), bt.Model(build), draws=10, tune=10)
    assert message in str(err.value)


def test_a_model_built_in_a_notebook_or_script_is_refused_at_save(population, tmp_path):
    def local(data: ModelData):
        return poisson_glmm(data)

    pop = bt.Population(
        family=bt.Model(local), schema=population.schema, columns=population.columns,
        idata=population.idata, verdict=population.verdict,
    )  # fmt: skip
    with pytest.raises(bt.ArtifactError, match="cannot save: the build function .*local was defined in a script"):
        pop.save(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(TypeError, match="build must be a function data -> pm.Model, not int"):
        bt.Model(3)


@pytest.mark.slow
def test_twin_conditioning_of_a_user_model_is_calibrated(population):
    """SBC of the twin step: 200 virtual patients with 3 periods each, outcomes drawn from the
    model's own Poisson law given true population and patient parameters; the ranks of the
    truth among each twin's draws must be uniform (χ² over 10 bins, p > 0.001 per quantity)."""
    from bayestwin.review.sbc import sbc_twins

    rows, _ = simulate_counts(200, seed=77)
    sbc, twin = sbc_twins(population, rows[rows.time <= 2], key=KEY, seed=3)
    table = sbc.table
    print(table.to_string())
    assert set(table.index) == {"u", "patient_level"}
    assert (table["reps"] == 200).all()
    assert (table["p_value"] > 0.001).all()
    assert twin.verdict.table["converged"].mean() > 0.95


@pytest.mark.slow
def test_counts_over_different_times_at_risk_use_an_exposure_offset():
    """Rows covering 1 to 8 days (Cohort(at_risk="days")): the model's rate is per day, recovered
    within 3 posterior SDs; a forecast row covers as long as the patient's last row did."""
    df, truth = simulate_counts(40, seed=8, at_risk=[1.0, 2.0, 4.0, 8.0])
    cohort = bt.Cohort(df, covariates=["age"], therapies=THERAPIES, at_risk="days", key=KEY)
    assert cohort.columns.at_risk == "days" and "at_risk" in cohort.frame
    pop = bt.fit(cohort, bt.Model(poisson_glmm), draws=500, tune=500, chains=2, seed=1, progressbar=False)
    b0 = pop.posterior["intercept"]
    assert abs(float(b0.mean()) - truth["intercept"]) < 3 * float(b0.std())
    rows = df[df.patient == "ct-0000"].iloc[:2].assign(therapy="placebo", days=[1.0, 8.0])
    twin = pop.condition(rows, key=KEY, draws=300, seed=2, method="importance")
    mean = twin.predict(times=[3.0]).draws["mean"].sel(therapy="placebo", time=3.0)
    post = twin.posterior  # expected count = 8 days x the patient's daily rate at time 3, draw by draw
    rate = np.exp(post["patient_level"] + 3.0 * post["slope"])
    np.testing.assert_allclose(mean.to_numpy(), (8.0 * rate).transpose(*mean.dims).to_numpy(), rtol=1e-9)
    with pytest.raises(bt.DataError, match="at_risk must be positive"):
        bt.Cohort(df.assign(days=0.0), covariates=["age"], therapies=THERAPIES, at_risk="days", key=KEY)


def test_a_count_model_refuses_a_fractional_outcome_naming_patient_row_and_column():
    df, _ = simulate_counts(6, seed=1)
    df.loc[20, "outcome"] = 3.5
    cohort = bt.Cohort(df, covariates=["age"], therapies=THERAPIES, key=KEY)
    with pytest.raises(bt.DataError) as err:
        bt.fit(cohort, bt.Model(poisson_glmm), draws=10, tune=10)
    assert "outcome 3.5 is not a whole number: the model's poisson law needs one" in str(err.value)
    assert f"patient {bt.pseudonymise(df.loc[20, 'patient'], KEY)}, row 20, column 'outcome'" in str(err.value)
