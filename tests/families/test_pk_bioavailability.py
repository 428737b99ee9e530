"""Bioavailability F (issue 20, items 1 and 4): ``Pk(bioavailability=True)`` scales every depot
dose by the subject's F and no dose into the central compartment; from a crossover study (an IV
bolus, then an oral dose) a population fit recovers F, CL and V."""

import warnings

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.families import from_config
from bayestwin.families import pk_analytic as pka

KEY = b"bioavailability-test-key"
TRUE = {"cl": 2.0, "v": 30.0, "ka": 1.2, "f": 0.6}
BSV = {"cl": 0.3, "v": 0.2, "ka": 0.3}
IV_TIMES = (0.25, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0)
ORAL_AT = 72.0
ORAL_TIMES = tuple(ORAL_AT + t for t in (0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0))


@pytest.mark.parametrize("compartments", [1, 2])
def test_f_scales_depot_doses_only(compartments):
    """Against the closed forms: a depot dose contributes F times its F = 1 level, a central bolus
    and an infusion are unchanged (exact up to rounding)."""
    fam, plain = bt.Pk(compartments, bioavailability=True), bt.Pk(compartments)
    theta = {"cl": np.array([2.0]), "ka": np.array([1.2]), "f": np.array([0.37])}
    theta |= (
        {"v": np.array([30.0])}
        if compartments == 1
        else {"v1": np.array([30.0]), "q": np.array([3.0]), "v2": np.array([50.0])}
    )
    t = np.linspace(0.0, 48.0, 97)[:, None]
    t_dose, amt = np.array([0.0, 6.0, 12.0]), np.array([100.0, 80.0, 60.0])
    duration, infusion = np.array([0.0, 0.0, 2.0]), np.array([0.0, 2.0, 1.0])  # depot, central bolus, infusion
    with_f = fam.concentration(np, theta, t, t_dose, amt, duration, infusion)
    without = plain.concentration(np, {k: v for k, v in theta.items() if k != "f"}, t, t_dose, amt, duration, infusion)
    np.testing.assert_allclose(with_f[:, 0], 0.37 * without[:, 0], rtol=1e-12)
    np.testing.assert_array_equal(with_f[:, 1:], without[:, 1:])
    assert without[:, 0].max() > 0


def test_options_are_checked_and_kept_in_the_card():
    with pytest.raises(
        ValueError, match="bioavailability=True is the fraction of an oral dose absorbed: it needs route='oral'"
    ):
        bt.Pk(route="iv", bioavailability=True)
    with pytest.raises(TypeError, match="bioavailability is True or False, not 'yes'"):
        bt.Pk(bioavailability="yes")
    fam = bt.Pk(bioavailability=True, bsv=["CL", "V", "KA"], covariates={"F": [bt.Categorical("FORM")]})
    assert fam.parameters == ("cl", "v", "ka", "f") and fam.bsv_parameters == ("cl", "v", "ka")
    assert from_config(fam.config()).config() == fam.config()


def _crossover(n: int, seed: int) -> pd.DataFrame:
    """Each subject: 100 mg IV bolus (CMT 2) at 0, levels to 24 h; 100 mg oral (CMT 1) at 72 h,
    levels to 96 h. Levels from the closed forms (F on the oral dose only), combined error."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        p = {k: TRUE[k] * np.exp(BSV.get(k, 0.0) * rng.standard_normal()) for k in ("cl", "v", "ka")}
        t_iv, t_oral = np.array(IV_TIMES), np.array(ORAL_TIMES)
        iv = pka.one_cmt_bolus(np, np.r_[t_iv, t_oral], 0.0, 100.0, p["cl"], p["v"])
        oral = pka.one_cmt_oral(np, np.r_[t_iv, t_oral], ORAL_AT, 100.0, p["cl"], p["v"], p["ka"], f=TRUE["f"])
        conc = iv + oral
        dv = conc + np.sqrt(0.05**2 + (0.1 * conc) ** 2) * rng.standard_normal(conc.shape)
        rows += [
            {"ID": i, "TIME": 0.0, "AMT": 100.0, "DV": np.nan, "EVID": 1, "CMT": 2},
            {"ID": i, "TIME": ORAL_AT, "AMT": 100.0, "DV": np.nan, "EVID": 1, "CMT": 1},
        ]
        rows += [
            {"ID": i, "TIME": t, "AMT": 0.0, "DV": y, "EVID": 0, "CMT": 2}
            for t, y in zip(np.r_[t_iv, t_oral], dv, strict=True)
        ]
    return pd.DataFrame(rows).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")


@pytest.mark.slow
def test_a_crossover_study_determines_f():
    table = _crossover(20, seed=5)
    events = bt.read_nonmem(table, key=KEY)
    fam = bt.Pk(bioavailability=True, bsv=["CL", "V", "KA"], correlated=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pop = bt.fit(events, fam, seed=1, draws=500, tune=500)
    assert pop.verdict.converged, str(pop.verdict)
    post = pop.posterior
    for p in ("f", "cl", "v"):
        draws = post[f"log_{p}"].to_numpy().ravel()
        est, sd = draws.mean(), draws.std()
        print(f"log {p}: {est:.3f} (SD {sd:.3f}) vs true {np.log(TRUE[p]):.3f}")
        assert abs(est - np.log(TRUE[p])) <= 3 * sd
    assert post["log_f"].std() < 0.1  # determined by the data (its prior SD is 0.5)
    # a new subject with an oral dose only: the twin carries the population's F into its forecast
    new = table[(table.ID == 1) & ((table.TIME >= ORAL_AT) & (table.TIME <= ORAL_AT + 2))].copy()
    new["ID"] = 999
    twin = pop.condition(new, key=KEY, method="importance")
    f = twin.posterior["patient_f"].to_numpy().ravel()
    assert abs(np.log(f).mean() - float(post["log_f"].mean())) < 3 * float(post["log_f"].std())
