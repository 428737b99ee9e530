"""Simulated trials: power against the closed form, type-I error, the Bayesian rule, sample size,
PROCOVA's saving against 1 - rho^2, resumable batches and the Dask path.

Tolerances are Monte-Carlo SEs of the simulated proportions (binomial), 3 SEs unless stated.
"""

import numpy as np
import pandas as pd
import pytest

from bayestwin.trials import TrialDesign, procova, sample_size, simulate_trials
from bayestwin.trials.analysis import two_sample_power

FIXED = {"age": 60.0, "sex": "F"}  # one covariate profile: the change from baseline is exactly normal
EFFECT = {"therapy_slope": {"drug_a": -0.35}}  # an assumed effect, smaller than the fitted one
T = 12.0


def _closed_form(population, n_c, n_t, alpha=0.025):
    """Effect and SD of the change y(T) - y(0) at the posterior mean: N(effect T, Var(u1) T^2 + 2 sigma^2)."""
    post = population.posterior.mean(("chain", "draw"))
    L = post.re_chol.values
    sd = np.sqrt((L[1] ** 2 + L[2] ** 2) * T**2 + 2 * float(post.sigma) ** 2)
    effect = -0.35 * T
    return effect, sd, two_sample_power(effect, sd, n_c, n_t, alpha)


def test_power_matches_the_closed_form_two_sample_power(population):
    design = TrialDesign("standard", "drug_a", n_per_arm=15, allocation=2.0, visits=(0, 6, T), analysis="ttest")
    trials = simulate_trials(population, design, 4000, parameters=EFFECT, covariates=FIXED, seed=1)
    effect, sd, exact = _closed_form(population, 15, 30)
    p = trials["success"].mean()
    se = np.sqrt(exact * (1 - exact) / len(trials))
    print(f"simulated power {p:.4f} vs closed form {exact:.4f} (MC SE {se:.4f})")
    assert 0.3 < exact < 0.9  # a power the check can tell apart
    assert abs(p - exact) < 3 * se
    assert abs(trials["estimate"].mean() - effect) < 3 * trials["estimate"].std() / np.sqrt(len(trials))
    # with delta = 0 and threshold = 1 - alpha, the reference-prior Bayesian rule is the t-test
    assert (trials["bayes_success"] == trials["reject"]).all()


def test_type_one_error_with_ancova_and_dropout(population):
    design = TrialDesign("standard", "drug_a", n_per_arm=40, visits=(0, 3, 6, 9, T), dropout=0.3)
    trials = simulate_trials(population, design, 4000, null=True, seed=2)
    rate = trials["success"].mean()
    assert abs(rate - 0.025) < 3 * np.sqrt(0.025 * 0.975 / 4000)
    # dropout: 30% leave before the last visit, completers only are analysed
    assert abs(1 - trials["n_analysed"].mean() / design.n_total - 0.3) < 0.01
    locf = simulate_trials(population, TrialDesign(**{**design.__dict__, "missing": "locf"}), 50, null=True, seed=2)
    assert (locf["n_analysed"] == design.n_total).all()


def test_sample_size_search_agrees_with_the_closed_form(population):
    design = TrialDesign("standard", "drug_a", n_per_arm=10, visits=(0, T), analysis="ttest")
    n, table = sample_size(population, design, target=0.8, trials=2000, parameters=EFFECT, covariates=FIXED)
    exact = next(k for k in range(2, 500) if _closed_form(population, k, k)[2] >= 0.8)
    print(table.to_string(), f"\nsimulated n = {n}, closed form n = {exact}")
    assert table.set_index("n_per_arm").loc[n, "power"] >= 0.8
    assert table.set_index("n_per_arm").loc[n - 1, "power"] < 0.8
    assert abs(n - exact) <= max(2, 0.1 * exact)


def test_responder_endpoint_and_design_errors(population):
    design = TrialDesign(
        "standard", "drug_b", n_per_arm=30, visits=(0, T), endpoint="responder", responder_threshold=0.0
    )
    trials = simulate_trials(population, design, 200, seed=3)
    assert trials["estimate"].mean() > 0.2  # drug_b lowers the slope: more patients improve
    with pytest.raises(ValueError, match=r"endpoint must be one of \('change', 'responder', 'exposure'\), not 'death'"):
        TrialDesign("standard", "drug_a", n_per_arm=10, endpoint="death")
    with pytest.raises(ValueError, match=r"randomisation \(5\) must be one of the visits before the last"):
        TrialDesign("standard", "drug_a", n_per_arm=10, visits=(0, 6, 12), randomisation=5)


def test_prognostic_twins_save_what_one_minus_rho_squared_predicts(population):
    design = TrialDesign("standard", "drug_a", n_per_arm=60, visits=(0, 3, 6, 12, 18), randomisation=6)
    res = procova(population, design, pool=500, trials=2000, parameters=EFFECT)
    print(res)
    tab = res.table.set_index("analysis")
    assert res.rho > 0.3
    for name in ("prognostic score", "baseline + prognostic score"):
        row = tab.loc[name]
        assert row["ratio"] < 1.0
        assert abs(row["ratio"] - row["predicted ratio"]) < 3 * row["ratio SE"] + 0.02, name
    assert tab.loc["prognostic score", "power"] > tab.loc["unadjusted", "power"]


def test_batches_stream_to_disk_and_resume(population, tmp_path):
    design = TrialDesign("standard", "drug_a", n_per_arm=20, visits=(0, T))
    whole = simulate_trials(population, design, 300, seed=4, batch=100)
    out = tmp_path / "run"
    first = simulate_trials(population, design, 300, seed=4, batch=100, out=out)
    pd.testing.assert_frame_equal(first, whole)
    files = sorted(out.glob("trials-*.parquet"))
    assert len(files) == 3
    files[1].unlink()  # a batch lost with its worker
    (out / ".trials-x.parquet.tmp").write_bytes(b"half-written")  # debris of a killed write
    again = simulate_trials(population, design, 300, seed=4, batch=100, out=out)
    pd.testing.assert_frame_equal(again, whole)
    # results depend on the trial index, not on the batching
    pd.testing.assert_frame_equal(simulate_trials(population, design, 300, seed=4, batch=64), whole)
    with pytest.raises(ValueError, match="holds batches of another job"):
        simulate_trials(population, design, 300, seed=5, batch=100, out=out)


def test_dask_local_cluster_gives_the_same_trials(population, tmp_path):
    distributed = pytest.importorskip("distributed")
    from bayestwin.engine.batches import WORKER_ENV

    design = TrialDesign("standard", "drug_a", n_per_arm=20, visits=(0, T))
    local = simulate_trials(population, design, 200, seed=6, batch=50)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, env=WORKER_ENV
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        remote = simulate_trials(population, design, 200, seed=6, batch=50, client=client, out=tmp_path / "dask")
    pd.testing.assert_frame_equal(remote, local)
    assert len(list((tmp_path / "dask").glob("trials-*.parquet"))) == 4
