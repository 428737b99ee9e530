"""ODE PK/PD models: the solver against closed forms and scipy, the family against the analytic
PK family, the built-in and a user-written model in the graph, and what the family refuses.

References: the closed forms of :mod:`pk_analytic` (exact) and scipy's LSODA at rtol 1e-11; the
family solves at rtol 1e-10 here, and must agree to 1e-6 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pymc as pm
import pytest
from scipy.integrate import solve_ivp

import bayestwin as bt
from bayestwin.data.nonmem import read_nonmem
from bayestwin.families import from_config, pk_ode
from bayestwin.families import pk_analytic as pka
from bayestwin.families.base import FamilyError

KEY = b"pk-ode-test-key-00001"
T_OBS = np.array([0.25, 1.0, 2.0, 6.0, 6.0, 7.5, 12.0, 13.0, 20.0, 30.0])


def test_the_solver_equals_the_closed_forms():
    """Oral doses into the depot, an IV bolus and an infusion into the central state."""
    model = pk_ode.one_compartment()
    p = {"cl": 2.5, "v": 30.0, "ka": 1.2}
    t_dose, amt = jnp.array([0.0, 6.0, 12.0, 0.0]), jnp.array([100.0, 80.0, 50.0, 0.0])
    state, duration = jnp.array([0, 1, 1, 0]), jnp.array([0.0, 0.0, 2.0, 0.0])
    y = pk_ode.solve_doses(model.rhs, jnp.zeros(2), p, t_dose, amt, state, duration, jnp.asarray(T_OBS), rtol=1e-10)
    exact = (
        pka.one_cmt_oral(np, T_OBS, 0.0, 100.0, 2.5, 30.0, 1.2)
        + pka.one_cmt_bolus(np, T_OBS, 6.0, 80.0, 2.5, 30.0)
        + pka.one_cmt_infusion(np, T_OBS, 12.0, 50.0, 2.0, 2.5, 30.0)
    )
    np.testing.assert_allclose(np.asarray(y[:, 1]) / 30.0, exact, rtol=1e-6)
    # the level at the bolus's own time (6.0, twice) sees the bolus, as in NONMEM
    assert y[3, 1] == y[4, 1] and y[3, 1] / 30.0 > exact[2]


def test_the_solver_is_differentiable_and_vmaps():
    model = pk_ode.one_compartment()

    def level(theta):
        p = dict(zip(("cl", "v", "ka"), theta, strict=True))
        y = pk_ode.solve_doses(
            model.rhs,
            jnp.zeros(2),
            p,
            jnp.array([0.0]),
            jnp.array([100.0]),
            jnp.array([0]),
            jnp.array([0.0]),
            jnp.array([3.0]),
            rtol=1e-10,
        )
        return y[0, 1] / p["v"]

    theta = jnp.array([2.5, 30.0, 1.2])
    exact = jax.grad(lambda th: pka.one_cmt_oral(jnp, 3.0, 0.0, 100.0, th[0], th[1], th[2]))(theta)
    np.testing.assert_allclose(jax.grad(level)(theta), exact, rtol=1e-5)
    batch = jax.vmap(level)(jnp.stack([theta, theta * 1.1]))
    assert batch.shape == (2,) and batch[0] != batch[1]


def events(doses, times, cmt_obs=0, covariates=None):
    """One subject's event table: ``doses`` (time, amt, cmt, rate), levels (dummy DV) at ``times``."""
    rows = [{"TIME": t, "AMT": a, "EVID": 1, "CMT": c, "RATE": r, "DV": np.nan} for t, a, c, r in doses]
    obs_cmt = cmt_obs if isinstance(cmt_obs, (list, tuple)) else [cmt_obs] * len(times)
    rows += [
        {"TIME": t, "AMT": 0.0, "EVID": 0, "CMT": c, "RATE": 0.0, "DV": 1.0}
        for t, c in zip(times, obs_cmt, strict=True)
    ]
    df = pd.DataFrame(rows).sort_values("TIME", kind="stable").reset_index(drop=True)
    df.insert(0, "ID", 1)
    return read_nonmem(df, key=KEY)


def graph_levels(fam, ev, values):
    model = fam.build_model(fam.design(ev.frame, ev.baseline, ev.schema), ev.schema)
    n = len(fam.bsv_parameters)
    fixed = {f"log_{p}": np.log(v) for p, v in values.items()} | {"z": np.zeros((1, n))}
    return model, pm.draw(pm.do(model, fixed)["conc"], random_seed=0)


def test_a_linear_model_as_an_ode_equals_the_analytic_family():
    """Predictions and the likelihood of the same data, to 1e-6 relative."""
    ev = events(
        [(0.0, 100.0, 0, 0.0), (12.0, 100.0, 0, 0.0), (24.0, 60.0, 2, 30.0)], [1.0, 4.0, 12.0, 13.0, 25.0, 36.0]
    )
    cl, v, ka = 2.0, 30.0, 1.2
    analytic = bt.Pk(correlated=False)
    ode = bt.Ode("one_compartment", correlated=False, rtol=1e-10)
    m_a, c_a = graph_levels(analytic, ev, {"cl": cl, "v": v, "ka": ka - cl / v})  # its log_ka: the excess over k
    m_o, c_o = graph_levels(ode, ev, {"cl": cl, "v": v, "ka": ka})
    np.testing.assert_allclose(c_o, c_a, rtol=1e-6)

    def loglik(model, values):
        point = model.initial_point()
        for name in point:
            base = name.removesuffix("_log__").removesuffix("_interval__")
            if base in values:
                point[name] = np.log(values[base]) if name.endswith("_log__") else values[base]
        return model.compile_logp(vars=model.observed_RVs)(point)

    noise = {"sigma_add": 0.05, "sigma_prop": 0.1, "z": np.zeros((1, 3))}
    la = loglik(m_a, noise | {"log_cl": np.log(cl), "log_v": np.log(v), "log_ka": np.log(ka - cl / v)})
    lo = loglik(m_o, noise | {"log_cl": np.log(cl), "log_v": np.log(v), "log_ka": np.log(ka)})
    assert lo == pytest.approx(la, rel=1e-6)


def scipy_levels(model, p, doses, times, output):
    """Reference: LSODA at rtol 1e-11, bolus jumps and infusion inputs, dose by dose."""
    y = np.array(model.initial({k: jnp.asarray(v) for k, v in p.items()}), float)
    cuts = sorted({0.0, *[d[0] for d in doses], *[d[0] + d[1] / d[3] for d in doses if d[3] > 0], max(times)})
    out = {}

    def rhs(t, y, rate):
        return np.asarray(model.rhs(t, jnp.asarray(y), p)) + rate

    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        rate = np.zeros_like(y)
        for t0, a, c, r in doses:
            s = (c - 1) if c > 0 else model.default_state
            if t0 == lo and r == 0:
                y[s] += a
            if r > 0 and t0 <= lo < t0 + a / r:
                rate[s] += r
        sol = solve_ivp(rhs, (lo, hi), y, args=(rate,), method="LSODA", rtol=1e-11, atol=1e-13, dense_output=True)
        for t in times:
            if lo <= t < hi or (t == hi == cuts[-1]):
                out[t] = sol.sol(t)
        y = sol.y[:, -1]
    f = model.outputs[output]
    return np.array([float(f(jnp.asarray(out[t]), {k: jnp.asarray(v) for k, v in p.items()})) for t in times])


BUILT_IN = {
    "michaelis_menten": ({"vmax": 40.0, "km": 3.0, "v": 25.0}, [(0.0, 300.0, 0, 0.0), (8.0, 100.0, 0, 50.0)], "conc"),
    "effect_emax": (
        {"cl": 2.0, "v": 30.0, "ke0": 0.4, "e0": 10.0, "emax": 50.0, "ec50": 2.0, "hill": 1.5},
        [(0.0, 200.0, 0, 0.0)],
        "effect",
    ),
    "indirect_response": (
        {"cl": 2.0, "v": 30.0, "kin": 10.0, "kout": 0.1, "imax": 0.8, "ic50": 2.0},
        [(0.0, 200.0, 0, 100.0)],
        "response",
    ),
    "friberg": (
        {"cl": 1.5, "v": 10.0, "mtt": 84.0, "gamma": 0.16, "circ0": 5.0, "slope": 0.5},
        [(0.0, 100.0, 0, 100.0), (504.0, 100.0, 0, 100.0)],
        "anc",
    ),
}


@pytest.mark.parametrize("name", list(BUILT_IN))
def test_each_built_in_model_equals_scipy(name):
    p, doses, output = BUILT_IN[name]
    model = pk_ode.ODE_MODELS[name]()
    times = [0.5, 2.0, 8.5, 24.0, 100.0, 200.0, 400.0, 600.0] if name == "friberg" else [0.5, 2.0, 8.5, 12.0, 24.0]
    cmt = model.states.index(model.dose_state or model.states[0]) + 1
    obs_cmt = 9  # observed output chosen through observations=
    fam = bt.Ode(name, observations={obs_cmt: output}, error="additive", correlated=False, rtol=1e-10)
    ev = events([(t, a, cmt, r) for t, a, _, r in doses], times, cmt_obs=obs_cmt)
    _, got = graph_levels(fam, ev, p)
    want = scipy_levels(model, p, doses, times, output)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if name == "friberg":
        nadir = got.min()
        assert nadir < 0.6 * p["circ0"] and got[-1] > nadir  # myelosuppression, then recovery


def test_friberg_without_drug_stays_at_baseline():
    model = pk_ode.friberg()
    p = {"cl": 30.0, "v": 10.0, "mtt": 84.0, "gamma": 0.16, "circ0": 5.0, "slope": 0.3}
    y = pk_ode.solve_doses(
        model.rhs,
        model.initial(p),
        p,
        jnp.array([0.0]),
        jnp.array([0.0]),
        jnp.array([0]),
        jnp.array([0.0]),
        jnp.array([1.0, 100.0, 500.0]),
    )
    np.testing.assert_allclose(np.asarray(y[:, 1:]), 5.0, rtol=1e-12)


def test_several_outputs_each_with_its_own_residual_error():
    """Friberg: levels (CMT 1, proportional error) and neutrophil counts (CMT 6, log-normal)."""
    fam = bt.Ode("friberg", observations={1: "conc", 6: "anc"}, error={"conc": "proportional", "anc": "exponential"})
    assert fam.residual_params == ("sigma_prop", "sigma_add_anc")
    ev = events([(0.0, 100.0, 1, 100.0)], [0.5, 2.0, 200.0, 300.0], cmt_obs=[1, 1, 6, 6])
    d = fam.design(ev.frame, ev.baseline, ev.schema)
    np.testing.assert_array_equal(d.data["output"], [0, 0, 1, 1])
    model = fam.build_model(d, ev.schema)
    point = model.initial_point()
    point["sigma_prop_log__"], point["sigma_add_anc_log__"] = np.log(0.2), np.log(0.3)
    fixed = {k: v for k, v in point.items() if k.startswith("log_") or k == "z"}
    conc = pm.draw(pm.do(model, fixed)["conc"], random_seed=0)
    y = d.data["y_obs"]
    want = -0.5 * ((y[:2] - conc[:2]) / (0.2 * conc[:2] + 1e-9)) ** 2 - np.log(0.2 * conc[:2] + 1e-9)
    want = want.sum() + (-0.5 * ((np.log(y[2:]) - np.log(conc[2:])) / 0.3) ** 2 - np.log(0.3)).sum()
    want -= 4 * 0.5 * np.log(2 * np.pi)
    got = model.compile_logp(vars=model.observed_RVs)(point)
    assert got == pytest.approx(want, rel=1e-6)
    # the gradient the sampler uses (the JAX program) is finite: a zero residual SD in the branch
    # a row does not take once made it NaN for every parameter that moves the levels
    from pymc.sampling.jax import get_jaxified_graph

    values = list(model.value_vars)
    logp = get_jaxified_graph(inputs=values, outputs=[model.logp()])
    x = [jnp.asarray(point[v.name]) for v in values]
    grads = jax.grad(lambda *a: logp(*a)[0], argnums=tuple(range(len(x))))(*x)
    assert {v.name for v, g in zip(values, grads, strict=True) if not np.isfinite(np.asarray(g)).all()} == set()


def test_a_user_written_model_by_object_and_by_import_path():
    from tests.families.ode_user_model import two_cmt_mm

    ev = events([(0.0, 200.0, 0, 0.0)], [0.5, 2.0, 6.0, 12.0])
    p = {"vmax": 40.0, "km": 4.0, "v1": 20.0, "q": 5.0, "v2": 40.0}
    by_object = bt.Ode(two_cmt_mm(), error="additive", correlated=False, rtol=1e-10)
    by_path = bt.Ode("tests.families.ode_user_model:two_cmt_mm", error="additive", correlated=False, rtol=1e-10)
    _, a = graph_levels(by_object, ev, p)
    _, b = graph_levels(by_path, ev, p)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(
        a, scipy_levels(two_cmt_mm(), p, [(0.0, 200.0, 0, 0.0)], [0.5, 2.0, 6.0, 12.0], "conc"), rtol=1e-6
    )
    assert from_config(by_path.config()).config() == by_path.config()
    with pytest.raises(FamilyError, match="two_cmt_mm"):
        from_config(by_object.config())  # an object has no import path: save refuses it before writing


def test_an_ode_model_is_checked_when_it_is_made():
    with pytest.raises(FamilyError, match=r"no typical value \(centres\) for \['b'\]"):
        bt.OdeModel("m", ("x",), ("a", "b"), lambda t, y, p: -p["a"] * y, {"x": lambda y, p: y[0]}, {"a": 1.0})
    with pytest.raises(ValueError, match="unknown ODE model 'fribreg'"):
        bt.Ode("fribreg")
    with pytest.raises(
        ValueError, match=r"observations: CMT 6 -> 'neutrophils' is not an output of friberg \(\['conc', 'anc'\]\)"
    ):
        bt.Ode("friberg", observations={6: "neutrophils"})
    with pytest.raises(ValueError, match="error must be one of"):
        bt.Ode("friberg", error={"anc": "lognormal"})


P = bt.pseudonymise(1, KEY)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(SS=1, II=12.0),
            "a steady-state dose (SS=1) needs Ode(..., steady_state=True), which solves each dose's steady "
            f"state in the program (patient {P}, row 0, column 'SS')",
        ),
        (
            dict(SS=2, II=12.0),
            "SS=2 (a steady state added to what is there) assumes superposition, which holds for linear models "
            "only: the ODE family models SS=1 (give the earlier doses, or use the closed-form PK family) "
            f"(patient {P}, row 0, column 'SS')",
        ),
        (
            dict(CMT=9),
            "a dose goes into CMT 1..2 (the states ['depot', 'central']) or 0 (the default) "
            f"(patient {P}, row 0, column 'CMT')",
        ),
    ],
)
def test_what_the_ode_family_does_not_model_is_refused(change, message):
    df = events([(0.0, 100.0, 0, 0.0)], [1.0, 2.0]).frame[["ID", "TIME", "AMT", "DV", "EVID", "CMT"]].copy()
    df["ID"] = 1
    for k, v in change.items():
        df[k] = df.get(k, 0)
        df.loc[0, k] = v
    ev = read_nonmem(df, key=KEY)
    with pytest.raises(bt.DataError) as err:
        bt.Ode("one_compartment").design(ev.frame, ev.baseline, ev.schema)
    assert str(err.value) == message


def test_a_level_of_an_unobserved_cmt_is_refused():
    ev = events([(0.0, 100.0, 1, 100.0)], [1.0, 300.0], cmt_obs=[1, 5])
    with pytest.raises(bt.DataError) as err:
        bt.Ode("friberg", observations={1: "conc", 6: "anc"}).design(ev.frame, ev.baseline, ev.schema)
    assert str(err.value).startswith("an observation's CMT must be one of [1, 6] (observations= maps CMT to output)")


def test_forecasts_of_a_chosen_output_use_its_own_residual_error():
    fam = bt.Ode("friberg", observations={1: "conc", 6: "anc"}, error={"conc": "proportional", "anc": "exponential"})
    ev = events([(0.0, 100.0, 1, 100.0)], [0.5, 2.0, 200.0, 300.0], cmt_obs=[1, 1, 6, 6])
    regimens = [bt.Regimen(100.0, 504.0, doses=2, duration=1.0)]
    _, times, data = fam.forecast_inputs(ev, ev.schema, regimens, [400.0, 600.0], 300.0, output="anc")
    assert (data["output"] == 1).all() and data["row_time"].shape == (1, 1, 1, 2)
    _, _, conc = fam.forecast_inputs(ev, ev.schema, regimens, [400.0, 600.0], 300.0)
    assert (conc["output"] == 0).all()
    mu = jnp.full((1000,), 4.0)
    params = {"sigma_prop": 0.2, "sigma_add_anc": 0.3}
    draws = np.asarray(fam.observe(jax.random.key(0), mu, params, output="anc"))
    assert (draws > 0).all() and np.log(draws).std() == pytest.approx(0.3, rel=0.1)  # log-normal, SD 0.3
    with pytest.raises(
        ValueError, match=r"output 'effect' is not observed by this population \(observed: \['anc', 'conc'\]\)"
    ):
        fam.forecast_inputs(ev, ev.schema, regimens, [400.0], 300.0, output="effect")


def test_a_segment_over_max_steps_is_nan_not_a_wrong_number():
    """Friberg with docetaxel-like PK is stiff: a 3-week segment needs ~560 explicit steps."""
    model = pk_ode.friberg()
    p = dict(model.centres)
    args = (jnp.array([0.0]), jnp.array([135.0]), jnp.array([0]), jnp.array([1.0]), jnp.array([168.0, 504.0]))
    short = pk_ode.solve_doses(model.rhs, model.initial(p), p, *args, max_steps=512)
    assert np.isnan(np.asarray(short)).all()
    full = pk_ode.solve_doses(model.rhs, model.initial(p), p, *args, max_steps=4096)
    assert np.isfinite(np.asarray(full)).all() and float(full[0, 5]) < 2.5  # ANC at day 7 well below 5
    assert bt.Ode("friberg", max_steps=4096).config()["max_steps"] == 4096
    with pytest.raises(ValueError, match="max_steps must be a whole number in"):
        bt.Ode("friberg", max_steps=8)


def test_a_sequential_pkpd_model_equals_its_full_ode():
    """Friberg with its PK in closed form (pk="iv1") equals the full six-state ODE (levels and
    neutrophil counts, two cycles), and is not stiff."""
    full, seq = pk_ode.friberg(), pk_ode.friberg_sequential()
    p = dict(full.centres)
    theta = jnp.array([[p[k] for k in full.parameters]])
    doses = (jnp.array([[0.0, 504.0]]), jnp.array([[135.0, 135.0]]), jnp.zeros((1, 2), int), jnp.ones((1, 2)))
    times = jnp.array([[0.5, 1.0, 2.0, 6.0, 168.0, 240.0, 336.0, 504.5, 672.0, 840.0]])
    idx, row = jnp.zeros(10, int), jnp.arange(10)
    for out in (0, 1):
        which = jnp.full(10, out)
        a = pk_ode.predict_outputs(full, theta, *doses, times, idx, row, which, rtol=1e-10, atol=1e-13, max_steps=20000)
        b = pk_ode.predict_outputs(seq, theta, *doses, times, idx, row, which, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9 * float(jnp.max(jnp.abs(a))))
    fam = bt.Ode("friberg_sequential", observations={1: "conc", 6: "anc"})
    assert fam.parameters == bt.Ode("friberg").parameters
    with pytest.raises(FamilyError, match=r"pk='iv1' needs the parameters \['v'\]"):
        bt.OdeModel("m", ("x",), ("cl",), lambda t, y, p: -y, {"x": lambda y, p: y[0]}, {"cl": 1.0}, pk="iv1")


def test_a_sequential_model_with_padded_slots_and_a_later_dose_equals_its_full_ode():
    """The sequential model (PK in closed form, doses entering no state) with what a batch pads
    in: empty dose slots (time 0, amount 0), a dose after the last observation, and a subject
    observed only at the start (a span of zero length), equals the full six-state ODE."""
    full, seq = pk_ode.friberg(), pk_ode.friberg_sequential()
    p = dict(full.centres)
    theta = jnp.array([[p[k] for k in full.parameters]] * 2)
    t_dose = jnp.array([[0.0, 504.0, 900.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    amt = jnp.array([[135.0, 100.0, 80.0, 0.0, 0.0], [135.0, 0.0, 0.0, 0.0, 0.0]])
    duration = jnp.where(amt > 0, 1.0, 0.0)
    doses = (t_dose, amt, jnp.zeros((2, 5), int), duration)
    times = jnp.array([[0.5, 2.0, 168.0, 336.0, 504.5, 600.0, 840.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    idx, row = jnp.repeat(jnp.arange(2), 7), jnp.tile(jnp.arange(7), 2)
    for out in (0, 1):
        which = jnp.full(14, out)
        a = pk_ode.predict_outputs(full, theta, *doses, times, idx, row, which, rtol=1e-10, atol=1e-13, max_steps=20000)
        b = pk_ode.predict_outputs(seq, theta, *doses, times, idx, row, which, rtol=1e-10, atol=1e-13)
        assert np.isfinite(np.asarray(b)).all()
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9 * float(jnp.max(jnp.abs(a))))
