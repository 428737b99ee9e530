"""Review: the convergence gate, predictive checks, forecast calibration and the reviewer report.

``from bayestwin.review import review`` writes the one-file HTML report of a fit or twins.
"""

from bayestwin.review.calibration import Calibration, forecast_calibration
from bayestwin.review.convergence import Thresholds, Verdict, diagnostics, free_quantities, gate
from bayestwin.review.predictive import compare, loo, pareto_k_table, predictive_check
from bayestwin.review.report import review

__all__ = [
    "Calibration",
    "Thresholds",
    "Verdict",
    "compare",
    "diagnostics",
    "forecast_calibration",
    "free_quantities",
    "gate",
    "loo",
    "pareto_k_table",
    "predictive_check",
    "review",
]
