"""Closed-form PK concentrations equal a numerical solution of the compartment ODEs.

Reference: scipy's LSODA on the ODE system, integrated dose by dose (bolus doses as jumps,
infusions as piecewise-constant input, oral doses into a depot), at rtol 1e-10; the closed
forms must agree to 1e-6 relative. Numpy, JAX and PyTensor evaluate the same functions.
"""

import jax.numpy as jnp
import numpy as np
import pytensor.tensor as pt
import pytest
from scipy.integrate import solve_ivp

from bayestwin.families import pk_analytic as pk

T = np.linspace(0.0, 60.0, 121)
DOSES = {"t_dose": np.array([0.0, 12.0, 24.0, 30.0]), "amt": np.array([100.0, 100.0, 50.0, 0.0])}
P1 = {"cl": 2.5, "v": 30.0}
P2 = {"cl": 2.5, "v1": 30.0, "q": 4.0, "v2": 60.0}


def ode(route: str, params: dict, ka=None, f=1.0, tlag=0.0, duration=None):
    """Concentration in the central compartment by numerical integration, dose by dose."""
    two = "q" in params
    cl, v1 = params["cl"], params.get("v", params.get("v1"))
    q, v2 = params.get("q", 0.0), params.get("v2", 1.0)
    starts = DOSES["t_dose"] + (tlag if route == "oral" else 0.0)
    events = sorted(set([0.0, *starts, *(starts + (duration or 0.0)), T[-1]]))

    def rhs(_, y, rate):
        depot, a1, a2 = y
        absorbed = ka * depot if route == "oral" else 0.0
        return [-absorbed, absorbed + rate - cl / v1 * a1 - q / v1 * a1 + q / v2 * a2, q / v1 * a1 - q / v2 * a2]

    y = np.zeros(3)
    out = np.zeros_like(T)
    for lo, hi in zip(events[:-1], events[1:], strict=True):
        for td, amt in zip(starts, DOSES["amt"], strict=True):
            if td == lo and route == "bolus":
                y[1] += amt
            if td == lo and route == "oral":
                y[0] += f * amt
        rate = 0.0
        if route == "infusion":
            rate = sum(a / duration for td, a in zip(starts, DOSES["amt"], strict=True) if td <= lo < td + duration)
        sol = solve_ivp(rhs, (lo, hi), y, args=(rate,), method="LSODA", rtol=1e-10, atol=1e-12, dense_output=True)
        sel = (T >= lo) & (T <= hi)
        out[sel] = sol.sol(T[sel])[1] / v1
        y = sol.y[:, -1]
    assert not two or q > 0
    return out


CASES = {
    "1cmt bolus": (pk.one_cmt_bolus, P1, {}, dict(route="bolus")),
    "1cmt infusion": (pk.one_cmt_infusion, P1, {"duration": 2.0}, dict(route="infusion", duration=2.0)),
    "1cmt oral": (pk.one_cmt_oral, P1, {"ka": 1.2, "f": 0.8, "tlag": 0.5}, dict(route="oral", ka=1.2, f=0.8, tlag=0.5)),
    "1cmt oral ka = k": (pk.one_cmt_oral, P1, {"ka": 2.5 / 30.0}, dict(route="oral", ka=2.5 / 30.0)),
    "2cmt bolus": (pk.two_cmt_bolus, P2, {}, dict(route="bolus")),
    "2cmt infusion": (pk.two_cmt_infusion, P2, {"duration": 1.5}, dict(route="infusion", duration=1.5)),
    "2cmt oral": (
        pk.two_cmt_oral,
        P2,
        {"ka": 0.9, "f": 0.7, "tlag": 0.25},
        dict(route="oral", ka=0.9, f=0.7, tlag=0.25),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_closed_form_equals_ode(case):
    fn, params, extra, ref_args = CASES[case]
    doses = dict(DOSES)
    if "duration" in extra:
        doses["duration"] = np.full(4, extra.pop("duration"))
    got = pk.superpose(np, fn, T, doses, **params, **extra)
    ref = ode(params=params, **ref_args)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9 * ref.max())
    lag = extra.get("tlag", 0.0)
    assert (got[T <= lag] == 0).all() == (ref_args["route"] != "bolus") and got[T > lag].min() > 0
    # the same function under JAX and PyTensor
    jx = pk.superpose(jnp, fn, jnp.asarray(T), {k: jnp.asarray(v) for k, v in doses.items()}, **params, **extra)
    np.testing.assert_allclose(np.asarray(jx), got, rtol=1e-12)
    pt_doses = {k: pt.as_tensor(v) for k, v in doses.items()}
    sym = pk.superpose(pt, fn, pt.as_tensor(T), pt_doses, **params, **extra)
    np.testing.assert_allclose(sym.eval(), got, rtol=1e-10)


def test_log_ndtr_is_accurate_and_has_finite_gradients():
    """The M3 likelihood's log Φ(z): scipy's value, and a gradient at every z (JAX)."""
    import jax
    import jax.numpy as jnp
    import pytensor.tensor as pt
    from pymc.sampling.jax import get_jaxified_graph
    from scipy.special import log_ndtr as reference

    from bayestwin.families.pk import log_ndtr

    z = pt.dvector("z")
    fn = get_jaxified_graph(inputs=[z], outputs=[log_ndtr(z).sum()])
    xs = np.array([-300.0, -40.0, -10.0, -8.01, -7.99, -3.0, 0.0, 2.0, 8.0])
    values = np.array([float(fn(jnp.array([x]))[0]) for x in xs])
    np.testing.assert_allclose(values, reference(xs), rtol=1e-7, atol=1e-15)
    grads = np.array([float(jax.grad(lambda v: fn(v)[0])(jnp.array([x]))[0]) for x in xs])
    assert np.all(np.isfinite(grads))
    np.testing.assert_allclose(grads, np.exp(-0.5 * xs**2 - reference(xs)) / np.sqrt(2 * np.pi), rtol=1e-5)
