"""Review: the convergence gate (and, later, calibration and reports)."""

from bayestwin.review.convergence import Thresholds, Verdict, diagnostics, gate

__all__ = ["Thresholds", "Verdict", "diagnostics", "gate"]
