"""Benchmarks for population PK and precision dosing (issue 3). One command, prints a table:

    .venv/bin/python benchmarks/pk.py            # 1,000 PK twins, 3-patient loop, dose searches
    .venv/bin/python benchmarks/pk.py --quick    # 128 twins

(a) PK twins per second: 1,000 new subjects, one 100 mg oral dose and two levels (1 h and 6 h,
    the absorption phase: the hardest case for the fast path), conditioned on a population fitted
    to 40 simulated subjects, 4 chains x 1,000 draws per twin, through the importance path (its
    NUTS fallback, preconditioned by the importance proposal, included), vs a Python loop of
    ``pm.sample(nuts_sampler="numpyro")`` on the *same* twin posterior, one subject at a time
    (timed on a few, first call excluded as compile).
(b) dose search: 20 regimens on one twin (4,000 draws), and 20 regimens on all 1,000 twins.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

warnings.simplefilter("ignore")

from run import pm_sample  # noqa: E402

import bayestwin as bt  # noqa: E402
from bayestwin.data.nonmem import read_nonmem  # noqa: E402
from bayestwin.dosing import Regimen, dose_search  # noqa: E402
from bayestwin.engine import condition as cond  # noqa: E402
from bayestwin.engine.compile import twin_pymc_model  # noqa: E402
from bayestwin.families.pk import Pk, simulate  # noqa: E402
from bayestwin.review.convergence import Thresholds  # noqa: E402

KEY = b"pk-benchmark-key-01234"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--loop", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="128 twins, 2-subject loop")
    args = ap.parse_args()
    if args.quick:
        args.patients, args.loop = 128, 2
    rows = []
    table, _ = simulate(40, seed=3, times=(0.5, 1, 2, 4, 8, 12, 24))
    t0 = time.perf_counter()
    pop = bt.fit(read_nonmem(table, key=KEY), Pk(), seed=0)
    rows.append(("population fit (40 subjects, 280 levels), wall s", time.perf_counter() - t0, str(pop.verdict)))

    new, _ = simulate(args.patients, seed=7, id_start=10_000, times=(1.0, 6.0))
    ids = new["ID"].unique()
    warm = new[new["ID"].isin(ids[:64])]
    t0 = time.perf_counter()
    pop.condition(warm, key=KEY, method="importance")
    rows.append(("compile + first 64 PK twins (importance), s", time.perf_counter() - t0, "once per model and shape"))
    t0 = time.perf_counter()
    # k̂ limit below any k̂: all 8 twins go through the fallback (NUTS preconditioned by their
    # importance proposals), which compiles it on both cores
    forced = pop.condition(new[new["ID"].isin(ids[:8])], key=KEY, method="importance", thresholds=Thresholds(khat=-1))
    rows.append(
        (
            "compile + 8 PK twins forced through the NUTS fallback, s",
            time.perf_counter() - t0,
            f"once; {int((forced.verdict.table['method'] == 'nuts').sum())}/8 redone by NUTS",
        )
    )
    t0 = time.perf_counter()
    twin = pop.condition(new, key=KEY, method="importance", seed=1)
    wall = time.perf_counter() - t0
    tab = twin.verdict.table
    rate = args.patients / wall
    redo = tab["method"] == "nuts"
    rows += [
        ("PK twins/s, importance path (NUTS fallback included)", rate, f"{wall:.1f} s for {args.patients}"),
        (
            "... twins redone by NUTS / passing the gate",
            float(redo.mean()),
            f"{int(redo.sum())} redone; {int(tab['converged'].sum())}/{len(tab)} pass; median k̂ "
            f"{tab.loc[~redo, 'khat'].median():.2f}; max R-hat {tab['rhat'].max():.4f}",
        ),
    ]

    # Baseline: the same twin posterior, one pm.sample per subject.
    events = pop.cohort(new, key=KEY)
    design = pop.family.design(events.frame, events.baseline, pop.schema)
    slots = {k: cond.padded_length(v) for k, v in pop.family.slots(design).items()}
    n_pad = cond.padded_length(2)  # the same padded program as the batched twins
    data, mask = cond.pad(design.data, events.patients, n_pad, pop.family, slots)
    prog, approx = pop.program(n_pad, **slots), pop.approx
    times = []
    for i in range(args.loop + 1):
        model = twin_pymc_model(
            prog, np.asarray(approx.mean), np.asarray(approx.chol), {k: v[i] for k, v in data.items()}, mask[i]
        )
        t0 = time.perf_counter()
        pm_sample(model, "numpyro", 1000, 1000, seed=i)
        times.append(time.perf_counter() - t0)
    loop_rate = 1.0 / np.mean(times[1:])
    rows += [
        (f"PK twins/s, pm.sample loop (mean of {args.loop}, warm)", loop_rate, f"first call {times[0]:.1f} s"),
        ("speed-up, importance path / loop", rate / loop_rate, "target: >= 50 PK twins/s"),
    ]

    regimens = [Regimen(a, i, doses=6) for i in (8.0, 12.0) for a in range(50, 550, 50)]
    one = twin.patients[0]
    dose_search(twin, regimens, target=(2.0, 4.0), limit=8.0, patient=one)  # compile
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        dose_search(twin, regimens, target=(2.0, 4.0), limit=8.0, patient=one)
    rows.append(("dose search, 20 regimens x 4,000 draws, one twin, s", (time.perf_counter() - t0) / reps, "warm"))
    t0 = time.perf_counter()
    dose_search(twin, regimens, target=(2.0, 4.0), limit=8.0)
    rows.append((f"dose search, 20 regimens, all {args.patients} twins, s", time.perf_counter() - t0, "one program"))

    import jax

    print(
        f"\nbayestwin PK benchmarks on {os.cpu_count()} CPU core(s), devices {jax.devices()[0].platform}, "
        f"jax {jax.__version__}; {args.patients} twins, 4 chains x 1000 draws each\n"
    )
    print(f"{'measure':<60} {'value':>10}  note")
    print("-" * 104)
    for name, value, note in rows:
        print(f"{name:<60} {value:>10.3f}  {note}")


if __name__ == "__main__":
    main()
