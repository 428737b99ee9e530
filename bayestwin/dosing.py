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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

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
        how = f" over {self.duration:g} h" if self.duration > 0 else ""
        return f"{self.amount:g} every {self.interval:g} h{how} x{self.doses}"


def evaluate_regimens(
    family,
    theta: dict,
    regimens: Sequence[Regimen],
    *,
    start: float,
    history: pd.DataFrame | None = None,
    grid: int = 25,
) -> dict[str, np.ndarray]:
    """Trough, peak and AUC over each regimen's last interval, per draw: arrays (regimens, draws).

    ``theta`` maps parameter names to arrays of draws (S,); ``history`` holds doses already
    given (columns TIME, AMT, DURATION), which keep contributing by superposition.
    """
    past = history if history is not None else pd.DataFrame({"TIME": [], "AMT": [], "DURATION": []})
    n_new = max(r.doses for r in regimens)
    m = len(past) + n_new
    R = len(regimens)
    t_dose, amt, dur, inf = np.zeros((R, m)), np.zeros((R, m)), np.ones((R, m)), np.zeros((R, m))
    times = np.zeros((R, grid))
    for i, r in enumerate(regimens):
        k = len(past)
        t_dose[i, :k], amt[i, :k] = past["TIME"].to_numpy(float), past["AMT"].to_numpy(float)
        d_past = past["DURATION"].to_numpy(float)
        dur[i, :k], inf[i, :k] = np.where(d_past > 0, d_past, 1.0), (d_past > 0).astype(float)
        new = start + r.interval * np.arange(r.doses)
        t_dose[i, k : k + r.doses], amt[i, k : k + r.doses] = new, r.amount
        if r.duration > 0:
            dur[i, k : k + r.doses], inf[i, k : k + r.doses] = r.duration, 1.0
        # the last interval, from the last dose to just before the next one would be due
        times[i] = new[-1] + np.linspace(0.0, r.interval, grid)
    step = np.array([r.interval for r in regimens])[:, None] / (grid - 1)
    theta = {p: np.asarray(v, float) for p, v in theta.items()}
    out = _metrics(family)(theta, times, t_dose, amt, dur, inf, step)
    return {k: np.asarray(v) for k, v in out.items()}


_JITTED: dict = {}


def _metrics(family):
    """The jitted metric computation for ``family`` (compiled once per family configuration)."""
    key = repr(sorted(family.config().items()))
    if key not in _JITTED:

        def metrics(theta, times, t_dose, amt, dur, inf, step):
            th = {p: v[None, :, None, None] for p, v in theta.items()}  # (1, S, 1, 1)
            t = times[:, None, :, None]  # (R, 1, G, 1)

            def arr(a):
                return a[:, None, None, :]  # (R, 1, 1, M)

            conc = family.concentration(jnp, th, t, arr(t_dose), arr(amt), arr(dur), arr(inf)).sum(-1)
            auc = step * (conc[..., 1:] + conc[..., :-1]).sum(-1) / 2.0  # (R, S)
            return {"trough": conc[..., -1], "peak": conc.max(-1), "auc": auc}

        _JITTED[key] = jax.jit(metrics)
    return _JITTED[key]


def dose_search(
    twin,
    regimens: Sequence[Regimen],
    *,
    target: tuple[float, float],
    metric: str = "trough",
    limit: float | None = None,
    max_toxic: float = 0.1,
    start: float | None = None,
    patient: str | None = None,
) -> pd.DataFrame:
    """Evaluate ``regimens`` for one PK twin and recommend one.

    Parameters
    ----------
    twin
        A PK :class:`~bayestwin.twin.Twin` (``patient`` picks one if it holds several).
    target
        (low, high) window for ``metric`` ("trough", "peak" or "auc") over the last interval.
    limit, max_toxic
        Toxicity: P(peak > ``limit``) must not exceed ``max_toxic`` for a recommendation.
    start
        When the first new dose is given (default: the patient's last recorded event).

    Returns
    -------
    DataFrame, one row per regimen: the regimen, the posterior mean and 90% interval of the
    metric, P(target), P(toxic) and ``recommended`` (the feasible regimen with the highest
    P(target); none if no regimen is feasible).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
    lo, hi = target
    if not lo < hi:
        raise ValueError(f"target must be (low, high) with low < high, not {target!r}")
    if not regimens:
        raise ValueError("no regimens given")
    fam = twin.population.family
    patient = patient or twin.patients[0]
    if patient not in twin.patients:
        raise ValueError(f"patient {patient!r} is not in this twin")
    post = twin.posterior.sel(patient=patient)
    theta = {n.removeprefix("patient_"): post[n].to_numpy().ravel() for n in fam.patient_outputs}
    if "v" not in theta and "ke" in theta:  # rate parameterisation
        theta["v"] = theta["cl"] / theta["ke"]
    events = twin.cohort
    history = events.doses()
    history = history[history["ID"] == patient]
    if start is None:
        start = float(events.frame.loc[events.frame["ID"] == patient, "TIME"].max())
    values = evaluate_regimens(fam, theta, regimens, start=start, history=history)
    x = values[metric]
    p_target = ((x >= lo) & (x <= hi)).mean(1)
    p_toxic = (values["peak"] > limit).mean(1) if limit is not None else np.zeros(len(regimens))
    table = pd.DataFrame(
        {
            "regimen": [r.label for r in regimens],
            "amount": [r.amount for r in regimens],
            "interval": [r.interval for r in regimens],
            "duration": [r.duration for r in regimens],
            f"{metric}_mean": x.mean(1),
            f"{metric}_q05": np.quantile(x, 0.05, axis=1),
            f"{metric}_q95": np.quantile(x, 0.95, axis=1),
            "P(target)": p_target,
            "P(toxic)": p_toxic,
        }
    )
    feasible = p_toxic <= max_toxic
    table["recommended"] = False
    if feasible.any():
        best = int(np.argmax(np.where(feasible, p_target, -1.0)))
        table.loc[best, "recommended"] = True
    return table
