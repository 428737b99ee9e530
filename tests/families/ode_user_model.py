"""A user-written ODE model, importable by path (``tests.families.ode_user_model:two_cmt_mm``):
two compartments, Michaelis-Menten elimination from the central one, IV doses."""

import jax.numpy as jnp

import bayestwin as bt


def rhs(t, y, p):
    c = y[0] / p["v1"]
    elim = p["vmax"] * c / (p["km"] + c)
    flow = p["q"] * (c - y[1] / p["v2"])
    return jnp.stack([-elim - flow, flow])


def two_cmt_mm() -> bt.OdeModel:
    return bt.OdeModel(
        name="two_cmt_mm",
        states=("central", "peripheral"),
        parameters=("vmax", "km", "v1", "q", "v2"),
        rhs=rhs,
        outputs={"conc": lambda y, p: y[0] / p["v1"]},
        centres={"vmax": 40.0, "km": 4.0, "v1": 20.0, "q": 5.0, "v2": 40.0},
    )
