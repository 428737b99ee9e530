"""Review: the convergence gate and forecast calibration."""

from bayestwin.review.calibration import Calibration, forecast_calibration
from bayestwin.review.convergence import Thresholds, Verdict, diagnostics, gate

__all__ = ["Calibration", "Thresholds", "Verdict", "diagnostics", "forecast_calibration", "gate"]
