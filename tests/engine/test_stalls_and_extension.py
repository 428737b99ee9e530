"""Fits that help themselves: a chain stalled during warmup is restarted, and healthy chains short
of effective draws are continued (issue 18). Both are recorded where a reviewer looks."""

import json

import numpy as np
import pandas as pd
import pymc as pm
import pytest

import bayestwin as bt
from bayestwin.engine.fit import FitConfig, sample_model, stalled_chains
from bayestwin.population import needs_more_draws
from bayestwin.review.convergence import Thresholds, diagnostics, gate
from tests.conftest import KEY


def test_stalled_chains_flags_a_chain_far_below_the_others():
    rng = np.random.default_rng(0)
    lp = rng.normal(-1082.0, 18.0, size=(4, 250))
    assert not stalled_chains(lp, n_params=650).any()
    lp[2] += -2469.0 + 1082.0  # the stall seen on a real cohort (issue 18)
    assert stalled_chains(lp, n_params=650).tolist() == [False, False, True, False]
    # chains of one typical set never differ by 10 SDs of the log density; one chain: nothing to compare
    assert not stalled_chains(lp[:1], n_params=650).any()


def test_stalled_chains_scale_with_the_dimension():
    """A gap of 60 nats is a stall for 2 parameters, not for 2,000 (log-density SD ~ sqrt(d/2))."""
    lp = np.zeros((3, 100)) + np.array([[0.0], [0.0], [-60.0]])
    assert stalled_chains(lp, n_params=2)[2]
    assert not stalled_chains(lp, n_params=2000).any()


def _two_wells():
    """x in two narrow wells at -5 and +5; the right one 100 nats lower, the barrier ~1,250 deep."""
    with pm.Model() as model:
        x = pm.Uniform("x", -10.0, 10.0)
        pm.Potential("wells", pm.math.logaddexp(-((x + 5.0) ** 2) / 0.02, -100.0 - (x - 5.0) ** 2 / 0.02))
    return model


def test_a_stalled_chain_is_restarted_and_recorded():
    model = _two_wells()
    init = [{"x": -5.0}, {"x": -5.0}, {"x": -5.0}, {"x": 5.0}]
    cfg = FitConfig(draws=200, tune=200, chains=4)
    idata = sample_model(model, ["x"], cfg, seed=3, initvals=init)
    x = idata.posterior["x"].to_numpy()
    assert json.loads(idata.posterior.attrs["stalled_chains"]) == [3]
    lp = json.loads(idata.posterior.attrs["stall_lp"])
    assert lp[3] < min(lp[:3]) - 90  # the stall's log density is recorded
    assert np.all(np.abs(x + 5.0) < 1.0)  # every chain ends in the main well
    # without restarts the chain stays where it started: the gate would see it (R-hat)
    idata = sample_model(model, ["x"], cfg._replace(restart_stalled=False), seed=3, initvals=init)
    assert "stalled_chains" not in idata.posterior.attrs
    assert np.all(np.abs(idata.posterior["x"].isel(chain=3).to_numpy() - 5.0) < 1.0)


def _table(rhat, bulk, tail, divergences=0, bfmi=1.0):
    t = pd.DataFrame({"rhat": rhat, "ess_bulk": bulk, "ess_tail": tail}, index=[f"v{i}" for i in range(len(rhat))])
    t.attrs.update(divergences=divergences, bfmi_min=bfmi)
    return t


@pytest.mark.parametrize(
    ("table", "drawn", "want"),
    [
        (_table([1.001], [900.0], [800.0]), 1000, False),  # converged: nothing to do
        (_table([1.004], [275.0], [170.0]), 1000, True),  # healthy, short: 170 x 4 reaches 400
        (_table([1.012], [700.0], [700.0]), 1000, True),  # R-hat just over: more draws
        (_table([1.004], [90.0], [95.0]), 1000, False),  # 90 x 4 < 400: more draws cannot pass
        (_table([1.004], [90.0], [95.0]), 250, True),  # ... but from 250 draws, 16x can
        (_table([1.2], [900.0], [900.0]), 1000, False),  # a stuck chain or a second mode
        (_table([1.004], [275.0], [300.0], divergences=3), 1000, False),  # divergences: geometry
        (_table([1.004], [275.0], [300.0], bfmi=0.1), 1000, False),  # E-BFMI: heavy tails
    ],
)
def test_needs_more_draws(table, drawn, want):
    assert needs_more_draws(table, Thresholds(), drawn=drawn, most=4000) is want


def test_a_short_healthy_fit_is_extended_until_it_passes(simulated):
    """100 draws x 4 chains cannot give 400 tail-ESS; continuing the same chains does."""
    train, _, _ = simulated
    keep = train["patient"].isin(train["patient"].unique()[:12])
    cohort = bt.Cohort(train[keep], covariates=["age", "sex"], therapies=["standard", "drug_a", "drug_b"], key=KEY)
    pop = bt.fit(cohort, draws=100, tune=300, seed=2, extend=6)
    attrs = pop.idata.posterior.attrs
    assert attrs["extensions"] >= 1
    assert attrs["draws_per_chain"] == 100 * (1 + attrs["extensions"]) == pop.posterior.sizes["draw"]
    assert pop.verdict.converged, pop.verdict
    assert pop.sampler["extensions"] == attrs["extensions"] and pop.sampler["extend"] == 6
    assert "restarted_chains" not in pop.sampler and "restarted" not in repr(pop)
    # the first 100 draws (what extend=0 returns, the same chains) fail the gate, honestly
    post = pop.idata.posterior.to_dataset().isel(draw=slice(0, 100))
    stats = pop.idata.sample_stats.to_dataset().isel(draw=slice(0, 100))
    assert not gate(diagnostics(post[pop.population_vars], stats)).converged
