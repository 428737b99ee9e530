"""The parameterisations of the population fit are one posterior: the default (``"auto"``: data-rich
patients centred), all non-centred and all centred agree, and their twins (which condition on
the non-centred offsets) too (issue 18)."""

import warnings

import numpy as np
import pytest

import bayestwin as bt
from bayestwin.families.progression import informative_patients

KEY = b"tests-pseudonym-key-01"
THERAPIES = ["standard", "drug_a", "drug_b"]


@pytest.fixture(scope="module")
def centred(simulated):
    train, _, _ = simulated
    cohort = bt.Cohort(train, covariates=["age", "sex"], therapies=THERAPIES, key=KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return bt.fit(cohort, bt.Progression(parameterisation="noncentred"), draws=1000, tune=1000, seed=2)


def test_the_default_fit_centres_these_patients(population, simulated):
    """The shared fit uses the default; on this cohort (5 visits over 12 months, residual SD 2.5,
    slope SD 0.5) every patient's data outweigh the prior, so all are centred."""
    assert population.family.config()["parameterisation"] == "auto"
    train, _, _ = simulated
    cohort = bt.Cohort(train, covariates=["age", "sex"], therapies=THERAPIES, key=KEY)
    design = population.family.design(cohort.frame, cohort.baseline, cohort.schema)
    assert informative_patients(design).all()


def test_centred_fit_is_the_same_posterior(population, centred):
    """``centred`` here is the all-non-centred fit, ``population`` the default (all centred)."""
    assert centred.verdict.converged, str(centred.verdict)
    post = population.posterior
    assert "theta_centred" not in post and "z_noncentred" not in post  # raw pieces left out
    assert post["z"].dims == ("chain", "draw", "patient", "effect")
    a, b = population.summary(), centred.summary()
    # |difference of posterior means| within 4 Monte-Carlo SEs of the difference, per parameter
    mcse = np.sqrt((a["sd"] / np.sqrt(a["ess_bulk"])) ** 2 + (b["sd"] / np.sqrt(b["ess_bulk"])) ** 2)
    z = (a["mean"] - b["mean"]).abs() / mcse
    assert (z < 4).all(), z.sort_values().tail()
    np.testing.assert_allclose(b["sd"], a["sd"], rtol=0.15)  # SDs from 4,000 draws each
    assert centred.family.config()["parameterisation"] == "noncentred"


def test_twins_of_a_centred_fit_match_the_non_centred_one(population, centred, simulated):
    _, held, _ = simulated
    t1 = population.condition(held, key=KEY, method="importance", seed=5)
    t2 = centred.condition(held, key=KEY, method="importance", seed=5)
    assert t2.verdict.converged, str(t2.verdict)
    for name in ("patient_intercept", "patient_slope"):
        m1, m2 = (t.posterior[name].mean(["chain", "draw"]).to_numpy() for t in (t1, t2))
        sd = t1.posterior[name].std(["chain", "draw"]).to_numpy()
        assert (np.abs(m1 - m2) <= 0.1 * sd).all(), (name, m1, m2, sd)


def test_auto_centres_patients_whose_data_dominate():
    from bayestwin.families.base import Design

    rng = np.random.default_rng(0)
    rich, sparse = 8, 3  # 12 visits a year apart, or 2 visits close together
    idx = np.repeat(np.arange(rich + sparse), [12] * rich + [2] * sparse)
    t = np.concatenate([np.arange(12.0)] * rich + [np.array([0.0, 0.2])] * sparse)
    level, slope = rng.normal(0, 5, rich + sparse), rng.normal(0, 1, rich + sparse)
    y = level[idx] + slope[idx] * t + rng.normal(0, 0.5, len(t))
    design = Design(patients=[f"p{i}" for i in range(rich + sparse)], data={"patient_idx": idx, "time": t, "y_obs": y})
    assert informative_patients(design).tolist() == [True] * rich + [False] * sparse
    # too few patients with a line of their own to judge: nothing centred
    few = Design(
        patients=["a", "b"],
        data={
            "patient_idx": np.array([0, 0, 0, 1]),
            "time": np.array([0.0, 1, 2, 0]),
            "y_obs": np.array([1.0, 2, 3, 4]),
        },
    )
    assert not informative_patients(few).any()


def test_parameterisation_is_checked():
    with pytest.raises(ValueError, match="parameterisation must be one of"):
        bt.Progression(parameterisation="centered")


def test_a_failed_fit_says_what_to_try():
    from bayestwin.families.base import Design
    from bayestwin.review.convergence import Verdict

    rng = np.random.default_rng(1)
    idx = np.repeat(np.arange(10), 9)
    t = np.tile(np.arange(9.0), 10)
    y = rng.normal(0, 5, 10)[idx] + rng.normal(0, 1, 10)[idx] * t + rng.normal(0, 0.3, len(t))
    design = Design(patients=[f"p{i}" for i in range(10)], data={"patient_idx": idx, "time": t, "y_obs": y})
    failed = Verdict(converged=False, table=None, failing=["R-hat > 1.01 for variables intercept"])
    advice = bt.Progression(parameterisation="noncentred").fit_advice(design, failed)
    assert len(advice) == 1 and "parameterisation='auto'" in advice[0] and advice[0].startswith("100% of the patients")
    failed.advice = advice
    assert str(failed).startswith("NOT CONVERGED: R-hat > 1.01 for variables intercept. Advice: 100% of the patients")
    assert bt.Progression(parameterisation="auto").fit_advice(design, failed) == []
    diverged = Verdict(converged=False, table=None, failing=["12 divergent transitions"])
    assert "funnel" in bt.Progression(parameterisation="centred").fit_advice(design, diverged)[0]
