"""Forecast: posterior predictive trajectories per patient, therapy and time."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import xarray as xr

from bayestwin import decision

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class Forecast:
    """Posterior predictive of twins under candidate therapies.

    ``idata.posterior_predictive`` holds ``mean`` (expected trajectory) and ``observation``
    (a new measurement), dims (chain, draw, patient, therapy, time).
    """

    def __init__(self, idata: xr.DataTree, verdict=None):
        self.idata = idata
        self.verdict = verdict

    @property
    def draws(self) -> xr.Dataset:
        return self.idata.posterior_predictive.to_dataset()

    def summary(self, quantity: str | None = None) -> pd.DataFrame:
        """Tidy table: patient, therapy, time, quantity, mean, median and 5/25/75/95 % quantiles."""
        names = [quantity] if quantity else ["mean", "observation"]
        frames = []
        for name in names:
            da = self.draws[name]
            q = da.quantile(list(QUANTILES), dim=["chain", "draw"])
            df = da.mean(["chain", "draw"]).to_dataframe(name="mean").reset_index()
            for p in QUANTILES:
                col = "median" if p == 0.5 else f"q{int(round(p * 100)):02d}"
                df[col] = q.sel(quantile=p).transpose("patient", "therapy", "time").to_numpy().ravel()
            df.insert(3, "quantity", name)
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def prob_best(self, time: float, direction: str = "lower", quantity: str = "mean") -> pd.DataFrame:
        """P(each therapy is best at ``time``) per patient; see :func:`bayestwin.decision.prob_best`."""
        return decision.prob_best(self.draws[quantity], time, direction)

    def prob_cross(self, threshold: float, by: float, direction: str = "above", quantity: str = "mean") -> pd.DataFrame:
        """P(outcome crosses ``threshold`` by ``by``) per patient and therapy."""
        return decision.prob_cross(self.draws[quantity], threshold, by, direction)

    def expected_utility(self, utility: Callable, time: float | None = None, quantity: str = "mean") -> pd.DataFrame:
        """Expected utility per patient and therapy; see :func:`bayestwin.decision.expected_utility`."""
        return decision.expected_utility(self.draws[quantity], utility, time)

    def plot(self, patient: str | None = None, quantity: str = "observation", ax=None):
        """Median and 50/90 % bands over time, one colour per therapy (matplotlib)."""
        import matplotlib.pyplot as plt

        da = self.draws[quantity]
        patient = patient or str(da.patient.values[0])
        da = da.sel(patient=patient)
        ax = ax or plt.subplots(figsize=(7, 4))[1]
        q = da.quantile([0.05, 0.25, 0.5, 0.75, 0.95], dim=["chain", "draw"])
        t = da.time.values
        for th in da.therapy.values:
            qq = q.sel(therapy=th).to_numpy()
            (line,) = ax.plot(t, qq[2], label=str(th))
            ax.fill_between(t, qq[1], qq[3], color=line.get_color(), alpha=0.3)
            ax.fill_between(t, qq[0], qq[4], color=line.get_color(), alpha=0.12)
        ax.set_xlabel("time")
        ax.set_ylabel(f"outcome ({quantity})")
        ax.set_title(f"forecast for patient {patient}: median, 50% and 90% bands")
        ax.legend(title="therapy")
        return ax

    def __repr__(self) -> str:
        s = self.draws.sizes
        return (
            f"Forecast({s['patient']} patient(s) x {s['therapy']} therapies x {s['time']} times, "
            f"{s['chain']}x{s['draw']} draws)"
        )

    def _repr_html_(self) -> str:
        t = float(np.max(self.draws.time))
        table = self.summary("observation")
        return f"<b>{self!r}</b>" + table[table.time == t].to_html(index=False, float_format=lambda x: f"{x:.3g}")
