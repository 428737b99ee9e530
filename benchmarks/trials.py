"""Virtual-cohort and trial-simulation benchmark (issue 5). One command:

    .venv/bin/python benchmarks/trials.py

Fits a progression population (60 simulated patients), then times (warm, after one call with
the same shapes compiled the program):

1. 1,000,000 virtual patients x 3 therapies x 20 time points (``virtual_cohort``: 10 replicates of
   100,000, each with its own population draw), against a plain NumPy loop over patients and
   ``pm.sample_posterior_predictive`` on the same PyMC model for the same population draws
   (both measured on fewer patients and reported as a rate);
2. 10,000 simulated trials x 300 patients analysed by ANCOVA (``simulate_trials``).

Prints a table and the ratios; targets: (1) < 10 s, (2) < 30 s on 2 CPU cores.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd


def main() -> None:
    warnings.simplefilter("ignore")
    import pymc as pm

    import bayestwin as bt
    from bayestwin.families.base import Design
    from bayestwin.families.progression import simulate
    from bayestwin.trials import TrialDesign, simulate_trials, virtual_cohort

    therapies = ["standard", "drug_a", "drug_b"]
    df, _ = simulate(n_patients=60, therapies=therapies, seed=0)
    pop = bt.fit(bt.Cohort(df, covariates=["age", "sex"], therapies=therapies, key=bt.new_key()), seed=0)
    times = np.linspace(0, 12, 20)
    rows = []

    # 1. virtual cohort
    t0 = time.perf_counter()
    virtual_cohort(pop, 100_000, times=times, replicates=10, seed=0)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    vc = virtual_cohort(pop, 100_000, times=times, replicates=10, seed=1)
    warm = time.perf_counter() - t0
    points = vc["observation"].size
    rows.append(("virtual cohort, 1,000,000 patients x 3 therapies x 20 times (warm)", warm, points / warm))
    rows.append(("  same, first call (compile included)", cold, points / cold))
    del vc

    # NumPy loop over patients (same model: a + b t + therapy effect x time on therapy, + noise)
    post = pop.posterior.mean(("chain", "draw"))
    L = post.re_chol.values
    chol = np.array([[L[0], 0.0], [L[1], L[2]]])
    eff = np.concatenate([[0.0], post.therapy_slope.values])
    rng = np.random.default_rng(0)
    n_loop = 20_000
    X = rng.normal(size=(n_loop, 2))
    t0 = time.perf_counter()
    for i in range(n_loop):
        u = chol @ rng.standard_normal(2)
        a = float(post.intercept) + X[i] @ post.beta_level.values + u[0]
        b = float(post.slope) + X[i] @ post.beta_slope.values + u[1]
        for k in range(3):
            mu = a + (b + eff[k]) * times
            _ = mu + float(post.sigma) * rng.standard_normal(len(times))
    t_loop = time.perf_counter() - t0
    rows.append((f"plain NumPy loop over patients ({n_loop:,} patients)", t_loop, n_loop * 60 / t_loop))

    # pm.sample_posterior_predictive: the family's PyMC model for n patients x 20 times on one
    # therapy, 10 population draws (z resampled from its prior, as for new patients)
    n_pp, draws = 2_000, 10
    fam, schema = pop.family, pop.schema
    pats = [f"v{i}" for i in range(n_pp)]
    tt = np.tile(times, n_pp)
    k = len(therapies) - 1
    data = {
        "X": np.zeros((n_pp, 2)),
        "patient_idx": np.repeat(np.arange(n_pp), len(times)),
        "time": tt,
        "exposure": np.zeros((len(tt), k)),
        "on_therapy": np.zeros((len(tt), k)),
        "y_obs": np.zeros(len(tt)),
    }
    model = fam.build_model(Design(patients=pats, data=data), schema)
    pvars = [v for v in ("intercept", "slope", "beta_level", "beta_slope", "therapy_slope", "re_chol", "sigma")]
    trace = pop.posterior[pvars].isel(chain=[0], draw=slice(0, draws))
    with model:
        t0 = time.perf_counter()
        pm.sample_posterior_predictive(trace, var_names=["y", "z"], progressbar=False, random_seed=0)
        t_pp = time.perf_counter() - t0
    rows.append(
        (
            f"pm.sample_posterior_predictive ({n_pp:,} patients x {draws} draws, 1 therapy)",
            t_pp,
            n_pp * draws * 20 / t_pp,
        )
    )

    # 2. 10,000 trials x 300 patients, ANCOVA
    design = TrialDesign("standard", "drug_a", n_per_arm=150, visits=(0, 6, 12), dropout=0.1)
    simulate_trials(pop, design, 2000, seed=0, batch=2000)  # compile
    t0 = time.perf_counter()
    res = simulate_trials(pop, design, 10_000, seed=1, batch=2000)
    t_trials = time.perf_counter() - t0
    rows.append(("10,000 trials x 300 patients, simulated + ANCOVA", t_trials, 10_000 / t_trials))

    table = pd.DataFrame(rows, columns=["task", "wall s", "rate (points/s; trials/s)"])
    pd.set_option("display.width", 160)
    print(table.to_string(index=False, float_format=lambda x: f"{x:,.2f}"))
    r_vc = rows[0][2]
    print(
        f"\nvirtual cohort vs NumPy loop: {r_vc / rows[2][2]:,.0f}x; "
        f"vs pm.sample_posterior_predictive: {r_vc / rows[3][2]:,.0f}x"
    )
    print(
        f"targets: 1M patients < 10 s: {'met' if warm < 10 else 'MISSED'} ({warm:.1f} s); "
        f"10,000 trials < 30 s: {'met' if t_trials < 30 else 'MISSED'} ({t_trials:.1f} s); "
        f"power {res['success'].mean():.3f}"
    )


if __name__ == "__main__":
    main()
