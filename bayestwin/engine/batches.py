"""Spread independent batches of work over a Dask cluster (or run them here), streaming each
batch's table to disk so that a crash loses only the batches in flight.

One mechanism for every large job (simulated trials, virtual cohorts, batch conditioning):
the job is ``fn(lo, hi) -> DataFrame`` over items ``[lo, hi)``, pure given its arguments (its
randomness keyed by item index, not by batch), so a batch computed twice, or on another worker,
gives the same rows.

With ``out``, every batch is written to ``out/<name>-<lo>-<hi>.parquet`` atomically (written to a
temporary name in the same folder, then renamed), and a run pointed at a folder that already
holds finished batches reads them back instead of recomputing them. ``out/run.json`` records a
fingerprint of the job; resuming with a different job is refused.

With a ``dask.distributed`` ``Client`` the batches are submitted as tasks (``client.submit``),
written by the workers themselves (``out`` must be on a filesystem they share), and gathered as
they finish. Workers run JAX: one worker per core, each with one XLA thread and one host device,
``LocalCluster(n_workers=cores, threads_per_worker=1, env=WORKER_ENV)``, so that workers do not
oversubscribe cores.
On a SLURM cluster the same call takes a ``dask_jobqueue.SLURMCluster``'s client.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from bayestwin._atomic import OutputError, write_file
from bayestwin.settings import progress_bar

#: Environment for Dask workers that run JAX, one worker per core: one XLA thread and one host
#: device each (bayestwin otherwise spreads chunks over one device per core), no nested BLAS
#: threads, and no preallocation of a shared GPU's memory by each worker. An XLA optimisation
#: level set in this process's XLA_FLAGS (when bayestwin is imported) is passed on, so that the
#: workers compile as this process does: the same draws from a worker as from here.
WORKER_ENV = {
    "XLA_FLAGS": " ".join(
        [
            *(f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_backend_optimization_level=")),
            "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
        ]
    ),
    "BAYESTWIN_CPU_DEVICES": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
}


def batch_bounds(n: int, batch: int) -> list[tuple[int, int]]:
    """[(lo, hi), ...] covering range(n) in steps of ``batch``."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or n < 1 or batch < 1:
        raise ValueError(f"need n >= 1 and a whole batch size >= 1, not n={n}, batch={batch!r}")
    return [(lo, min(lo + batch, n)) for lo in range(0, n, batch)]


def batch_path(out, name: str, lo: int, hi: int) -> Path:
    return Path(out) / f"{name}-{lo:010d}-{hi:010d}.parquet"


def check_store(out, fingerprint: dict) -> None:
    """Before anything is written: ``out`` must be a new or empty folder, or a store of the same
    job (its ``run.json`` equal to ``fingerprint``); anything else is refused unchanged."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    if not out.is_dir():
        return
    path = out / "run.json"
    if path.exists():
        try:
            same = json.loads(path.read_text()) == json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        except (json.JSONDecodeError, UnicodeDecodeError):
            same = False
        if not same:
            raise ValueError(
                f"{out} holds batches of another job ({path}); use a new folder or delete it to start afresh"
            )
        return
    store = {"rows.parquet", "carried.parquet"}  # written before run.json by condition_many / refresh
    other = [p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in store]
    if other:
        raise OutputError(
            f"{out} is a non-empty folder that is not a bayestwin store (it holds {other[0]!r}): not writing there"
        )


def write_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` (Parquet) atomically (:func:`bayestwin._atomic.write_file`)."""
    write_file(path, lambda tmp: df.to_parquet(tmp, index=False))


def _task(fn: Callable, lo: int, hi: int, out, name: str) -> pd.DataFrame:
    """One batch: read it back if already finished, else compute and write it."""
    if out is not None:
        path = batch_path(out, name, lo, hi)
        if path.exists():
            return pd.read_parquet(path)
    df = fn(lo, hi)
    if out is not None:
        write_atomic(df, path)
    return df


def map_batches(
    fn: Callable[[int, int], pd.DataFrame],
    n: int,
    batch: int,
    *,
    client=None,
    out=None,
    name: str = "batch",
    fingerprint: dict | None = None,
    say: Callable = lambda *a: None,
) -> pd.DataFrame:
    """Run ``fn`` over the batches of ``range(n)`` and concatenate their tables in item order.

    Parameters
    ----------
    fn
        ``fn(lo, hi) -> DataFrame`` for items ``lo .. hi - 1`` (must pickle, for a client).
    client
        A ``dask.distributed.Client``, or None to run the batches here, one after another.
    out
        Folder that receives each finished batch (Parquet, atomic); finished batches found there
        are read back, not recomputed.
    fingerprint
        A JSON-able description of the job, checked against ``out/run.json`` when resuming.
    """
    bounds = batch_bounds(n, batch)
    if out is not None:
        check_store(out, run_fingerprint(name, n, batch, fingerprint))
        _check_fingerprint(Path(out), run_fingerprint(name, n, batch, fingerprint))
        done = sum(batch_path(out, name, lo, hi).exists() for lo, hi in bounds)
        if done:
            say(f"resuming: {done} of {len(bounds)} batches already in {out}")
    if client is None:
        shown = progress_bar(bounds, desc=name, show=None if len(bounds) > 1 else False)
        parts = [_task(fn, lo, hi, out, name) for lo, hi in shown]
    else:
        from distributed import as_completed

        [shared] = client.scatter([fn], broadcast=True)  # the job (e.g. a Population) is sent once per worker
        futures = {client.submit(_task, shared, lo, hi, out, name, pure=False): (lo, hi) for lo, hi in bounds}
        results = {}
        for fut in progress_bar(as_completed(list(futures)), total=len(futures), desc=name):
            results[futures[fut]] = fut.result()
        parts = [results[b] for b in bounds]
    return pd.concat(parts, ignore_index=True)


def run_fingerprint(name: str, n: int, batch: int, fingerprint: dict | None) -> dict:
    """What ``run.json`` records of a job: resuming requires the same."""
    return {"name": name, "n": n, "batch": batch, **(fingerprint or {})}


def _check_fingerprint(out: Path, fingerprint: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    if path.exists():
        if json.loads(path.read_text()) != json.loads(text):
            raise ValueError(
                f"{out} holds batches of another job ({path}); use a new folder or delete it to start afresh"
            )
        return
    tmp = out / f".run.json.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
