"""A non-Gaussian model on real data: the epilepsy seizure counts of Thall & Vail (1990).

The zoo model ``epilepsy`` (``models/epilepsy``: ``MASS::epil``, 59 patients, 4 two-week periods,
progabide vs placebo) is the classic Poisson GLMM of Venables & Ripley (MASS, §10.4) and of
``glmer(y ~ lbase * trt + lage + V4 + (1 | subject), family = poisson)``, written as plain PyMC
(:func:`bayestwin.families.glmm.epilepsy_glmm`) and fitted with ``bt.Model``. The reference is the
maximum-likelihood fit of the same model by adaptive Gauss-Hermite quadrature (20 nodes per
patient: the marginal likelihood glmer maximises with ``nAGQ = 20``), computed here with scipy, so
that no R is needed: fixed effects must agree within 2 reference standard errors and the random-
intercept SD within 25%.
"""

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, special

import bayestwin as bt
from bayestwin.zoo import model_path


def agq_fit(y, F, subject, nodes=20):
    """ML of the Poisson random-intercept GLMM: log-likelihood by adaptive Gauss-Hermite
    quadrature per subject, maximised by BFGS; SEs from the inverse of a central-difference
    Hessian. Returns (estimates, standard errors) for [fixed effects..., log SD]."""
    x, w = np.polynomial.hermite.hermgauss(nodes)
    groups = [np.flatnonzero(subject == s) for s in np.unique(subject)]
    lgy = special.gammaln(y + 1)

    def loglik(theta):
        beta, sd = theta[:-1], np.exp(theta[-1])
        eta = F @ beta
        total = 0.0
        for g in groups:
            e, yy = eta[g], y[g]
            b = 0.0  # mode and curvature of the subject's integrand (Newton)
            for _ in range(30):
                mu = np.exp(e + b)
                grad, hess = (yy - mu).sum() - b / sd**2, -mu.sum() - 1 / sd**2
                b -= grad / hess
            s = 1 / np.sqrt(-hess)
            bb = b + np.sqrt(2) * s * x
            inner = (yy[:, None] * (e[:, None] + bb) - np.exp(e[:, None] + bb) - lgy[g][:, None]).sum(0)
            log_f = inner - 0.5 * bb**2 / sd**2 - 0.5 * np.log(2 * np.pi * sd**2) + x**2
            total += special.logsumexp(log_f, b=w) + np.log(np.sqrt(2) * s)
        return total

    start = np.r_[np.linalg.lstsq(F, np.log(y + 0.5), rcond=None)[0], np.log(0.5)]
    fit = optimize.minimize(lambda t: -loglik(t), start, method="BFGS", options={"gtol": 1e-6})
    h, k = 1e-4, len(fit.x)
    H = np.zeros((k, k))
    for i in range(k):
        for j in range(i, k):
            ei, ej = np.eye(k)[i] * h, np.eye(k)[j] * h
            H[i, j] = H[j, i] = (
                loglik(fit.x + ei + ej) - loglik(fit.x + ei - ej) - loglik(fit.x - ei + ej) + loglik(fit.x - ei - ej)
            ) / (4 * h * h)
    return fit.x, np.sqrt(np.diag(np.linalg.inv(-H)))


@pytest.mark.slow
def test_epilepsy_counts_agree_with_the_maximum_likelihood_glmm():
    pop = bt.load("epilepsy")  # the shipped fit, verified on load
    assert pop.verdict.converged
    assert pop.family.config()["build"] == "bayestwin.families.glmm:epilepsy_glmm"
    df = pd.read_csv(model_path("epilepsy") / "data.csv")

    # the same design, standardised as the cohort standardised it, for the ML reference
    z = {c: (df[c].to_numpy(float) - m) / s for c, (m, s) in pop.schema.numeric.items()}
    prog = (df["trt"] == "progabide").to_numpy(float)
    F = np.column_stack([np.ones(len(df)), z["lbase"], z["lage"], prog, prog * z["lbase"], df["V4"].to_numpy(float)])
    est, se = agq_fit(df["y"].to_numpy(float), F, df["subject"].to_numpy())

    post = pop.posterior
    names = [
        ("intercept", post["intercept"]),
        ("lbase", post["beta"].sel(covariate="lbase")),
        ("lage", post["beta"].sel(covariate="lage")),
        ("trt", post["trt"]),
        ("lbase:trt", post["lbase_trt"]),
        ("V4", post["V4"]),
    ]
    for (name, draws), ml, s in zip(names, est[:-1], se[:-1], strict=True):
        print(
            f"{name}: posterior mean {float(draws.mean()):.3f} (SD {float(draws.std()):.3f}), ML {ml:.3f} (SE {s:.3f})"
        )
        assert abs(float(draws.mean()) - ml) <= 2 * s, name
    sd_ml, sd_post = float(np.exp(est[-1])), float(post["sd_subject"].mean())
    print(f"subject SD: posterior mean {sd_post:.3f}, ML {sd_ml:.3f}")
    assert abs(sd_post - sd_ml) <= 0.25 * sd_ml


def test_a_new_epilepsy_patient_gets_a_twin_and_a_therapy_comparison():
    """A new patient on placebo with a high baseline count and two periods of many seizures: their
    twin's rate sits above the population's, and the forecast compares the two arms for them."""
    pop = bt.load("epilepsy")
    rows = pd.DataFrame(
        {"subject": "new", "period": [1, 2], "y": [14, 18], "trt": "placebo", "lbase": 0.8, "lage": 0.0}
    )
    twin = pop.condition(rows, key="bayestwin-zoo-epilepsy-key", method="importance", seed=1)
    assert twin.verdict.converged
    assert float(twin.posterior["u"].mean()) > 0  # more seizures than the covariates predict
    fc = twin.predict(times=[3.0, 4.0], start=2.0)
    table = fc.summary("mean")
    assert (table["mean"] > 5).all()
    best = fc.prob_best(time=4.0, direction="lower")
    assert set(best.columns) == {"placebo", "progabide"}
    assert np.allclose(best.sum(axis=1), 1.0)
