"""Hierarchical models of counts, binary outcomes and growth, written as plain PyMC for :class:`bt.Model`.

Each function is what a user would write: ``build(data) -> pm.Model`` on the arrays of
:class:`~bayestwin.families.model.ModelData`. They are shipped as examples and as models you can
fit directly (``bt.fit(cohort, bt.Model(poisson_glmm))``); being importable, populations fitted
with them save and load.

Priors are weakly informative on the scale of the linear predictor and fixed, not computed from
the outcome: a twin rebuilds the model on a one-patient template, so a constant taken from the
data's values would differ between the fit and the twin (derive nothing but shapes from
``data``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pymc as pm

from bayestwin.families.model import ModelData


def _linear_predictor(data: ModelData, model: pm.Model):
    """intercept + X beta + therapy effects + slope * time + u_patient (a centred random
    intercept) + log(time at risk) (0 without ``Cohort(at_risk=)``), per observation; returns
    (eta, y)."""
    idx = pm.Data("patient_idx", data["patient_idx"], dims="obs")
    X = pm.Data("X", data["X"], dims=("patient", "covariate"))
    t = pm.Data("time", data["time"], dims="obs")
    on = pm.Data("on_therapy", data["on_therapy"], dims=("obs", "therapy_effect"))
    offset = pm.Data("log_at_risk", data["log_at_risk"], dims="obs")
    y = pm.Data("y_obs", data["y_obs"], dims="obs")
    b0 = pm.Normal("intercept", 0.0, 2.5)
    slope = pm.Normal("slope", 0.0, 1.0)
    beta = pm.Normal("beta", 0.0, 1.0, dims="covariate")
    effect = pm.Normal("therapy_coef", 0.0, 1.0, dims="therapy_effect")
    tau = pm.Gamma("tau", alpha=2.0, beta=2.0)  # zero-avoiding SD of the patient intercepts
    u = pm.Normal("u", 0.0, tau, dims="patient")  # centred: bt.Model conditions twins on u / tau
    level = pm.Deterministic("patient_level", b0 + X @ beta + u, dims="patient")
    eta = level[idx] + slope * t + on @ effect + offset
    return eta, y


def poisson_glmm(data: ModelData) -> pm.Model:
    """Counts: y ~ Poisson(exp(eta)), eta = level_i + slope t + therapy effect (log rate ratios)."""
    with pm.Model(coords=data.coords) as model:
        eta, y = _linear_predictor(data, model)
        pm.Poisson("y", mu=pm.math.exp(eta), observed=y, dims="obs")
    return model


def negbin_glmm(data: ModelData) -> pm.Model:
    """Overdispersed counts: y ~ NegativeBinomial(mu = exp(eta), alpha) (variance mu + mu²/alpha)."""
    with pm.Model(coords=data.coords) as model:
        eta, y = _linear_predictor(data, model)
        alpha = pm.Gamma("alpha", alpha=2.0, beta=0.2)
        pm.NegativeBinomial("y", mu=pm.math.exp(eta), alpha=alpha, observed=y, dims="obs")
    return model


def logistic_glmm(data: ModelData) -> pm.Model:
    """Binary outcomes: y ~ Bernoulli(logit⁻¹(eta)) (therapy effects are log odds ratios)."""
    with pm.Model(coords=data.coords) as model:
        eta, y = _linear_predictor(data, model)
        pm.Bernoulli("y", logit_p=eta, observed=y, dims="obs")
    return model


def simulate_counts(
    n_patients: int = 60,
    visits: int = 4,
    therapies=("placebo", "drug"),
    *,
    intercept: float = 1.5,
    slope: float = 0.0,
    log_rr: float = -0.4,
    beta_age: float = 0.3,
    tau: float = 0.5,
    alpha: float | None = None,
    at_risk=None,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """A count cohort with known truth (the model of :func:`poisson_glmm`, or of
    :func:`negbin_glmm` with ``alpha``): ``visits`` periods per patient, one therapy per
    patient, age standardised by the cohort as bt.Cohort does. ``at_risk``: values to draw each
    row's time at risk from (column ``days``; the rate is per unit at risk), or None.

    Examples
    --------
    >>> df, truth = simulate_counts(n_patients=4, seed=1)
    >>> sorted(df.columns)
    ['age', 'outcome', 'patient', 'therapy', 'time']
    """
    rng = np.random.default_rng(seed)
    age = rng.normal(40.0, 10.0, n_patients).round()
    z_age = (age - age.mean()) / age.std(ddof=1)
    arm = np.arange(n_patients) % len(therapies)
    u = rng.normal(0.0, tau, n_patients)
    level = intercept + beta_age * z_age + u
    rows = []
    for i in range(n_patients):
        for t in range(visits):
            days = float(rng.choice(at_risk)) if at_risk is not None else 1.0
            rate = days * np.exp(level[i] + slope * t + log_rr * (arm[i] > 0))
            if alpha is not None:
                rate = rng.gamma(alpha, rate / alpha)
            rows.append((f"ct-{i:04d}", float(t), float(rng.poisson(rate)), therapies[arm[i]], age[i], days))
    df = pd.DataFrame(rows, columns=["patient", "time", "outcome", "therapy", "age", "days"])
    if at_risk is None:
        df = df.drop(columns="days")
    ids = [f"ct-{i:04d}" for i in range(n_patients)]
    truth = {"intercept": intercept, "slope": slope, "log_rr": log_rr, "beta_age": beta_age, "tau": tau}
    truth["patient_level"] = dict(zip(ids, level, strict=True))
    return df, truth


def linear_growth(data: ModelData) -> pm.Model:
    """The progression family's model, written as a user would in plain PyMC: correlated
    patient (level, slope) as a *centred* MvNormal around covariate-dependent means, therapy
    effects on the slope through the time spent on each therapy, Gaussian residuals. Twins of it
    match the built-in family's (benchmarks/model_family.py compares them and their speed)."""
    effects = ["intercept", "slope"]
    with pm.Model(coords=data.coords | {"effect": effects, "effect_bis": effects}) as model:
        idx = pm.Data("patient_idx", data["patient_idx"], dims="obs")
        X = pm.Data("X", data["X"], dims=("patient", "covariate"))
        t = pm.Data("time", data["time"], dims="obs")
        E = pm.Data("exposure", data["exposure"], dims=("obs", "therapy_effect"))
        y = pm.Data("y_obs", data["y_obs"], dims="obs")
        intercept = pm.Normal("intercept", 0.0, 100.0)
        slope = pm.Normal("slope", 0.0, 10.0)
        beta_level = pm.Normal("beta_level", 0.0, 10.0, dims="covariate")
        beta_slope = pm.Normal("beta_slope", 0.0, 1.0, dims="covariate")
        therapy_slope = pm.Normal("therapy_slope", 0.0, 1.0, dims="therapy_effect")
        # PyMC's SD and correlation deterministics have unnamed dims: ours are labelled
        chol, corr, stds = pm.LKJCholeskyCov(
            "re_chol",
            n=2,
            eta=2.0,
            sd_dist=pm.Gamma.dist(alpha=2.0, beta=[0.2, 2.0], shape=2),
            compute_corr=True,
            store_in_trace=False,
        )
        pm.Deterministic("re_chol_stds", stds, dims="effect")
        pm.Deterministic("re_chol_corr", corr, dims=("effect", "effect_bis"))
        mean = pm.math.stack([intercept + X @ beta_level, slope + X @ beta_slope], axis=1)
        theta = pm.MvNormal("theta", mu=mean, chol=chol, dims=("patient", "effect"))
        mu = theta[idx, 0] + theta[idx, 1] * t + E @ therapy_slope
        sigma = pm.HalfNormal("sigma", 10.0)
        pm.Normal("y", mu=mu, sigma=sigma, observed=y, dims="obs")
    return model


def epilepsy_glmm(data: ModelData) -> pm.Model:
    """The epilepsy trial's Poisson GLMM (Thall & Vail 1990; Venables & Ripley, MASS §10.4; the
    zoo model ``epilepsy``): ``log E[y] = b0 + lbase + lage + (trt + lbase:trt) on progabide +
    V4 + u_patient``, with covariates ``lbase`` and ``lage`` (in that order, standardised by the
    cohort), period 4 (``time == 4``) as V4, and a centred random intercept per patient."""
    with pm.Model(coords=data.coords) as model:
        idx = pm.Data("patient_idx", data["patient_idx"], dims="obs")
        X = pm.Data("X", data["X"], dims=("patient", "covariate"))
        period = pm.Data("time", data["time"], dims="obs")
        on = pm.Data("on_therapy", data["on_therapy"], dims=("obs", "therapy_effect"))
        y = pm.Data("y_obs", data["y_obs"], dims="obs")
        b0 = pm.Normal("intercept", 0.0, 5.0)
        beta = pm.Normal("beta", 0.0, 5.0, dims="covariate")
        trt = pm.Normal("trt", 0.0, 5.0)
        inter = pm.Normal("lbase_trt", 0.0, 5.0)
        v4 = pm.Normal("V4", 0.0, 5.0)
        sd = pm.HalfNormal("sd_subject", 2.0)
        u = pm.Normal("u", 0.0, sd, dims="patient")
        eta = b0 + (X @ beta)[idx] + on[:, 0] * (trt + inter * X[idx, 0]) + v4 * pm.math.eq(period, 4) + u[idx]
        pm.Poisson("y", pm.math.exp(eta), observed=y, dims="obs")
    return model
