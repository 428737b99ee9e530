"""The importance path's pieces: PSIS equals ArviZ's, the mode search is robust, and the sampler
recovers known posteriors and flags the ones it cannot handle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from arviz_stats.base import array_stats

from bayestwin.engine.importance import ImportanceConfig, find_mode, grad_and_hessian, make_importance_sampler, psis


@pytest.mark.parametrize("n, scale, df", [(4000, 0.5, None), (4000, 1.0, 3), (1000, 1.0, 2), (100, 1.0, None)])
def test_psis_matches_arviz(n, scale, df):
    rng = np.random.default_rng(n)
    lw = scale * (rng.normal(size=n) if df is None else rng.standard_t(df, n))
    ref, kref = array_stats.psislw(-lw)  # ArviZ takes log-likelihoods: log weights are their negative
    mine, k = psis(jnp.asarray(lw))
    np.testing.assert_allclose(np.asarray(mine), ref, atol=1e-12)
    np.testing.assert_allclose(float(k), kref, rtol=1e-10)


def test_mode_search_escapes_negative_curvature():
    # A Cauchy log density centred at 5: at the start (0) the curvature is negative.
    def f(x):
        return -jnp.sum(jnp.log1p((x - 5.0) ** 2))

    mode, gnorm, H = find_mode(f, jnp.zeros(2), 25)
    np.testing.assert_allclose(np.asarray(mode), 5.0, atol=1e-8)
    assert float(gnorm) < 1e-8
    np.testing.assert_allclose(np.asarray(H), -2.0 * np.eye(2), atol=1e-6)  # -2 / (1 + 0²) per axis


def test_gradient_and_hessian_from_one_vmapped_gradient_equal_autodiff():
    def f(x):
        return -jnp.sum(jnp.log1p((x - jnp.array([1.0, -2.0, 0.5])) ** 2)) - 0.3 * x[0] * x[1] * x[2]

    x = jnp.array([0.3, -1.2, 2.0])
    g, H = grad_and_hessian(f, x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(f)(x)), rtol=1e-14)
    np.testing.assert_allclose(np.asarray(H), np.asarray(jax.hessian(f)(x)), rtol=1e-7, atol=1e-9)


def _gaussian_batch():
    # Three "patients": correlated 3-d Gaussians whose means are their data.
    cov = jnp.array([[1.0, 0.6, 0.0], [0.6, 2.0, 0.3], [0.0, 0.3, 0.5]])
    prec = jnp.linalg.inv(cov)

    def logdensity(x, mu):
        d = x - mu
        return -0.5 * d @ prec @ d

    return logdensity, jnp.array([[0.0, 1.0, -1.0], [3.0, -2.0, 0.5], [-1.0, 0.0, 2.0]]), cov


def test_importance_recovers_a_gaussian_posterior():
    logdensity, mus, cov = _gaussian_batch()
    cfg = ImportanceConfig(chains=4, draws=1000, proposals=4000)
    run = make_importance_sampler(logdensity, 3, cfg)
    keys = jax.random.split(jax.random.key(0), 12).reshape(3, 4)
    out = run(keys, mus)
    pos = np.asarray(out.position).reshape(3, -1, 3)
    assert (np.asarray(out.khat) < 0.5).all()  # t proposal around the exact Gaussian: bounded weights
    assert (np.asarray(out.ess) > 0.5 * cfg.proposals).all()
    # Means within 4 Monte-Carlo SEs (4000 resampled draws, ESS at least ~2000).
    se = np.sqrt(np.diag(np.asarray(cov)) / 2000)
    assert (np.abs(pos.mean(1) - np.asarray(mus)) < 4 * se).all()
    np.testing.assert_allclose(np.asarray(out.mode), np.asarray(mus), atol=1e-8)
    sd = pos.std(1)
    assert (np.abs(sd / np.sqrt(np.diag(np.asarray(cov))) - 1) < 0.08).all()  # SE of an SD ratio ~0.016


def test_importance_flags_a_posterior_it_cannot_handle():
    # A Cauchy target: heavier-tailed than any t(10) proposal, so the weights are unbounded.
    def logdensity(x, mu):
        return -jnp.sum(jnp.log1p((x - mu) ** 2))

    cfg = ImportanceConfig(chains=4, draws=500, proposals=4000)
    out = make_importance_sampler(logdensity, 2, cfg)(
        jax.random.split(jax.random.key(1), 4).reshape(1, 4), jnp.zeros((1, 2))
    )
    assert (np.asarray(out.khat) > 0.7).any()
