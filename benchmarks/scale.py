"""Twins at scale (issue 8): twins/s and peak memory vs batch size, vs Dask workers, and 100,000
patients end to end. One command:

    .venv/bin/python benchmarks/scale.py                 # the full run (about 25 min on 2 cores)
    .venv/bin/python benchmarks/scale.py --quick         # smaller sizes, a few minutes

Population: the model zoo's ``sleepstudy`` (progression). Patients: the 18 subjects' first 3 days
copied with new ids and jittered outcomes. Each measurement runs in its own process (peak RSS of
that process: ``ru_maxrss``), timing the conditioning only (import and loading excluded; the
first batch includes compilation). Prints a table and writes benchmarks/results/scale.csv.
Peer: the same twins as a Python loop of one ``population.condition`` call per patient (the
obvious way to use a one-patient API at scale), on 50 patients.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
KEY = b"benchmark-scale-key-0123"


def patients(n: int, seed: int = 0):
    import numpy as np
    import pandas as pd

    from bayestwin.zoo import model_path

    df = pd.read_csv(model_path("sleepstudy") / "data.csv")
    df = df[df.Days <= 2]
    reps = -(-n // 18)
    rng = np.random.default_rng(seed)
    out = pd.concat([df.assign(Subject=df.Subject.astype(str) + f"-{r}") for r in range(reps)], ignore_index=True)
    out["Reaction"] = out["Reaction"] + rng.normal(0, 10, len(out))
    keep = out.Subject.unique()[:n]
    return out[out.Subject.isin(keep)]


def child(spec: dict) -> dict:
    """One measurement, in this process."""
    import resource
    import shutil
    import warnings

    warnings.simplefilter("ignore")
    import bayestwin as bt
    from bayestwin.engine.many import condition_many

    pop = bt.load("sleepstudy")
    rows = patients(spec["n"])
    out = spec.get("out")
    if out:
        shutil.rmtree(out, ignore_errors=True)
    client = cluster = None
    if spec.get("workers"):
        from distributed import Client, LocalCluster

        from bayestwin.engine.batches import WORKER_ENV

        cluster = LocalCluster(n_workers=spec["workers"], threads_per_worker=1, env=WORKER_ENV, processes=True)
        client = Client(cluster)
    t0 = time.perf_counter()
    if spec.get("loop"):
        for p in rows.Subject.unique():
            pop.condition(rows[rows.Subject == p], key=KEY, method="importance")
        ok = spec["n"]
    else:
        table = condition_many(pop, rows, key=KEY, batch=spec["batch"], client=client, out=out)
        ok = int(table["converged"].sum())
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB
    worker_rss = None
    if client is not None:
        worker_rss = max(client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024).values())
        client.close()
        cluster.close()
    return {
        **spec,
        "wall_s": wall,
        "twins_per_s": spec["n"] / wall,
        "converged": ok,
        "peak_rss_mb": rss,
        "worker_peak_rss_mb": worker_rss,
    }


def measure(spec: dict) -> dict:
    run = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import pandas as pd

    n_curve = 1_000 if args.quick else 4_000
    n_big = 10_000 if args.quick else 100_000
    specs = [{"what": "python loop of condition() (peer)", "n": 50, "loop": True, "batch": 1}]
    specs += [{"what": f"local, batch {b}", "n": n_curve, "batch": b} for b in (64, 256, 1024, 4096)]
    specs += [
        {"what": f"Dask LocalCluster, {w} worker(s), batch 1024", "n": n_curve, "batch": 1024, "workers": w}
        for w in (1, 2)
    ]
    specs += [
        {
            "what": f"{n_big:,} patients end to end, store",
            "n": n_big,
            "batch": 2048,
            "out": str(Path(tempfile.gettempdir()) / "bayestwin-scale-store"),
        }
    ]
    rows = []
    for s in specs:
        r = measure(s)
        rows.append(r)
        print(
            f"{r['what']:45s} {r['n']:>7,} twins {r['wall_s']:8.1f} s {r['twins_per_s']:8.1f} twins/s "
            f"peak RSS {r['peak_rss_mb']:6.0f} MB"
            + (f" (worker {r['worker_peak_rss_mb']:.0f} MB)" if r.get("worker_peak_rss_mb") else ""),
            flush=True,
        )
    table = pd.DataFrame(rows)
    loop = table.iloc[0]["twins_per_s"]
    table["ratio_vs_loop"] = table["twins_per_s"] / loop
    RESULTS.mkdir(exist_ok=True)
    table.drop(columns=["out"], errors="ignore").to_csv(RESULTS / "scale.csv", index=False)
    print()
    print(
        table[
            ["what", "n", "wall_s", "twins_per_s", "ratio_vs_loop", "peak_rss_mb", "worker_peak_rss_mb", "converged"]
        ].to_string(index=False, float_format=lambda x: f"{x:.1f}")
    )
    print(f"\ncores: {os.cpu_count()}; written to {RESULTS / 'scale.csv'}")


if __name__ == "__main__":
    main()
