"""Session fixtures: one simulated cohort and its population fit, shared by the tests."""

import warnings

import pytest

import bayestwin as bt
from bayestwin.families.progression import simulate

KEY = b"tests-pseudonym-key-01"
THERAPIES = ["standard", "drug_a", "drug_b"]


@pytest.fixture(scope="session")
def simulated():
    """40 training patients with known truth, plus 3 held-out patients (first 3 visits)."""
    df, truth = simulate(n_patients=43, seed=11)
    ids = df.patient.unique()
    train = df[df.patient.isin(ids[:40])]
    held = df[df.patient.isin(ids[40:]) & (df.time <= 6.0)]
    return train, held, truth


@pytest.fixture(scope="session")
def population(simulated):
    train, _, _ = simulated
    cohort = bt.Cohort(train, covariates=["age", "sex"], therapies=THERAPIES, key=KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return bt.fit(cohort, draws=1000, tune=1000, seed=1)
