"""Model-informed precision dosing: candidate regimens evaluated on a PK twin's full posterior.

For each regimen (amount, interval, number of doses, infusion duration) and each posterior draw
of the twin's own PK parameters, the concentration over the *last* dosing interval is computed
in closed form (the family's :meth:`~bayestwin.families.pk.Pk.concentration`, the same formula
as its PyMC model), including what remains of the doses the patient already had. From it:

- ``trough``: the concentration at the end of the last interval (just before the next dose);
- ``peak``: the highest concentration in that interval;
- ``auc``: the area under the curve over that interval (AUC_tau, trapezoid on a fine grid).

``P(target)`` is the posterior probability that the chosen metric lies in the target window, and
``P(toxic)`` that the peak exceeds ``limit``. Unlike MAP dosing tools, these probabilities carry
both the patient's and the population's uncertainty. All regimens and draws are evaluated at
once (one jitted, broadcast JAX expression).

The closed forms are sums over doses, each dose's term proportional to its amount, so regimens
that differ only in amount share one computation: for each schedule (interval, number of doses,
infusion duration) the concentration of the doses already given and that of unit doses on the
schedule are computed once, and a regimen of amount ``a`` is ``history + a * unit`` (12 amounts
on one schedule: one evaluation of the closed form instead of 12).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from bayestwin import _memory

METRICS = ("trough", "peak", "auc")


@dataclass(frozen=True)
class Regimen:
    """``doses`` doses of ``amount`` every ``interval``; ``duration`` > 0 makes them infusions."""

    amount: float
    interval: float
    doses: int = 7
    duration: float = 0.0

    def __post_init__(self):
        if not (self.amount > 0 and self.interval > 0 and self.doses >= 1 and self.duration >= 0):
            raise ValueError(f"a regimen needs amount > 0, interval > 0, doses >= 1, duration >= 0: {self}")
        if self.duration > self.interval:
            raise ValueError(f"infusion longer than the dosing interval: {self}")

    @property
    def label(self) -> str:
        """A readable name of the regimen, e.g. ``"100 every 12 h x6"`` (the forecast's therapy label)."""
        how = f" over {self.duration:g} h" if self.duration > 0 else ""
        return f"{self.amount:g} every {self.interval:g} h{how} x{self.doses}"


def evaluate_regimens(
    family,
    theta: dict,
    regimens: Sequence[Regimen],
    *,
    start,
    history=None,
    grid: int = 25,
    batch: int = 8,
) -> dict[str, np.ndarray]:
    """Trough, peak and AUC over each regimen's last interval, per draw.

    ``theta`` maps parameter names to draws: shape (S,) for one patient, or (P, S) for P
    patients at once. ``start`` (scalar or (P,)) is when each patient's first new dose is given;
    ``history`` (a DataFrame, or one per patient, columns TIME, AMT, DURATION) holds the doses
    already given, which keep contributing by superposition. Patients are evaluated ``batch``
    at a time inside one compiled program (memory grows with batch x regimens x draws x grid x
    doses).

    Returns arrays (regimens, draws), or (patients, regimens, draws) for batched ``theta``.
    """
    theta = {p: np.asarray(v, float) for p, v in theta.items()}
    single = next(iter(theta.values())).ndim == 1
    if single:
        theta = {p: v[None] for p, v in theta.items()}
        history = [history]
    n, draws = next(iter(theta.values())).shape
    starts = np.broadcast_to(np.asarray(start, float), (n,))
    if history is None or isinstance(history, pd.DataFrame):
        history = [history] * n
    regimens = list(regimens)
    R = len(regimens)
    # One schedule per (interval, doses, duration): regimens on it differ only in amount.
    unit = [replace(r, amount=1.0) for r in regimens]
    schedules = list(dict.fromkeys(unit))
    group = np.array([schedules.index(u) for u in unit])
    amount = np.array([r.amount for r in regimens])
    m_hist = max((len(h) for h in history if h is not None), default=0)
    m = m_hist + max(r.doses for r in regimens)
    # Memory: the result is 3 x (patients, regimens, draws); the work, per chunk of regimens,
    # batch x chunk x draws x grid x dose slots doubles (a few temporaries of that size).
    _memory.check(3 * n * R * draws * 8, f"the metrics of {R} regimens x {draws} draws x {n} patients")
    per_regimen = 4 * min(batch, n) * draws * grid * m * 8
    chunk = int(max(1, min(R, _memory.budget() // 4 // max(per_regimen, 1))))
    width = min(chunk, len(schedules))  # schedules per chunk: one compiled shape for every chunk
    parts = []
    for lo in range(0, R, chunk):
        idx = np.arange(lo, min(lo + chunk, R))
        idx = np.concatenate([idx, np.full(chunk - len(idx), idx[-1])])
        used = list(dict.fromkeys(group[idx]))
        used += [used[-1]] * (width - len(used))
        local = np.array([used.index(g) for g in group[idx]])
        designs = [_regimen_design([schedules[g] for g in used], starts[i], history[i], grid) for i in range(n)]
        arrays = {k: np.stack([_widen(d[k], m, k) for d in designs]) for k in designs[0]}
        arrays["group"] = np.broadcast_to(local, (n, chunk))
        arrays["amount"] = np.broadcast_to(amount[idx], (n, chunk))
        out = _metrics(family, grid)(theta, arrays, batch)
        parts.append({k: np.asarray(v)[:, : min(chunk, R - lo)] for k, v in out.items()})
    out = {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}
    return {k: v[0] for k, v in out.items()} if single else out


def regimen_doses(
    regimens: Sequence[Regimen], start: float, history: pd.DataFrame | None = None, state: float = 0.0
) -> dict:
    """Dose slots of each regimen given from ``start`` on top of the ``history`` already given.

    ``history``: doses as rows with TIME, AMT, DURATION (0 = bolus or oral) and optionally INPUT
    (how each enters, :meth:`~bayestwin.families.pk.Pk.routed_doses`), e.g. from
    ``Pk.routed_doses(events.frame)``. Returns arrays (regimens, slots): ``t_dose``, ``amt``,
    ``dur`` (> 0), ``inf`` (the input code: 1 for infusions, 2 for a central bolus of an oral
    model, 0 otherwise) and ``ii`` (a steady-state dose's interval, column SS_II of the history;
    0 for a single dose) and ``state`` (the state a dose enters, column STATE of the history, ``state``
    for the new doses; ODE models); with no regimens, one row holding the history alone.
    """
    past = history if history is not None else pd.DataFrame({"TIME": [], "AMT": [], "DURATION": []})
    k = len(past)
    plans = list(regimens) or [None]
    m = max(k + max((r.doses for r in regimens), default=0), 1)
    R = len(plans)
    t_dose, amt, dur, inf = np.zeros((R, m)), np.zeros((R, m)), np.ones((R, m)), np.zeros((R, m))
    ii, into = np.zeros((R, m)), np.full((R, m), float(state))
    d_past = past["DURATION"].to_numpy(float)
    code = past["INPUT"].to_numpy(float) if "INPUT" in past else (d_past > 0).astype(float)
    ss = past["SS_II"].to_numpy(float) if "SS_II" in past else np.zeros(k)
    for i, r in enumerate(plans):
        t_dose[i, :k], amt[i, :k] = past["TIME"].to_numpy(float), past["AMT"].to_numpy(float)
        dur[i, :k], inf[i, :k], ii[i, :k] = np.where(d_past > 0, d_past, 1.0), code, ss
        if "STATE" in past:
            into[i, :k] = past["STATE"].to_numpy(float)
        if r is None:
            continue
        new = start + r.interval * np.arange(r.doses)
        t_dose[i, k : k + r.doses], amt[i, k : k + r.doses] = new, r.amount
        if r.duration > 0:
            dur[i, k : k + r.doses], inf[i, k : k + r.doses] = r.duration, 1.0
    return {"t_dose": t_dose, "amt": amt, "dur": dur, "inf": inf, "ii": ii, "state": into}


def _regimen_design(regimens: Sequence[Regimen], start: float, history: pd.DataFrame | None, grid: int) -> dict:
    """Dose slots (regimens, doses) and the last interval's time grid (regimens, grid) for one patient."""
    out = regimen_doses(regimens, start, history)
    k = 0 if history is None else len(history)
    out["new"] = np.zeros_like(out["amt"])  # the regimen's own dose slots (after the history's)
    for i, r in enumerate(regimens):
        out["new"][i, k : k + r.doses] = 1.0
    # the last interval, from the last dose to just before the next one would be due
    last = np.array([start + r.interval * (r.doses - 1) for r in regimens])
    interval = np.array([r.interval for r in regimens])
    out["times"] = last[:, None] + interval[:, None] * np.linspace(0.0, 1.0, grid)[None, :]
    out["step"] = interval[:, None] / (grid - 1)
    return out


def _widen(a: np.ndarray, m: int, name: str) -> np.ndarray:
    """Pad a (regimens, doses) array to ``m`` dose slots with empty doses (amount 0)."""
    if name not in ("t_dose", "amt", "dur", "inf", "ii", "state", "new") or a.shape[1] == m:
        return a
    fill = 1.0 if name == "dur" else 0.0
    return np.concatenate([a, np.full((a.shape[0], m - a.shape[1]), fill)], axis=1)


_JITTED: dict = {}


def _metrics(family, grid: int):
    """The jitted metric computation for ``family`` (compiled once per family configuration)."""
    key = (repr(sorted(family.config().items())), grid)
    if key not in _JITTED:

        def one(theta, a):
            th = {p: v[None, :, None, None] for p, v in theta.items()}  # (1, S, 1, 1)
            t = a["times"][:, None, :, None]  # (U, 1, G, 1): U schedules of unit doses

            def arr(x):
                return x[:, None, None, :]  # (U, 1, 1, M)

            doses = (arr(a["t_dose"]), arr(a["amt"]), arr(a["dur"]), arr(a["inf"]))
            each = family.concentration(jnp, th, t, *doses, ii=arr(a["ii"]))  # (U, S, G, M) per dose
            unit = (each * arr(a["new"])).sum(-1)  # (U, S, G)
            past = (each * (1.0 - arr(a["new"]))).sum(-1)
            g = a["group"]  # (R,): each regimen's schedule
            conc = past[g] + a["amount"][:, None, None] * unit[g]  # (R, S, G)
            auc = a["step"][g] * (conc[..., 1:] + conc[..., :-1]).sum(-1) / 2.0  # (R, S)
            return {"trough": conc[..., -1], "peak": conc.max(-1), "auc": auc}

        @partial(jax.jit, static_argnums=2)
        def metrics(theta, arrays, batch):
            return jax.lax.map(lambda x: one(*x), (theta, arrays), batch_size=batch)

        _JITTED[key] = metrics
    return _JITTED[key]


def dose_search(
    twin,
    regimens: Sequence[Regimen],
    *,
    target: tuple[float, float],
    metric: str = "trough",
    limit: float | None = None,
    max_toxic: float = 0.1,
    min_target: float = 0.5,
    start: float | None = None,
    patient: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Evaluate ``regimens`` for PK twins and recommend one per patient.

    Parameters
    ----------
    twin
        A PK :class:`~bayestwin.twin.Twin` of one or many patients.
    regimens
        Candidate :class:`Regimen` s.
    target
        (low, high) window for ``metric`` ("trough", "peak" or "auc") over the last interval.
    limit, max_toxic
        Toxicity: P(peak > ``limit``) must not exceed ``max_toxic`` for a recommendation.
    min_target
        The floor: a regimen is recommended only if its P(target) is at least this (default
        0.5). Below it the answer is "no regimen offered meets the target" (the best candidate
        is still shown, with a note), never a recommendation the posterior does not support.
    start
        When the first new dose is given (default: each patient's last recorded event).
    patient
        One pseudonym or several (default: every patient of the twin, all in one program).

    Returns
    -------
    DataFrame, one row per patient and regimen: the regimen, the posterior mean and 90%
    interval of the metric, P(target), P(toxic), ``recommended`` (per patient, the feasible
    regimen with the highest P(target) if it reaches ``min_target``; none otherwise) and
    ``edge`` (the recommendation is the smallest or largest amount offered at its interval and
    duration: the best dose may lie outside the grid). ``table.attrs["notes"]`` says, per
    patient, when nothing is recommended or the recommendation sits at the edge; the same notes
    are issued as a :class:`~bayestwin.errors.DecisionWarning`.

    Examples
    --------
    >>> table = dose_search(twin, [Regimen(a, 12.0) for a in (100, 200, 300)],
    ...                     target=(5, 15), limit=20)  # doctest: +SKIP
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
    lo, hi = target
    if not (np.isfinite([lo, hi]).all() or (np.isfinite(lo) and hi == np.inf)) or not lo < hi:
        raise ValueError(f"target must be (low, high) with low < high (high may be inf), not {target!r}")
    if not regimens:
        raise ValueError("no regimens given")
    if not all(isinstance(r, Regimen) for r in regimens):
        raise TypeError("regimens must be Regimen objects")
    if len({r.label for r in regimens}) < len(regimens):
        raise ValueError("a regimen is listed twice")
    if not 0 <= max_toxic <= 1 or not 0 <= min_target <= 1:
        raise ValueError(f"max_toxic and min_target are probabilities in [0, 1], not {max_toxic!r}, {min_target!r}")
    if limit is not None and not (np.isfinite(limit) and limit > 0):
        raise ValueError(f"limit must be a positive concentration, not {limit!r}")
    if start is not None and not np.isfinite(start):
        raise ValueError(f"start must be a finite time, not {start!r}")
    fam = twin.population.family
    patients = [patient] if isinstance(patient, str) else list(patient or twin.patients)
    for p in patients:
        if p not in twin.patients:
            raise ValueError(f"patient {p!r} is not in this twin")
    theta = twin_parameters(twin, patients)
    events = twin.cohort
    doses = fam.current_doses(events.frame)  # a reset ends what came before it
    history = [doses[doses["ID"] == p] for p in patients]
    if start is None:
        last = events.frame.groupby("ID")["TIME"].max()
        starts = last.reindex(patients).to_numpy(float)
    else:
        starts = np.full(len(patients), float(start))
    values = evaluate_regimens(fam, theta, regimens, start=starts, history=history)
    table = regimen_table(
        values,
        regimens,
        patients,
        metric=metric,
        target=target,
        limit=limit,
        max_toxic=max_toxic,
        min_target=min_target,
    )
    if table.attrs["notes"]:
        from bayestwin.errors import DecisionWarning, warn

        warn("\n".join(table.attrs["notes"]), DecisionWarning)
    return table


def twin_parameters(twin, patients: Sequence[str]) -> dict[str, np.ndarray]:
    """Each patient's PK parameter draws from a twin: name -> (patients, draws)."""
    fam = twin.population.family
    post = twin.posterior.sel(patient=list(patients))
    theta = {}
    for n in fam.patient_outputs:
        x = post[n].transpose("patient", "chain", "draw").to_numpy()
        theta[n.removeprefix("patient_")] = x.reshape(len(patients), -1)
    if "v" not in theta and "ke" in theta:  # rate parameterisation
        theta["v"] = theta["cl"] / theta["ke"]
    return theta


def recommend(p_target: np.ndarray, feasible: np.ndarray, min_target: float):
    """Per patient (rows), the feasible regimen (columns) with the highest P(target), and whether
    the posterior supports recommending it (P(target) >= ``min_target`` and > 0): (best index,
    supported, a boolean table with the recommendation)."""
    best = np.argmax(np.where(feasible, p_target, -1.0), axis=1)
    rows = np.arange(p_target.shape[0])
    supported = feasible[rows, best] & (p_target[rows, best] >= min_target) & (p_target[rows, best] > 0)
    recommended = np.zeros(p_target.shape, bool)
    recommended[rows, best] = supported
    return best, supported, recommended


def regimen_table(
    values: dict,
    regimens: Sequence[Regimen],
    patients,
    *,
    metric: str,
    target,
    limit,
    max_toxic: float,
    min_target: float = 0.5,
) -> pd.DataFrame:
    """The per-patient regimen table from metric draws (patients, regimens, draws); see :func:`dose_search`."""
    lo, hi = target
    x = values[metric]
    p_target = ((x >= lo) & (x <= hi)).mean(-1)  # (P, R)
    p_toxic = (values["peak"] > limit).mean(-1) if limit is not None else np.zeros_like(p_target)
    q05, q95 = np.quantile(x, [0.05, 0.95], axis=-1)
    P, R = p_target.shape
    feasible = p_toxic <= max_toxic
    best, supported, recommended = recommend(p_target, feasible, min_target)
    edge = np.zeros((P, R), bool)
    notes = []
    for i, p in enumerate(patients):
        j = best[i]
        if not feasible[i].any():
            notes.append(f"patient {p}: no regimen offered keeps P(toxic) <= {max_toxic:g}; none recommended")
        elif not supported[i]:
            notes.append(
                f"patient {p}: no regimen offered meets the target: the best, {regimens[j].label}, has "
                f"P(target) = {p_target[i, j]:.3f} < {min_target:g}; none recommended"
            )
        else:
            same = [
                r.amount for r in regimens if (r.interval, r.duration) == (regimens[j].interval, regimens[j].duration)
            ]
            if len(set(same)) > 1 and regimens[j].amount in (min(same), max(same)):
                edge[i, j] = True
                side = "largest" if regimens[j].amount == max(same) else "smallest"
                notes.append(
                    f"patient {p}: the recommended regimen {regimens[j].label} is the {side} amount offered; "
                    "the best dose may lie beyond the grid: extend it"
                )
    table = pd.DataFrame(
        {
            "patient": np.repeat(list(patients), R),
            "regimen": [r.label for r in regimens] * P,
            "amount": [r.amount for r in regimens] * P,
            "interval": [r.interval for r in regimens] * P,
            "duration": [r.duration for r in regimens] * P,
            f"{metric}_mean": x.mean(-1).ravel(),
            f"{metric}_q05": q05.ravel(),
            f"{metric}_q95": q95.ravel(),
            "P(target)": p_target.ravel(),
            "P(toxic)": p_toxic.ravel(),
            "recommended": recommended.ravel(),
            "edge": edge.ravel(),
        }
    )
    table.attrs["notes"] = notes
    return table


# ------------------------------------------------------------------ outcome-based regimen search
OUTCOME_METRICS = ("auc", "peak", "nadir", "trough", "mean")


@dataclass(frozen=True)
class Outcome:
    """An event about one forecast output over the forecast times: ``low <= metric <= high``.

    ``metric``: ``"auc"`` (trapezoid over the times), ``"peak"`` (highest), ``"nadir"``
    (lowest), ``"trough"`` (at the last time), ``"mean"`` (time-averaged: AUC / span).
    ``output``: the output of a family with several (``"anc"`` of the Friberg model); None for
    the family's forecast output. E.g. ``Outcome("conc", "auc", 80, 120)`` (AUC in 80-120) or
    ``Outcome("anc", "nadir", high=1.0)`` (grade >= 3 neutropenia: ANC nadir below 1.0 x 10^9/L).
    """

    output: str | None
    metric: str
    low: float = -np.inf
    high: float = np.inf

    def __post_init__(self):
        if self.metric not in OUTCOME_METRICS:
            raise ValueError(f"metric must be one of {OUTCOME_METRICS}, not {self.metric!r}")
        if not self.low < self.high or np.isnan([self.low, self.high]).any():
            raise ValueError(f"an Outcome needs low < high, not ({self.low!r}, {self.high!r})")
        if self.low == -np.inf and self.high == np.inf:
            raise ValueError("an Outcome needs low or high (otherwise its probability is 1)")

    @property
    def label(self) -> str:
        """A readable statement of the outcome, e.g. ``"auc in [80, 120]"``."""
        what = f"{self.output + ' ' if self.output else ''}{self.metric}"
        if self.low == -np.inf:
            return f"{what} <= {self.high:g}"
        if self.high == np.inf:
            return f"{what} >= {self.low:g}"
        return f"{self.low:g} <= {what} <= {self.high:g}"


def outcome_values(forecast_mean: np.ndarray, times, metric: str) -> np.ndarray:
    """A metric of forecast trajectories (..., time) over ``times``: shape (...)."""
    x, t = np.asarray(forecast_mean, float), np.asarray(times, float)
    if metric in ("auc", "mean"):
        auc = (np.diff(t) * (x[..., 1:] + x[..., :-1]) / 2.0).sum(-1)
        return auc / (t[-1] - t[0]) if metric == "mean" else auc
    return {"peak": x.max(-1), "nadir": x.min(-1), "trough": x[..., -1]}[metric]


def outcome_search(
    twin,
    regimens: Sequence[Regimen],
    *,
    times,
    target: Outcome,
    constraints: Sequence[tuple[Outcome, float]] = (),
    min_target: float = 0.5,
    start: float | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Regimens judged by what they do, from each twin's full posterior (PK or PK/PD).

    Each regimen is forecast over ``times`` (``twin.predict``, the structural prediction, one
    compiled program for every regimen and draw); the recommended regimen maximises P(``target``)
    among those that keep every constraint's probability at most its bound, and only if
    P(target) >= ``min_target`` (otherwise none, with a note and a
    :class:`~bayestwin.errors.DecisionWarning`, as :func:`dose_search` does).

    Examples
    --------
    >>> outcome_search(twin, [Regimen(a, 504.0, doses=1, duration=1.0) for a in (60, 75, 100)],
    ...                times=np.linspace(0, 504, 253),
    ...                target=Outcome("conc", "auc", 80, 120),
    ...                constraints=[(Outcome("anc", "nadir", high=1.0), 0.2)])  # doctest: +SKIP

    Returns
    -------
    DataFrame, one row per patient and regimen: the target metric's posterior mean and 90%
    interval, P(target), P(constraint) for each, ``feasible`` and ``recommended``.
    """
    if not isinstance(target, Outcome) or not all(
        isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], Outcome) for c in constraints
    ):
        raise TypeError("target is an Outcome and constraints a list of (Outcome, max probability)")
    for _, bound in constraints:
        if not 0 <= bound <= 1:
            raise ValueError(f"a constraint's bound is a probability in [0, 1], not {bound!r}")
    if not 0 <= min_target <= 1:
        raise ValueError(f"min_target is a probability in [0, 1], not {min_target!r}")
    regimens = list(regimens)
    if not regimens or not all(isinstance(r, Regimen) for r in regimens):
        raise TypeError("regimens must be a non-empty list of Regimen objects")
    times = np.asarray(times, float)
    if times.ndim != 1 or len(times) < 2 or np.any(np.diff(times) <= 0):
        raise ValueError("times must be at least two increasing times")
    outputs = list(dict.fromkeys([target.output] + [c.output for c, _ in constraints]))
    paths = {}
    for out in outputs:
        kw = {} if out is None else {"output": out}
        fc = twin.predict(regimens, times, start=start, seed=seed, **kw)
        m = fc.draws["mean"].transpose("patient", "therapy", "chain", "draw", "time").to_numpy()
        paths[out] = m.reshape(m.shape[0], m.shape[1], -1, m.shape[-1])  # (P, R, S, T)

    def prob(o: Outcome):
        x = outcome_values(paths[o.output], times, o.metric)
        return x, ((x >= o.low) & (x <= o.high)).mean(-1)

    x, p_target = prob(target)
    probs = [prob(c)[1] for c, _ in constraints]
    feasible = np.ones_like(p_target, bool)
    for p, (_, bound) in zip(probs, constraints, strict=True):
        feasible &= p <= bound
    patients = list(twin.patients)
    P, R = p_target.shape
    best, ok, recommended = recommend(p_target, feasible, min_target)
    notes = []
    for i, p in enumerate(patients):
        if not feasible[i].any():
            notes.append(f"patient {p}: no regimen offered meets every constraint; none recommended")
        elif not ok[i]:
            notes.append(
                f"patient {p}: no regimen offered meets the target ({target.label}): the best feasible, "
                f"{regimens[best[i]].label}, has P(target) = {p_target[i, best[i]]:.3f} < {min_target:g}; "
                "none recommended"
            )
    q05, q95 = np.quantile(x, [0.05, 0.95], axis=-1)
    name = f"{target.output + '_' if target.output else ''}{target.metric}"
    table = pd.DataFrame(
        {
            "patient": np.repeat(patients, R),
            "regimen": [r.label for r in regimens] * P,
            f"{name}_mean": x.mean(-1).ravel(),
            f"{name}_q05": q05.ravel(),
            f"{name}_q95": q95.ravel(),
            f"P({target.label})": p_target.ravel(),
            **{f"P({c.label})": p.ravel() for (c, _), p in zip(constraints, probs, strict=True)},
            "feasible": feasible.ravel(),
            "recommended": recommended.ravel(),
        }
    )
    table.attrs["notes"] = notes
    if notes:
        from bayestwin.errors import DecisionWarning, warn

        warn("\n".join(notes), DecisionWarning)
    return table
