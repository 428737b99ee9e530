"""Simulated trials and their operating characteristics: power, type-I error, sample size, assurance.

Each simulated trial is one replicate of a virtual cohort (:mod:`bayestwin.trials.virtual`):
its own population parameters (fixed at the posterior mean for power, drawn from the posterior
for assurance), ``n_total`` new patients with covariates resampled from a pool, both arms'
trajectories at the visits, one arm per patient (the first ``n_per_arm`` patients are the
control arm; patients are exchangeable, so this is a randomisation), the baseline measured
before treatment, dropout, and the analysis of :mod:`bayestwin.trials.analysis`. A batch of
trials is one vectorised JAX program plus one vectorised analysis; batches can be spread over
a Dask cluster and streamed to disk (:func:`bayestwin.engine.batches.map_batches`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
import pandas as pd

from bayestwin.engine.batches import map_batches
from bayestwin.errors import require_whole
from bayestwin.trials import analysis as an
from bayestwin.trials.design import TrialDesign
from bayestwin.trials.virtual import (
    draw_covariates,
    patient_bucket,
    population_draws,
    replicate_keys,
    simulate_arrays,
)

#: Size of the covariate pool drawn once when covariates are given as distributions.
POOL = 100_000


def covariate_pool(population, covariates, seed: int) -> tuple[pd.DataFrame, dict]:
    """The covariate table trials resample from, and the family's arrays for it: the fitting
    cohort (default), a given table, or ``POOL`` draws from given distributions."""
    if covariates is None:
        covariates = population.cohort_covariates()
    if isinstance(covariates, pd.DataFrame):
        draw_covariates(population, 1, covariates, rng=np.random.default_rng(0))  # validates the table
        table = covariates[population.schema.covariates].reset_index(drop=True)
    else:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0]))
        table = draw_covariates(population, POOL, covariates, rng=rng)
    arrays = population.family.covariate_arrays(table, population.schema)
    return table, {k: np.asarray(v) for k, v in arrays.items()}


def simulate_trials(
    population,
    design: TrialDesign,
    trials: int = 1000,
    *,
    seed: int = 0,
    uncertainty: str = "mean",
    parameters: Mapping | None = None,
    null: bool = False,
    covariates=None,
    batch: int = 2000,
    client=None,
    out=None,
) -> pd.DataFrame:
    """Simulate and analyse ``trials`` trials of ``design``: one row per trial.

    Parameters
    ----------
    uncertainty
        ``"mean"``: every trial at the posterior mean of the population parameters (power at
        fixed assumptions); ``"posterior"``: each trial with its own posterior draw (assurance).
    parameters
        Population parameters to fix, e.g. an assumed effect ``{"therapy_slope": {"drug_a": -0.5}}``.
    null
        Remove the treatment effect: the treatment arm gets the control therapy (type-I error).
    batch, client, out
        Trials per vectorised batch; a ``dask.distributed`` client to spread batches over;
        a folder to stream each batch's rows to (Parquet; a rerun resumes). See
        :func:`bayestwin.engine.batches.map_batches`.

    Returns
    -------
    DataFrame: trial, estimate (treatment - control; a difference of rates for a responder
    endpoint, of log exposure for PK), se, p_value (one-sided), reject, prob_benefit (posterior
    P(benefit > delta)), bayes_success, success (by ``design.decision``), n_analysed.
    """
    arms = [design.control, design.control if null else design.treatment]
    labels, scenario = population.family.scenario_arrays(
        arms, np.asarray(design.visits), population.schema, start=design.randomisation, before=design.control
    )
    draws = population_draws(population, trials, seed=seed, uncertainty=uncertainty, parameters=parameters)
    _, pool = covariate_pool(population, covariates, seed)

    def run(lo: int, hi: int) -> pd.DataFrame:
        idx = np.arange(lo, hi)
        trial = simulate_batch(population, design, draws, idx, pool, scenario, seed)
        return analyse(design, trial, seed=seed, first=lo)

    fingerprint = {
        "design": design.to_dict(),
        "seed": seed,
        "uncertainty": uncertainty,
        "parameters": repr(dict(parameters or {})),
        "null": null,
        "family": population.family.config(),
    }
    return map_batches(run, trials, batch, client=client, out=out, name="trials", fingerprint=fingerprint)


def simulate_batch(population, design: TrialDesign, draws, idx: np.ndarray, pool: dict, scenario: dict, seed: int):
    """The data of trials ``idx``: outcome at each visit (B, N, V) of the patient's own arm,
    the mean trajectory, arm (N,) and the last visit attended (B, N)."""
    N, nc = design.n_total, design.n_per_arm
    n_pool = len(next(iter(pool.values())))
    keys = replicate_keys(seed + 1, idx)
    slots = patient_bucket(N)  # one program per bucket of trial sizes; the first N draws are the same
    rows = np.asarray(jax.vmap(lambda k: jax.random.randint(k, (slots,), 0, n_pool))(keys))[:, :N]
    pat = {k: v[rows] for k, v in pool.items()}
    mean, obs = simulate_arrays(population, draws, idx, pat, scenario, seed)  # (B, N, 2, V)
    arm = (np.arange(N) >= nc).astype(int)
    y = np.where(arm[None, :, None] == 1, obs[:, :, 1, :], obs[:, :, 0, :])
    mu = np.where(arm[None, :, None] == 1, mean[:, :, 1, :], mean[:, :, 0, :])
    b = design.baseline_index
    y[:, :, : b + 1] = obs[:, :, 0, : b + 1]  # run-in and baseline: measured before randomisation
    visits = np.asarray(design.visits)
    if design.dropout > 0:
        rate = -np.log1p(-design.dropout) / (visits[-1] - visits[b])
        u = jax.vmap(lambda k: jax.random.uniform(k, (slots,), minval=1e-12))(replicate_keys(seed + 2, idx))
        u = np.asarray(u)[:, :N]
        leave = visits[b] - np.log(u) / rate
        last = (visits[None, None, :] <= leave[..., None]).sum(-1) - 1  # index of the last visit attended
        last = np.maximum(last, b)
    else:
        last = np.full((len(idx), N), len(visits) - 1)
    return {"y": y, "mean": mu, "arm": arm, "last": last}


def analyse(design: TrialDesign, trial: dict, *, seed: int = 0, first: int = 0) -> pd.DataFrame:
    """Analyse a batch of simulated trials (see :func:`simulate_batch`) by ``design``'s rule."""
    y, arm, last = trial["y"], trial["arm"], trial["last"]
    B, N, V = y.shape
    b = design.baseline_index
    arms = np.broadcast_to(arm, (B, N))
    if design.missing == "complete":
        keep = last == V - 1
        end = y[:, :, -1]
    else:
        keep = np.ones((B, N), bool)
        end = np.take_along_axis(y, last[..., None], axis=2)[..., 0]
    rule = {"alpha": design.alpha, "delta": design.delta, "threshold": design.threshold}
    if design.endpoint == "exposure":
        mu = np.maximum(trial["mean"], 1e-12)
        t = np.asarray(design.visits)[b:]
        mu = mu[..., b:]
        metric = {
            "auc": ((mu[..., 1:] + mu[..., :-1]) / 2 * np.diff(t)).sum(-1),
            "cmax": mu.max(-1),
            "ctrough": mu[..., -1],
        }[design.metric]
        out_y = np.log(metric)
        beta, se, df, _ = an.ols(out_y, an.design_matrix(arms), keep)
        res = {
            "estimate": beta[:, 1],
            "se": se[:, 1],
            **an.t_decision(beta[:, 1], se[:, 1], df, direction=design.direction, **rule),
        }
    else:
        change = end - y[:, :, b]
        if design.endpoint == "responder":
            sign = -1.0 if design.direction == "lower" else 1.0
            resp = (sign * change >= sign * design.responder_threshold).astype(float)
            rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB7, first]))
            res = an.two_proportions(resp, arms, keep, rng=rng, **rule)
        else:
            extra = (y[:, :, b],) if design.analysis == "ancova" else ()
            extra += tuple(trial.get("covariates", ()))
            beta, se, df, _ = an.ols(change, an.design_matrix(arms, *extra), keep)
            res = {
                "estimate": beta[:, 1],
                "se": se[:, 1],
                **an.t_decision(beta[:, 1], se[:, 1], df, direction=design.direction, **rule),
            }
    df = pd.DataFrame(res)
    df.insert(0, "trial", np.arange(first, first + B))
    df["success"] = df["bayes_success"] if design.decision == "bayesian" else df["reject"]
    df["n_analysed"] = keep.sum(1)
    return df


def rate(x) -> tuple[float, float]:
    """A proportion and its Monte-Carlo (binomial) standard error."""
    x = np.asarray(x, float)
    p = float(x.mean())
    return p, float(np.sqrt(max(p * (1 - p), 1.0 / len(x) ** 2) / len(x)))


def summarise(df: pd.DataFrame, scenario: str, measure: str) -> dict:
    p, se = rate(df["success"])
    pf, _ = rate(df["reject"])
    pb, _ = rate(df["bayes_success"])
    return {
        "scenario": scenario,
        "measure": measure,
        "P(success)": p,
        "MC SE": se,
        "P(reject, frequentist)": pf,
        "P(success, Bayesian)": pb,
        "mean estimate": float(df["estimate"].mean()),
        "mean SE": float(df["se"].mean()),
        "mean analysed": float(df["n_analysed"].mean()),
        "trials": len(df),
    }


def operating_characteristics(
    population,
    design: TrialDesign,
    trials: int = 2000,
    *,
    seed: int = 0,
    parameters: Mapping | None = None,
    assurance: bool = True,
    **kwargs,
) -> pd.DataFrame:
    """Power (at the posterior mean, or at ``parameters``), type-I error (effect removed) and
    assurance (power averaged over the population posterior), each with its Monte-Carlo SE.

    ``kwargs`` go to :func:`simulate_trials` (covariates, batch, client, out; an ``out`` folder
    gets one subfolder per scenario).
    """
    out = kwargs.pop("out", None)
    sub = (lambda name: None) if out is None else (lambda name: f"{out}/{name}")
    rows = []
    alt = simulate_trials(population, design, trials, seed=seed, parameters=parameters, out=sub("power"), **kwargs)
    rows.append(summarise(alt, "effect as fitted" if not parameters else f"effect {dict(parameters)}", "power"))
    null = simulate_trials(population, design, trials, seed=seed + 1, null=True, out=sub("null"), **kwargs)
    rows.append(summarise(null, "no effect", "type-I error"))
    if assurance:
        post = simulate_trials(
            population, design, trials, seed=seed + 2, uncertainty="posterior", out=sub("assurance"), **kwargs
        )
        rows.append(summarise(post, "population posterior", "assurance"))
    return pd.DataFrame(rows)


def power(population, design: TrialDesign, trials: int = 1000, **kwargs) -> tuple[float, float]:
    """P(success) of ``design`` and its Monte-Carlo SE (see :func:`simulate_trials`)."""
    return rate(simulate_trials(population, design, trials, **kwargs)["success"])


def sample_size(
    population,
    design: TrialDesign,
    *,
    target: float = 0.8,
    trials: int = 1000,
    n_min: int = 4,
    n_max: int = 5000,
    seed: int = 0,
    **kwargs,
) -> tuple[int, pd.DataFrame]:
    """The smallest ``n_per_arm`` whose simulated P(success) reaches ``target``.

    Doubling from ``n_min`` until the target is reached, then bisection; every candidate uses
    the same seed (common random numbers), so the power curve is smooth in n. Returns (n, the
    table of every n evaluated with its power and MC SE). Raises if ``n_max`` is not enough.
    """
    require_whole("n_min", n_min, 2)
    require_whole("n_max", n_max, n_min)
    seen: dict[int, tuple[float, float]] = {}

    def at(n: int) -> float:
        if n not in seen:
            seen[n] = power(population, design.with_n(n), trials, seed=seed, **kwargs)
        return seen[n][0]

    lo, hi = n_min, n_min
    while at(hi) < target:
        lo, hi = hi, hi * 2
        if hi > n_max:
            if at(n_max) < target:
                raise ValueError(f"power {seen[n_max][0]:.3f} < {target} even at n_per_arm = {n_max}")
            hi = n_max
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid) < target else (lo, mid)
    n = hi if at(hi) >= target else lo
    table = pd.DataFrame(
        [
            {"n_per_arm": k, "n_total": design.with_n(k).n_total, "power": v[0], "MC SE": v[1]}
            for k, v in sorted(seen.items())
        ]
    )
    return n, table


__all__ = ["analyse", "operating_characteristics", "power", "sample_size", "simulate_trials"]
