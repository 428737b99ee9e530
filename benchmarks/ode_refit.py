"""ODE twins are right: a twin matches a full refit, and population fits recover the truth.

    .venv/bin/python benchmarks/ode_refit.py                 # both parts
    .venv/bin/python benchmarks/ode_refit.py --part refit    # or --part recovery [--reps 8] [--first 8]

The model is the ODE family's ``one_compartment`` (oral, first-order absorption, proportional
error, diagonal between-subject variability; fits at target_accept 0.95), solved by diffrax
inside the sampler, on studies simulated by the closed-form family's ``simulate`` (one 100 mg
dose, levels at 0.5-12 h, combined error: 0.05 mg/L + 10%).

- **refit**: a population fitted on 16 subjects; a 17th subject's twin from her first 4 hours
  (NUTS) against a full refit of all 17 (each 4 chains x 2,500 draws after 1,000 warmup steps).
  Per patient parameter: |Δmean| / reference SD (tolerance 0.1) and the SD ratio (0.9-1.1),
  with the Monte-Carlo SE of the difference, as ``tests/engine/test_refit_agreement.py`` judges
  the closed-form families (too long for the test suite: an ODE fit costs ~10x per step).
- **recovery**: ``--reps`` simulated studies of 16 subjects, each fitted (4 x (400 + 400)); per
  population parameter (typical values and BSV SDs), how often the truth lies in the
  90% central posterior interval (goal: >= 85% of all parameter-replicates).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

KEY = b"benchmark-ode-refit-key-0001"
TRUTH = {"cl": 2.0, "v": 30.0, "ka": 1.2, "bsv": (0.3, 0.2, 0.4), "sigma_add": 0.05, "sigma_prop": 0.1}


def family():
    import bayestwin as bt

    return bt.Ode("one_compartment", error="proportional", correlated=False)


def refit(draws: int, tune: int) -> pd.DataFrame:
    import arviz_stats as azs

    import bayestwin as bt
    from bayestwin.families.pk import simulate

    df, _ = simulate(17, seed=21, times=(0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0))
    last = df.ID.max()
    train = df[df.ID != last]
    new = df[(df.ID == last) & ((df.EVID == 1) | (df.TIME <= 4.0))]
    t = time.perf_counter()
    pop = bt.fit(bt.read_nonmem(train, key=KEY), family(), draws=draws, tune=tune, seed=1, target_accept=0.95)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    twin = pop.condition(new, key=KEY, draws=draws, tune=tune, seed=2, method="nuts")
    twin_s = time.perf_counter() - t
    ref = bt.fit(
        bt.read_nonmem(pd.concat([train, new]), key=KEY), family(), draws=draws, tune=tune, seed=3, target_accept=0.95
    )
    pid = bt.pseudonymise(last, KEY)
    row = twin.verdict.table.loc[pid]
    out = []
    for name in ("patient_cl", "patient_v", "patient_ka"):
        r = ref.posterior[name].sel(patient=pid)
        w = twin.posterior[name].sel(patient=pid)
        sd = float(r.std())
        se = np.hypot(float(azs.mcse(r, sample_dims=["chain", "draw"])), float(w.std()) / np.sqrt(row["ess_bulk"])) / sd
        out.append(
            {
                "parameter": name,
                "refit mean": float(r.mean()),
                "twin mean": float(w.mean()),
                "|Δmean| / SD": abs(float(w.mean()) - float(r.mean())) / sd,
                "3 MC SE": 3 * se,
                "SD ratio": float(w.std()) / sd,
            }
        )
    table = pd.DataFrame(out)
    table["within 0.1 SD"] = table["|Δmean| / SD"] <= 0.1
    table["SD ratio in 0.9-1.1"] = table["SD ratio"].between(0.9, 1.1)
    print(f"population fit (16 subjects, 4 x ({tune} + {draws})): {fit_s:.0f} s; twin: {twin_s:.1f} s")
    print(f"verdicts: population {pop.verdict}; twin {twin.verdict}; refit {ref.verdict}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return table


def recovery(reps: int, draws: int, first: int = 0) -> pd.DataFrame:
    import jax

    import bayestwin as bt
    from bayestwin.families.pk import simulate

    truth = {
        "log_cl": np.log(TRUTH["cl"]),
        "log_v": np.log(TRUTH["v"]),
        "log_ka": np.log(TRUTH["ka"]),
        "bsv_sd[cl]": TRUTH["bsv"][0],
        "bsv_sd[v]": TRUTH["bsv"][1],
        "bsv_sd[ka]": TRUTH["bsv"][2],
    }
    rows = []
    for r in range(first, first + reps):
        df, _ = simulate(16, seed=100 + r, times=(0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0))
        t = time.perf_counter()
        pop = bt.fit(
            bt.read_nonmem(df, key=KEY), family(), draws=draws, tune=draws, seed=r, extend=0, target_accept=0.95
        )
        wall = time.perf_counter() - t
        # each fit compiles its own programs and JAX keeps them: the 9th study of one run died in
        # LLVM ("Cannot allocate memory") on 3 December 2026; drop them, as benchmarks/sbc.py does
        jax.clear_caches()
        post = pop.posterior
        for name, true in truth.items():
            if "[" in name:
                var, label = name[:-1].split("[")
                x = post[var].sel(pk_param=label)
            else:
                x = post[name]
            lo, hi = (float(q) for q in x.quantile([0.05, 0.95]))
            rows.append(
                {"replicate": r, "parameter": name, "truth": true, "q05": lo, "q95": hi, "covered": lo <= true <= hi}
            )
        print(f"replicate {r}: {wall:.0f} s, {pop.verdict}", flush=True)
        print(f"  covered: { {row['parameter']: row['covered'] for row in rows[-len(truth) :]} }", flush=True)
    table = pd.DataFrame(rows)
    per = table.groupby("parameter", sort=False)["covered"].mean()
    print(per.to_string(float_format=lambda x: f"{x:.2f}"))
    print(
        f"truth in the 90% interval: {table['covered'].mean():.1%} of {len(table)} parameter-replicates (goal >= 85%)"
    )
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["refit", "recovery"], action="append")
    ap.add_argument("--draws", type=int, default=2500, help="refit part: draws per chain")
    ap.add_argument("--tune", type=int, default=1000, help="refit part: warmup steps per chain")
    ap.add_argument("--reps", type=int, default=8, help="recovery part: simulated studies")
    ap.add_argument("--first", type=int, default=0, help="recovery part: the first study's index (seed 100 + index)")
    ap.add_argument("--fit-draws", type=int, default=400, help="recovery part: warmup and draws per chain")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    for part in args.part or ["refit", "recovery"]:
        t = time.perf_counter()
        if part == "refit":
            refit(args.draws, args.tune)
        else:
            recovery(args.reps, args.fit_draws, args.first)
        print(f"[{part}: {time.perf_counter() - t:.0f} s]\n", flush=True)


if __name__ == "__main__":
    main()
