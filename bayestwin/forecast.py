"""Forecast: posterior predictive trajectories per patient, therapy and time."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import xarray as xr

from bayestwin import decision
from bayestwin.data.pseudonym import own_ids

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class Forecast:
    """Posterior predictive of twins under candidate therapies.

    ``idata.posterior_predictive`` holds ``mean`` (expected trajectory) and ``observation``
    (a new measurement), dims (chain, draw, patient, therapy, time). When the twin's own data are
    known, ``idata.observed_data`` holds its measurements (``value`` by ``obs``, with each row's
    ``patient`` and ``time``), ``idata.constant_data`` the time each patient's candidate therapy
    starts (``start`` by ``patient``), and the attributes ``time_label`` / ``outcome_label`` of
    ``posterior_predictive`` the table's own column names: :meth:`plot` shows all three.
    """

    def __init__(self, idata: xr.DataTree, verdict=None):
        self.idata = idata
        self.verdict = verdict

    @property
    def draws(self) -> xr.Dataset:
        """The posterior predictive draws: ``mean`` and ``observation`` (chain, draw, patient, therapy, time)."""
        return self.idata.posterior_predictive.to_dataset()

    def summary(self, quantity: str | None = None, *, ids=None) -> pd.DataFrame:
        """Tidy table: patient, therapy, time, quantity, mean, median and 5/25/75/95 % quantiles.

        ``ids``: a mapping from pseudonym to your own identifier (``bt.reidentify(your_ids, key)``):
        adds the column ``patient_id`` next to ``patient``.
        """
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
        out = pd.concat(frames, ignore_index=True)
        if ids is not None:
            out.insert(1, "patient_id", own_ids(out["patient"].tolist(), ids))
        return out

    def prob_best(self, time: float, direction: str = "lower", quantity: str = "mean") -> pd.DataFrame:
        """P(each therapy is best at ``time``) per patient; see :func:`bayestwin.decision.prob_best`."""
        return decision.prob_best(self.draws[quantity], time, direction)

    def prob_cross(self, threshold: float, by: float, direction: str = "above", quantity: str = "mean") -> pd.DataFrame:
        """P(outcome crosses ``threshold`` by ``by``) per patient and therapy."""
        return decision.prob_cross(self.draws[quantity], threshold, by, direction)

    def expected_utility(self, utility: Callable, time: float | None = None, quantity: str = "mean") -> pd.DataFrame:
        """Expected utility per patient and therapy; see :func:`bayestwin.decision.expected_utility`."""
        return decision.expected_utility(self.draws[quantity], utility, time)

    def plot(self, patient: str | None = None, quantity: str = "observation", ax=None, *, ids=None):
        """Median and 50/90 % bands over time, one colour per therapy, with the patient's own
        measurements and the time the therapy starts (matplotlib).

        ``ids``: a mapping from pseudonym to your own identifier (``bt.reidentify(your_ids, key)``);
        then ``patient`` may be your identifier, and the title shows it.
        """
        import matplotlib.pyplot as plt

        da = self.draws[quantity]
        pseudonyms = [str(p) for p in da.patient.values]
        shown = dict(zip(pseudonyms, own_ids(pseudonyms, ids), strict=True)) if ids is not None else {}
        if patient is not None and patient not in pseudonyms:
            mine = [p for p, own in shown.items() if str(own) == str(patient)]
            if not mine:
                raise KeyError(f"patient {patient!r} is not in this forecast (patients: {pseudonyms[:5]}...)")
            patient = mine[0]
        patient = patient or pseudonyms[0]
        da = da.sel(patient=patient)
        ax = ax or plt.subplots(figsize=(7, 4), layout="constrained")[1]
        q = da.quantile([0.05, 0.25, 0.5, 0.75, 0.95], dim=["chain", "draw"])
        t = da.time.values
        for th in da.therapy.values:
            qq = q.sel(therapy=th).to_numpy()
            (line,) = ax.plot(t, qq[2], label=str(th))
            ax.fill_between(t, qq[1], qq[3], color=line.get_color(), alpha=0.3)
            ax.fill_between(t, qq[0], qq[4], color=line.get_color(), alpha=0.12)
        seen = self.observed(patient)
        if len(seen):
            ax.plot(seen["time"], seen["value"], "o", color="black", ms=4, label="measured", zorder=5)
        if "constant_data" in self.idata.children and "start" in self.idata.constant_data:
            start = float(self.idata.constant_data["start"].sel(patient=patient))
            ax.axvline(start, color="grey", ls="--", lw=1, label=f"therapy from {start:g}")
        attrs = self.idata.posterior_predictive.attrs
        ax.set_xlabel(attrs.get("time_label", "time"))
        ax.set_ylabel(f"{attrs.get('outcome_label', 'outcome')} ({quantity})")
        ax.set_title(f"forecast for patient {shown.get(patient, patient)}: median, 50% and 90% bands")
        ax.legend(title="therapy", fontsize=8)
        return ax

    def observed(self, patient: str | None = None) -> pd.DataFrame:
        """The twin's own measurements (patient, time, value), of one patient or all; empty when
        the forecast was made without them."""
        if "observed_data" not in self.idata.children:
            return pd.DataFrame({"patient": [], "time": [], "value": []})
        ds = self.idata.observed_data.to_dataset()
        columns = {"patient": ds["patient"].to_numpy().astype(str), "time": ds["time"].to_numpy()}
        df = pd.DataFrame(columns | {"value": ds["value"].to_numpy()})
        return df if patient is None else df[df.patient == patient].reset_index(drop=True)

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


class EventForecast:
    """Event risk of twins under candidate therapies (time-to-event families).

    ``idata.posterior_predictive`` holds ``survival``, the probability of no event from the
    forecast's start (each patient's end of follow-up, or the scenario's start) to each time, and
    ``cumhaz``, the cumulative hazard over the same interval; dims (chain, draw, patient,
    therapy, time). The posterior draws carry the uncertainty: a credible band of a survival
    curve is a quantile over draws.
    """

    def __init__(self, idata: xr.DataTree, verdict=None):
        self.idata = idata
        self.verdict = verdict

    @classmethod
    def from_cumhaz(cls, cumhaz: np.ndarray, coords: dict, verdict=None, description: str = "") -> EventForecast:
        """An event forecast from cumulative hazards (chain, draw, patient, therapy, time) and their coordinates."""
        dims = ("chain", "draw", "patient", "therapy", "time")
        ds = xr.Dataset({"cumhaz": (dims, cumhaz), "survival": (dims, np.exp(-cumhaz))}, coords=coords)
        ds["survival"].attrs["description"] = "P(no event from the forecast start to time) " + description
        ds["cumhaz"].attrs["description"] = "cumulative hazard from the forecast start to time"
        return cls(xr.DataTree.from_dict({"posterior_predictive": ds}), verdict)

    @property
    def draws(self) -> xr.Dataset:
        """The posterior predictive draws: ``survival`` and ``cumhaz`` (chain, draw, patient, therapy, time)."""
        return self.idata.posterior_predictive.to_dataset()

    @property
    def survival(self) -> xr.DataArray:
        """P(no event from the forecast's start to each time), per draw (chain, draw, patient, therapy, time)."""
        return self.draws["survival"]

    def _at(self, time: float) -> xr.DataArray:
        """Survival draws at ``time``, linear in the cumulative hazard between forecast times."""
        t = self.survival.time.values
        if not t.min() <= time <= t.max():
            raise ValueError(f"time {time:g} is outside the forecast times [{t.min():g}, {t.max():g}]")
        return np.exp(-self.draws["cumhaz"].interp(time=time))

    def summary(self) -> pd.DataFrame:
        """Tidy table: patient, therapy, time, survival mean, median and 5/25/75/95 % quantiles."""
        da = self.survival
        q = da.quantile(list(QUANTILES), dim=["chain", "draw"])
        df = da.mean(["chain", "draw"]).to_dataframe(name="mean").reset_index()
        for p in QUANTILES:
            col = "median" if p == 0.5 else f"q{int(round(p * 100)):02d}"
            df[col] = q.sel(quantile=p).transpose("patient", "therapy", "time").to_numpy().ravel()
        df.insert(3, "quantity", "survival")
        return df

    def risk(self, by: float) -> pd.DataFrame:
        """P(event by ``by``) per patient and therapy: posterior mean and 90% credible interval."""
        return _table(1.0 - self._at(by))

    def rmst_draws(self, tau: float) -> xr.DataArray:
        """Restricted mean event-free time from the forecast start to ``tau`` (trapezoid over
        the forecast times, which should be dense: 41 by default), draws (chain, draw, patient, therapy)."""
        s = self.survival
        t = s.time.values
        keep = t[t < tau]
        grid = xr.concat([s.sel(time=keep), self._at(tau).expand_dims(time=[tau])], dim="time")
        return grid.integrate("time")

    def rmst(self, tau: float) -> pd.DataFrame:
        """Restricted mean survival time up to ``tau`` per patient and therapy (mean, 90% CrI)."""
        return _table(self.rmst_draws(tau))

    def rmst_difference(self, tau: float, reference: str | None = None) -> pd.DataFrame:
        """RMST of each therapy minus the ``reference`` therapy's (default: the first), with its
        90% credible interval and the posterior probability that it is positive."""
        r = self.rmst_draws(tau)
        reference = reference if reference is not None else str(r.therapy.values[0])
        diff = (r - r.sel(therapy=reference)).drop_sel(therapy=reference)
        out = _table(diff)
        out["prob_positive"] = (diff > 0).mean(["chain", "draw"]).transpose("patient", "therapy").to_numpy().ravel()
        return out

    def prob_best(self, tau: float, by: str = "rmst") -> pd.DataFrame:
        """P(each therapy is best) per patient: the longest RMST up to ``tau`` (``by="rmst"``) or
        the lowest risk of an event by ``tau`` (``by="risk"``). Rows sum to 1."""
        if by == "rmst":
            return decision.prob_best(self.rmst_draws(tau).expand_dims(time=[tau]), tau, "higher")
        if by == "risk":
            return decision.prob_best((1.0 - self._at(tau)).expand_dims(time=[tau]), tau, "lower")
        raise ValueError(f"by must be 'rmst' or 'risk', not {by!r}")

    def plot(self, patient: str | None = None, ax=None):
        """Survival curves per therapy: posterior median and 90% credible band (matplotlib)."""
        import matplotlib.pyplot as plt

        da = self.survival
        patient = patient or str(da.patient.values[0])
        da = da.sel(patient=patient)
        ax = ax or plt.subplots(figsize=(7, 4))[1]
        q = da.quantile([0.05, 0.5, 0.95], dim=["chain", "draw"])
        t = da.time.values
        for th in da.therapy.values:
            qq = q.sel(therapy=th).to_numpy()
            (line,) = ax.step(t, qq[1], where="post", label=str(th))
            ax.fill_between(t, qq[0], qq[2], step="post", color=line.get_color(), alpha=0.2)
        ax.set(xlabel="time", ylabel="P(event-free)", ylim=(0, 1.02))
        ax.set_title(f"event-free probability for patient {patient}: median and 90% band")
        ax.legend(title="therapy")
        return ax

    def __repr__(self) -> str:
        s = self.draws.sizes
        return (
            f"EventForecast({s['patient']} patient(s) x {s['therapy']} therapies x {s['time']} times, "
            f"{s['chain']}x{s['draw']} draws)"
        )

    def _repr_html_(self) -> str:
        t = float(np.max(self.draws.time))
        return f"<b>{self!r}</b><br>P(event by {t:g}):" + self.risk(t).to_html(float_format=lambda x: f"{x:.3g}")


def _table(da: xr.DataArray) -> pd.DataFrame:
    """Posterior mean, median and 90% interval per patient and therapy."""
    q = da.quantile([0.05, 0.5, 0.95], dim=["chain", "draw"])
    out = da.mean(["chain", "draw"]).transpose("patient", "therapy").to_dataframe(name="mean")
    out = out.drop(columns=[c for c in out.columns if c != "mean"])
    for p, name in ((0.5, "median"), (0.05, "q05"), (0.95, "q95")):
        out[name] = q.sel(quantile=p).transpose("patient", "therapy").to_numpy().ravel()
    return out
