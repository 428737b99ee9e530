"""Session fixtures: one simulated cohort and its population fit, shared by the tests (fitted once
per run, by whichever worker asks first: :func:`shared_population`).

One persistent XLA compilation cache serves the whole test run: both xdist workers and every
process they start (notebook kernels, command-line subprocesses, Dask workers) inherit it through
the environment, so a program compiled once (the same family graph at the same padded shapes) is
loaded, not compiled again. A fresh clone starts it empty (``.pytest_cache`` is not tracked);
measured on notebook 04 alone, 92 s with an empty cache and 54 s with a warm one (before fits
stopped writing to the cache: their programs hold the cohort's rows, see ``bayestwin.cache``).
Setting ``JAX_COMPILATION_CACHE_DIR`` here also keeps the tests out of the user's own cache.
"""

import os
import warnings
from pathlib import Path

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax-compilation")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("BAYESTWIN_PROGRESS", "0")  # no bars in test logs, notebook outputs or subprocesses
# Each xdist worker owns one core (two workers on the 2-core CI machine), as a Dask worker would:
# twins then run on one CPU device. With one device per core, a batch of more than one chunk
# compiled the same twin program once per device (XLA executables are per device), twice the
# compile time for no speed-up while the other worker holds the other core. Results do not
# depend on it (each patient's seed travels with the patient).
os.environ.setdefault("BAYESTWIN_CPU_DEVICES", "1")
# XLA's CPU backend at optimisation level 1 (LLVM's -O1, not -O2) for the test run: compilation is
# most of the suite's time (1,177 of 2,776 s the workers spent outside the notebooks, profiled on
# 1 December 2026) and -O1 compiles faster at about the same speed of the compiled programs.
# Fresh clones, idle 2 cores: the suite 23-24 min before (user 43-45 min), 17 min 18 s and 17 min
# 50 s after (e03804c, bd0a224; user 32 min). The programs compute the same quantities; their
# last bits differ from -O2's, as they differ between 1 and 2 devices (above). Users' sessions
# keep XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=1".strip()

# One thread per worker for XLA's CPU kernels and for BLAS/OpenMP: the two xdist workers share 2
# cores, and a worker whose thread pools also reach for the other core slows both (measured on
# 2 December 2026, two test modules run side by side: test_precision_dosing 229 -> 173 s,
# federated/test_fit 246 -> 239 s; the whole suite from a clone, 826 tests: 2,407 s without it on
# 2 December, 2,295 s with it on 3 December, test time summed over both workers 4,744 -> 4,524 s;
# a small gain, within the day-to-day spread of this machine). A single-threaded reduction sums
# in another order: results differ in the last bits, as between 1 and 2 devices above.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
if "xla_cpu_multi_thread_eigen" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} --xla_cpu_multi_thread_eigen=false"

import pytest

import bayestwin as bt
from bayestwin.families.progression import simulate

KEY = b"tests-pseudonym-key-01"
THERAPIES = ["standard", "drug_a", "drug_b"]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop JAX's compiled executables and collect garbage, to bound a
    worker's memory (programs still needed, the shared ``population``'s, are recompiled on their
    next call, mostly from the persistent cache above). Measured with it, on a fresh clone: workers
    still grew to 8.1 and 6.1 GB over the run (23 GB machine), so most of the growth is elsewhere.
    """
    yield
    import gc

    import jax

    gc.collect()
    jax.clear_caches()


@pytest.fixture(scope="session")
def simulated():
    """40 training patients with known truth, plus 3 held-out patients (first 3 visits)."""
    df, truth = simulate(n_patients=43, seed=11)
    ids = df.patient.unique()
    train = df[df.patient.isin(ids[:40])]
    held = df[df.patient.isin(ids[40:]) & (df.time <= 6.0)]
    return train, held, truth


def shared_population(name: str, build, tmp_path_factory) -> bt.Population:
    """A population fitted once per test run, whichever xdist worker asks first: it fits and saves
    it (atomically, ``bt.save``) under the run's shared temporary folder, the others wait on a file
    lock and load it (checksums verified). The folder is new for each run, so nothing outlives it.
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the workers' common parent
    folder = root / f"shared-population-{name}"
    with FileLock(f"{folder}.lock"):
        if folder.exists():
            return bt.load(folder)
        pop = build()
        bt.save(pop, folder)
        return pop


@pytest.fixture(scope="session")
def population(simulated, tmp_path_factory):
    def build():
        train, _, _ = simulated
        cohort = bt.Cohort(train, covariates=["age", "sex"], therapies=THERAPIES, key=KEY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return bt.fit(cohort, draws=1000, tune=1000, seed=1)

    return shared_population("progression", build, tmp_path_factory)
