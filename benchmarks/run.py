"""Benchmarks for the core engine (issue 2). One command, prints a table:

    .venv/bin/python benchmarks/run.py            # full: 1,000 twins, 5-patient loop, fit vs nutpie
    .venv/bin/python benchmarks/run.py --quick    # smaller, for a smoke check

(a) twins per second: the batched engine (one vectorised JAX program, 4 chains x 1000 draws per
    patient) vs a Python loop of ``pm.sample(nuts_sampler="numpyro")`` on the *same* twin
    posterior, one patient at a time (timed on a few patients, extrapolated; first call excluded
    as compile).
(b) population fit: minimum bulk ESS per second, bayestwin.fit (numpyro, vectorised chains,
    block-dense metric; and with the diagonal metric pm.sample would use) vs
    ``pm.sample(nuts_sampler="nutpie")`` on the same model and data, wall time including compile,
    averaged over a few seeds (one run's minimum ESS is itself noisy).
Needs the bench extra for nutpie: ``.venv/bin/pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

warnings.simplefilter("ignore")

import arviz_stats as azs  # noqa: E402
import pymc as pm  # noqa: E402

import bayestwin as bt  # noqa: E402
from bayestwin.engine import condition as cond  # noqa: E402
from bayestwin.engine.compile import twin_pymc_model  # noqa: E402
from bayestwin.families.progression import simulate  # noqa: E402
from bayestwin.review.convergence import Thresholds  # noqa: E402

KEY = b"benchmark-key-0123456"
THERAPIES = ["standard", "drug_a", "drug_b"]


def min_ess(idata, names) -> float:
    ess = azs.ess(idata.posterior.to_dataset()[names], sample_dims=["chain", "draw"], method="bulk")
    return float(min(float(ess[n].min()) for n in names))


def pm_sample(model, sampler: str, draws: int, tune: int, seed: int):
    """The peers' way: ``pm.sample`` with an external NUTS sampler, 4 chains, quiet."""
    with model:
        return pm.sample(
            draws=draws,
            tune=tune,
            chains=4,
            nuts_sampler=sampler,
            progressbar=False,
            random_seed=seed,
            compute_convergence_checks=False,
        )


def bench_twins(pop, n_patients: int, n_loop: int, draws: int, tune: int, chunk: int | None) -> list[tuple]:
    new, _ = simulate(n_patients=n_patients, therapies=THERAPIES, seed=123)
    new = new[new.time <= 6.0]
    warm = new[new.patient.isin(new.patient.unique()[:64])]  # several chunks: compiles on both cores
    rows, rate = [], {}
    for method in ("nuts", "importance"):
        t0 = time.perf_counter()
        pop.condition(warm, key=KEY, draws=draws, tune=tune, method=method, chunk=chunk)
        compile_s = time.perf_counter() - t0
        if method == "importance":  # compile the NUTS fallback too (k̂ limit below any k̂: 8 twins forced)
            forced = warm[warm.patient.isin(warm.patient.unique()[:8])]
            pop.condition(forced, key=KEY, draws=draws, tune=tune, method=method, thresholds=Thresholds(khat=-1))
        t0 = time.perf_counter()
        twin = pop.condition(new, key=KEY, draws=draws, tune=tune, seed=1, method=method, chunk=chunk)
        warm_s = time.perf_counter() - t0
        rate[method] = n_patients / warm_s
        table = twin.verdict.table
        label = "NUTS" if method == "nuts" else "importance (Laplace-t + PSIS, NUTS fallback)"
        rows += [
            (f"{method}: compile + first 64 twins, s", compile_s, "once per model and shape"),
            (f"twins/s, batched {label}", n_patients / warm_s, f"{warm_s:.1f} s for {n_patients}"),
            (
                f"{method}: twins passing the gate",
                float(table["converged"].mean()),
                f"max R-hat {table.rhat.max():.4f}, min ESS_bulk {table.ess_bulk.min():.0f}",
            ),
        ]
        if method == "importance":
            rows.append(
                (
                    "importance: twins redone by NUTS (k̂ > 0.7 etc.)",
                    float((table["method"] == "nuts").mean()),
                    f"median k̂ {table.khat.median():.2f}",
                )
            )

    if not n_loop:
        return rows
    # Baseline: the same posterior, one pm.sample per patient.
    cohort = pop.cohort(new, key=KEY)
    design = pop.family.design(cohort.frame, cohort.baseline, pop.schema)
    data, mask = cond.pad(design.data, cohort.patients, 8, pop.family)
    prog, ap = pop.program(8), pop.approx
    times = []
    for i in range(n_loop + 1):
        one = {k: v[i] for k, v in data.items()}
        model = twin_pymc_model(prog, np.asarray(ap.mean), np.asarray(ap.chol), one, mask[i])
        t0 = time.perf_counter()
        pm_sample(model, "numpyro", draws, tune, seed=i)
        times.append(time.perf_counter() - t0)
    loop_rate = 1.0 / np.mean(times[1:])  # first call compiles
    rows += [
        (f"twins/s, pm.sample loop (mean of {n_loop}, warm)", loop_rate, f"first call {times[0]:.1f} s"),
        ("speed-up, batched NUTS / loop", rate["nuts"] / loop_rate, "target >= 150"),
        ("speed-up, importance path / loop", rate["importance"] / loop_rate, "target >= 150"),
    ]
    return rows


def _nutpie(model, draws: int, seed: int):
    for attempt in range(5):  # nutpie sometimes fails to find a finite jittered start
        try:
            return pm_sample(model, "nutpie", draws, draws, seed=seed + 100 * attempt)
        except RuntimeError as err:
            print(f"nutpie seed {seed + 100 * attempt}: {str(err).splitlines()[0]}; retrying with another seed")
    raise RuntimeError("nutpie failed 5 times")


def bench_fit(cohort, draws: int, seeds: int) -> list[tuple]:
    """Min bulk ESS per second (wall time incl. compile) over ``seeds`` seeds, per sampler."""
    try:
        import nutpie  # noqa: F401
    except ImportError:
        nutpie = None
    runs = {"block": [], "diag": [], "nutpie": []}
    pop = None
    for seed in range(seeds):
        for mass in ("block", "diag"):
            t0 = time.perf_counter()
            fitted = bt.fit(cohort, draws=draws, tune=draws, seed=seed, mass=mass)
            wall = time.perf_counter() - t0
            steps = float(fitted.idata.sample_stats["n_steps"].mean())
            runs[mass].append((wall, min_ess(fitted.idata, fitted.population_vars), steps))
            pop = pop or fitted
        if nutpie is not None:
            t0 = time.perf_counter()
            ref = _nutpie(pop.model(cohort), draws, seed)
            wall = time.perf_counter() - t0
            runs["nutpie"].append((wall, min_ess(ref, pop.population_vars), float(ref.sample_stats["n_steps"].mean())))
    label = {
        "block": "bayestwin.fit (numpyro, block-dense metric)",
        "diag": "bayestwin.fit(mass='diag') (as pm.sample)",
        "nutpie": "pm.sample(nuts_sampler='nutpie')",
    }
    rows, rate = [], {}
    for name, r in runs.items():
        if not r:
            continue
        wall, ess, steps = (np.array(x) for x in zip(*r, strict=True))
        rate[name] = ess / wall
        rows.append(
            (
                f"fit min ESS_bulk/s, {label[name]}",
                float(rate[name].mean()),
                f"mean of {len(r)} seeds: wall {wall.mean():.1f} s, min ESS {ess.mean():.0f}, "
                f"{steps.mean():.0f} steps/draw; per seed {', '.join(f'{x:.1f}' for x in rate[name])}",
            )
        )
    if "nutpie" in rate:
        per_seed = rate["block"] / rate["nutpie"]
        rows.append(
            (
                "ratio ESS/s bayestwin / nutpie",
                float(rate["block"].mean() / rate["nutpie"].mean()),
                f"per seed {', '.join(f'{x:.2f}' for x in per_seed)}; target >= 1.0",
            )
        )
    return rows, pop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--loop", type=int, default=5)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--tune", type=int, default=500)
    ap.add_argument(
        "--chunk", type=int, default=None, help="patients per compiled call (default: NUTS 4, importance 32)"
    )
    ap.add_argument("--no-fit", action="store_true", help="skip the population-fit comparison")
    ap.add_argument("--fit-seeds", type=int, default=3, help="seeds for the population-fit comparison")
    ap.add_argument("--quick", action="store_true", help="100 twins, 2-patient loop")
    args = ap.parse_args()
    if args.quick:
        args.patients, args.loop, args.fit_seeds = 100, 2, 1
    df, _ = simulate(n_patients=60, therapies=THERAPIES, seed=0)
    cohort = bt.Cohort(df, covariates=["age", "sex"], therapies=THERAPIES, key=KEY)
    if args.no_fit:
        fit_rows, pop = [], bt.fit(cohort, draws=1000, tune=1000, seed=0)
    else:
        fit_rows, pop = bench_fit(cohort, 1000, args.fit_seeds)
    twin_rows = bench_twins(pop, args.patients, args.loop, args.draws, args.tune, args.chunk)
    import jax

    print(
        f"\nbayestwin benchmarks on {os.cpu_count()} CPU core(s), devices {jax.devices()[0].platform} "
        f"x{jax.local_device_count()}, jax {jax.__version__}; "
        f"{args.patients} twins, 4 chains x {args.draws} draws ({args.tune} tuning) per twin\n"
    )
    print(f"{'measure':<66} {'value':>12}  note")
    print("-" * 104)
    for name, value, note in twin_rows + fit_rows:
        print(f"{name:<66} {value:>12.3f}  {note}")


if __name__ == "__main__":
    main()
