"""bayestwin's warnings point at the caller's own line, not at the package's internals (issue 21,
item 4): Python's default filter then says each once per line of user code."""

import warnings

import pandas as pd

import bayestwin as bt
from bayestwin.errors import ConvergenceWarning, KeyWarning
from bayestwin.review.convergence import Verdict


def test_a_warning_from_deep_inside_is_attributed_to_the_callers_line():
    df = pd.DataFrame({"patient": ["a", "a"], "time": [0.0, 1.0], "outcome": [1.0, 2.0]})
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        bt.Cohort(df, therapy=None)  # no key: a KeyWarning from bayestwin.data.pseudonym
        Verdict(converged=False, table=pd.DataFrame(), failing=["R-hat > 1.01"]).warn("the fit")
    kinds = [w.category for w in said]
    assert KeyWarning in kinds and ConvergenceWarning in kinds
    for w in said:
        if w.category in (KeyWarning, ConvergenceWarning):
            assert w.filename == __file__, (w.category, w.filename)
