"""A failed fit says why, in words: each reading of the draws on a case built to show it, and
the whole chain (bt.fit -> Verdict.advice -> str, warning) on a fit that cannot pass."""

import json
import re

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.engine.fit import FitConfig, sample_model
from bayestwin.review import advice
from bayestwin.review.convergence import Thresholds, diagnostics
from tests.conftest import KEY
from tests.engine.test_stalls_and_extension import _two_wells


def test_a_stuck_chain_is_named_with_its_parameter():
    """Chains 0-2 in the main well, chain 3 restarts disabled and left in the other one."""
    init = [{"x": -5.0}, {"x": -5.0}, {"x": -5.0}, {"x": 5.0}]
    cfg = FitConfig(draws=200, tune=200, chains=4, restart_stalled=False)
    idata = sample_model(_two_wells(), ["x"], cfg, seed=3, initvals=init)
    table = diagnostics(idata.posterior.to_dataset()[["x"]], idata.sample_stats.to_dataset())
    out = advice.fit_advice(idata, table, Thresholds(), ["x"])
    head = r"chain 3 is stuck: its log density sits 100 below the other chains', with x at (4\.9\d|5) "
    assert re.match(head, out[0])
    assert re.search(r"against -(4\.9\d|5) in the other chains", out[0])


def test_divergences_at_small_scales_are_a_funnel():
    rng = np.random.default_rng(0)
    tau = np.exp(rng.normal(0, 1, (4, 500)))
    mu = rng.normal(0, 1, (4, 500))
    diverging = tau < np.quantile(tau, 0.02)  # the neck of the funnel
    msg = advice.divergence_site(diverging, {"mu": mu, "tau": tau})
    assert msg.startswith("40 divergent transitions concentrate at small values of tau (median ")
    assert "a funnel between this scale and the effects it scales" in msg
    spread = advice.divergence_site(rng.random((4, 500)) < 0.01, {"mu": mu, "tau": tau})
    assert "spread over the parameters" in spread
    assert advice.divergence_site(np.zeros((4, 500), bool), {"mu": mu}) is None


def test_tree_depth_bfmi_and_prior_conflict():
    steps = np.full((4, 100), 15)
    assert advice.tree_depth(steps, 10) is None
    steps[:, :20] = 1023
    assert advice.tree_depth(steps, 10).startswith("20% of the draws hit the maximum tree depth (1,023 leapfrog steps)")
    assert "max_tree_depth=12" in advice.tree_depth(steps, 10)
    assert advice.low_bfmi(0.5, 0.3) is None and advice.low_bfmi(np.nan, 0.3) is None
    assert advice.low_bfmi(0.05, 0.3).startswith("E-BFMI 0.05: ")
    rng = np.random.default_rng(1)
    prior = {"sigma": np.abs(rng.normal(0, 1, 4000)), "mu": rng.normal(0, 10, 4000)}
    post = {"sigma": np.full((4, 100), 8.0), "mu": np.full((4, 100), 1.0)}
    (msg,) = advice.prior_conflict(post, prior)
    assert msg.startswith("the posterior lies beyond 99% of the prior for sigma (median 8, prior 99% ")
    assert "mu" not in msg


def test_short_of_draws_says_how_many():
    t = pd.DataFrame({"rhat": [1.004], "ess_bulk": [250.0], "ess_tail": [200.0]}, index=["sigma"])
    t.attrs.update(divergences=0, bfmi_min=0.9)
    msg = advice.short_of_draws(t, extensions=3, drawn=4000, limits=Thresholds())
    assert msg.startswith("the chains are healthy but slow on sigma (ESS 200) (continued 3 times, to 4,000 draws")
    assert "about draws=8,000 would pass" in msg
    t.attrs["divergences"] = 2
    assert advice.short_of_draws(t, 0, 1000, Thresholds()) is None


def test_an_rhat_short_of_its_limit_with_enough_ess_asks_for_more_draws_not_fewer():
    """Seen on an ODE fit of 400 draws: R-hat 1.014 on log_ka failed the gate, every ESS >= 592;
    the advice read the ESS and said "about draws=300 would pass", fewer than were drawn."""
    t = pd.DataFrame(
        {"rhat": [1.014, 1.003], "ess_bulk": [650.0, 900.0], "ess_tail": [592.0, 800.0]}, index=["log_ka", "bsv_sd"]
    )
    t.attrs.update(divergences=0, bfmi_min=0.9)
    msg = advice.short_of_draws(t, extensions=0, drawn=400, limits=Thresholds())
    assert msg.startswith("the chains are healthy but do not yet agree on log_ka (R-hat 1.014, limit 1.01): ")
    assert "about draws=600 would pass" in msg  # 400 x 0.014 / 0.01 = 560, to the hundred
    t["rhat"] = [1.004, 1.003]
    assert advice.short_of_draws(t, 0, 400, Thresholds()) is None  # nothing to advise: it passes
    t["ess_tail"] = [250.0, 800.0]  # short of ESS as well: the ESS decides, never below the draws run
    assert "about draws=700 would pass" in advice.short_of_draws(t, 0, 400, Thresholds())


def test_scalars_label_entries_and_skip_constants():
    import xarray as xr

    post = xr.Dataset(
        {
            "a": (("chain", "draw"), np.ones((2, 3)) * np.arange(3)),
            "s": (("chain", "draw", "effect"), np.random.default_rng(0).random((2, 3, 2))),
            "c": (("chain", "draw", "i", "j"), np.ones((2, 3, 2, 2))),  # constant: left out
        },
        coords={"effect": ["intercept", "slope"]},
    )
    assert list(advice.scalars(post, ["a", "s", "c"])) == ["a", "s[intercept]", "s[slope]"]


def test_a_failed_fit_carries_advice_everywhere(simulated):
    """Too few draws and tiny trees: the gate fails, the verdict says why and what to try."""
    train, _, _ = simulated
    keep = train["patient"].isin(train["patient"].unique()[:12])
    cohort = bt.Cohort(train[keep], covariates=["age", "sex"], therapies=["standard", "drug_a", "drug_b"], key=KEY)
    with pytest.warns(bt.ConvergenceWarning, match="Advice: "):
        pop = bt.fit(cohort, draws=100, tune=100, seed=2, extend=0, max_tree_depth=3)
    v = pop.verdict
    assert not v.converged
    assert any(a.startswith("100% of the draws hit the maximum tree depth (7 leapfrog steps)") for a in v.advice)
    assert all(f"Advice: {a}" in str(v) for a in v.advice)
    assert json.loads(pop.idata.attrs["bayestwin_failing"]) == v.failing
    assert "Advice: " in pop.idata.attrs["bayestwin_verdict"]
