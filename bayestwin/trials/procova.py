"""Prognostic covariate adjustment with digital twins (PROCOVA; Schuler et al. 2021, qualified by
the EMA in 2022).

Each trial patient's *prognostic score* is their twin's forecast of the endpoint under the control
therapy, made from baseline data only (the baseline visit and covariates): the population
posterior conditioned on that one visit (:meth:`~bayestwin.population.Population.condition`,
importance path, all patients in one batch), then the posterior mean of the predicted change
from baseline at the endpoint visit. The score enters the ANCOVA as a covariate. Since it is
computed before randomisation it cannot bias the effect estimate; it removes the outcome variance
it predicts. With ρ the correlation of score and outcome, the variance of the effect estimate
shrinks by the factor 1 - ρ² against the unadjusted analysis (1 - ρ²_partial, the partial
correlation given baseline, against ANCOVA on baseline), and the sample size for a given power
by the same factor.

The simulation: a pool of virtual patients (population parameters at their posterior mean)
with both potential outcomes and their twin-made score; each simulated trial draws its patients
from the pool (without replacement) and randomises them; every analysis is run on the same
trials, so their variances are compared on common random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
import pandas as pd

from bayestwin.data.cohort import OUTCOME, PATIENT, TIME
from bayestwin.data.pseudonym import pseudonymise
from bayestwin.trials import analysis as an
from bayestwin.trials.design import TrialDesign
from bayestwin.trials.simulate import covariate_pool, rate
from bayestwin.trials.virtual import population_draws, simulate_arrays

ANALYSES = {
    "unadjusted": (),
    "prognostic score": ("score",),
    "baseline": ("baseline",),
    "baseline + prognostic score": ("baseline", "score"),
}


@dataclass
class ProcovaResult:
    """What prognostic adjustment buys, measured on simulated trials and predicted in closed form.

    ``table``: per analysis, the variance of the effect estimate across trials (with a
    batch-means SE), its ratio to the reference analysis, the closed-form ratio, power and the
    sample size needed for the reference analysis' power (n x ratio). ``pool``: the virtual
    patients with baseline, score and outcomes. ``rho``: corr(score, change under control);
    ``rho_partial``: the same given the baseline.
    """

    table: pd.DataFrame
    pool: pd.DataFrame
    rho: float
    rho_partial: float
    trials: pd.DataFrame

    def __repr__(self) -> str:
        cols = ["analysis", "variance", "ratio", "predicted ratio", "power", "MC SE"]
        return f"PROCOVA: rho = {self.rho:.3f}, partial rho given baseline = {self.rho_partial:.3f}\n" + self.table[
            cols
        ].to_string(index=False, float_format=lambda x: f"{x:.4f}")


def prognostic_scores(population, rows: pd.DataFrame, *, control, horizon: float, key, seed: int = 0) -> pd.Series:
    """Each patient's twin-predicted change from baseline (their last row) under ``control`` at
    ``horizon``, from the rows given (run-in and baseline visits): posterior mean, by pseudonym."""
    twin = population.condition(rows, key=key, method="importance", seed=seed, draws=500, chains=2, proposals=1000)
    start = float(twin.cohort.frame[TIME].max())
    fc = twin.predict(therapies=[control], times=[horizon], start=start, seed=seed)
    pred = fc.draws["mean"].mean(("chain", "draw")).sel(therapy=control).isel(time=0).to_series()
    base = twin.cohort.frame.groupby(PATIENT)[OUTCOME].last()
    return pred - base.reindex(pred.index)


def procova(
    population,
    design: TrialDesign,
    *,
    pool: int = 1000,
    trials: int = 2000,
    seed: int = 0,
    covariates=None,
    parameters=None,
    key: bytes = b"bayestwin-procova-virtual",
) -> ProcovaResult:
    """Measure the PROCOVA variance reduction and sample-size saving for ``design`` (progression
    family, change-from-baseline endpoint), against the closed-form 1 - ρ².

    ``pool`` virtual patients get a twin each (the cost: ~``pool`` / 100 s on 2 cores);
    ``trials`` trials of ``design.n_total`` patients are drawn from them. ``parameters``: an
    assumed effect (see :func:`~bayestwin.trials.virtual.population_draws`); the twins always
    condition on the fitted population.
    """
    if design.endpoint != "change":
        raise ValueError("procova() needs a change-from-baseline endpoint (design.endpoint = 'change')")
    if pool < design.n_total:
        raise ValueError(f"pool ({pool}) must be at least the trial size ({design.n_total})")
    schema = population.schema
    visits = np.asarray(design.visits)
    labels, scenario = population.family.scenario_arrays(
        [design.control, design.treatment], visits, schema, start=design.randomisation, before=design.control
    )
    draws = population_draws(population, 1, seed=seed, uncertainty="mean", parameters=parameters)
    cov_table, arrays = covariate_pool(population, covariates, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9C]))
    rows_idx = rng.integers(0, len(next(iter(arrays.values()))), pool)
    pat = {k: v[rows_idx][None] for k, v in arrays.items()}
    _, obs = simulate_arrays(population, draws, np.array([0]), pat, scenario, seed)
    obs = obs[0]  # (pool, 2, V)
    b = design.baseline_index
    run_in = obs[:, 0, : b + 1]  # run-in and baseline visits, before randomisation (control)
    y0 = run_in[:, -1]
    change = obs[:, :, -1] - y0[:, None]  # (pool, 2): potential outcomes under control, treatment

    # baseline rows for the twins: the one visit, its covariates, on the control therapy
    cov_table = cov_table.iloc[rows_idx].reset_index(drop=True)
    ids = [f"virtual-{i:06d}" for i in range(pool)]
    c = population.columns
    rows = pd.DataFrame(
        {
            c.patient: np.repeat(ids, b + 1),
            c.time: np.tile(visits[: b + 1], pool),
            c.outcome: run_in.ravel(),
            c.therapy: design.control,
        }
    )
    for name in schema.covariates:
        rows[name] = np.repeat(cov_table[name].to_numpy(), b + 1)
    score_by = prognostic_scores(
        population, rows, control=design.control, horizon=float(visits[-1]), key=key, seed=seed
    )
    score = score_by.reindex([pseudonymise(i, key) for i in ids]).to_numpy()

    table = pd.DataFrame(
        {
            "patient": ids,
            "baseline": y0,
            "score": score,
            "change_control": change[:, 0],
            "change_treatment": change[:, 1],
        }
    )
    rho = float(np.corrcoef(score, change[:, 0])[0, 1])
    rho_partial = _partial_corr(score, change[:, 0], y0)

    # trials: draw n_total pool patients without replacement, first n_per_arm to control
    N, nc = design.n_total, design.n_per_arm
    keys = jax.random.split(jax.random.key(seed + 7), trials)
    pick = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, pool)[:N])(keys))
    arm = (np.arange(N) >= nc).astype(int)
    armB = np.broadcast_to(arm, pick.shape)
    out = np.where(armB == 1, change[pick, 1], change[pick, 0])
    keep = np.ones_like(out, bool)
    covs = {"baseline": y0[pick], "score": score[pick]}
    rule = {"alpha": design.alpha, "delta": design.delta, "threshold": design.threshold}
    per_trial, rows_out = {}, []
    for name, terms in ANALYSES.items():
        beta, se, df, _ = an.ols(out, an.design_matrix(armB, *(covs[t] for t in terms)), keep)
        dec = an.t_decision(beta[:, 1], se[:, 1], df, direction=design.direction, **rule)
        success = dec["bayes_success"] if design.decision == "bayesian" else dec["reject"]
        per_trial[name] = beta[:, 1]
        p, p_se = rate(success)
        rows_out.append(
            {
                "analysis": name,
                "variance": float(np.var(beta[:, 1], ddof=1)),
                "power": p,
                "MC SE": p_se,
                "mean SE": float(np.nanmean(se[:, 1])),
            }
        )
    res = pd.DataFrame(rows_out)
    var = dict(zip(res["analysis"], res["variance"], strict=True))
    ref = {
        "unadjusted": "unadjusted",
        "prognostic score": "unadjusted",
        "baseline": "baseline",
        "baseline + prognostic score": "baseline",
    }
    res["reference"] = res["analysis"].map(ref)
    res["ratio"] = [var[a] / var[ref[a]] for a in res["analysis"]]
    res["ratio SE"] = [_ratio_se(per_trial[a], per_trial[ref[a]]) for a in res["analysis"]]
    pred_ratio = {
        "unadjusted": 1.0,
        "prognostic score": 1 - rho**2,
        "baseline": 1.0,
        "baseline + prognostic score": 1 - rho_partial**2,
    }
    res["predicted ratio"] = res["analysis"].map(pred_ratio)
    res["n_per_arm for the reference's power"] = np.ceil(design.n_per_arm * res["ratio"]).astype(int)
    trials_df = pd.DataFrame(per_trial)
    return ProcovaResult(table=res, pool=table, rho=rho, rho_partial=rho_partial, trials=trials_df)


def _partial_corr(x, y, z) -> float:
    """corr(x, y | z) from the residuals of linear regressions on z."""
    Z = np.column_stack([np.ones_like(z), z])
    rx = x - Z @ np.linalg.lstsq(Z, x, rcond=None)[0]
    ry = y - Z @ np.linalg.lstsq(Z, y, rcond=None)[0]
    return float(np.corrcoef(rx, ry)[0, 1])


def _ratio_se(a: np.ndarray, b: np.ndarray, groups: int = 20) -> float:
    """Batch-means SE of var(a) / var(b) over trials (the two share trials)."""
    parts = [
        np.var(x, ddof=1) / np.var(y, ddof=1)
        for x, y in zip(np.array_split(a, groups), np.array_split(b, groups), strict=True)
    ]
    return float(np.std(parts, ddof=1) / np.sqrt(groups))
