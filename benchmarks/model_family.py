"""A user's own PyMC model against the built-in family it re-implements (issue 19). One command:

    .venv/bin/python benchmarks/model_family.py            # 60-patient cohort, 256 twins
    .venv/bin/python benchmarks/model_family.py --quick    # 64 twins

The progression model written as a plain PyMC function (:func:`bayestwin.families.glmm.linear_growth`,
centred MvNormal patient effects) is fitted with ``bt.Model`` to the same simulated cohort as the
built-in ``bt.Progression`` (with its priors made the same), then both condition the same new
patients (first 3 visits). Prints twins per second (compile excluded: the second call of each
compiled program is timed) for the NUTS and importance paths, their ratio (target: the user
model within 1.5x of the built-in), and how far the two families' twins are apart (patient level
and slope: mean |Δmean| / posterior SD).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

warnings.simplefilter("ignore")

import bayestwin as bt  # noqa: E402
from bayestwin.families.glmm import linear_growth  # noqa: E402
from bayestwin.families.progression import simulate  # noqa: E402

KEY = b"benchmark-key-0123456"
THERAPIES = ["standard", "drug_a", "drug_b"]
P = bt.Prior


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=256)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_new = 64 if args.quick else args.patients
    df, _ = simulate(n_patients=60 + n_new, therapies=THERAPIES, seed=21)
    ids = df.patient.unique()
    train, new = df[df.patient.isin(ids[:60])], df[df.patient.isin(ids[60:]) & (df.time <= 6.0)]
    cohort = bt.Cohort(train, covariates=["age", "sex"], therapies=THERAPIES, key=KEY)
    same = {  # the built-in family with linear_growth's priors
        "intercept": P("Normal", mu=0.0, sigma=100.0),
        "slope": P("Normal", mu=0.0, sigma=10.0),
        "beta_level": P("Normal", mu=0.0, sigma=10.0),
        "beta_slope": P("Normal", mu=0.0, sigma=1.0),
        "therapy_slope": P("Normal", mu=0.0, sigma=1.0),
        "re_sd": P("Gamma", alpha=2.0, beta=np.array([0.2, 2.0])),
        "sigma": P("HalfNormal", sigma=10.0),
        "re_corr_eta": 2.0,
    }
    families = {"built-in Progression": bt.Progression(priors=same), "bt.Model(linear_growth)": bt.Model(linear_growth)}
    rows, twins = [], {}
    for label, fam in families.items():
        t0 = time.perf_counter()
        pop = bt.fit(cohort, fam, seed=1, progressbar=False)
        fit_s = time.perf_counter() - t0
        for method in ("importance", "nuts"):
            pop.condition(new, key=KEY, method=method)  # compile
            t0 = time.perf_counter()
            tw = pop.condition(new, key=KEY, method=method, seed=1)
            dt = time.perf_counter() - t0
            twins[(label, method)] = tw
            rows.append(
                (label, method, fit_s, pop.verdict.converged, n_new / dt, int(tw.verdict.table["converged"].sum()))
            )
    print(f"\n{n_new} new patients (3 visits each); twins of 4 chains x 1000 draws\n")
    print(f"{'family':26s} {'method':11s} {'fit s':>7s} {'fit ok':>7s} {'twins/s':>9s} {'converged':>10s}")
    for label, method, fit_s, ok, rate, conv in rows:
        print(f"{label:26s} {method:11s} {fit_s:7.1f} {ok!s:>7s} {rate:9.1f} {conv:>6d}/{n_new}")
    for method in ("importance", "nuts"):
        a, b = (r[4] for r in rows if r[1] == method)
        print(f"{method}: user model / built-in twins per second = {b / a:.2f}")
        ref, user = (
            twins[("built-in Progression", method)].posterior,
            twins[("bt.Model(linear_growth)", method)].posterior,
        )
        for k, (rn, un) in enumerate([("patient_intercept", "theta"), ("patient_slope", "theta")]):
            r = ref[rn]
            u = user[un].isel(effect=k)
            d = (np.abs(u.mean(["chain", "draw"]) - r.mean(["chain", "draw"])) / r.std(["chain", "draw"])).to_numpy()
            print(f"  {rn}: |Δmean| / SD between the two families' twins: mean {d.mean():.3f}, max {d.max():.3f}")


if __name__ == "__main__":
    main()
