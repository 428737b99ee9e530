"""Toxicity-guided dosing against body-surface-area dosing: the effect estimate.

    .venv/bin/python benchmarks/toxicity.py [--patients 40] [--cycles 3] [--draws 300] [--tune 500]

Runs :func:`bayestwin.trials.toxicity_dosing_trial` on the model zoo's ``docetaxel_friberg``
population (Friberg myelosuppression, simulated from the published docetaxel system parameters):
``--patients`` virtual patients, each in both arms (75 mg/m² in cycle 1; BSA arm: the label's
cut to 75% after a count below 0.5; twin arm: the candidate most likely to give an AUC of 3-4.5
mg·h/L among those with P(nadir < 1.0) <= 0.2). Prints the trial's table and the paired
differences (twin - BSA) over the cycles after the first, with their SEs across patients, and
the wall time.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--tune", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import bayestwin as bt
    from bayestwin.trials import toxicity_dosing_trial

    pop = bt.load("docetaxel_friberg")
    t = time.perf_counter()
    res = toxicity_dosing_trial(
        pop,
        args.patients,
        dose_per_m2=75.0,
        candidates=[60.0, 80.0, 100.0, 120.0, 135.0, 160.0],
        target=bt.Outcome("conc", "auc", 3.0, 4.5),
        constraint=(bt.Outcome("anc", "nadir", high=1.0), 0.2),
        cycles=args.cycles,
        samples={"conc": (0.5, 1.0, 1.5, 2.0), "anc": (0.0, 168.0, 240.0, 336.0)},
        draws=args.draws,
        tune=args.tune,
        seed=args.seed,
    )
    wall = time.perf_counter() - t
    print(res)
    later = res.cycles[res.cycles["cycle"] > 1]
    per = later.groupby(["ID", "arm"])[["grade3", "grade4", "in_window", "dose"]].mean().unstack("arm")
    rows = []
    for what in ("grade3", "grade4", "in_window", "dose"):
        d = (per[(what, "twin")] - per[(what, "BSA")]).astype(float)
        rows.append(
            {"quantity": what, "twin - BSA": d.mean(), "SE (paired, by patient)": d.std(ddof=1) / np.sqrt(len(d))}
        )
    print("\npaired differences over cycles 2+ (per patient, then averaged):")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"\n{args.patients} patients x {args.cycles} cycles, twins 4 x ({args.tune} + {args.draws}): {wall:.0f} s")


if __name__ == "__main__":
    main()
