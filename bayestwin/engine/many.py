"""Twins at scale: condition many patients in batches, locally or on a Dask cluster, resumably,
and refresh a store of twins incrementally as new rows arrive.

A *store* is a folder:

- ``rows.parquet``: every patient's validated, pseudonymised rows (the data the twins are
  conditioned on; written atomically before any batch runs);
- ``twins-<lo>-<hi>.parquet``: one file per batch (written atomically by
  :func:`bayestwin.engine.batches.map_batches`): per patient, the posterior mean, SD and 5/95%
  quantiles of each patient-level quantity, the convergence gate (method, R-hat, ESS, k̂,
  converged, out of population) and ``keep`` thinned posterior draws per quantity (list columns);
- ``carried.parquet`` (a refreshed store only): yesterday's twins of patients without new rows;
- ``run.json``: the job's fingerprint (population draws, data, settings); a rerun with another
  job is refused, a rerun of the same job reads the finished batches back.

Each patient's random numbers come from (seed, pseudonym): results do not depend on the batch
size, the batch a patient falls in, or the number of workers - bit for bit when the patient's
rows are padded to the same length (batches pad to their longest patient, in steps), otherwise
to rounding (~1e-8 relative: the order of floating-point sums changes).

Memory: a batch's twins are held whole until summarised (the importance path keeps every
proposal of every chain), so peak RSS grows with ``batch``; measured on 2 cores for progression
twins (``benchmarks/scale.py``): 2.5 / 3.0 / 3.8 / 7.3 GB at batch 64 / 256 / 1,024 / 4,096,
i.e. about 2.4 GB + 1.2 MB x batch. A worker with 8 GB takes batches of up to ~4,000.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bayestwin._atomic import OutputError, folder_lock
from bayestwin.engine.batches import batch_bounds, check_store, map_batches, run_fingerprint, write_atomic
from bayestwin.errors import require_whole

NAME = "twins"


@dataclass
class _ConditionJob:
    """``job(lo, hi)``: the twins of patients ``lo .. hi - 1`` (in pseudonym order) as a table."""

    population: object
    cohort: object
    patients: list
    settings: dict
    keep: int

    def __call__(self, lo: int, hi: int) -> pd.DataFrame:
        import warnings

        from bayestwin.errors import ConvergenceWarning, OutOfPopulationWarning

        sub = _subset(self.cohort, set(self.patients[lo:hi]))
        with warnings.catch_warnings():  # the table says which twins failed; one warning per batch is noise
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", OutOfPopulationWarning)
            twin = self.population.condition(sub, **self.settings)
        return twin_table(twin, keep=self.keep).reindex(self.patients[lo:hi]).reset_index()


def _subset(cohort, patients: set):
    """The rows of ``patients`` only (a Cohort, or NONMEM Events)."""
    col = _patient_col(cohort)
    frame = cohort.frame[cohort.frame[col].isin(patients)]
    if col == "ID":
        from bayestwin.data.nonmem import Events

        return Events(frame=frame, covariates=cohort.covariates)
    return cohort.restrict(frame)


def _patient_col(cohort) -> str:
    return "ID" if "ID" in cohort.frame.columns and "patient" not in cohort.frame.columns else "patient"


def twin_table(twin, keep: int = 100) -> pd.DataFrame:
    """One row per patient: summaries, the gate, and ``keep`` thinned draws per quantity."""
    names = list(twin.population.family.patient_outputs)
    summary = twin.summary(names)
    summary.columns = [f"{a}_{b}" if a != "gate" else b for a, b in summary.columns]
    gate = twin.verdict.table[["method", "rhat", "ess_bulk", "khat", "n_obs"]]
    table = summary.join(gate)
    table.index.name = "patient"
    if keep:
        post = twin.posterior
        for n in names:
            x = post[n].transpose("patient", "chain", "draw").to_numpy().reshape(len(twin.patients), -1)
            idx = np.linspace(0, x.shape[1] - 1, min(keep, x.shape[1])).round().astype(int)
            table[f"{n}_draws"] = list(x[:, idx])
    return table


def condition_many(
    population,
    rows,
    *,
    key=None,
    out=None,
    client=None,
    batch: int = 256,
    keep: int = 100,
    method: str = "importance",
    seed: int = 0,
    say=lambda *a: None,
    **condition_kwargs,
) -> pd.DataFrame:
    """Condition ``population`` on every patient in ``rows``: one twin per patient, in batches.

    Parameters
    ----------
    rows
        New patients' rows (the fitting table's columns, or a validated Cohort / Events).
    key
        Your pseudonymisation key.
    out
        Store folder (see the module doc): each batch is written as it finishes; a rerun after a
        crash computes only the missing batches. None: nothing written.
    client
        A ``dask.distributed.Client`` (LocalCluster, a scheduler address's client, or a
        ``dask_jobqueue.SLURMCluster``'s): batches run on its workers, which must see ``out``.
    batch
        Patients per batch: one vectorised JAX program per ``chunk`` of a batch, one task per batch.
    keep
        Thinned posterior draws kept per patient and quantity.
    method, seed, condition_kwargs
        As :meth:`Population.condition` (default: the importance path, NUTS for twins it cannot do).

    Returns
    -------
    DataFrame, one row per patient (pseudonym order): see :func:`twin_table`.
    """
    cohort = population.cohort(rows, key=key)
    patients = sorted(cohort.patients)
    settings = {"method": method, "seed": seed, **condition_kwargs}
    bounds = batch_bounds(len(patients), batch)  # every argument checked before anything is written
    require_whole("keep", keep, 1)
    job = _ConditionJob(population, cohort, patients, settings, keep)
    fingerprint = {
        "population": _population_digest(population),
        "data": _frame_digest(cohort.frame),
        "settings": {k: repr(v) for k, v in settings.items()},
        "keep": keep,
    }
    say(f"{len(patients)} patients in {len(bounds)} batches of up to {batch}")
    if out is None:
        return map_batches(job, len(patients), batch, client=client, name=NAME, fingerprint=fingerprint, say=say)
    out = Path(out)
    check_store(out, run_fingerprint(NAME, len(patients), batch, fingerprint))
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "store"):
        _write_rows(cohort, out)
        return map_batches(
            job, len(patients), batch, client=client, out=out, name=NAME, fingerprint=fingerprint, say=say
        )


def read_store(path) -> pd.DataFrame:
    """Every twin in a store (carried-over and freshly conditioned), one row per patient."""
    path = Path(path)
    parts = [pd.read_parquet(p) for p in sorted(path.glob(f"{NAME}-*.parquet"))]
    if (path / "carried.parquet").exists():
        parts.append(pd.read_parquet(path / "carried.parquet"))
    if not parts:
        raise FileNotFoundError(f"{path} holds no twins")
    return pd.concat(parts, ignore_index=True).sort_values("patient", kind="stable").reset_index(drop=True)


def refresh(population, store, new_rows, *, out, key=None, **kwargs) -> pd.DataFrame:
    """Yesterday's ``store`` plus today's ``new_rows`` -> a new store at ``out``.

    Patients with new rows (or new patients) are conditioned again on all their rows so far (the
    same posterior as updating sequentially: each twin is computed from the population posterior
    and the union of its data); every other patient's twin is carried over unchanged. Same key
    as yesterday. Returns the new store's table.
    """
    store, out = Path(store), Path(out)
    if out.resolve() == store.resolve():
        raise ValueError("refresh writes a new store: out must differ from the store being refreshed")
    old_rows = pd.read_parquet(store / "rows.parquet")
    new = population.cohort(new_rows, key=key)
    col = _patient_col(new)
    frame = pd.concat([old_rows, _rows_table(new)], ignore_index=True)
    changed = set(new.frame[col])
    combined = _with_frame(population, frame, col)
    old = read_store(store)
    carried = old[~old["patient"].isin(changed)]
    todo = _subset(combined, changed)
    if (out / "carried.parquet").exists() or (
        out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith("."))
    ):
        if not (out / "run.json").exists():
            raise OutputError(f"{out} is a non-empty folder that is not a bayestwin store: not writing there")
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "store"):
        write_atomic(carried, out / "carried.parquet")
    fresh = condition_many(population, todo, out=out, **kwargs)
    return pd.concat([carried, fresh], ignore_index=True).sort_values("patient", kind="stable").reset_index(drop=True)


def _with_frame(population, frame: pd.DataFrame, col: str):
    """A validated table object holding ``frame`` (already pseudonymised rows)."""
    from bayestwin.data.pseudonym import PSEUDONYMISED

    if col == "ID":  # NONMEM events: re-read with the pseudonyms kept
        from bayestwin.data.nonmem import Events

        return Events(frame=frame, covariates=list(population.schema.covariates))
    c = population.columns
    table = frame.rename(columns={"patient": c.patient, "time": c.time, "outcome": c.outcome})
    if c.therapy is not None:
        table = table.rename(columns={"therapy": c.therapy})
    return population.cohort(table, key=PSEUDONYMISED)


def _rows_table(cohort) -> pd.DataFrame:
    """The validated rows with their covariates (a Cohort keeps those in its baseline table)."""
    frame = cohort.frame
    if "ID" not in frame.columns:
        base = cohort.baseline.drop(columns=[c for c in cohort.baseline.columns if c in frame.columns])
        frame = frame.join(base, on="patient")
    return frame.reset_index(drop=True)


def _write_rows(cohort, out: Path) -> None:
    write_atomic(_rows_table(cohort), out / "rows.parquet")


def _frame_digest(frame: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(frame.reset_index(drop=True), index=False).to_numpy()).hexdigest()


def _population_digest(population) -> str:
    from bayestwin.io import draws_digest

    return draws_digest(population.idata)
