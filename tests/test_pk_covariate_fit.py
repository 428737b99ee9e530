"""A population PK fit with a covariate model on CL and V, partial BSV and a correlation block,
then a new subject's twin, forecast and dose search through the same covariate inputs.

Simulated study (``pk.simulate``): 40 subjects, weight on CL ((WT/70)^0.75) and V (WT/70),
CYP2D6 poor metabolisers at 0.3 x CL. Recovery tolerances are 3 posterior SDs (the chance that
a correct posterior misses one of the five checks is about 1%; fixed seeds keep it fixed).
"""

import numpy as np
import pytest

import bayestwin as bt
from bayestwin.data.nonmem import read_nonmem
from bayestwin.families import pk

KEY = b"pk-covariate-fit-key-01"
PHENOTYPE = {"normal": 1.0, "poor": 0.3}


@pytest.fixture(scope="module")
def fitted():
    table, truth = pk.simulate(40, weight=True, phenotype=PHENOTYPE, seed=3)
    events = read_nonmem(table, covariates=["WT", "CYP2D6"], key=KEY)
    family = bt.Pk(
        covariates={
            "CL": [bt.Power("WT", ref=70), bt.Categorical("CYP2D6")],  # exponent estimated
            "V": [bt.Power("WT", ref=70, exponent=1)],
        },
        correlated=[["CL", "V"]],
    )
    pop = bt.fit(events, family=family, draws=500, tune=500, chains=2, seed=1)
    return pop, truth


def test_the_covariate_model_is_recovered(fitted):
    pop, truth = fitted
    assert pop.verdict.converged, pop.verdict
    post = pop.idata.posterior
    k = truth["population"]["cl"] / truth["population"]["v"]
    want = {
        "log_cl": np.log(truth["population"]["cl"]),
        "log_v": np.log(truth["population"]["v"]),
        "log_ka": np.log(truth["population"]["ka"] - k),  # one compartment: the excess of ka over k
        "cov_cl_WT": 0.75,
        "cov_cl_CYP2D6": np.log(0.3),
    }
    for name, value in want.items():
        x = post[name].to_numpy().ravel()
        assert abs(x.mean() - value) < 3 * x.std(), (name, x.mean(), x.std(), value)
    assert "cov_v_WT" not in post  # a fixed exponent is not a parameter
    assert list(post["re_chol_0_corr"].dims[-2:]) and post["bsv_sd"].sizes["diag_param"] == 1


@pytest.fixture(scope="module")
def twin(fitted):
    pop, _ = fitted
    # a poor metaboliser: her clearance is 0.3 x (WT/70)^0.75 of the typical value
    table, truth = pk.simulate(1, weight=True, phenotype={"poor": 0.3}, seed=11, id_start=900)
    table["CYP2D6"] = table["CYP2D6"].cat.set_categories(list(PHENOTYPE))
    rows = table[table["TIME"] <= 4.0]  # the dose and the levels up to 4 h
    return pop.condition(rows, key=KEY, seed=2), truth


def test_a_new_subjects_twin_uses_its_own_covariates(fitted, twin):
    pop, _ = fitted
    twin, truth = twin
    assert twin.verdict.converged
    cl = twin.posterior["patient_cl"].to_numpy().ravel()
    assert abs(cl.mean() - truth["cl"][900]) < 3 * cl.std()
    prior_mean = np.exp(pop.idata.posterior["log_cl"].mean().item())
    assert cl.mean() < 0.6 * prior_mean  # the genotype (not only the levels) moved her clearance down
    fc = twin.predict(times=[12.0, 24.0])
    assert np.isfinite(fc.draws["mean"].to_numpy()).all()
    table = bt.dose_search(twin, [bt.Regimen(a, 12.0, doses=4) for a in (25, 50, 100)], target=(0.5, 3.0))
    assert len(table) == 3 and table["P(target)"].between(0, 1).all()


def test_a_one_output_family_refuses_output(twin):
    twin, _ = twin
    with pytest.raises(TypeError, match="output= is for families with several outputs; family 'pk' has one"):
        twin.predict(times=[12.0], output="conc")


def test_outcome_search_agrees_with_the_closed_form_dose_search(twin):
    """The same twin draws, the same last-interval grid: AUC, P(target) and P(peak > limit) of
    the forecast-based search equal dose_search's closed-form metrics."""
    twin, _ = twin
    regimens = [bt.Regimen(a, 12.0, doses=4) for a in (25, 50, 100)]
    closed = bt.dose_search(twin, regimens, target=(20.0, 40.0), metric="auc", limit=4.0, max_toxic=1.0)
    start = float(twin.cohort.frame["TIME"].max())
    grid = start + 36.0 + 12.0 * np.linspace(0.0, 1.0, 25)
    table = bt.outcome_search(
        twin,
        regimens,
        times=grid,
        target=bt.Outcome(None, "auc", 20.0, 40.0),
        constraints=[(bt.Outcome(None, "peak", low=4.0), 1.0)],
        min_target=0.0,
    )
    np.testing.assert_allclose(table["auc_mean"], closed["auc_mean"], rtol=1e-9)
    np.testing.assert_allclose(table["P(20 <= auc <= 40)"], closed["P(target)"], atol=1e-12)
    np.testing.assert_allclose(table["P(peak >= 4)"], closed["P(toxic)"], atol=1e-12)
    assert table["recommended"].sum() == 1
