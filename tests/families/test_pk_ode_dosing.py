"""Steady-state doses (SS=1) and resets (EVID 3 and 4) in the ODE family.

References: the exact solution of the linear compartment ODEs event by event, with a steady state
simulated as the long train of doses it stands for (``simulate`` of ``test_pk_steady_state``); the
closed-form PK family on the same table; and, for a nonlinear (Michaelis-Menten) model, the
explicit train of doses solved dose by dose. The family solves at rtol 1e-10 here and must agree
to 1e-6 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.data.nonmem import read_nonmem
from bayestwin.families import pk_ode
from tests.families.test_pk_ode import graph_levels
from tests.families.test_pk_steady_state import CASES, KEY, OBS, P1, simulate, table

TOL = {"rtol": 1e-10, "atol": 1e-13, "max_steps": 4096}


def ode_levels(df, theta=P1, **options):
    """The ODE family's ``conc`` (what is fitted and forecast) for the one subject of ``df``."""
    fam = bt.Ode("one_compartment", observations={2: "conc"}, correlated=False, rtol=1e-10, **options)
    return graph_levels(fam, read_nonmem(df, key=KEY), theta)[1]


def one_id(*records):
    """One subject's event table from (TIME, AMT, EVID, CMT) records, in this order (levels: DV 1)."""
    df = pd.DataFrame(
        [{"TIME": t, "AMT": a, "EVID": e, "CMT": c, "DV": 1.0 if e == 0 else np.nan} for t, a, e, c in records]
    )
    df.insert(0, "ID", 1)
    return df


ODE_CASES = [c for c in CASES if "SS2" not in c]


@pytest.mark.parametrize("case", ODE_CASES)
def test_steady_state_and_resets_equal_the_exact_solution(case):
    records = CASES[case]
    want = simulate(dict(P1), records, OBS)
    got = ode_levels(table(records, OBS), steady_state=True)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12 * want.max())


def test_evid_4_resets_then_doses():
    """EVID 4 (one record) equals a reset and a dose at its time; the earlier dose is gone."""
    records = [(0.0, "depot", 80.0, 0, 0), (30.5, "reset", 0, 0, 0), (30.5, "depot", 100.0, 0, 0)]
    df = table([records[0], records[2]], OBS)
    df.loc[df["TIME"] == 30.5, "EVID"] = 4
    want = simulate(dict(P1), records, OBS)
    np.testing.assert_allclose(ode_levels(df), want, rtol=1e-6)
    plain = simulate(dict(P1), [records[0], records[2]], OBS)
    assert np.abs(want / plain - 1).max() > 1e-3  # the reset matters for these levels


def test_a_level_recorded_at_a_reset_but_before_it_sees_the_state_before_it():
    """Record order decides the episode (as in the closed-form family): a level at 30.5 listed
    before the EVID 3 record at 30.5 reads the state before the reset, one listed after reads 0."""
    df = one_id((0.0, 80.0, 1, 1), (30.5, 0.0, 0, 2), (30.5, 0.0, 3, 0), (30.5, 0.0, 0, 2))
    got = ode_levels(pd.concat([df, one_id((31.0, 100.0, 1, 1), (33.0, 0.0, 0, 2))], ignore_index=True))
    before = simulate(dict(P1), [(0.0, "depot", 80.0, 0, 0)], [30.5])[0]
    after = simulate(dict(P1), [(0.0, "depot", 80.0, 0, 0), (30.5, "reset", 0, 0, 0)], [33.0])[0]
    last = simulate(dict(P1), [(31.0, "depot", 100.0, 0, 0)], [33.0])[0]
    assert after == 0.0
    np.testing.assert_allclose(got, [before, 0.0, last], rtol=1e-6, atol=1e-12)


def test_a_michaelis_menten_steady_state_is_the_long_train_of_doses():
    """A nonlinear model's steady state (Newton on the dose-to-dose map) equals the state after
    enough explicit doses (the train is run until doubling it changes nothing)."""
    model = pk_ode.michaelis_menten(oral=True)
    p = {"vmax": 40.0, "km": 4.0, "v": 30.0, "ka": 1.3}
    ii, amt = 12.0, 300.0  # peaks near 3 Km: elimination well into saturation
    got = pk_ode.steady_state(model, p, amt, 0, 0.0, ii, **TOL)

    def train(n):
        t = jnp.arange(n) * ii
        y = pk_ode.solve_doses(
            model.rhs, jnp.zeros(2), p, t, jnp.full(n, amt), jnp.zeros(n, int), jnp.zeros(n), t[-1:] + ii, **TOL
        )
        return np.asarray(y[0])

    long, longer = train(80), train(160)
    np.testing.assert_allclose(long, longer, rtol=1e-9)  # the train has settled
    np.testing.assert_allclose(got, longer, rtol=1e-6)
    c_ss = got[1] / p["v"]
    assert c_ss > p["km"] / 4  # saturation matters here: a linear model would not do


def test_the_steady_state_is_differentiable_by_the_implicit_function_theorem():
    """Its gradient (implicit differentiation, no train solved) equals central differences."""
    model = pk_ode.michaelis_menten(oral=True)

    def level(log_theta):
        p = dict(zip(model.parameters, jnp.exp(log_theta), strict=True))
        return pk_ode.steady_state(model, p, 300.0, 0, 0.0, 12.0, **TOL)[1] / p["v"]

    x = jnp.log(jnp.array([40.0, 4.0, 30.0, 1.3]))
    grad = np.asarray(jax.jit(jax.grad(level))(x))
    h, steps = 1e-5, jnp.concatenate([jnp.eye(4), -jnp.eye(4)]) * 1e-5
    moved = np.asarray(jax.jit(jax.vmap(level))(x + steps))
    fd = (moved[:4] - moved[4:]) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8 * np.abs(fd).max())
    assert np.all(np.abs(grad) > 1e-3)  # each parameter moves the steady state


def test_the_model_log_density_has_a_finite_gradient_with_steady_state_and_resets():
    """What NUTS needs: the model's log density compiled to JAX as the engine does, and its
    gradient through the steady-state solve (implicit) and a reset, equal to central differences."""
    from pymc.sampling.jax import get_jaxified_graph

    records = [(0.0, "depot", 80.0, 0, 0), (24.0, "ss1:depot", 100.0, 0, 12.0), (40.0, "reset", 0, 0, 0)]
    records += [(41.0, "infusion", 50.0, 2.0, 0)]
    df = table(records, [24.5, 30.0, 35.0, 41.5, 44.0])
    df.loc[df["EVID"] == 0, "DV"] = [3.0, 3.5, 2.5, 0.6, 1.2]
    # solved tightly, so that central differences of the log density are exact enough to compare
    fam = bt.Ode("one_compartment", observations={2: "conc"}, correlated=False, steady_state=True, rtol=1e-10)
    ev = read_nonmem(df, key=KEY)
    model = fam.build_model(fam.design(ev.frame, ev.baseline, ev.schema), ev.schema)
    values = model.value_vars
    logp = get_jaxified_graph(inputs=values, outputs=[model.logp()])
    point = model.initial_point()
    x = {v.name: jnp.asarray(point[v.name]) for v in values}

    def f(x):
        return logp(*[x[v.name] for v in values])[0]

    value, grad = jax.jit(jax.value_and_grad(f))(x)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in jax.tree.leaves(grad))
    names, h = ("log_cl", "log_v", "log_ka"), 1e-5
    probes = [x | {n: x[n] + s * h} for n in names for s in (1.0, -1.0)]
    moved = np.asarray(jax.jit(jax.vmap(f))(jax.tree.map(lambda *a: jnp.stack(a), *probes)))
    for j, name in enumerate(names):
        fd = (moved[2 * j] - moved[2 * j + 1]) / (2 * h)
        assert float(grad[name]) == pytest.approx(float(fd), rel=1e-4, abs=1e-6)
    assert abs(float(grad["log_cl"])) > 0.1  # the levels inform CL


def test_a_sequential_model_at_steady_state_equals_its_full_ode():
    """Friberg with its PK in closed form (the drug's train summed exactly, the neutrophil states
    periodic) equals the full six-state ODE's steady state, found by the same Newton solve."""
    full, seq = pk_ode.friberg(), pk_ode.friberg_sequential()
    p = dict(full.centres)
    theta = jnp.array([[p[k] for k in full.parameters]])
    doses = (jnp.array([[0.0, 504.0]]), jnp.array([[135.0, 135.0]]), jnp.zeros((1, 2), int), jnp.ones((1, 2)))
    times = jnp.array([[0.5, 6.0, 168.0, 336.0, 504.5, 672.0, 840.0]])
    idx, row = jnp.zeros(7, int), jnp.arange(7)
    ss = {"ss_ii": jnp.array([[504.0, 0.0]]), "dose_episode": jnp.zeros((1, 2)), "episode": jnp.zeros(7)}
    for out in (0, 1):
        which = jnp.full(7, out)
        a = pk_ode.predict_outputs(full, theta, *doses, times, idx, row, which, **ss, **(TOL | {"max_steps": 20000}))
        b = pk_ode.predict_outputs(seq, theta, *doses, times, idx, row, which, **ss, **TOL)
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9 * float(jnp.max(jnp.abs(a))))
        if out == 1:  # neutrophils recover incompletely between cycles: the steady state shows
            once = pk_ode.predict_outputs(seq, theta, *doses, times, idx, row, which, **TOL)
            assert np.abs(np.asarray(b) / np.asarray(once) - 1).max() > 1e-3


def test_what_the_ode_family_refuses_around_resets_and_steady_state():
    df = table([(0.0, "depot", 80.0, 0, 0), (24.0, "ss1:infusion", 100.0, 14.0, 12.0)], OBS)
    ev = read_nonmem(df, key=KEY)
    fam = bt.Ode("one_compartment", observations={2: "conc"}, steady_state=True)
    pid = bt.pseudonymise(1, KEY)
    with pytest.raises(bt.DataError) as err:
        fam.design(ev.frame, ev.baseline, ev.schema)
    assert str(err.value) == (
        "a steady-state infusion (SS > 0) that lasts longer than its interval II is not modelled "
        f"(its infusions would overlap) (patient {pid}, row 1, column 'RATE')"
    )
    ev = read_nonmem(one_id((0.0, 80.0, 1, 1), (10.0, 0.0, 0, 2), (0.0, 80.0, 4, 1), (5.0, 0.0, 0, 2)), key=KEY)
    bt.Pk().design(ev.frame, ev.baseline, ev.schema)  # the closed-form family takes the restarted clock
    with pytest.raises(bt.DataError) as err:
        fam.design(ev.frame, ev.baseline, ev.schema)
    assert str(err.value) == (
        "TIME goes back at this reset: the ODE family solves one clock per ID (keep TIME non-decreasing "
        f"through resets) (patient {pid}, row 2, column 'TIME')"
    )
    with pytest.raises(TypeError, match="steady_state must be True or False, not 1"):
        bt.Ode("one_compartment", steady_state=1)
