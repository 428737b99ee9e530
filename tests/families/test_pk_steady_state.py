"""Steady-state doses (SS 1 and 2) and resets (EVID 3 and 4), read from an event table and
predicted by the PK family, against an exact solution of the compartment ODEs.

Reference: the linear ODE x' = A x + r(t) (depot, central, peripheral amounts) solved event by
event with the matrix exponential of the augmented system [[A, r], [0, 0]] (exact for piecewise
constant input, no step-size error). A steady-state dose is simulated as what it stands for: the
same dose given every II for long enough that the train's first dose has decayed to < 1e-13
(SS 1: the state is set to the train's at the dose's time; SS 2: the train is added to what is
there); a reset sets the state to zero and stops running infusions. The family's closed forms must
agree to 1e-6 relative.
"""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import expm

import bayestwin as bt
from bayestwin.data.nonmem import read_nonmem
from bayestwin.families import pk_analytic as pka

KEY = b"steady-state-key-0001"
P1 = {"cl": 2.5, "v": 30.0, "ka": 1.1}
P2 = {"cl": 2.5, "v1": 30.0, "q": 4.0, "v2": 60.0, "ka": 0.9}


def rate_matrix(theta):
    """A of x' = A x for (depot, central, peripheral) amounts."""
    cl, v1 = theta["cl"], theta.get("v", theta.get("v1"))
    q, v2 = theta.get("q", 0.0), theta.get("v2", 1.0)
    ka = theta.get("ka", 0.0)
    return np.array(
        [
            [-ka, 0.0, 0.0],
            [ka, -(cl + q) / v1, q / v2],
            [0.0, q / v1, -q / v2],
        ]
    )


def propagate(A, x, rate, h):
    """x after h of x' = A x + rate (exact: matrix exponential of the augmented system)."""
    if h <= 0:
        return x
    M = np.zeros((4, 4))
    M[:3, :3], M[:3, 3] = A, rate
    return (expm(M * h) @ np.r_[x, 1.0])[:3]


def simulate(theta, records, t_obs, tlag=0.0):
    """Central concentrations at ``t_obs`` from ``records``: (time, kind, amt, duration, ii) with kind
    'depot', 'central', 'infusion', 'ss1:<kind>', 'ss2:<kind>' or 'reset', in record order."""
    A = rate_matrix(theta)
    v1 = theta.get("v", theta.get("v1"))

    def train_state(kind, amt, duration, ii):
        """State at a steady-state dose's time just before it (its train's earlier doses)."""
        lam = np.min(np.abs(np.linalg.eigvals(A)[np.abs(np.linalg.eigvals(A)) > 0]))
        n = int(np.ceil(30.0 * np.log(10) / (lam * ii))) + 1
        recs = [(-(k * ii), kind, amt, duration, 0.0) for k in range(n, 0, -1)]
        return run(recs, [0.0], x0=None, final=True)

    def run(recs, times, x0=None, final=False):
        # expand to timed actions: (time, order, action, payload)
        actions = []
        for order, (t, kind, amt, duration, ii) in enumerate(recs):
            if kind == "reset":
                actions.append((t, order, "reset", None))
                continue
            if kind.startswith("ss"):
                mode, kind = kind.split(":")
                actions.append((t, order, "set" if mode == "ss1" else "add", train_state(kind, amt, duration, ii)))
            if kind == "depot":
                actions.append((t + tlag, order + 0.5, "bolus", np.array([amt, 0.0, 0.0])))
            elif kind == "central":
                actions.append((t, order + 0.5, "bolus", np.array([0.0, amt, 0.0])))
            else:
                r = np.array([0.0, amt / duration, 0.0])
                actions.append((t, order + 0.5, "on", (order, r)))
                actions.append((t + duration, order + 0.5, "off", (order, r)))
        actions.sort(key=lambda a: (a[0], a[1]))
        x = np.zeros(3) if x0 is None else x0
        now = min([a[0] for a in actions] + list(times))
        running = {}
        out = {}
        pending = sorted(times)
        for t_act, _, what, payload in [*actions, (np.inf, 0, "end", None)]:
            while pending and pending[0] < t_act:  # an observation sees what happened at its time
                tp = pending.pop(0)
                x = propagate(A, x, sum(running.values(), np.zeros(3)), tp - now)
                now = tp
                out[tp] = x.copy()
            if what == "end":
                break
            x = propagate(A, x, sum(running.values(), np.zeros(3)), t_act - now)
            now = t_act
            if what == "reset":
                x, running = np.zeros(3), {}
            elif what == "set":
                x = payload.copy()
            elif what == "add":
                x = x + payload
            elif what == "bolus":
                x = x + payload
            elif what == "on":
                running[payload[0]] = payload[1]
            elif what == "off":
                running.pop(payload[0], None)
        if final:
            return x
        return np.array([out[t][1] / v1 for t in times])

    return run(records, list(t_obs))


def table(records, t_obs):
    """The records as a NONMEM event table with levels (dummy DV) at ``t_obs``."""
    rows = []
    for t, kind, amt, duration, ii in records:
        ss = 0
        if kind.startswith("ss"):
            ss, kind = int(kind[2]), kind.split(":")[1]
        if kind == "reset":
            rows.append({"TIME": t, "AMT": 0.0, "EVID": 3, "CMT": 0, "RATE": 0.0, "II": 0.0, "SS": 0})
            continue
        rows.append(
            {
                "TIME": t,
                "AMT": amt,
                "EVID": 1,
                "CMT": 1 if kind == "depot" else 2,
                "RATE": amt / duration if kind == "infusion" else 0.0,
                "II": ii,
                "SS": ss,
            }
        )
    for t in t_obs:
        rows.append({"TIME": t, "AMT": 0.0, "EVID": 0, "CMT": 2, "RATE": 0.0, "II": 0.0, "SS": 0, "DV": 1.0})
    df = pd.DataFrame(rows).sort_values("TIME", kind="stable")
    df.insert(0, "ID", 1)
    return df.reset_index(drop=True)


def predicted(fam, df, theta):
    ev = read_nonmem(df, key=KEY)
    d = fam.design(ev.frame, ev.baseline, ev.schema).data
    th = {k: np.asarray(v) for k, v in theta.items()}
    per_dose = fam.concentration(
        np, th, d["time"][:, None], d["t_dose"], d["amt"], d["duration"], d["infusion"], ii=d["ss_ii"]
    )
    return np.where(d["episode"][:, None] == d["dose_episode"], per_dose, 0.0).sum(-1)


OBS = [24.5, 25.0, 26.5, 30.0, 35.9, 37.0, 41.0, 50.0, 61.0]
CASES = {
    # a regular dose at 0, then a steady-state dose at 24 every 12 (SS 1 wipes the dose at 0)
    "oral SS1": [(0.0, "depot", 80.0, 0, 0), (24.0, "ss1:depot", 100.0, 0, 12.0)],
    "oral SS2": [(0.0, "depot", 80.0, 0, 0), (24.0, "ss2:depot", 100.0, 0, 12.0)],
    "central bolus SS1": [(0.0, "depot", 80.0, 0, 0), (24.0, "ss1:central", 100.0, 0, 8.0)],
    "infusion SS2": [(0.0, "infusion", 80.0, 2.0, 0), (24.0, "ss2:infusion", 100.0, 1.5, 12.0)],
    "infusion SS1, then a dose": [(24.0, "ss1:infusion", 100.0, 3.0, 6.0), (36.0, "depot", 50.0, 0, 0)],
    "reset (EVID 3) then a dose": [(0.0, "depot", 80.0, 0, 0), (30.5, "reset", 0, 0, 0), (31.0, "depot", 100.0, 0, 0)],
    "SS1 after a long history": [(0.0, "depot", 300.0, 0, 0), (6.0, "infusion", 200.0, 10.0, 0)]
    + [(24.0, "ss1:depot", 100.0, 0, 24.0)],
}


@pytest.mark.parametrize("compartments", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_steady_state_and_resets_equal_the_ode(case, compartments):
    theta = dict(P1 if compartments == 1 else P2)
    records = CASES[case]
    want = simulate(theta, records, OBS)
    got = predicted(bt.Pk(compartments=compartments), table(records, OBS), theta)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12 * want.max())
    if case != "SS1 after a long history":
        assert want.min() > 1e-6  # every level sees a dose (a vacuous 0 = 0 would pass otherwise)


def test_steady_state_with_a_lag_time_equals_the_ode():
    theta = dict(P1) | {"tlag": 0.75}
    records = [(0.0, "depot", 80.0, 0, 0), (24.0, "ss1:depot", 100.0, 0, 12.0)]
    t_obs = [24.2, 24.7, 24.9, 26.0, 30.0, 36.5, 40.0]  # within the lag, the train's earlier doses act
    want = simulate(theta, records, t_obs, tlag=0.75)
    got = predicted(bt.Pk(lag=True), table(records, t_obs), theta)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_ss1_with_addl_gives_a_steady_state_then_ordinary_doses():
    """ADDL copies of an SS record are ordinary doses after the steady-state one (not trains)."""
    records = [(24.0, "ss1:depot", 100.0, 0, 12.0), (36.0, "depot", 100.0, 0, 0), (48.0, "depot", 100.0, 0, 0)]
    want = simulate(dict(P1), records, OBS)
    df = table(records[:1], OBS).assign(ADDL=0)
    df.loc[df["EVID"] == 1, "ADDL"] = 2
    got = predicted(bt.Pk(), df, dict(P1))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_steady_state_infusion_longer_than_its_interval_is_refused():
    df = table([(24.0, "ss1:infusion", 100.0, 14.0, 12.0)], OBS)
    ev = read_nonmem(df, key=KEY)
    with pytest.raises(bt.DataError) as err:
        bt.Pk().design(ev.frame, ev.baseline, ev.schema)
    assert str(err.value) == (
        "a steady-state infusion (SS > 0) that lasts longer than its interval II is not modelled "
        f"(its infusions would overlap) (patient {bt.pseudonymise(1, KEY)}, row 0, column 'RATE')"
    )


@pytest.mark.parametrize("case", ["infusion SS2", "reset (EVID 3) then a dose", "oral SS1"])
def test_the_model_graph_uses_steady_state_and_episodes(case):
    """The PyMC model's conc (what is fitted and forecast) equals the ODE solution."""
    import pymc as pm

    fam = bt.Pk(compartments=2, error="additive", correlated=False)
    records = CASES[case]
    ev = read_nonmem(table(records, OBS), key=KEY)
    model = fam.build_model(fam.design(ev.frame, ev.baseline, ev.schema), ev.schema)
    fixed = {f"log_{p}": np.log(P2[p]) for p in ("cl", "v1", "q", "v2", "ka")} | {"z": np.zeros((1, 5))}
    conc = pm.draw(pm.do(model, fixed)["conc"], random_seed=0)
    np.testing.assert_allclose(conc, simulate(dict(P2), records, OBS), rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    cl=st.floats(0.2, 20.0),
    v=st.floats(5.0, 200.0),
    ka=st.floats(0.05, 5.0),
    ii=st.floats(2.0, 48.0),
    frac=st.floats(0.0, 1.0),
    two=st.booleans(),
)
def test_a_steady_state_dose_is_a_long_train_of_doses(cl, v, ka, ii, frac, two):
    """Property: for any parameters, interval, infusion length and lag (both at most II), the
    closed-form train equals the sum of enough explicit doses (until the slowest rate decays)."""
    p = {"cl": cl, "v1": v, "q": 0.5 * cl, "v2": 2 * v} if two else {"cl": cl, "v": v}
    rates = pka.two_cmt_rates(np, cl, v, 0.5 * cl, 2 * v)[:2] if two else (cl / v,)
    slowest = min(min(rates), ka)
    n = int(np.ceil(40.0 / (slowest * ii))) + 2
    if n > 20_000:
        return  # a train longer than 20,000 doses: nothing to compare against in reasonable time
    t = np.linspace(0.0, 2 * ii, 9)
    past = -ii * np.arange(n)
    cases = [
        (pka.two_cmt_bolus if two else pka.one_cmt_bolus, {}),
        (pka.two_cmt_infusion if two else pka.one_cmt_infusion, {"duration": max(frac * ii, 1e-3)}),
        (pka.two_cmt_oral if two else pka.one_cmt_oral, {"ka": ka * (1.37 if two else 1.0), "tlag": frac * ii}),
    ]
    for fn, kw in cases:
        ss = fn(np, t, 0.0, 100.0, **p, **kw, ii=ii)
        train = fn(np, t[:, None], past[None, :], 100.0, **p, **kw).sum(1)
        np.testing.assert_allclose(ss, train, rtol=1e-8, atol=1e-12 * max(train.max(), 1e-300))
