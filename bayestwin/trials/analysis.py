"""Trial analyses as pure functions over many trials at once (leading axis: trial).

Every function takes arrays (trials, patients) with a 0/1 ``keep`` mask (patients analysed) and
returns per-trial arrays, so 10,000 simulated trials are analysed in one vectorised call.

- :func:`ols`: least squares with per-trial design matrices; the ANCOVA (outcome on arm and
  baseline [and a prognostic score]) and the two-sample t-test (arm only) are special cases.
- :func:`t_decision`: the one-sided frequentist test of the arm coefficient and the Bayesian
  posterior probability that the effect is beyond ``delta``. Under the reference prior
  (flat on the coefficients, 1/σ² on the variance) the marginal posterior of a regression
  coefficient is exactly Student-t with n - p degrees of freedom, centred at the least-squares
  estimate with scale its standard error (Gelman et al., BDA3, 14.2), so both come from the
  same fit.
- :func:`two_proportions`: responder rates: pooled z-test, and the posterior of the difference
  under independent Beta(1, 1) priors (by Monte Carlo).
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def ols(y: np.ndarray, X: np.ndarray, keep: np.ndarray):
    """Least squares per trial: y (B, n), X (B, n, p), keep (B, n) in {0, 1}.

    Returns (beta (B, p), se (B, p), df (B,), sigma (B,)). Trials with fewer than p + 1 kept
    patients get NaN.
    """
    w = keep.astype(float)
    XtX = np.einsum("bni,bn,bnj->bij", X, w, X)
    Xty = np.einsum("bni,bn,bn->bi", X, w, y)
    df = w.sum(1) - X.shape[2]
    ok = df > 0
    XtX[~ok] = np.eye(X.shape[2])
    inv = np.linalg.inv(XtX)
    beta = np.einsum("bij,bj->bi", inv, Xty)
    resid = y - np.einsum("bni,bi->bn", X, beta)
    s2 = (w * resid**2).sum(1) / np.where(ok, df, 1.0)
    se = np.sqrt(s2[:, None] * np.diagonal(inv, axis1=1, axis2=2))
    beta[~ok], se[~ok] = np.nan, np.nan
    return beta, se, df, np.sqrt(s2)


def design_matrix(arm: np.ndarray, *covariates: np.ndarray) -> np.ndarray:
    """(B, n, p): intercept, treatment indicator, then each covariate centred per trial."""
    cols = [np.ones_like(arm, float), arm.astype(float)]
    cols += [c - c.mean(1, keepdims=True) for c in covariates]
    return np.stack(cols, axis=-1)


def t_decision(estimate, se, df, *, direction: str, alpha: float, delta: float, threshold: float) -> dict:
    """One-sided test of the treatment effect and its Bayesian counterpart, per trial.

    ``direction``: "lower" if a lower outcome is better (benefit = negative effect), "higher"
    otherwise. ``delta`` (>= 0): the smallest benefit of interest for the Bayesian rule.
    Returns p_value, reject (p < alpha), prob_benefit (posterior P(benefit > delta)), and
    bayes_success (prob_benefit > threshold).
    """
    sign = -1.0 if direction == "lower" else 1.0
    t = sign * estimate / se
    p = stats.t.sf(t, df)
    prob = stats.t.cdf((sign * estimate - delta) / se, df)
    return {
        "p_value": p,
        "reject": p < alpha,
        "prob_benefit": prob,
        "bayes_success": prob > threshold,
    }


def two_proportions(
    resp: np.ndarray, arm: np.ndarray, keep: np.ndarray, *, alpha: float, delta: float, threshold: float, rng
) -> dict:
    """Responder rates per trial (benefit = a higher rate on treatment).

    Frequentist: one-sided pooled two-proportion z-test. Bayesian: Beta(1, 1) priors per arm,
    P(p_treatment - p_control > delta) from 4,000 posterior draws per trial.
    """
    w = keep.astype(float)
    nt, nc = (w * arm).sum(1), (w * (1 - arm)).sum(1)
    xt, xc = (w * arm * resp).sum(1), (w * (1 - arm) * resp).sum(1)
    pt, pc = xt / np.maximum(nt, 1), xc / np.maximum(nc, 1)
    pooled = (xt + xc) / np.maximum(nt + nc, 1)
    se0 = np.sqrt(pooled * (1 - pooled) * (1 / np.maximum(nt, 1) + 1 / np.maximum(nc, 1)))
    z = np.where(se0 > 0, (pt - pc) / np.where(se0 > 0, se0, 1.0), 0.0)
    p = stats.norm.sf(z)
    S = 4000
    draws_t = rng.beta(1 + xt[:, None], 1 + nt[:, None] - xt[:, None], (len(xt), S))
    draws_c = rng.beta(1 + xc[:, None], 1 + nc[:, None] - xc[:, None], (len(xc), S))
    prob = (draws_t - draws_c > delta).mean(1)
    return {
        "estimate": pt - pc,
        "se": np.sqrt(pt * (1 - pt) / np.maximum(nt, 1) + pc * (1 - pc) / np.maximum(nc, 1)),
        "p_value": p,
        "reject": p < alpha,
        "prob_benefit": prob,
        "bayes_success": prob > threshold,
    }


def two_sample_power(effect: float, sd: float, n_control: int, n_treatment: int, alpha: float) -> float:
    """Exact power of the one-sided pooled two-sample t-test for a normal endpoint
    (noncentral t), the closed form the simulation is checked against."""
    df = n_control + n_treatment - 2
    ncp = abs(effect) / (sd * np.sqrt(1 / n_control + 1 / n_treatment))
    crit = stats.t.isf(alpha, df)
    return float(stats.nct.sf(crit, df, ncp))
