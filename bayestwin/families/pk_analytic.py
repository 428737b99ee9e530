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

**Steady state.** With ``ii`` > 0 a dose is a steady-state dose (NONMEM ``SS``): it is the latest
of an infinite train given every ``ii`` before it, so its contribution is
c(tau) + sum_{n >= 1} c(tau + n ii) from its own time on (nothing before: the steady state is
the state reached at that time). The earlier doses of the train have finished entering (infusion
over, lag passed: ``duration`` and ``tlag`` at most ``ii``), so each is a sum of exponentials
a_j exp(-lambda_j tau), and the train sums in closed form with the geometric series
sum_{n >= 1} exp(-lambda (x + n ii)) = exp(-lambda (x + ii)) / (1 - exp(-lambda ii)) (:func:`_train`).
``ii`` = 0 (the default) is a single dose; ``ii`` may be an array (0 where a dose is not SS).
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


def _train(xp, lam, x, ii):
    """sum_{n >= 1} exp(-lam (x + n ii)): the earlier doses of a steady-state train (0 where ii = 0)."""
    on = ii > 0
    safe = xp.where(on, ii, 1.0)
    return xp.where(on, xp.exp(-lam * (x + safe)) / -xp.expm1(-lam * safe), 0.0)


def _has_ss(ii) -> bool:
    """False only for a literal 0 (a plain number): then the steady-state terms are not built."""
    return not (isinstance(ii, (int, float)) and ii == 0)


def one_cmt_bolus(xp, t, t_dose, amt, cl, v, ii=0.0):
    """IV bolus into a one-compartment model."""
    k = cl / v
    tau, given = _after(xp, t - t_dose)
    conc = xp.exp(-k * tau)
    if _has_ss(ii):
        conc = conc + _train(xp, k, tau, ii)
    return xp.where(given, amt / v * conc, 0.0)


def one_cmt_infusion(xp, t, t_dose, amt, duration, cl, v, ii=0.0):
    """Zero-order infusion of ``amt`` over ``duration`` into a one-compartment model."""
    k = cl / v
    tau, given = _after(xp, t - t_dose)
    on = xp.minimum(tau, duration)  # time infused so far
    rate = amt / duration
    conc = -xp.expm1(-k * on) * xp.exp(-k * (tau - on))
    if _has_ss(ii):  # the train's earlier infusions are over: (1 - e^{-k D}) e^{-k (tau + n ii - D)}
        conc = conc - xp.expm1(-k * duration) * _train(xp, k, tau - duration, ii)
    return xp.where(given, rate / cl * conc, 0.0)


def one_cmt_oral(xp, t, t_dose, amt, cl, v, ka, f=1.0, tlag=0.0, ii=0.0):
    """First-order absorption (optional lag) into a one-compartment model (Bateman function).

    At ka = k the limit ``f amt ka tau exp(-k tau) / v`` is used, and for a steady-state train
    its sum, sum_{n >= 1} (x + n ii) e^{-k (x + n ii)} = e^{-k x} (x r + ii r / (1 - q)) with
    q = e^{-k ii}, r = q / (1 - q). The lag counts from each dose of a train; while a
    steady-state dose waits out its own lag, the train's earlier doses are already in.
    """
    k = cl / v
    x = t - t_dose - tlag
    tau, given = _after(xp, x)
    diff = ka - k
    close = xp.abs(diff) < _EPS * ka
    safe = xp.where(close, 1.0, diff)
    bateman = ka / safe * (xp.exp(-k * tau) - xp.exp(-ka * tau))  # 0 at tau = 0 (before the lag ends)
    limit = ka * tau * xp.exp(-k * tau)
    if _has_ss(ii):
        on = ii > 0
        bateman = bateman + ka / safe * (_train(xp, k, x, ii) - _train(xp, ka, x, ii))
        one_minus_q = -xp.expm1(-k * xp.where(on, ii, 1.0))
        r = (1.0 - one_minus_q) / one_minus_q
        limit = limit + xp.where(on, ka * xp.exp(-k * x) * (x * r + ii * r / one_minus_q), 0.0)
        given = given | (on & (t >= t_dose))
    return xp.where(given, f * amt / v * xp.where(close, limit, bateman), 0.0)


def two_cmt_rates(xp, cl, v1, q, v2):
    """Macro rate constants (alpha > beta) and k21 of a two-compartment model."""
    k10, k12, k21 = cl / v1, q / v1, q / v2
    s = k10 + k12 + k21
    root = xp.sqrt(s * s - 4.0 * k10 * k21)
    alpha = (s + root) / 2.0
    beta = k10 * k21 / alpha  # numerically stable form of (s - root) / 2
    return alpha, beta, k21


def two_cmt_bolus(xp, t, t_dose, amt, cl, v1, q, v2, ii=0.0):
    """IV bolus into the central compartment of a two-compartment model."""
    alpha, beta, k21 = two_cmt_rates(xp, cl, v1, q, v2)
    tau, given = _after(xp, t - t_dose)
    a = (alpha - k21) / (alpha - beta)
    b = (k21 - beta) / (alpha - beta)
    conc = a * xp.exp(-alpha * tau) + b * xp.exp(-beta * tau)
    if _has_ss(ii):
        conc = conc + a * _train(xp, alpha, tau, ii) + b * _train(xp, beta, tau, ii)
    return xp.where(given, amt / v1 * conc, 0.0)


def two_cmt_infusion(xp, t, t_dose, amt, duration, cl, v1, q, v2, ii=0.0):
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
    if _has_ss(ii):
        conc = conc - a / alpha * xp.expm1(-alpha * duration) * _train(xp, alpha, tau - duration, ii)
        conc = conc - b / beta * xp.expm1(-beta * duration) * _train(xp, beta, tau - duration, ii)
    return xp.where(given, rate / v1 * conc, 0.0)


def two_cmt_oral(xp, t, t_dose, amt, cl, v1, q, v2, ka, f=1.0, tlag=0.0, ii=0.0):
    """First-order absorption (optional lag) into a two-compartment model.

    Assumes ka differs from both macro rates (relative gap > 1e-6); the fitted ka of oral drugs
    is rarely that close to alpha or beta, and the PyMC model keeps them apart by construction.
    """
    alpha, beta, k21 = two_cmt_rates(xp, cl, v1, q, v2)
    x = t - t_dose - tlag
    tau, given = _after(xp, x)
    ca = (k21 - alpha) / ((ka - alpha) * (beta - alpha))
    cb = (k21 - beta) / ((ka - beta) * (alpha - beta))
    ck = (k21 - ka) / ((alpha - ka) * (beta - ka))
    conc = ca * xp.exp(-alpha * tau) + cb * xp.exp(-beta * tau) + ck * xp.exp(-ka * tau)  # 0 at tau = 0
    if _has_ss(ii):
        conc = conc + ca * _train(xp, alpha, x, ii) + cb * _train(xp, beta, x, ii) + ck * _train(xp, ka, x, ii)
        given = given | ((ii > 0) & (t >= t_dose))
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
