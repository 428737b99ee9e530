"""NONMEM dosing semantics the PK family models (CMT routing, MDV exclusion), against closed forms
and an ODE solution; and what it refuses (tested with the bad-input catalogue)."""

import numpy as np
import pandas as pd
import pytest
from scipy.integrate import solve_ivp

import bayestwin as bt
from bayestwin.data.nonmem import read_nonmem
from bayestwin.families import pk_analytic as pka

KEY = b"dosing-semantics-key-01"
CL, V, KA = 2.0, 30.0, 1.2
K = CL / V


def events(cmt, rate=(0.0, 0.0), mdv=None):
    """One subject: an oral-route model's dose at 0 and a second dose at 6, levels in between."""
    df = pd.DataFrame(
        {
            "ID": [1] * 6,
            "TIME": [0.0, 1.0, 3.0, 6.0, 7.0, 12.0],
            "AMT": [100.0, 0, 0, 80.0, 0, 0],
            "DV": [np.nan, 2.0, 1.5, np.nan, 2.5, 1.0],
            "EVID": [1, 0, 0, 1, 0, 0],
            "CMT": [cmt[0], 2, 2, cmt[1], 2, 2],
            "RATE": [rate[0], 0, 0, rate[1], 0, 0],
        }
    )
    if mdv is not None:
        df["MDV"] = mdv
    return read_nonmem(df, key=KEY)


def predicted(fam, ev, t):
    d = fam.design(ev.frame, ev.baseline, ev.schema).data
    theta = {"cl": CL, "v": V, "ka": KA}
    return fam.concentration(np, theta, t[:, None], d["t_dose"], d["amt"], d["duration"], d["infusion"]).sum(-1)


def ode(t_end, doses):
    """Depot + central one-compartment model by numerical integration; doses: (time, amt, cmt, rate)."""
    times = sorted({0.0, *[d[0] for d in doses], *[d[0] + d[1] / d[3] for d in doses if d[3] > 0]})

    def rhs(t, a):
        infusion = sum(r for (t0, amt, c, r) in doses if r > 0 and t0 <= t < t0 + amt / r)
        return [-KA * a[0], KA * a[0] - K * a[1] + infusion]

    def solve(t_obs):
        a = np.zeros(2)
        t_prev = 0.0
        for seg_end in [*times[1:], np.inf]:
            for t0, amt, c, r in doses:
                if t0 == t_prev and r == 0:
                    a[0 if c == 1 else 1] += amt
            upto = min(seg_end, t_obs)
            if upto > t_prev:
                a = solve_ivp(rhs, (t_prev, upto), a, rtol=1e-11, atol=1e-13, method="LSODA").y[:, -1]
            if upto == t_obs:
                return a[1] / V
            t_prev = seg_end
        return a[1] / V

    return np.array([solve(t) for t in t_end])


T = np.array([0.5, 1.0, 3.0, 6.5, 7.0, 12.0, 20.0])


def test_a_central_dose_of_an_oral_model_is_an_iv_bolus():
    fam = bt.Pk()
    ev = events(cmt=(2, 2))  # both doses into the central compartment (CMT 2)
    d = fam.design(ev.frame, ev.baseline, ev.schema).data
    assert d["infusion"][0].tolist() == [2.0, 2.0]
    exact = pka.one_cmt_bolus(np, T[:, None], np.array([0.0, 6.0]), np.array([100.0, 80.0]), cl=CL, v=V).sum(-1)
    np.testing.assert_allclose(predicted(fam, ev, T), exact, rtol=1e-12)
    np.testing.assert_allclose(predicted(fam, ev, T), ode(T, [(0.0, 100.0, 2, 0.0), (6.0, 80.0, 2, 0.0)]), rtol=1e-6)


def test_depot_central_and_infusion_doses_mix_by_superposition():
    fam = bt.Pk()
    ev = events(cmt=(1, 2), rate=(0.0, 40.0))  # oral dose at 0, a 2-hour infusion into central at 6
    d = fam.design(ev.frame, ev.baseline, ev.schema).data
    assert d["infusion"][0].tolist() == [0.0, 1.0]
    np.testing.assert_allclose(
        predicted(fam, ev, T), ode(T, [(0.0, 100.0, 1, 0.0), (6.0, 80.0, 2, 40.0)]), rtol=1e-6, atol=1e-12
    )
    # without a CMT column the same doses go to the route's defaults: oral, and infusion into central
    plain = read_nonmem(ev.frame.drop(columns=["CMT"])[["ID", "TIME", "AMT", "DV", "EVID", "RATE"]], key=KEY)
    np.testing.assert_allclose(predicted(fam, plain, T), predicted(fam, ev, T), rtol=1e-12)


def test_the_model_graph_uses_the_routing():
    """The PyMC model's conc (what is fitted) equals the closed form for a central bolus."""
    fam = bt.Pk(error="additive", correlated=False)
    ev = events(cmt=(2, 1))
    design = fam.design(ev.frame, ev.baseline, ev.schema)
    model = fam.build_model(design, ev.schema)
    import pymc as pm

    fixed = {"log_cl": np.log(CL), "log_v": np.log(V), "log_ka": np.log(KA - K), "z": np.zeros((1, 3))}
    conc = pm.draw(pm.do(model, fixed)["conc"], random_seed=0)
    t = design.data["time"]
    exact = pka.one_cmt_bolus(np, t, 0.0, 100.0, cl=CL, v=V) + pka.one_cmt_oral(np, t, 6.0, 80.0, cl=CL, v=V, ka=KA)
    np.testing.assert_allclose(conc, exact, rtol=1e-9)


def test_mdv_1_excludes_a_level_from_the_data():
    ev = events(cmt=(1, 1), mdv=[1, 0, 1, 1, 0, 0])  # the level at t = 3 excluded by the analyst
    assert ev.frame["EVID"].tolist() == [1, 0, 2, 1, 0, 0]
    assert ev.observations()["TIME"].tolist() == [1.0, 7.0, 12.0]
    d = bt.Pk().design(ev.frame, ev.baseline, ev.schema).data
    assert d["time"].tolist() == [1.0, 7.0, 12.0] and d["y_obs"].tolist() == [2.0, 2.5, 1.0]
    # an excluded level may have no DV at all
    df = ev.frame[["ID", "TIME", "AMT", "DV", "EVID", "MDV"]].copy()
    df.loc[df.index[2], ["DV", "EVID", "MDV"]] = [np.nan, 0, 1]
    assert len(read_nonmem(df.assign(ID=1), key=KEY).observations()) == 3


def test_dose_search_continues_the_routed_history():
    """The doses already given keep their route in a forecast: a central bolus stays a bolus."""
    from bayestwin.dosing import Regimen, evaluate_regimens

    fam = bt.Pk()
    ev = events(cmt=(2, 2))
    history = fam.routed_doses(ev.frame)
    theta = {"cl": np.full(3, CL), "v": np.full(3, V), "ka": np.full(3, KA)}
    out = evaluate_regimens(fam, theta, [Regimen(50.0, 12.0, doses=1)], start=12.0, history=history, grid=5)
    t_end = np.array([24.0])  # trough of the one new dose: old boluses + the new oral dose
    exact = (
        pka.one_cmt_bolus(np, t_end, np.array([0.0, 6.0]), np.array([100.0, 80.0]), cl=CL, v=V).sum()
        + pka.one_cmt_oral(np, t_end, 12.0, 50.0, cl=CL, v=V, ka=KA)[0]
    )
    np.testing.assert_allclose(out["trough"][0], exact, rtol=1e-9)


@pytest.mark.parametrize("weight", ["wt", "WT"])
def test_weight_name_is_matched_to_nonmem_upper_case(weight):
    df = pd.DataFrame(
        {"ID": [1, 1], "TIME": [0.0, 1.0], "AMT": [100.0, 0.0], "DV": [np.nan, 3.0], "EVID": [1, 0], "wt": [80.0] * 2}
    )
    ev = read_nonmem(df, key=KEY, covariates=["wt"])
    d = bt.Pk(weight=weight).design(ev.frame, ev.baseline, ev.schema).data
    np.testing.assert_allclose(d["log_wt"], np.log(80.0 / 70.0))
