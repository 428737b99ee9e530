"""Latency in a notebook session: each family's steps timed in a fresh process of their own, first
with an empty compiled-program cache (cold), then in a second fresh process that finds the first
one's programs on disk (bayestwin.cache), and once more within that process (warm in memory).
Each family starts from nothing (its own process and cache), as a user's notebook does.

    .venv/bin/python benchmarks/latency.py            # about 2 minutes on 2 cores

Families: progression (the shipped sleepstudy population), PK (the shipped Theoph population,
with a dose search over 12 amounts) and survival (a Weibull population of 60 simulated patients,
fitted and saved first: the zoo has no survival model). Issue 21's targets: first twin <= 10 s cold and <= 2 s with
the disk cache; update <= 1 s warm; dose search on one twin <= 0.2 s warm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent(
    """
    import json, os, sys, time, warnings
    t0 = time.perf_counter()
    import numpy as np, pandas as pd
    import bayestwin as bt
    from bayestwin.dosing import Regimen, dose_search
    warnings.simplefilter("ignore")
    FAMILY = os.environ["LATENCY_FAMILY"]
    out = {f"{FAMILY}: import bayestwin": time.perf_counter() - t0}
    KEY = b"latency-benchmark-key-0123"

    def timed(name, fn):
        t = time.perf_counter(); r = fn(); out[name] = time.perf_counter() - t; return r

    if FAMILY == "progression":
        pop = timed("progression: load", lambda: bt.load("sleepstudy"))
        rows = pd.DataFrame({"Subject": 1, "Days": [0.0, 1.0, 2.0], "Reaction": [250.0, 262.0, 270.0]})
        twin = timed("progression: first twin", lambda: pop.condition(rows, key=KEY, seed=1))
        timed("progression: forecast", lambda: twin.predict(times=[5.0, 9.0]).summary())
        more = pd.DataFrame({"Subject": 1, "Days": [3.0], "Reaction": [281.0]})
        timed("progression: update (+1 row)", lambda: twin.update(more, key=KEY))
        days = np.arange(6.0)
        other = pd.DataFrame({"Subject": 2, "Days": days, "Reaction": 260.0 + 8 * days})
        timed("progression: another patient (6 rows)", lambda: pop.condition(other, key=KEY, seed=1))
        timed("progression: first twin again", lambda: pop.condition(rows, key=KEY, seed=2))
    if FAMILY == "pk":
        pk = timed("PK: load", lambda: bt.load("theoph"))
        # the shipped Theoph population's doses are mg/kg (3.1-5.9 in the study): a 4 mg/kg dose
        levels = pd.DataFrame({"ID": 1, "TIME": [0.0, 2.0, 8.0], "AMT": [4.0, 0, 0],
                               "DV": [np.nan, 8.0, 6.0], "EVID": [1, 0, 0]})
        ptwin = timed("PK: first twin", lambda: pk.condition(levels, key=KEY, method="importance"))
        regimens = [Regimen(a, 12.0, doses=6) for a in np.arange(0.5, 6.5, 0.5)]  # 12 amounts, mg/kg
        search = lambda: dose_search(ptwin, regimens, target=(5, 15), limit=20, start=12.0)
        timed("PK: dose search (12 amounts)", search)
        timed("PK: dose search again", search)
        timed("PK: update (+1 level)", lambda: ptwin.update(
            pd.DataFrame({"ID": [1], "TIME": [10.0], "AMT": [0.0], "DV": [5.0], "EVID": [0]}), key=KEY))
    if FAMILY == "survival":
        from bayestwin.families.survival import simulate
        surv = timed("survival: load", lambda: bt.load(os.environ["LATENCY_SURVIVAL"]))
        df, _ = simulate(63, seed=3)
        new = df[df.patient == df.patient.iloc[-1]]
        stwin = timed("survival: first twin", lambda: surv.condition(new, key=KEY, seed=1))
        timed("survival: event risk forecast", lambda: stwin.predict(times=[6.0, 12.0]).summary())
        timed("survival: first twin again", lambda: surv.condition(new, key=KEY, seed=2))
    print("TIMES" + json.dumps(out))
    """
)


def survival_population(folder: str) -> str:
    """A Weibull survival population (60 simulated patients, age), fitted and saved once: there is
    no survival model in the zoo. Its fit is not timed (the children time loading it)."""
    import warnings

    import bayestwin as bt
    from bayestwin.families.survival import simulate

    df, _ = simulate(63, seed=3)
    train = df[df.patient.isin(df.patient.unique()[:60])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = bt.read_survival(train, covariates=["age"], key=b"latency-benchmark-key-0123")
        pop = bt.fit(table, bt.Survival(baseline="weibull"), draws=500, tune=500, seed=1, progressbar=False)
    path = os.path.join(folder, "survival")
    bt.save(pop, path)
    return path


def child(cache: str, survival: str, family: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["BAYESTWIN_CACHE_DIR"] = cache
    env["LATENCY_SURVIVAL"] = survival
    env["LATENCY_FAMILY"] = family
    run = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-3000:])
    return json.loads(run.stdout.split("TIMES", 1)[1])


def main() -> None:
    cold, disk = {}, {}
    with tempfile.TemporaryDirectory() as models:
        survival = survival_population(models)
        for family in ("progression", "pk", "survival"):
            with tempfile.TemporaryDirectory() as cache:  # each family: its own new cache
                cold.update(child(cache, survival, family))
                disk.update(child(cache, survival, family))
    print(f"{'step':42s} {'cold s':>8s} {'disk cache s':>13s}")
    for name in cold:
        print(f"{name:42s} {cold[name]:8.2f} {disk[name]:13.2f}")
    print(
        "\n'again' rows are warm in memory (same process, same padded shapes); 'cold' is a new process "
        "with an empty cache, 'disk cache' a new process that finds the first one's compiled programs."
    )


if __name__ == "__main__":
    main()
