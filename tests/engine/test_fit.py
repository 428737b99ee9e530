"""The population-fit driver: the DataTree it builds is what pm.sample would build, and the gate.

Parameter recovery and agreement with published fits are in test_sleepstudy / test_theoph; here
the pieces the driver computes itself: pointwise log-likelihood, deterministics, sample stats,
the diagnostics table against ArviZ, and the mass-matrix option.
"""

import arviz_stats as azs
import numpy as np
import pymc as pm
import pytest

import bayestwin as bt
from bayestwin.engine.compile import Block, unconstrained_draws
from bayestwin.engine.fit import FitConfig, sample_model
from tests.conftest import KEY, THERAPIES


def test_datatree_groups_and_sample_stats(population):
    idata = population.idata
    assert {"posterior", "sample_stats", "log_likelihood", "observed_data", "constant_data"} <= set(idata.children)
    stats = idata.sample_stats
    for name in ("lp", "energy", "step_size", "acceptance_rate", "diverging", "n_steps", "tree_depth"):
        assert stats[name].dims == ("chain", "draw"), name
    assert idata.posterior.attrs["mass_matrix"] == "block"
    assert "z" not in idata.posterior.attrs["dense_block"] and "intercept" in idata.posterior.attrs["dense_block"]
    assert population.sampler["mass"] == "block" and population.sampler["seed"] == 1
    # the suite's workers own one core each (tests/conftest.py): every chain on one device
    assert population.sampler["devices"] == 1 and population.sampler["split"] == "shard"


def test_log_likelihood_and_deterministics_equal_the_model(population, simulated):
    """Pointwise log-likelihood and patient deterministics recomputed by PyMC at a few draws."""
    train, _, _ = simulated
    cohort = bt.Cohort(train, covariates=["age", "sex"], therapies=THERAPIES, key=KEY)
    model = population.model(cohort)
    post = population.posterior
    loglik = pm.compile(model.value_vars, model.logp(vars=[model["y"]], sum=False)[0], on_unused_input="ignore")
    intercept = pm.compile(
        model.value_vars, model.replace_rvs_by_values([model["patient_intercept"]])[0], on_unused_input="ignore"
    )
    ip = model.initial_point()
    blocks = tuple(Block(v.name, model.values_to_rvs[v].name, ip[v.name].shape) for v in model.value_vars)
    for chain, draw in ((0, 0), (3, 999), (2, 417)):
        flat = unconstrained_draws(model, post.isel(chain=[chain], draw=[draw]), blocks)[0]
        point, i = {}, 0
        for b in blocks:
            point[b.name] = flat[i : i + b.size].reshape(b.shape).astype(ip[b.name].dtype)
            i += b.size
        want = loglik(**point)
        got = population.idata.log_likelihood["y"].isel(chain=chain, draw=draw).to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        got_a = post["patient_intercept"].isel(chain=chain, draw=draw).to_numpy()
        np.testing.assert_allclose(got_a, intercept(**point), rtol=1e-9)


def test_fit_diagnostics_equal_arviz(population):
    table = population.verdict.table
    post = population.posterior[population.population_vars]
    rhat = azs.rhat(post, sample_dims=["chain", "draw"])
    bulk = azs.ess(post, sample_dims=["chain", "draw"], method="bulk")
    for name in ("intercept", "slope", "beta_level", "sigma", "re_chol_stds"):
        assert table.loc[name, "rhat"] == pytest.approx(float(rhat[name].max()), rel=1e-9)
        assert table.loc[name, "ess_bulk"] == pytest.approx(float(bulk[name].min()), rel=1e-9)


def test_mass_option_is_checked(population):
    with pytest.raises(ValueError, match="mass must be one of \\('block', 'diag', 'dense'\\), not 'full'"):
        sample_model(population.model(), ["intercept"], FitConfig(mass="full"))


@pytest.mark.parametrize("mass", ["block", "diag"])
def test_prewarm_hands_a_metric_in_each_layout(mass):
    """Scales 10,000 apart: after the short first warmup the main warmup starts from its metric
    (block-dense or diagonal layout, names in numpyro's sorted order), and the draws give each
    scale's SD within 4 Monte-Carlo SEs (SD of an SD estimate: SD / sqrt(2 ESS))."""
    with pm.Model() as model:
        pm.Normal("wide", 0.0, 100.0, shape=3)
        pm.Normal("narrow", 0.0, 0.01, shape=2)
        pm.Normal("unit", 0.0, 1.0)
    cfg = FitConfig(draws=500, tune=200, chains=2, mass=mass, prewarm=30, restart_stalled=False)
    idata = sample_model(model, ["wide", "unit"], cfg, seed=3)
    for name, sd in (("wide", 100.0), ("narrow", 0.01), ("unit", 1.0)):
        draws = idata.posterior[name].to_numpy().reshape(1000, -1)
        ess = azs.ess(idata.posterior[name], sample_dims=["chain", "draw"], method="bulk").to_numpy().min()
        np.testing.assert_allclose(draws.std(axis=0), sd, rtol=4 / np.sqrt(2 * ess), err_msg=name)


def test_prewarm_option_is_checked(population):
    with pytest.raises(ValueError, match="prewarm must be 0 \\(none\\) or a whole number of iterations >= 20, not 5"):
        sample_model(population.model(), ["intercept"], FitConfig(prewarm=5))


def test_jitter_moves_each_chain_within_its_scale_and_avoids_infinite_starts():
    from bayestwin.engine.fit import _jittered

    init = [np.zeros((4, 3)), np.ones(4)]  # 4 chains: a vector and a scalar
    out = _jittered(init, 0.2, 0, lambda x: np.inf if float(x[0][0]) > 0.0 else 0.0)
    assert [a.shape for a in out] == [(4, 3), (4,)]
    assert (np.abs(out[0]) <= 0.2).all() and (np.abs(out[1] - 1.0) <= 0.2).all()
    assert (out[0][:, 0] <= 0.0).all()  # drawn again where the potential was not finite
    assert len({round(float(v), 12) for v in out[1]}) == 4  # every chain its own start
    with pytest.raises(ValueError, match=r"jitter must be a number in \[0, 2\] \(the unconstrained scale\), not 3.0"):
        sample_model(pm.Model(), [], FitConfig(jitter=3.0))
