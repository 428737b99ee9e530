"""The PK family's PyMC graph: doses, infusions, ADDL and BLQ rows wired as the closed forms say.

No sampling: the model's ``conc`` and pointwise log-likelihood at a point are checked against the
closed forms of :mod:`bayestwin.families.pk_analytic` and the M3 formula, for a two-compartment
IV model with a bolus, repeated infusions (RATE, II, ADDL) and a BLQ level.
"""

import numpy as np
import pandas as pd
import pymc as pm
from scipy.stats import norm

from bayestwin.data.nonmem import read_nonmem
from bayestwin.families import pk_analytic as pka
from bayestwin.families.pk import Pk

KEY = b"pk-model-test-key-012"


def events():
    rows = [
        # ID 1: a 500 mg bolus, then 3 infusions of 200 mg over 2 h every 12 h (RATE 100, ADDL 2)
        (1, 0.0, 500.0, np.nan, 1, 0.0, 0.0, 0, 0, np.nan),
        (1, 1.0, 0.0, 12.0, 0, 0.0, 0.0, 0, 0, np.nan),
        (1, 6.0, 200.0, np.nan, 1, 100.0, 12.0, 2, 0, np.nan),
        (1, 7.0, 0.0, 9.5, 0, 0.0, 0.0, 0, 0, np.nan),
        (1, 20.0, 0.0, 8.0, 0, 0.0, 0.0, 0, 0, np.nan),
        (1, 40.0, 0.0, np.nan, 0, 0.0, 0.0, 0, 1, 0.5),  # below the LLOQ: censored (M3)
        # ID 2: one bolus
        (2, 0.0, 300.0, np.nan, 1, 0.0, 0.0, 0, 0, np.nan),
        (2, 2.0, 0.0, 7.0, 0, 0.0, 0.0, 0, 0, np.nan),
    ]
    cols = ["ID", "TIME", "AMT", "DV", "EVID", "RATE", "II", "ADDL", "BLQ", "LLOQ"]
    return read_nonmem(pd.DataFrame(rows, columns=cols), key=KEY)


def test_two_compartment_infusions_and_blq_in_the_graph():
    ev = events()
    fam = Pk(compartments=2, route="iv", error="combined")
    model = fam.build_model(fam.design(ev.frame, ev.baseline, ev.schema), ev.schema)
    point = model.initial_point()
    point["z"] = np.array([[0.3, -0.2, 0.1, 0.4], [-0.5, 0.2, 0.0, -0.1]])
    names = ["conc", "patient_cl", "patient_v1", "patient_q", "patient_v2", "sigma_add", "sigma_prop"]
    outputs = model.replace_rvs_by_values([model[n] for n in names])
    values = pm.compile(model.value_vars, outputs, on_unused_input="ignore")(**point)
    conc, cl, v1, q, v2, s_add, s_prop = values
    want = []
    t1 = np.array([1.0, 7.0, 20.0, 40.0])
    i = 0
    c = pka.two_cmt_bolus(np, t1, 0.0, 500.0, cl[i], v1[i], q[i], v2[i])
    for t_inf in (6.0, 18.0, 30.0):
        c = c + pka.two_cmt_infusion(np, t1, t_inf, 200.0, 2.0, cl[i], v1[i], q[i], v2[i])
    want += list(c)
    want += list(pka.two_cmt_bolus(np, np.array([2.0]), 0.0, 300.0, cl[1], v1[1], q[1], v2[1]))
    np.testing.assert_allclose(conc, want, rtol=1e-10)
    loglik = pm.compile(model.value_vars, model.logp(vars=[model["y"]], sum=False)[0], on_unused_input="ignore")
    ll = loglik(**point)
    sd = np.sqrt(s_add**2 + (s_prop * conc) ** 2)
    y = np.array([12.0, 9.5, 8.0, 0.5, 7.0])
    expected = norm.logpdf(y, conc, sd)
    expected[3] = norm.logcdf(0.5, conc[3], sd[3])  # BLQ: P(y < LLOQ)
    np.testing.assert_allclose(ll, expected, rtol=1e-9)


def test_lag_time_delays_oral_absorption_in_the_graph():
    """``lag=True``: the graph's ``conc`` is the closed form with each subject's own lag time,
    zero before it, and repeated oral doses (ADDL) are each delayed by it."""
    rows = [
        (1, 0.0, 100.0, np.nan, 1, 12.0, 1),
        (1, 0.2, 0.0, 1.0, 0, 0.0, 0),  # before the lag: no drug yet
        (1, 2.0, 0.0, 3.0, 0, 0.0, 0),
        (1, 13.0, 0.0, 4.0, 0, 0.0, 0),  # after the second dose (ADDL) and its lag
        (2, 0.0, 50.0, np.nan, 1, 0.0, 0),
        (2, 1.5, 0.0, 2.0, 0, 0.0, 0),
    ]
    table = pd.DataFrame(rows, columns=["ID", "TIME", "AMT", "DV", "EVID", "II", "ADDL"])
    ev = read_nonmem(table, key=KEY)
    fam = Pk(error="additive", lag=True)
    model = fam.build_model(fam.design(ev.frame, ev.baseline, ev.schema), ev.schema)
    point = model.initial_point()
    point["log_tlag"] = np.log(0.5)
    point["z"] = np.array([[0.1, -0.2, 0.3, 0.2], [0.0, 0.1, -0.3, -0.4]])
    names = ["conc", "patient_cl", "patient_v", "patient_ka", "patient_tlag"]
    outputs = model.replace_rvs_by_values([model[n] for n in names])
    conc, cl, v, ka, tlag = pm.compile(model.value_vars, outputs, on_unused_input="ignore")(**point)
    assert 0.2 < tlag[0] < 1.0 and tlag[0] != tlag[1]  # each subject's own lag
    t1 = np.array([0.2, 2.0, 13.0])
    want = sum(pka.one_cmt_oral(np, t1, td, 100.0, cl[0], v[0], ka[0], tlag=tlag[0]) for td in (0.0, 12.0))
    want = [*want, *pka.one_cmt_oral(np, np.array([1.5]), 0.0, 50.0, cl[1], v[1], ka[1], tlag=tlag[1])]
    np.testing.assert_allclose(conc, want, rtol=1e-10)
    assert conc[0] == 0.0


def test_lag_needs_oral_route():
    import pytest

    with pytest.raises(ValueError, match="lag=True is an absorption lag time: it needs route='oral'"):
        Pk(route="iv", lag=True)
