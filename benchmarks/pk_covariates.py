"""Covariate models on real PK data: does body weight belong on CL and V?

Theoph (R ``datasets::Theoph``, shipped as ``models/theoph/data.csv``: 12 subjects, one oral
dose per kg, 11 levels each), with the amount in mg (dose per kg x weight), three models of one
compartment with additive error and diagonal BSV:

- ``none``: no covariate;
- ``fixed``: allometric weight, (WT/70)^0.75 on CL and (WT/70)^1 on V;
- ``estimated``: (WT/70)^theta on CL and on V, both exponents estimated.

Printed: each fit's verdict and wall time, the estimated exponents (posterior mean, 90% interval),
and PSIS-LOO (leave one subject out, and one level out) against ``none``: elpd differences with
their SEs (ArviZ's ``compare``). With 12 subjects of 54-86 kg, weight is not expected to be
identifiable (Pinheiro & Bates 2000 fit Theoph without it); the benchmark says what the data say.

    .venv/bin/python benchmarks/pk_covariates.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import bayestwin as bt
from bayestwin.review.predictive import compare

ROOT = Path(__file__).resolve().parents[1]
KEY = b"benchmark-pk-covariates"


def theoph() -> bt.Events:
    df = pd.read_csv(ROOT / "models" / "theoph" / "data.csv", na_values=["."])
    df["AMT"] = df["AMT"] * df["WT"]  # mg/kg -> mg
    return bt.read_nonmem(df, covariates=["WT"], key=KEY)


MODELS = {
    "none": dict(covariates={"CL": [], "V": []}),
    "fixed": dict(
        covariates={"CL": [bt.Power("WT", ref=70, exponent=0.75)], "V": [bt.Power("WT", ref=70, exponent=1)]}
    ),
    "estimated": dict(covariates={"CL": [bt.Power("WT", ref=70)], "V": [bt.Power("WT", ref=70)]}),
}


def main() -> None:
    events = theoph()
    pops, rows = {}, []
    for name, kw in MODELS.items():
        ev = (
            events
            if name != "none"
            else bt.read_nonmem(events.frame[["ID", "TIME", "AMT", "DV", "EVID"]].assign(ID=lambda f: f["ID"]), key=KEY)
        )
        fam = bt.Pk(error="additive", correlated=False, **kw)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pop = bt.fit(ev, family=fam, seed=1, progressbar=False)
        wall = time.perf_counter() - t0
        pops[name] = pop
        post = pop.idata.posterior
        row = {"model": name, "verdict": "ok" if pop.verdict.converged else "FAILED", "wall s": round(wall, 1)}
        for v in ("cov_cl_WT", "cov_v_WT"):
            if v in post:
                x = post[v].to_numpy().ravel()
                q = np.quantile(x, [0.05, 0.95])
                row[v] = f"{x.mean():.2f} [{q[0]:.2f}, {q[1]:.2f}]"
        for p in ("log_cl", "log_v"):
            row[p] = round(float(post[p].mean()), 3)
        rows.append(row)
    print(pd.DataFrame(rows).to_string(index=False))
    for by in ("patient", "obs"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = compare(pops, by=by)
        print(f"\nPSIS-LOO, leave one {'subject' if by == 'patient' else 'level'} out:")
        print(table.to_string())


if __name__ == "__main__":
    main()
