"""The twin sampler's one-scan warmup and draws equal blackjax's window adaptation followed by
NUTS draws, bit for bit, on the same keys (so the one-program rewrite changes no result)."""

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blackjax.adaptation.base import get_filter_adapt_info_fn

from bayestwin.engine.nuts import NutsConfig, guarded, make_sampler

A = jnp.array([[2.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 0.5]])


def logdensity(x, mu):
    z = x - mu
    return -0.5 * z @ jnp.linalg.solve(A, z) - 0.1 * jnp.sum(z**4)


def reference(cfg: NutsConfig):
    """blackjax.window_adaptation, then blackjax.nuts with the adapted parameters."""

    def one_chain(key, position, data):
        ld = lambda x: logdensity(x, data)  # noqa: E731
        warm_key, sample_key = jax.random.split(key)
        warmup = blackjax.window_adaptation(
            blackjax.nuts,
            ld,
            target_acceptance_rate=cfg.target_accept,
            adaptation_info_fn=get_filter_adapt_info_fn(),
            is_mass_matrix_diagonal=cfg.diagonal,
            max_num_doublings=cfg.max_doublings,
        )
        (state, params), _ = warmup.run(warm_key, position, num_steps=cfg.tune)
        step = blackjax.nuts(ld, **params).step

        def one_step(state, k):
            state, info = step(k, state)
            return state, (state.position, info.num_integration_steps)

        _, (pos, n) = jax.lax.scan(one_step, state, jax.random.split(sample_key, cfg.draws))
        return pos, n, params["step_size"]

    return jax.jit(jax.vmap(jax.vmap(one_chain, in_axes=(0, 0, None)), in_axes=(0, 0, 0)))


@pytest.mark.parametrize(("diagonal", "tune"), [(False, 200), (True, 15)])  # Stan windows; fast-only
def test_one_scan_equals_window_adaptation_then_nuts(diagonal, tune):
    cfg = NutsConfig(chains=2, tune=tune, draws=100, diagonal=diagonal)
    keys = jax.random.split(jax.random.key(0), 3 * 2).reshape(3, 2)
    init = jax.random.normal(jax.random.key(1), (3, 2, 3))
    mu = jnp.arange(3.0)[:, None] * jnp.ones((3, 3))
    pos, n, step_size = reference(cfg)(keys, init, mu)
    out = make_sampler(logdensity, cfg)(keys, init, mu)
    np.testing.assert_array_equal(out.position, pos)
    np.testing.assert_array_equal(out.n_steps, n)
    np.testing.assert_array_equal(out.step_size, step_size)
    assert out.position.shape == (3, 2, 100, 3)


def test_a_kinetic_energy_that_overflows_is_a_divergence_not_a_perfect_proposal():
    """A leapfrog step that met a gradient of 1e221 (a count-model twin's chain at its seed 5,
    during warmup): blackjax's kinetic energy of that momentum under the adapted dense metric came
    out -inf, an energy it takes as a perfect proposal, and the chain jumped to |w| ~ 50 and stayed
    there. The guarded metric makes any non-finite kinetic energy +inf (a divergence) and leaves
    finite ones bit-identical."""
    imm = jnp.array(
        [
            [0.913, -0.081, -0.03, 0.079, 0.157, -0.07],
            [-0.081, 0.818, 0.061, -0.116, 0.029, 0.041],
            [-0.03, 0.061, 0.624, 0.058, 0.004, -0.079],
            [0.079, -0.116, 0.058, 0.894, 0.038, -0.078],
            [0.157, 0.029, 0.004, 0.038, 0.819, 0.068],
            [-0.07, 0.041, -0.079, -0.078, 0.068, 0.235],
        ]
    )
    p = jnp.array([1.428e221, 9.022e220, -8.024e218, 7.762e220, -1.175e222, -5.754e221])
    plain = blackjax.mcmc.metrics.default_metric(imm).kinetic_energy(p)
    assert not np.isfinite(plain)  # -inf on this machine; NaN or -inf depending on summation order
    assert guarded(imm).kinetic_energy(p) == np.inf
    assert guarded(imm).kinetic_energy(jnp.full(6, np.nan)) == np.inf
    q = jax.random.normal(jax.random.key(3), (6,))
    for m in (imm, jnp.diag(imm)):
        assert guarded(m).kinetic_energy(q) == blackjax.mcmc.metrics.default_metric(m).kinetic_energy(q)
