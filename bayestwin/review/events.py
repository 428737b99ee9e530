"""Calibration and discrimination of predicted event risks (time-to-event families).

* :func:`kaplan_meier`: the product-limit estimate of survival at given times, with Greenwood's
  variance (pure numpy).
* :func:`concordance`: Harrell's C, the probability that of two comparable patients the one
  with the higher predicted risk has the event first.
* :func:`event_calibration`: held-out patients are conditioned on at baseline (twins with no
  follow-up), their predicted risk of an event by each horizon under the therapy they received
  is compared with the Kaplan–Meier risk observed in groups of predicted risk (time-dependent
  calibration, as in Royston & Altman 2013), and Harrell's C of the predicted risk is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


def kaplan_meier(time, event, at) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan–Meier survival at times ``at`` and its standard error (Greenwood).

    ``time``: follow-up per patient (event or censoring), ``event``: 1 for an event.
    """
    time, event = np.asarray(time, float), np.asarray(event, float)
    order = np.argsort(time, kind="stable")
    t, d = time[order], event[order]
    uniq = np.unique(t[d > 0])
    at_risk = np.array([(t >= u).sum() for u in uniq], float)
    deaths = np.array([d[t == u].sum() for u in uniq], float)
    s = np.cumprod(1.0 - deaths / at_risk)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.cumsum(deaths / (at_risk * (at_risk - deaths)))
    idx = np.searchsorted(uniq, np.asarray(at, float), side="right") - 1
    surv = np.where(idx >= 0, s[np.maximum(idx, 0)] if len(s) else 1.0, 1.0)
    var = np.where(idx >= 0, g[np.maximum(idx, 0)] if len(g) else 0.0, 0.0)
    return surv, surv * np.sqrt(var)


def concordance(time, event, risk) -> float:
    """Harrell's C: among pairs where the patient with the shorter time had an event, the share
    in which that patient's predicted ``risk`` is higher (ties in risk count one half)."""
    time, event, risk = (np.asarray(a, float) for a in (time, event, risk))
    earlier = (time[:, None] < time[None, :]) & (event[:, None] > 0)  # i had the event before j's time
    higher = (risk[:, None] > risk[None, :]) + 0.5 * (risk[:, None] == risk[None, :])
    return float((higher * earlier).sum() / earlier.sum())


@dataclass
class EventCalibration:
    """Predicted against observed event risk by horizon and risk group, and Harrell's C.

    ``table``: one row per (horizon, group): patients, mean predicted risk, Kaplan–Meier
    observed risk with its 95% interval (Greenwood, on the risk scale), and whether the
    prediction lies inside it. ``c_index``: per horizon, Harrell's C of the predicted risk.
    ``predicted``: each held-out patient's predicted risk per horizon.
    """

    table: pd.DataFrame
    c_index: pd.Series
    predicted: pd.DataFrame

    def plot(self, ax=None):
        """Observed (Kaplan–Meier, 95% interval) against predicted risk, one colour per horizon."""
        import matplotlib.pyplot as plt

        ax = ax or plt.subplots(figsize=(5, 5))[1]
        for h, g in self.table.groupby("horizon"):
            ax.errorbar(
                g["predicted"],
                g["observed"],
                yerr=[g["observed"] - g["observed_lo"], g["observed_hi"] - g["observed"]],
                fmt="o",
                capsize=3,
                label=f"by {h:g} (C = {self.c_index[h]:.3f})",
            )
        ax.plot([0, 1], [0, 1], color="k", lw=1)
        ax.set(xlabel="predicted risk", ylabel="observed risk (Kaplan–Meier)", xlim=(0, 1), ylim=(0, 1))
        ax.set_title("time-dependent calibration, held-out patients")
        ax.legend()
        return ax

    def __repr__(self) -> str:
        inside = int(self.table["inside"].sum())
        cs = ", ".join(f"{h:g}: {c:.3f}" for h, c in self.c_index.items())
        return f"EventCalibration({inside} of {len(self.table)} groups inside their 95% KM interval; C-index {cs})"


def event_calibration(
    population,
    rows: pd.DataFrame,
    *,
    key,
    horizons: Sequence[float],
    groups: int = 3,
    seed: int = 0,
) -> EventCalibration:
    """Time-dependent calibration and concordance on held-out patients (see module docstring).

    ``rows``: the held-out patients' table in the fitting table's columns, one row per patient
    (their follow-up and outcome are used only to score the predictions). Each patient's
    predicted risk by each horizon comes from a twin conditioned on the baseline covariates
    alone, under the therapy the patient received. Patients are split into ``groups`` equal
    groups of predicted risk per horizon.
    """
    c = population.columns
    cohort = population.cohort(rows, key=key)
    frame = cohort.frame
    if frame["patient"].duplicated().any():
        raise ValueError("event_calibration takes one row (one at-risk interval from time 0) per patient")
    base_cols = [c.patient, *population.schema.covariates]
    baseline = rows[base_cols].drop_duplicates(c.patient)
    twin = population.condition(rows.iloc[:0], key=key, baseline=baseline, method="importance", seed=seed)
    horizons = sorted(float(h) for h in horizons)
    fc = twin.predict(times=np.array([0.0, *horizons]), start=0.0)
    own = frame.set_index("patient").loc[twin.patients]
    risk = np.stack([fc.risk(h)["mean"].unstack("therapy").loc[twin.patients] for h in horizons])  # (H, n, K)
    therapy_idx = [list(fc.survival.therapy.values).index(t) for t in own["therapy"]]
    pred = risk[:, np.arange(len(therapy_idx)), therapy_idx]  # (H, n)
    time, event = own["time"].to_numpy(float), own["outcome"].to_numpy(float)
    out, cidx = [], {}
    for h, p in zip(horizons, pred, strict=True):
        cidx[h] = concordance(time, event, p)
        bins = pd.qcut(p, groups, labels=False, duplicates="drop")
        for g in np.unique(bins):
            sel = bins == g
            s, se = kaplan_meier(time[sel], event[sel], [h])
            obs = 1.0 - s[0]
            lo, hi = max(0.0, obs - 1.96 * se[0]), min(1.0, obs + 1.96 * se[0])
            mean = float(p[sel].mean())
            out.append(
                {
                    "horizon": h,
                    "group": int(g) + 1,
                    "patients": int(sel.sum()),
                    "predicted": mean,
                    "observed": obs,
                    "observed_lo": lo,
                    "observed_hi": hi,
                    "inside": lo <= mean <= hi,
                }
            )
    predicted = pd.DataFrame(pred.T, index=pd.Index(twin.patients, name="patient"), columns=horizons)
    return EventCalibration(pd.DataFrame(out), pd.Series(cidx, name="c_index"), predicted)
