"""The toxicity-guided dosing trial on the zoo's Friberg PK/PD population: the paired design, the
BSA arm's label rule, the truth it follows, and the twin arm's choices.

The population is the model zoo's ``docetaxel_friberg`` (loaded, not fitted: a fit of even 6
subjects with short chains took 200-270 s of the suite) and the trial has 3 patients: the
trial's machinery is under test here, not an effect estimate, so the assertions are exact
properties of the design, and the true exposure against its closed form (AUC = dose / CL).
"""

import warnings

import numpy as np
import pytest

import bayestwin as bt
from bayestwin.trials import toxicity_dosing_trial
from bayestwin.trials.toxicity import cycle_grid, true_paths

KEY = b"toxicity-trial-test-key"
CANDIDATES = [60.0, 100.0, 135.0, 160.0]


@pytest.fixture(scope="module")
def trial():
    pop = bt.load("docetaxel_friberg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = toxicity_dosing_trial(
            pop,
            3,
            dose_per_m2=75.0,
            candidates=CANDIDATES,
            target=bt.Outcome("conc", "auc", 3.0, 4.5),
            constraint=(bt.Outcome("anc", "nadir", high=1.0), 0.2),
            cycles=2,
            draws=50,  # the design's properties are exact: the twins' draws only pick doses
            tune=100,
            chains=2,
            seed=0,
        )
    return pop, result


def test_the_arms_share_patients_and_the_first_cycle(trial):
    _, res = trial
    c = res.cycles.set_index(["arm", "cycle", "ID"]).sort_index()
    first = ["dose", "metric", "nadir"]
    np.testing.assert_array_equal(c.loc[("BSA", 1), first].to_numpy(), c.loc[("twin", 1), first].to_numpy())
    np.testing.assert_allclose(c.loc[("BSA", 1), "dose"].to_numpy(), 75.0 * res.bsa.to_numpy())
    assert (c["grade3"] == (c["nadir"] < 1.0)).all() and (c["grade4"] == (c["nadir"] < 0.5)).all()
    assert list(res.table["arm"]) == ["BSA", "twin"] and (res.table["patient-cycles"] == 3).all()


def test_bsa_arm_follows_the_label_rule_on_what_it_measured(trial):
    _, res = trial
    m = res.measurements
    low = m[(m["arm"] == "BSA") & (m["CMT"] == 6)].groupby("ID")["DV"].min() < 0.5
    c = res.cycles[res.cycles["arm"] == "BSA"].pivot(index="ID", columns="cycle", values="dose")
    np.testing.assert_allclose(c[2].to_numpy(), np.where(low.reindex(c.index), 0.75, 1.0) * c[1].to_numpy())


def test_twin_arm_chooses_among_the_candidates(trial):
    _, res = trial
    chosen = res.cycles[(res.cycles["arm"] == "twin") & (res.cycles["cycle"] == 2)]["dose"]
    assert set(chosen) <= set(CANDIDATES)


def test_the_truth_is_the_models_solution(trial):
    """True AUC over a cycle equals dose / CL (all of the drug is eliminated within the cycle)."""
    pop, res = trial
    fam = pop.family
    theta = {
        p: np.array([v])
        for p, v in {"cl": 30.0, "v": 8.0, "mtt": 90.0, "gamma": 0.15, "circ0": 5.0, "slope": 9.0}.items()
    }
    grid = cycle_grid(504.0)
    paths = true_paths(fam, theta, (np.array([[0.0]]), np.array([[120.0]])), 1.0, grid)
    auc = np.trapezoid(paths["conc"][0], grid)
    assert auc == pytest.approx(120.0 / 30.0, rel=3e-3)
    assert paths["anc"][0, 0] == pytest.approx(5.0, rel=1e-9) and paths["anc"][0].min() < 5.0
