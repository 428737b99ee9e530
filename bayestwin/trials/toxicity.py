"""An in-silico toxicity-guided dosing trial: PK/PD twins against body-surface-area dosing.

Virtual patients are drawn from a PK/PD population (the ODE family, e.g. the Friberg
myelosuppression model with drug levels and neutrophil counts) with known true parameters
(:meth:`~bayestwin.population.Population.draw_patients`) and a body-surface area (BSA). Each
arm gives one infusion per cycle at the cycle's start for ``cycles`` cycles, and measures the
outputs in ``samples`` (hours after each cycle's start, with the model's residual error).

- **BSA arm**: ``dose_per_m2`` x BSA, reduced to ``reduction`` of the dose for the following
  cycles each time a measured count of ``constraint``'s output falls below ``reduce_below`` (the
  usual label rule after grade-4 neutropenia).
- **Twin arm**: the BSA dose in the first cycle; at the end of each cycle the twin is conditioned
  on everything measured so far (all patients at once) and
  :func:`~bayestwin.dosing.outcome_search` chooses the next dose among ``candidates``: the one
  most likely to meet ``target`` among those whose risk of ``constraint`` stays at most its
  bound (if none is recommended, the one with the lowest risk).

The truth of every patient in both arms is then followed on a fine grid: per cycle the true
nadir (grade >= 3 neutropenia: nadir below ``constraint``'s ``high``; grade 4: below
``reduce_below``) and the true value of ``target``'s metric (in its window or not). The first
cycle is the same in both arms; the table reports the cycles after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from bayestwin.data.pseudonym import pseudonymise
from bayestwin.dosing import Outcome, Regimen, outcome_search, outcome_values


@dataclass
class ToxicityResult:
    """``table``: per arm, over the cycles after the first: mean dose, rate of grade >= 3 and
    grade 4 toxicity (with SEs, per patient-cycle), % of cycles with the target metric in its
    window. ``cycles``: one row per patient, arm and cycle (dose, true metric, true nadir).
    ``bsa``: each virtual patient's body-surface area. ``measurements``: what each arm measured
    (observation records with ``arm``), on which its dose changes were decided."""

    table: pd.DataFrame
    cycles: pd.DataFrame
    bsa: pd.Series
    measurements: pd.DataFrame

    def __repr__(self) -> str:
        return "Toxicity-guided dosing trial\n" + self.table.to_string(index=False, float_format=lambda x: f"{x:.3f}")


def cycle_grid(cycle: float, duration: float = 1.0) -> np.ndarray:
    """Times (from a cycle's start) on which a cycle's AUC and nadir are computed: every 0.05 h
    over the first day (a drug eliminated at 3.6/h is gone within hours; the trapezoid's error
    there is below 0.3%), then every 2 h."""
    early = np.arange(0.0, min(24.0, cycle) + 1e-9, 0.05)
    late = np.arange(early[-1], cycle + 1e-9, 2.0)
    return np.unique(np.r_[early, late, duration, cycle])


def true_paths(family, theta: Mapping, doses: np.ndarray, duration: float, times: np.ndarray) -> dict:
    """Each output's true course (patients, len(times)) under ``doses`` = ``(t_dose, amt)``, a
    pair of arrays (patients, doses), each dose an infusion of ``duration``."""
    from bayestwin.families.pk_ode import predict_outputs

    model = family.ode
    t_dose, amt = (jnp.asarray(a, float) for a in doses)
    B, T = t_dose.shape[0], len(times)
    th = jnp.stack([jnp.asarray(theta[p], float) for p in model.parameters], axis=1)
    out = {}
    for k, name in enumerate(model.outputs):
        values = predict_outputs(
            model,
            th,
            t_dose,
            amt,
            jnp.full(t_dose.shape, model.default_state),
            jnp.full(t_dose.shape, float(duration)),
            jnp.broadcast_to(jnp.asarray(times, float), (B, T)),
            jnp.repeat(jnp.arange(B), T),
            jnp.tile(jnp.arange(T), B),
            jnp.full(B * T, k),
            rtol=1e-8,
            atol=1e-11,
            max_steps=20_000,
        )
        out[name] = np.asarray(values).reshape(B, T)
    return out


def toxicity_dosing_trial(
    population,
    n: int,
    *,
    dose_per_m2: float,
    candidates: Sequence[float],
    target: Outcome,
    constraint: tuple[Outcome, float],
    cycles: int = 3,
    cycle: float = 504.0,
    duration: float = 1.0,
    samples: Mapping[str, Sequence[float]] | None = None,
    bsa: tuple[float, float] = (1.8, 0.2),
    reduce_below: float = 0.5,
    reduction: float = 0.75,
    draws: int = 500,
    tune: int | None = None,
    chains: int = 4,
    seed: int = 0,
    key: bytes = b"bayestwin-toxicity-trial",
) -> ToxicityResult:
    """Run the trial on ``n`` virtual patients (the same patients in both arms: a paired
    comparison); see the module docstring. ``target``: e.g. ``Outcome("conc", "auc", 80, 120)``;
    ``constraint``: e.g. ``(Outcome("anc", "nadir", high=1.0), 0.2)``; ``samples``: {output:
    hours after each cycle's start} (default: levels at 0.5, 1, 2, 4 h, counts at 0, 168, 240,
    336 h); ``bsa``: mean and SD of the patients' BSA (m², kept within 1.2-2.6); ``draws``,
    ``tune``, ``chains``: each twin's NUTS settings (``tune`` default: the family's)."""
    from bayestwin.families.pk_ode import Ode

    fam = population.family
    if not isinstance(fam, Ode):
        raise ValueError("toxicity_dosing_trial needs a PK/PD population of the ODE family (bt.Ode)")
    if population.schema.covariates:
        raise ValueError("toxicity_dosing_trial draws patients without covariates; this population has some")
    con, bound = constraint
    observed = set(fam.observations.values())
    for o in (target, con):
        if o.output not in observed:
            raise ValueError(f"{o.output!r} is not an observed output of this population ({sorted(observed)})")
    if cycles < 2:
        raise ValueError("cycles must be >= 2 (the first cycle is the same in both arms)")
    candidates = sorted(float(a) for a in candidates)
    if not candidates or candidates[0] <= 0:
        raise ValueError("candidates are positive dose amounts")
    samples = dict(samples or {"conc": (0.5, 1.0, 2.0, 4.0), "anc": (0.0, 168.0, 240.0, 336.0)})
    cmt = {out: c for c, out in fam.observations.items()}
    for out in samples:
        if out not in cmt:
            raise ValueError(f"samples: {out!r} is not an observed output ({sorted(observed)})")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x70C]))
    ids = np.arange(1, n + 1)
    area = np.clip(rng.normal(bsa[0], bsa[1], n), 1.2, 2.6)
    first = pd.DataFrame({"ID": ids, "TIME": 0.0, "AMT": dose_per_m2 * area, "DV": np.nan, "EVID": 1})
    first["RATE"] = first["AMT"] / duration
    truth = population.draw_patients(first, key=key, seed=seed)
    theta = {p: truth[f"patient_{p}"].to_numpy() for p in fam.parameters}
    residual = {r: jnp.asarray(truth[r].to_numpy()) for r in fam.residual_params}
    grid = cycle_grid(cycle, duration)

    def measure(doses, c, k):
        """The measurements of cycle ``c`` (a DataFrame of observation records)."""
        rows = []
        for j, (out, hours) in enumerate(samples.items()):
            t = c * cycle + np.asarray(hours, float)
            f = true_paths(fam, theta, doses, duration, t)[out]
            y = np.asarray(
                fam.observe(jax.random.key(seed * 1000 + 10 * k + j), jnp.asarray(f), _by_patient(residual), output=out)
            )
            rows.append(
                pd.DataFrame(
                    {
                        "ID": np.repeat(ids, len(t)),
                        "TIME": np.tile(t, n),
                        "DV": np.maximum(y, 1e-6).ravel(),
                        "CMT": cmt[out],
                    }
                )
            )
        return pd.concat(rows, ignore_index=True).assign(AMT=0.0, EVID=0, RATE=0.0)

    def dose_rows(doses):
        t, a = doses
        return pd.DataFrame(
            {"ID": np.repeat(ids, t.shape[1]), "TIME": t.ravel(), "AMT": a.ravel(), "DV": np.nan, "EVID": 1, "CMT": 0}
        ).assign(RATE=lambda d: d["AMT"] / duration)

    start_dose = dose_per_m2 * area
    arms = {"BSA": [start_dose], "twin": [start_dose]}
    observations = {"BSA": [], "twin": []}
    for c in range(1, cycles):
        for arm in arms:
            doses = _schedule(arms[arm], cycle)
            observations[arm].append(measure(doses, c - 1, 2 * c + (arm == "twin")))
        # BSA: the label's reduction after a measured count below reduce_below in the last cycle
        low = observations["BSA"][-1]
        low = low[low["CMT"] == cmt[con.output]].groupby("ID")["DV"].min().reindex(ids).to_numpy() < reduce_below
        arms["BSA"].append(np.where(low, arms["BSA"][-1] * reduction, arms["BSA"][-1]))
        # twin: condition on everything so far, then judge the candidates for the next cycle
        rows = pd.concat([dose_rows(_schedule(arms["twin"], cycle)), *observations["twin"]], ignore_index=True)
        rows = rows.sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
        twin = population.condition(
            rows[["ID", "TIME", "AMT", "DV", "EVID", "CMT", "RATE"]],
            key=key,
            draws=draws,
            tune=tune,
            chains=chains,
            method="nuts",
            seed=seed + c,
        )
        plans = [Regimen(a, cycle, doses=1, duration=duration) for a in candidates]
        table = outcome_search(
            twin, plans, times=c * cycle + grid, target=target, constraints=[constraint], start=c * cycle, seed=seed
        )
        amount = {r.label: r.amount for r in plans}
        chosen = _choose(table.assign(amount=table["regimen"].map(amount)), f"P({con.label})")
        arms["twin"].append(chosen.reindex([pseudonymise(i, key) for i in ids]).to_numpy())

    out = []
    for arm, amounts in arms.items():
        doses = _schedule(amounts, cycle)
        for c in range(cycles):
            t = c * cycle + grid
            paths = true_paths(fam, theta, doses, duration, t)
            metric = outcome_values(paths[target.output][:, None, None, :], t, target.metric)[:, 0, 0]
            nadir = paths[con.output].min(axis=1)
            out.append(
                pd.DataFrame(
                    {
                        "ID": ids,
                        "arm": arm,
                        "cycle": c + 1,
                        "dose": amounts[c],
                        "metric": metric,
                        "in_window": (metric >= target.low) & (metric <= target.high),
                        "nadir": nadir,
                        "grade3": nadir < con.high,
                        "grade4": nadir < reduce_below,
                    }
                )
            )
    per_cycle = pd.concat(out, ignore_index=True)
    later = per_cycle[per_cycle["cycle"] > 1]
    rows = []
    for arm, g in later.groupby("arm", sort=False):
        m = len(g)
        rows.append(
            {
                "arm": arm,
                "mean dose": g["dose"].mean(),
                "grade>=3 rate": g["grade3"].mean(),
                "SE": np.sqrt(max(g["grade3"].mean() * (1 - g["grade3"].mean()), 1 / m**2) / m),
                "grade 4 rate": g["grade4"].mean(),
                f"% cycles {target.metric} in window": 100 * g["in_window"].mean(),
                "patient-cycles": m,
            }
        )
    measured = pd.concat([m.assign(arm=arm) for arm, ms in observations.items() for m in ms], ignore_index=True)
    return ToxicityResult(pd.DataFrame(rows), per_cycle, pd.Series(area, index=ids, name="BSA"), measured)


def _schedule(amounts: list, cycle: float) -> tuple[np.ndarray, np.ndarray]:
    """(t_dose, amt), each (patients, cycles so far): one dose at each cycle's start."""
    amt = np.stack(amounts, axis=1).astype(float)
    return np.broadcast_to(cycle * np.arange(amt.shape[1]), amt.shape).copy(), amt


def _by_patient(residual: dict) -> dict:
    return {k: v[:, None] for k, v in residual.items()}


def _choose(table: pd.DataFrame, risk: str) -> pd.Series:
    """Amount per patient: the recommended regimen, else the one least likely to break the
    constraint (column ``risk``; the lower dose on ties)."""
    rec = table[table["recommended"]].set_index("patient")["amount"]
    fallback = table.sort_values([risk, "amount"]).groupby("patient")["amount"].first()
    return rec.reindex(fallback.index).fillna(fallback)
