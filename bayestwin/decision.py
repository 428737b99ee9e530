"""Decisions from forecasts: pure functions over labelled posterior predictive draws.

Each takes a DataArray with dims (chain, draw, patient, therapy, time) and returns a tidy result.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import xarray as xr

SAMPLE = ["chain", "draw"]


def _check_direction(direction: str) -> None:
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', not {direction!r}")


def prob_best(draws: xr.DataArray, time: float, direction: str = "lower") -> pd.DataFrame:
    """P(each therapy gives the best outcome at ``time``), per patient (rows sum to 1).

    ``direction='lower'``: a lower outcome is better (e.g. a disease score).
    """
    _check_direction(direction)
    at = draws.sel(time=time, method="nearest")
    best = at.argmin("therapy") if direction == "lower" else at.argmax("therapy")
    probs = xr.concat([(best == k).mean(SAMPLE) for k in range(at.sizes["therapy"])], dim=at.therapy)
    return probs.transpose("patient", "therapy").to_pandas()


def prob_cross(draws: xr.DataArray, threshold: float, by: float, direction: str = "above") -> pd.DataFrame:
    """P(the outcome crosses ``threshold`` at any forecast time <= ``by``), patient x therapy."""
    if direction not in ("above", "below"):
        raise ValueError(f"direction must be 'above' or 'below', not {direction!r}")
    window = draws.sel(time=draws.time[draws.time <= by])
    if window.sizes["time"] == 0:
        raise ValueError(f"no forecast time at or before {by}")
    crossed = (window > threshold) if direction == "above" else (window < threshold)
    return crossed.any("time").mean(SAMPLE).transpose("patient", "therapy").to_pandas()


def expected_utility(
    draws: xr.DataArray, utility: Callable[[xr.DataArray], xr.DataArray], time: float | None = None
) -> pd.DataFrame:
    """Posterior expected utility per patient and therapy.

    ``utility`` maps outcome draws (a DataArray; at ``time`` if given, else the whole trajectory
    with a ``time`` dim it must reduce) to utilities of the same draws.
    """
    x = draws if time is None else draws.sel(time=time, method="nearest")
    u = utility(x)
    if "time" in u.dims:
        raise ValueError("utility must reduce the 'time' dimension when time=None")
    return u.mean(SAMPLE).transpose("patient", "therapy").to_pandas()
