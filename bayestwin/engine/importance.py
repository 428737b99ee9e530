"""Importance sampling from a Laplace proposal with Pareto-smoothed weights: the fast twin path.

For a low-dimensional twin posterior p(x | y_new), x = [w, theta] in the sampler's coordinates:

1. find its mode by damped Newton steps on the log density (the prior part is a standard
   normal in these coordinates, so the curvature is well conditioned);
2. propose from a multivariate t with ``df`` degrees of freedom (default 10) centred at the mode
   with scale (-H)^-1 — the Laplace approximation with heavier tails, so that the weights stay
   bounded where the twin's tails are heavier than Gaussian — or from the Gaussian itself; then
   move the proposal once to the PSIS-weighted mean and covariance of pilot draws from it
   (:func:`adapt_proposal`: the Laplace scale is local, the posterior of a PK twin is curved);
3. weight each proposal by p/q and Pareto-smooth the largest weights (PSIS, Vehtari, Simpson,
   Gelman, Yao & Gabry 2024, JMLR 25(72)); the fitted Pareto shape k̂ says whether the weights
   can be trusted (k̂ <= 0.7) and 1 / Σ w̃² is the effective sample size;
4. resample ``draws`` equally weighted draws per chain (systematic resampling).

Each "chain" is an independent importance sampler (own proposals, own k̂), so R-hat across chains
still compares independent estimates. The estimator is consistent for any proposal; the
diagnostics say when it is not accurate enough, and then the caller falls back to NUTS
(``Twin.from_cohort``): this path is offered on top of NUTS, never instead of it.

Everything here is a pure function of arrays, ``vmap``-ped over chains and then patients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp


class ImportanceConfig(NamedTuple):
    """Settings of the Laplace-proposal importance sampler (the same for every patient)."""

    chains: int = 4  # independent importance samplers per patient
    draws: int = 1000  # equally weighted draws kept per chain
    proposals: int = 2000  # proposals per chain
    df: int | None = 10  # multivariate-t proposal with this many degrees of freedom; None: Gaussian
    newton_steps: int = 12  # damped Newton converges in a few steps from the prior centre; 25 gave the same k̂
    khat_max: float = 0.7  # above this the weights are unreliable (PSIS paper, for >= 2200 proposals)
    adapt: int = 1000  # pilot draws per moment-matching step of the proposal (0: Laplace only)
    adapt_steps: int = 2
    chunk: int = 32  # patients per call of the compiled program
    # Warmup steps of the NUTS redo of twins that fail the gate, run on u with x = centre + scale u
    # (the final proposal, close to the posterior even where the weights are not good enough),
    # with a diagonal metric; 0: plain NUTS with the caller's settings.
    fallback_tune: int = 500  # 300 left 2 divergences in 1 of 18 PK redos (target_accept 0.95), 500 none


class ImportanceDraws(NamedTuple):
    """Output, leading axes (batch, chain[, draw])."""

    position: jax.Array  # (B, C, D, d) resampled, equally weighted
    khat: jax.Array  # (B, C) Pareto shape of each chain's weights
    ess: jax.Array  # (B, C) PSIS effective sample size of each chain's proposals
    mode: jax.Array  # (B, d)
    grad_norm: jax.Array  # (B,) |∇ log p| at the mode: ~0 when Newton converged
    centre: jax.Array  # (B, d) the final proposal's centre ...
    scale: jax.Array  # (B, d, d) ... and scale: x = centre + scale @ z (preconditions a NUTS redo)


# ----------------------------------------------------------------------------- mode and curvature
def grad_and_hessian(logdensity: Callable, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gradient at ``x`` and the Hessian by central differences of the exact gradient
    (symmetrised), from one ``vmap``-ped gradient over x and x ± eps e_i.

    Second-order autodiff breaks on some special functions (JAX's ``erfcx`` JVP-of-JVP, used by
    censored likelihoods), and the proposal needs no more accuracy than this (~1e-8 relative).
    One gradient in the compiled program, not three (the gradient, and the Hessian's at x + e and
    x - e): each is a copy of the family's log density and its reverse pass, and they made most
    of a PK twin's first compilation.
    """
    grad = jax.grad(logdensity)
    d = x.shape[0]
    eps = 1e-5 * jnp.maximum(1.0, jnp.abs(x))
    steps = jnp.diag(eps)
    grads = jax.vmap(lambda e: grad(x + e))(jnp.concatenate([jnp.zeros((1, d), x.dtype), steps, -steps]))
    rows = (grads[1 : d + 1] - grads[d + 1 :]) / (2 * eps[:, None])
    return grads[0], 0.5 * (rows + rows.T)


def find_mode(logdensity: Callable, x0: jax.Array, steps: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Damped Newton ascent with a backtracking line search; returns (mode, |gradient| there,
    Hessian there).

    Curvature is taken in absolute value with a floor of 0.1 (saddle-free Newton: in the twin's
    whitened coordinates the prior's curvature is 1, so this is a mild floor), so every step is an
    ascent direction; of the step lengths 1, 1/2, ..., 1/512 the best one is taken, and none if
    none improves. Each iteration ends with the gradient and Hessian at its point, which the next
    one (or the caller) uses: the log density's gradient appears once in the program.
    """
    ts = 2.0 ** -jnp.arange(10.0)

    def safe(x):
        v = logdensity(x)
        return jnp.where(jnp.isfinite(v), v, -jnp.inf)

    def body(_, carry):
        x, fx, g, H = carry
        lam, V = jnp.linalg.eigh(-H)
        step = V @ ((V.T @ g) / jnp.maximum(jnp.abs(lam), 0.1))
        step = jnp.where(jnp.all(jnp.isfinite(step)), step, 0.0)
        vals = jax.vmap(lambda t: safe(x + t * step))(ts)
        best = jnp.argmax(vals)
        better = vals[best] > fx
        x = jnp.where(better, x + ts[best] * step, x)
        return (x, jnp.where(better, vals[best], fx), *grad_and_hessian(logdensity, x))

    # Iteration 0 starts from a zero gradient, so it takes no step: it only evaluates the log
    # density (fx from -inf) and the derivatives at x0. The loop's body is then the only place the
    # log density and its gradient are traced; iterations 1..steps are the Newton steps.
    d = x0.shape[0]
    first = (x0, -jnp.inf, jnp.zeros(d, x0.dtype), -jnp.eye(d, dtype=x0.dtype))
    x, _, g, H = jax.lax.fori_loop(0, steps + 1, body, first)
    return x, jnp.linalg.norm(g), H


def laplace_factor(H: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(A, log|det A|) with A A^T = (-H)^-1, ``H`` the Hessian at the mode: the Laplace covariance
    factor."""
    lam, V = jnp.linalg.eigh(-H)
    lam = jnp.maximum(lam, 1e-8 * jnp.maximum(jnp.max(lam), 1.0))
    return V / jnp.sqrt(lam), -0.5 * jnp.sum(jnp.log(lam))


# ----------------------------------------------------------------------------- PSIS
def _tail_length(n: int) -> int:
    """Tail size for the Pareto fit (r_eff = 1), as in loo / ArviZ."""
    return int(np.floor(3 * np.sqrt(n))) if n > 225 else int(np.floor(n / 5))


def gpd_fit(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Generalized Pareto (k, sigma) of sorted exceedances ``x`` (Zhang & Stephens 2009).

    Empirical-Bayes estimate with the weakly informative prior on k of Vehtari et al. (2024),
    as in ArviZ; returns (nan, nan) when the sample is too degenerate to fit.
    """
    n = x.shape[0]
    m = 30 + int(np.sqrt(n))
    xstar = x[int(n / 4 + 0.5) - 1]  # first quartile
    b = 1 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))
    b = b / (3 * xstar) + 1 / x[-1]
    k = jnp.mean(jnp.log1p(-b[:, None] * x[None, :]), axis=1)
    len_scale = n * (jnp.log(-b / k) - k - 1)
    w = jnp.exp(len_scale - logsumexp(len_scale))
    w = jnp.where(w >= 10 * jnp.finfo(w.dtype).eps, w, 0.0)
    b_post = jnp.sum(b * w) / jnp.sum(w)
    k_hat = jnp.mean(jnp.log1p(-b_post * x))
    sigma = -k_hat / b_post
    k_hat = (n * k_hat + 10 * 0.5) / (n + 10)
    bad = (xstar <= x[0]) | ~jnp.isfinite(k_hat)
    return jnp.where(bad, jnp.nan, k_hat), jnp.where(bad, jnp.nan, sigma)


def psis(log_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pareto-smoothed, normalised log weights and the Pareto shape k̂ (one 1-D array of weights).

    The largest ``3 sqrt(n)`` weights are replaced by expected order statistics of a generalized
    Pareto fitted to them (capped at the largest raw weight). Agrees with ArviZ's ``psislw``.
    """
    n = log_weights.shape[0]
    m = _tail_length(n)
    lw = log_weights - jnp.max(log_weights)
    order = jnp.argsort(lw)
    srt = lw[order]
    cutoff = srt[n - m - 1]
    tail = srt[n - m :]
    k, sigma = gpd_fit(jnp.exp(tail) - jnp.exp(cutoff))
    p = (jnp.arange(m) + 0.5) / m
    safe_k = jnp.where(jnp.abs(k) < 1e-12, 1.0, k)
    q = jnp.where(
        jnp.abs(k) < 1e-12, -sigma * jnp.log1p(-p), sigma * jnp.expm1(-safe_k * jnp.log1p(-p)) / safe_k
    ) + jnp.exp(cutoff)
    smoothed = jnp.minimum(jnp.log(q), tail[-1])
    ok = jnp.isfinite(k) & (sigma > 0)
    srt = srt.at[n - m :].set(jnp.where(ok, smoothed, tail))
    lw = jnp.zeros_like(lw).at[order].set(srt)
    return lw - logsumexp(lw), jnp.where(jnp.isnan(k), jnp.inf, k)


def systematic_resample(key: jax.Array, log_weights: jax.Array, n: int) -> jax.Array:
    """``n`` indices drawn by systematic resampling with normalised ``log_weights``, in random order."""
    k1, k2 = jax.random.split(key)
    cdf = jnp.cumsum(jnp.exp(log_weights))
    u = (jax.random.uniform(k1) + jnp.arange(n)) / n
    idx = jnp.minimum(jnp.searchsorted(cdf, u * cdf[-1]), log_weights.shape[0] - 1)
    return jax.random.permutation(k2, idx)


def _chi2(key: jax.Array, df: int, n: int) -> jax.Array:
    """``n`` chi-square(df) draws: -2 Σ log U over df/2 uniforms for even df, Σ z² otherwise."""
    if df % 2 == 0:
        u = jax.random.uniform(key, (n, df // 2), jnp.float32, minval=jnp.finfo(jnp.float32).tiny)
        return -2.0 * jnp.sum(jnp.log(u), axis=1)
    return jnp.sum(jax.random.normal(key, (n, df), jnp.float32) ** 2, axis=1)


# ----------------------------------------------------------------------------- the sampler
def _proposal_draws(key: jax.Array, n: int, dim: int, df: int | None, dtype) -> tuple[jax.Array, jax.Array]:
    """``n`` standard draws z of the proposal (t with ``df`` d.o.f., or Gaussian) and log q(z) + const."""
    kz, kc = jax.random.split(key)
    # float32 base draws (cast to float64): half the random bits, which dominate the cost
    z = jax.random.normal(kz, (n, dim), jnp.float32).astype(dtype)
    if df is None:
        return z, -0.5 * jnp.sum(z**2, axis=1)
    chi2 = _chi2(kc, df, n).astype(dtype)
    z = z * jnp.sqrt(df / chi2)[:, None]
    return z, -0.5 * (df + dim) * jnp.log1p(jnp.sum(z**2, axis=1) / df)


def _weights(ld: Callable, centre, A, logdet, z, log_q):
    """Log importance weights (unnormalised) and the points x = centre + A z."""
    x = centre + z @ A.T
    log_p = jax.vmap(ld)(x)
    return jnp.where(jnp.isfinite(log_p), log_p - (log_q - logdet), -jnp.inf), x


def adapt_proposal(ld: Callable, key, centre, A, logdet, cfg: ImportanceConfig):
    """One moment-matching step: the proposal's centre and scale from PSIS-weighted pilot draws.

    The Laplace approximation fits the curvature at the mode only; where the posterior is skewed
    or curved (PK twins with one or two levels: CL, V and ka on a curved ridge), its scale is
    wrong away from the mode and the weights get heavy tails. The weighted mean and covariance of
    ``cfg.adapt`` pilot draws describe the posterior's actual extent (population Monte Carlo,
    Cappé et al. 2004). Kept only when the pilot's weights are usable (k̂ <= ``khat_max`` and a
    finite, positive-definite covariance); otherwise the Laplace proposal stays.
    """
    z, log_q = _proposal_draws(key, cfg.adapt, centre.shape[0], cfg.df, centre.dtype)
    log_w, x = _weights(ld, centre, A, logdet, z, log_q)
    lw, khat = psis(log_w)
    w = jnp.exp(lw)
    mean = w @ x
    cov = (x - mean).T @ ((x - mean) * w[:, None])
    if cfg.df is not None:
        cov = cov * (cfg.df - 2) / cfg.df  # a t's scale matrix, for this covariance
    chol = jnp.linalg.cholesky(cov)
    ok = (khat <= cfg.khat_max) & jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.diag(chol) > 0)
    safe = jnp.where(ok, chol, A)
    return (
        jnp.where(ok, mean, centre),
        safe,
        jnp.where(ok, jnp.sum(jnp.log(jnp.abs(jnp.diag(safe)))), logdet),
        khat,
    )


def make_importance_sampler(logdensity: Callable, dim: int, cfg: ImportanceConfig) -> Callable:
    """Build ``run(keys (B, C), data (B, ...)) -> ImportanceDraws``, jitted.

    ``logdensity(position, data)`` is one patient's log density; the search starts at the origin
    (the population prior's centre in the twin's whitened coordinates).
    """

    # jitted once here, the log density is traced once per program: the mode search, the
    # proposal's adaptation and the draws call it with the same shapes and reuse its jaxpr (each
    # trace of a family's graph costs ~0.2 s of Python; four of them were half a cached twin's time)
    traced_once = jax.jit(logdensity)

    def one_patient(keys, data):
        def ld(x):
            return traced_once(x, data)

        mode, gnorm, H = find_mode(ld, jnp.zeros(dim), cfg.newton_steps)
        centre, (A, logdet) = mode, laplace_factor(H)
        if cfg.adapt and cfg.adapt_steps:

            def adapt(step, proposal):  # a loop, not unrolled: the step is traced and compiled once
                return adapt_proposal(ld, jax.random.fold_in(keys[0], step + 1), *proposal, cfg)[:3]

            centre, A, logdet = jax.lax.fori_loop(0, cfg.adapt_steps, adapt, (centre, A, logdet))

        def one_chain(key):
            kz, kr = jax.random.split(key)
            z, log_q = _proposal_draws(kz, cfg.proposals, dim, cfg.df, mode.dtype)
            log_w, x = _weights(ld, centre, A, logdet, z, log_q)
            lw, khat = psis(log_w)
            ess = 1.0 / jnp.sum(jnp.exp(2 * lw))
            return x[systematic_resample(kr, lw, cfg.draws)], khat, ess

        pos, khat, ess = jax.vmap(one_chain)(keys)
        return ImportanceDraws(pos, khat, ess, mode, gnorm, centre, A)

    return jax.jit(jax.vmap(one_patient))
