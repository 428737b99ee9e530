"""Command line: ``bayestwin demo`` and friends. ``bayestwin --help`` lists every command."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
    import warnings

    import numpy as np
    import pandas as pd

    import bayestwin as bt
    from bayestwin.families.progression import simulate

    warnings.simplefilter("ignore", FutureWarning)
    say = print if not args.quiet else (lambda *a, **k: None)
    key = bt.new_key()
    therapies = ["standard", "drug_a", "drug_b"]
    t_start = time.perf_counter()
    df, _ = simulate(n_patients=args.patients, therapies=therapies, seed=args.seed)
    cohort = bt.Cohort(df, covariates=["age", "sex"], therapies=therapies, key=key)
    say(f"1. Simulated cohort: {cohort}")
    say("2. Fitting the population model (PyMC model, JAX NUTS via numpyro) ...")
    pop = bt.fit(cohort, draws=args.draws, tune=args.draws, seed=args.seed, progressbar=sys.stderr.isatty())
    say(f"   population fit: {pop.verdict}")
    say(pop.summary()[["mean", "sd", "eti89_lb", "eti89_ub", "r_hat", "ess_bulk"]].to_string())

    new, truth = simulate(n_patients=1, therapies=therapies, seed=args.seed + 1000)
    new = new[new.time <= 6.0]  # three visits so far, on standard care
    new["therapy"] = "standard"
    say(f"\n3. New patient with {len(new)} visits (times {list(new.time)}), conditioning its twin ...")
    twin = pop.condition(new, key=key, seed=args.seed)
    say(f"   twin: {twin.verdict}")
    horizon = 18.0
    fc = twin.predict(therapies=therapies, times=np.linspace(6.0, horizon, 5))
    table = fc.summary("observation")
    table = table[table.time == horizon][["therapy", "mean", "q05", "median", "q95"]]
    best = fc.prob_best(time=horizon, direction="lower").iloc[0]
    table["P(best)"] = table.therapy.map(best)
    cross = fc.prob_cross(threshold=float(new.outcome.iloc[0]) + 10, by=horizon).iloc[0]
    table["P(+10 by T)"] = table.therapy.map(cross)
    say(f"\n4. Forecast at t = {horizon:g} if each therapy starts now (lower outcome is better):")
    say(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    verdict_ok = pop.verdict.converged and twin.verdict.converged
    say(f"\nConvergence verdict: {'PASS' if verdict_ok else 'FAIL'} (population: {pop.verdict}; twin: {twin.verdict})")
    say(f"Total time {time.perf_counter() - t_start:.1f} s")
    pd.set_option("display.width", 120)
    return 0 if verdict_ok else 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayestwin",
        description="Patient digital twins: population fit -> posterior twin -> per-therapy forecast.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="simulate a 3-therapy cohort, fit it, condition a new patient, print the forecast table",
        description="Simulate a cohort with 3 therapies, fit the progression model, condition a new patient "
        "with 3 visits, and print a per-therapy forecast with uncertainty, P(best) and the convergence verdict. "
        "Exits 2 if a convergence check fails.",
    )
    demo.add_argument("--patients", type=int, default=60, help="cohort size (default 60)")
    demo.add_argument("--draws", type=int, default=1000, help="draws (and tuning steps) per chain (default 1000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--quiet", action="store_true", help="print nothing; exit status only")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
