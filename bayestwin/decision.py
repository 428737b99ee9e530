"""Decisions from forecasts: pure functions over labelled posterior predictive draws.

Each takes a DataArray with dims (chain, draw, patient, therapy, time) and returns a tidy result.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import xarray as xr

SAMPLE = ["chain", "draw"]


def _check_direction(direction: str) -> None:
    if direction not in ("lower", "higher"):
        raise ValueError(f"direction must be 'lower' or 'higher', not {direction!r}")


def at_time(draws: xr.DataArray, time: float) -> xr.DataArray:
    """``draws`` at ``time``, which must be one of the forecast times (a relative tolerance of
    1e-9 allows for float round-off); any other time is an error naming the nearest ones. An
    answer for the nearest time instead would be an answer to another question."""
    times = draws["time"].to_numpy().astype(float)
    t = float(time)
    hit = np.flatnonzero(np.isclose(times, t, rtol=1e-9, atol=1e-12))
    if not len(hit):
        near = times[np.argsort(np.abs(times - t))[:3]]
        raise ValueError(
            f"time {t:g} is not a forecast time (nearest: {', '.join(f'{x:g}' for x in sorted(near))}); "
            "forecast at that time first (predict(times=...))"
        )
    return draws.isel(time=int(hit[0]))


def prob_best(draws: xr.DataArray, time: float, direction: str = "lower") -> pd.DataFrame:
    """P(each therapy gives the best outcome at ``time``), per patient (rows sum to 1).

    ``direction='lower'``: a lower outcome is better (e.g. a disease score). ``time`` must be
    one of the forecast times.
    """
    _check_direction(direction)
    at = at_time(draws, time)
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
    x = draws if time is None else at_time(draws, time)
    u = utility(x)
    if "time" in u.dims:
        raise ValueError("utility must reduce the 'time' dimension when time=None")
    return u.mean(SAMPLE).transpose("patient", "therapy").to_pandas()
