"""Closed-form concentrations of linear compartmental PK models, by superposition of doses.

Pure functions written against an array namespace ``xp`` (``numpy``, ``jax.numpy`` or
``pytensor.tensor``), so the same equations serve the PyMC model, the JAX dose search and the
tests. Every function returns the concentration in the central compartment at times ``t`` after
doses given at ``t_dose`` (broadcast: e.g. ``t[:, None]`` against ``t_dose[None, :]``, then sum
over the dose axis); a dose contributes nothing before it is given (or before its lag time), and a
bolus counts at its own time, as in NONMEM.

Parameters are clearance ``cl``, central volume ``v`` (``v1``), and for two compartments the
inter-compartmental clearance ``q`` and peripheral volume ``v2``; ``ka`` is the first-order
absorption rate, ``f`` the bioavailability. Infusions have rate ``amt / duration``.
References: Gibaldi & Perrier, *Pharmacokinetics* (2nd ed., 1982), ch. 1-2 and appendix C;
Bertrand & Mentré, *Mathematical expressions of the pharmacokinetic and pharmacodynamic models
implemented in the Monolix software* (2008).
"""

from __future__ import annotations

_EPS = 1e-9  # relative gap below which ka and an elimination rate count as equal (limit formula)


def _after(xp, tau):
    """tau where the dose has been given (tau >= 0: a bolus counts at its own time), else 0; and the mask."""
    given = tau >= 0
    return xp.where(given, tau, 0.0), given


def one_cmt_bolus(xp, t, t_dose, amt, cl, v):
    """IV bolus into a one-compartment model."""
    tau, given = _after(xp, t - t_dose)
    return xp.where(given, amt / v * xp.exp(-cl / v * tau), 0.0)


def one_cmt_infusion(xp, t, t_dose, amt, duration, cl, v):
    """Zero-order infusion of ``amt`` over ``duration`` into a one-compartment model."""
    k = cl / v
    tau, given = _after(xp, t - t_dose)
    on = xp.minimum(tau, duration)  # time infused so far
    rate = amt / duration
    return xp.where(given, rate / cl * (-xp.expm1(-k * on)) * xp.exp(-k * (tau - on)), 0.0)


def one_cmt_oral(xp, t, t_dose, amt, cl, v, ka, f=1.0, tlag=0.0):
    """First-order absorption (optional lag) into a one-compartment model (Bateman function).

    At ka = k the limit ``f amt k tau exp(-k tau) / v`` is used.
    """
    k = cl / v
    tau, given = _after(xp, t - t_dose - tlag)
    diff = ka - k
    close = xp.abs(diff) < _EPS * ka
    safe = xp.where(close, 1.0, diff)
    bateman = ka / safe * (xp.exp(-k * tau) - xp.exp(-ka * tau))
    limit = ka * tau * xp.exp(-k * tau)
    return xp.where(given, f * amt / v * xp.where(close, limit, bateman), 0.0)


def two_cmt_rates(xp, cl, v1, q, v2):
    """Macro rate constants (alpha > beta) and k21 of a two-compartment model."""
    k10, k12, k21 = cl / v1, q / v1, q / v2
    s = k10 + k12 + k21
    root = xp.sqrt(s * s - 4.0 * k10 * k21)
    alpha = (s + root) / 2.0
    beta = k10 * k21 / alpha  # numerically stable form of (s - root) / 2
    return alpha, beta, k21


def two_cmt_bolus(xp, t, t_dose, amt, cl, v1, q, v2):
    """IV bolus into the central compartment of a two-compartment model."""
    alpha, beta, k21 = two_cmt_rates(xp, cl, v1, q, v2)
    tau, given = _after(xp, t - t_dose)
    a = (alpha - k21) / (alpha - beta)
    b = (k21 - beta) / (alpha - beta)
    return xp.where(given, amt / v1 * (a * xp.exp(-alpha * tau) + b * xp.exp(-beta * tau)), 0.0)


def two_cmt_infusion(xp, t, t_dose, amt, duration, cl, v1, q, v2):
    """Zero-order infusion into the central compartment of a two-compartment model."""
    alpha, beta, k21 = two_cmt_rates(xp, cl, v1, q, v2)
    tau, given = _after(xp, t - t_dose)
    on = xp.minimum(tau, duration)
    rate = amt / duration
    a = (alpha - k21) / (alpha - beta)
    b = (k21 - beta) / (alpha - beta)
    conc = a / alpha * (-xp.expm1(-alpha * on)) * xp.exp(-alpha * (tau - on)) + b / beta * (
        -xp.expm1(-beta * on)
    ) * xp.exp(-beta * (tau - on))
    return xp.where(given, rate / v1 * conc, 0.0)


def two_cmt_oral(xp, t, t_dose, amt, cl, v1, q, v2, ka, f=1.0, tlag=0.0):
    """First-order absorption (optional lag) into a two-compartment model.

    Assumes ka differs from both macro rates (relative gap > 1e-6); the fitted ka of oral drugs
    is rarely that close to alpha or beta, and the PyMC model keeps them apart by construction.
    """
    alpha, beta, k21 = two_cmt_rates(xp, cl, v1, q, v2)
    tau, given = _after(xp, t - t_dose - tlag)
    ca = (k21 - alpha) / ((ka - alpha) * (beta - alpha))
    cb = (k21 - beta) / ((ka - beta) * (alpha - beta))
    ck = (k21 - ka) / ((alpha - ka) * (beta - ka))
    conc = ca * xp.exp(-alpha * tau) + cb * xp.exp(-beta * tau) + ck * xp.exp(-ka * tau)
    return xp.where(given, f * amt * ka / v1 * conc, 0.0)


def superpose(xp, fn, t, doses: dict, **params):
    """Sum ``fn`` over doses: ``doses`` holds arrays ``t_dose``, ``amt`` (and ``duration``) of
    shape (n_doses,); ``t`` has shape (n_times,); returns shape (n_times,).

    Padding doses with ``amt = 0`` is harmless, so ragged patients can share one shape.
    """
    td = doses["t_dose"][None, :]
    extra = {"duration": doses["duration"][None, :]} if "duration" in doses else {}
    per_dose = fn(xp, t[:, None], td, doses["amt"][None, :], **extra, **params)
    return per_dose.sum(axis=1)


__all__ = [
    "one_cmt_bolus",
    "one_cmt_infusion",
    "one_cmt_oral",
    "superpose",
    "two_cmt_bolus",
    "two_cmt_infusion",
    "two_cmt_oral",
    "two_cmt_rates",
]
