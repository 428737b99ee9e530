"""An in-silico adaptive dosing trial: twin-guided precision dosing against fixed dosing.

Virtual patients (PK family) are drawn from the population model with known true parameters
(:meth:`~bayestwin.population.Population.draw_patients`). Treatment runs in ``cycles`` cycles,
each ``cycle_doses`` doses long.

- **Fixed arm**: the standard regimen throughout.
- **Adaptive arm**: the standard regimen in the first cycle; at the end of each cycle the levels
  measured in it (``samples`` hours after the cycle's last dose, with the model's residual
  error, below ``lloq`` reported as BLQ) are added to the patient's record, the twin is
  conditioned on everything so far (all patients at once, importance path), and
  :func:`~bayestwin.dosing.dose_search` chooses the next cycle's regimen among ``candidates``
  (the feasible one with the highest P(target); if none is feasible, the one with the lowest
  P(toxic)).

The true concentration of every patient in both arms is then followed on a fine grid over the
whole treatment: the percentage of time in the therapeutic window ``target`` (after the first
cycle, when the arms can first differ, and overall), and the rate of toxic exposure (the true
concentration exceeding ``limit`` at any time after the first cycle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bayestwin.dosing import Regimen, dose_search


@dataclass
class AdaptiveResult:
    """``table``: per arm, % time in the window (mean and SE), toxic-exposure rate (and SE),
    % of end-of-treatment troughs in the window. ``patients``: one row per patient and arm.
    ``choices``: the adaptive arm's regimen per patient and cycle."""

    table: pd.DataFrame
    patients: pd.DataFrame
    choices: pd.DataFrame

    def __repr__(self) -> str:
        return "Adaptive dosing trial\n" + self.table.to_string(index=False, float_format=lambda x: f"{x:.3f}")


def _conc(family, theta: dict, t: np.ndarray, doses: pd.DataFrame, ids) -> np.ndarray:
    """True concentrations (patients, len(t)) by superposition of each patient's doses."""
    per = [doses[doses["ID"] == i] for i in ids]
    m = max(len(d) for d in per)
    t_dose, amt = np.zeros((len(ids), m)), np.zeros((len(ids), m))
    for k, d in enumerate(per):
        t_dose[k, : len(d)], amt[k, : len(d)] = d["TIME"], d["AMT"]
    th = {p: v[:, None, None] for p, v in theta.items()}
    return family.concentration(np, th, t[None, :, None], t_dose[:, None, :], amt[:, None, :], 1.0, 0.0).sum(-1)


def adaptive_dosing_trial(
    population,
    n: int,
    *,
    standard: Regimen,
    candidates,
    target: tuple[float, float],
    limit: float,
    cycles: int = 3,
    cycle_doses: int = 2,
    samples=(2.0,),
    metric: str = "trough",
    max_toxic: float = 0.1,
    lloq: float = 0.05,
    covariates: pd.DataFrame | None = None,
    seed: int = 0,
    key: bytes = b"bayestwin-adaptive-dosing",
    grid: int = 24,
) -> AdaptiveResult:
    """Run the trial on ``n`` virtual patients per arm (the same patients in both arms: a paired
    comparison). See the module docstring; ``samples``: sampling times after the last dose of a
    cycle (the default, 2 h, is near the peak; add ``standard.interval - 0.5`` for a trough).
    Candidate regimens and the standard one must share the dosing interval."""
    fam = population.family
    if not hasattr(fam, "concentration"):
        raise ValueError("adaptive_dosing_trial needs a PK population")
    tau = standard.interval
    if any(r.interval != tau for r in candidates):
        raise ValueError("candidate regimens must share the standard regimen's dosing interval")
    if cycles < 2:
        raise ValueError("cycles must be >= 2 (the first cycle is always standard dosing)")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xAD]))
    ids = np.arange(1, n + 1)
    cycle_len = cycle_doses * tau
    first = pd.DataFrame({"ID": ids, "TIME": 0.0, "AMT": standard.amount, "DV": np.nan, "EVID": 1})
    if covariates is None:
        covariates = population.cohort_covariates()
    cov = (
        covariates.iloc[rng.integers(0, len(covariates), n)].reset_index(drop=True) if len(covariates.columns) else None
    )
    if cov is not None:
        first = pd.concat([first, cov], axis=1)
    truth = population.draw_patients(first, key=key, seed=seed)
    theta = {p.removeprefix("patient_"): truth[p].to_numpy() for p in fam.patient_outputs}
    if "v" not in theta and "ke" in theta:
        theta["v"] = theta["cl"] / theta["ke"]
    s_add = truth["sigma_add"].to_numpy() if "sigma_add" in truth else np.zeros(n)
    s_prop = truth["sigma_prop"].to_numpy() if "sigma_prop" in truth else np.zeros(n)

    def cycle_doses_of(amounts, c):
        t = c * cycle_len + tau * np.arange(cycle_doses)
        return pd.DataFrame(
            {"ID": np.repeat(ids, cycle_doses), "TIME": np.tile(t, n), "AMT": np.repeat(amounts, cycle_doses)}
        )

    fixed = pd.concat([cycle_doses_of(np.full(n, standard.amount), c) for c in range(cycles)], ignore_index=True)
    adaptive = [cycle_doses_of(np.full(n, standard.amount), 0)]
    levels = []
    choices = [pd.DataFrame({"ID": ids, "cycle": 0, "regimen": standard.label, "amount": standard.amount})]
    base_cols = list(cov.columns) if cov is not None else []
    for c in range(1, cycles):
        doses = pd.concat(adaptive, ignore_index=True)
        t_s = (c - 1) * cycle_len + (cycle_doses - 1) * tau + np.asarray(samples, float)
        conc = _conc(fam, theta, t_s, doses, ids)
        sd = np.hypot(s_add[:, None], s_prop[:, None] * conc)
        dv = conc + sd * rng.standard_normal(conc.shape)
        levels.append(pd.DataFrame({"ID": np.repeat(ids, len(t_s)), "TIME": np.tile(t_s, n), "DV": dv.ravel()}))
        obs = pd.concat(levels, ignore_index=True)
        blq = obs["DV"] < lloq
        obs = obs.assign(AMT=0.0, EVID=0, BLQ=blq.astype(int), LLOQ=lloq, DV=obs["DV"].where(~blq))
        rows = pd.concat([doses.assign(DV=np.nan, EVID=1, BLQ=0, LLOQ=lloq), obs], ignore_index=True)
        if cov is not None:
            rows = rows.merge(pd.concat([pd.Series(ids, name="ID"), cov], axis=1), on="ID")
        rows = rows.sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
        twin = population.condition(
            rows[["ID", "TIME", "AMT", "DV", "EVID", "BLQ", "LLOQ", *base_cols]],
            key=key,
            method="importance",
            seed=seed + c,
        )
        plans = [Regimen(r.amount, tau, doses=cycle_doses, duration=r.duration) for r in candidates]
        table = dose_search(
            twin, plans, target=target, metric=metric, limit=limit, max_toxic=max_toxic, start=c * cycle_len
        )
        amount = _choose(table).reindex([_pseudo(i, key) for i in ids]).to_numpy()
        choices.append(
            pd.DataFrame(
                {"ID": ids, "cycle": c, "regimen": [f"{a:g} every {tau:g} h" for a in amount], "amount": amount}
            )
        )
        adaptive.append(cycle_doses_of(amount, c))

    t_end = cycles * cycle_len
    t = np.linspace(0.0, t_end, cycles * cycle_doses * grid + 1)
    after = t >= cycle_len
    lo, hi = target
    rows_out, per_patient = [], []
    for arm, doses in (("fixed", fixed), ("adaptive", pd.concat(adaptive, ignore_index=True))):
        conc = _conc(fam, theta, t, doses, ids)
        inside = (conc >= lo) & (conc <= hi)
        frac_after = inside[:, after].mean(1)
        toxic = (conc[:, after] > limit).any(1)
        trough = _conc(fam, theta, np.array([t_end]), doses, ids)[:, 0]
        per_patient.append(
            pd.DataFrame(
                {
                    "ID": ids,
                    "arm": arm,
                    "time_in_window": frac_after,
                    "time_in_window_all": inside.mean(1),
                    "toxic": toxic,
                    "final_trough": trough,
                }
            )
        )
        rows_out.append(
            {
                "arm": arm,
                "% time in window (after cycle 1)": 100 * frac_after.mean(),
                "SE": 100 * frac_after.std(ddof=1) / np.sqrt(n),
                "% time in window (all)": 100 * inside.mean(),
                "toxic exposure rate": toxic.mean(),
                "toxic SE": np.sqrt(max(toxic.mean() * (1 - toxic.mean()), 1 / n**2) / n),
                "% final troughs in window": 100 * ((trough >= lo) & (trough <= hi)).mean(),
                "patients": n,
            }
        )
    return AdaptiveResult(
        table=pd.DataFrame(rows_out),
        patients=pd.concat(per_patient, ignore_index=True),
        choices=pd.concat(choices, ignore_index=True),
    )


def _pseudo(i, key):
    from bayestwin.data.pseudonym import pseudonymise

    return pseudonymise(i, key)


def _choose(table: pd.DataFrame) -> pd.Series:
    """Amount per patient: the recommended regimen, else the one least likely to be toxic."""
    rec = table[table["recommended"]].set_index("patient")["amount"]
    fallback = table.sort_values(["P(toxic)", "amount"]).groupby("patient")["amount"].first()
    return rec.reindex(fallback.index).fillna(fallback)
