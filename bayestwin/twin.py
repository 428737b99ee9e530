"""Twin: the posterior of one or many patients given the population and their own data."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import xarray as xr

from bayestwin.data.cohort import PATIENT, Cohort
from bayestwin.data.pseudonym import own_ids
from bayestwin.engine import condition as cond
from bayestwin.engine.importance import ImportanceConfig
from bayestwin.engine.nuts import NutsConfig
from bayestwin.errors import OutOfPopulationWarning, warn
from bayestwin.review.convergence import Thresholds, Verdict, gate
from bayestwin.review.twins import OUT_OF_POPULATION_LEVEL, out_of_population  # noqa: F401 - re-exported


@dataclass
class Twin:
    """Posterior twins of a batch of patients (dim ``patient``, labelled by pseudonym).

    Attributes
    ----------
    population
        The Population it was conditioned on.
    cohort
        The patients' validated rows.
    idata
        ArviZ DataTree with ``posterior`` (chain, draw, patient) and ``sample_stats``.
    verdict
        Convergence gate per patient (``verdict.table``: R-hat, ESS, divergences, E-BFMI).
    """

    population: object
    cohort: Cohort
    idata: xr.DataTree
    verdict: Verdict
    config: NutsConfig
    seed: int
    _positions: np.ndarray  # (B, C, D, d) raw sampler positions, for predictions
    importance: ImportanceConfig | None = None  # the fast path's settings, when it was asked for

    @classmethod
    def from_cohort(
        cls,
        population,
        cohort: Cohort,
        cfg: NutsConfig,
        *,
        seed=0,
        thresholds=Thresholds(),
        importance: ImportanceConfig | None = None,
    ) -> Twin:
        """Condition ``population`` on ``cohort`` by NUTS, or by importance sampling first.

        With ``importance``, every twin is first drawn by Laplace-proposal importance sampling;
        twins that then fail the gate (Pareto k̂, ESS, R-hat across the independent samplers)
        are redone by NUTS with ``cfg``, preconditioned by their final importance proposal and with
        ``importance.fallback_tune`` warmup steps (0: plain NUTS). ``verdict.table["method"]``
        says which path each took.
        """
        fam = population.family
        patients = cohort.patients
        design = fam.design(cohort.frame, cohort.baseline, population.schema)
        seeds = population.patient_seeds(patients, seed)
        # this batch's program first: the population's approximation below reuses its blocks
        # instead of compiling a program of its own (0.4-0.5 s of a first twin)
        _, n_pad, slots = cond.padded_shape(design, patients, fam)
        population.program(n_pad, **slots)
        out = cond.condition_batch(
            population.compiled, fam, population.approx, design, patients, seeds, cfg, importance, thresholds
        )
        values, stats, table = out.values, out.stats, out.table
        verdict = gate(table, thresholds, by="patient")
        verdict.warn(f"{(~verdict.table['converged']).sum()} of {len(patients)} twin(s)")
        _warn_out_of_population(table)
        idata = _to_datatree(values, stats, patients, fam, population.program(out.n_pad, **out.slots).model)
        idata.attrs.update(verdict.to_attrs())
        return cls(population, cohort, idata, verdict, cfg, seed, stats["position"], importance)

    # --------------------------------------------------------------- access
    @property
    def patients(self) -> list[str]:
        """The twins' patients (pseudonyms), in order."""
        return self.cohort.patients

    @property
    def posterior(self) -> xr.Dataset:
        """The twins' posterior draws (an xarray Dataset: chain, draw, patient, ...)."""
        return self.idata.posterior.to_dataset()

    def summary(self, var_names: Sequence[str] | None = None, *, ids=None) -> pd.DataFrame:
        """Posterior mean, SD and 90% interval of each patient-level quantity, one row per patient.

        ``ids``: a mapping from pseudonym to your own identifier (``bt.reidentify(your_ids, key)``);
        the rows are then labelled by your identifiers (the twin itself keeps only pseudonyms).
        """
        names = var_names or list(self.population.family.patient_outputs)
        post = self.posterior[names]
        q = post.quantile([0.05, 0.95], dim=["chain", "draw"])
        out = {}
        for n in names:
            out[(n, "mean")] = post[n].mean(["chain", "draw"]).to_series()
            out[(n, "sd")] = post[n].std(["chain", "draw"]).to_series()
            out[(n, "q05")] = q[n].sel(quantile=0.05).to_series()
            out[(n, "q95")] = q[n].sel(quantile=0.95).to_series()
        table = pd.DataFrame(out)
        table[("gate", "converged")] = self.verdict.table["converged"]
        table[("gate", "out_of_population")] = self.verdict.table["out_of_population"]
        if ids is not None:
            table.index = pd.Index(own_ids(list(table.index), ids), name="patient_id")
        return table

    # -------------------------------------------------------------- update
    def update(self, new_rows, *, key=None, baseline=None, seed: int | None = None) -> Twin:
        """Condition again on all rows so far plus ``new_rows`` (same key as before).

        The new posterior is computed from the population posterior and the union of the data,
        not from an approximation of the previous twin, so repeated updates do not accumulate
        approximation error: it equals conditioning on all rows at once.
        """
        new = self.population.cohort(new_rows, key=key, baseline=baseline)
        merged = self.cohort.extend(new)
        return Twin.from_cohort(
            self.population,
            merged,
            self.config,
            seed=self.seed + 1 if seed is None else seed,
            thresholds=self.verdict.thresholds,
            importance=self.importance,
        )

    # ------------------------------------------------------------- predict
    def predict(
        self, therapies=None, times=None, *, start: float | None = None, seed: int = 0, output: str | None = None
    ):
        """Forecast each patient under each candidate therapy (a regimen, for PK twins).

        Parameters
        ----------
        therapies
            Candidate therapies (default: all in the population's schema). For a PK twin:
            :class:`~bayestwin.dosing.Regimen` s given from ``start`` on, on top of the doses
            already recorded (default: no new doses, the scenario ``"as recorded"``).
        times
            Forecast times (default: from the last visit or event to one time scale beyond it).
        start
            When the candidate therapy starts (default: each patient's last observed time or
            event). Before it, the patient's recorded history applies.
        output
            For a family with several outputs (``ode``, e.g. ``"anc"`` of the Friberg model):
            the one to forecast (default: its first observed output).

        Returns
        -------
        Forecast
            ``mean`` (the expected trajectory or concentration) and ``observation`` (a new
            measurement, with residual error), dims (chain, draw, patient, therapy, time).
            For a time-to-event twin an :class:`~bayestwin.forecast.EventForecast`: survival
            from ``start`` per therapy, risk by a time, RMST and its differences, P(best).
        """
        from bayestwin.forecast import Forecast

        fam, schema = self.population.family, self.population.schema
        which = {}
        if output is not None:
            if "output" not in inspect.signature(fam.forecast_inputs).parameters:
                raise TypeError(f"output= is for families with several outputs; family {fam.name!r} has one")
            which = {"output": output}
        labels, times, pred = fam.forecast_inputs(self.cohort, schema, therapies, times, start, **which)
        predict = self.population.compiled("predict", cond.padded_length(1), cond.make_predict)  # shapes free
        mu, extra = predict(self._positions, pred)  # (B, S, C, D, T)
        post = self.posterior
        coords = {
            "chain": post.chain.values,
            "draw": post.draw.values,
            "patient": self.patients,
            "therapy": labels,
            "time": times,
        }
        if fam.forecast_kind == "event":  # time-to-event: survival per therapy
            from bayestwin.forecast import EventForecast

            cumhaz = np.moveaxis(np.asarray(mu), (2, 3), (0, 1))
            return EventForecast.from_cumhaz(cumhaz, coords, verdict=self.verdict)
        params = {
            n: jnp.asarray(post[n].transpose("patient", "chain", "draw").to_numpy())[:, None, :, :, None]
            for n in fam.residual_params
        }
        params |= extra  # per-observation parameters of the observation law (user models)
        obs = fam.observe(jax.random.key(seed), mu, params, **which)
        mean = np.moveaxis(np.asarray(mu), (2, 3), (0, 1))  # (C, D, B, S, T)
        obs = np.moveaxis(np.asarray(obs), (2, 3), (0, 1))
        dims = ("chain", "draw", "patient", "therapy", "time")
        ds = xr.Dataset({"mean": (dims, mean), "observation": (dims, obs)}, coords=coords)
        ds["mean"].attrs["description"] = f"expected {output or fam.prediction} (structural prediction)"
        ds["observation"].attrs["description"] = "a new measurement (prediction plus residual error)"
        tree = {"posterior_predictive": ds}
        recorded = None if output is not None else _recorded(self.cohort)
        if recorded is not None:
            rows, last, (time_label, outcome_label) = recorded
            ds.attrs |= {"time_label": time_label, "outcome_label": outcome_label}
            rows = rows[rows.patient.isin(self.patients)]
            tree["observed_data"] = xr.Dataset(
                {"value": ("obs", rows["value"].to_numpy(float))},
                coords={
                    "patient": ("obs", rows["patient"].to_numpy(str)),
                    "time": ("obs", rows["time"].to_numpy(float)),
                },
            )
            begins = last.reindex(self.patients).fillna(0.0).to_numpy(float) if start is None else float(start)
            starts = np.broadcast_to(begins, (len(self.patients),))
            tree["constant_data"] = xr.Dataset({"start": ("patient", starts)}, coords={"patient": self.patients})
        return Forecast(xr.DataTree.from_dict(tree), verdict=self.verdict)

    def select(self, patients: Sequence[str]) -> Twin:
        """The twins of ``patients`` (pseudonyms) alone, in this twin's order: their rows,
        posterior, sampler positions and verdict (re-gated over them). Nothing is re-sampled, so
        forecasts of the selection equal those of the whole batch for the same patients."""
        wanted = set(patients)
        if missing := [p for p in patients if p not in set(self.patients)]:
            raise KeyError(f"patient {missing[0]!r} has no twin in this batch")
        idx = np.array([i for i, p in enumerate(self.patients) if p in wanted], int)
        cohort = self.cohort.restrict(self.cohort.frame[self.cohort.frame[PATIENT].isin(wanted)])
        table = self.verdict.table.iloc[idx].drop(columns="converged")
        verdict = gate(table, self.verdict.thresholds, by="patient")
        idata = self.idata.isel(patient=idx)
        idata.attrs.update(verdict.to_attrs())
        positions = self._positions[idx]
        return Twin(self.population, cohort, idata, verdict, self.config, self.seed, positions, self.importance)

    def __getitem__(self, patient: str) -> xr.Dataset:
        return self.posterior.sel(patient=patient)

    def save(self, path):
        """Save to the folder ``path`` atomically, with its population (netCDF + Parquet + JSON
        model card with checksums); see :func:`bayestwin.io.save`. Reload with ``bt.load(path)``."""
        from bayestwin.io import save

        return save(self, path)

    def __repr__(self) -> str:
        ok = int(self.verdict.table["converged"].sum())
        out = int(self.verdict.table["out_of_population"].sum())
        return (
            f"Twin({len(self.patients)} patient(s), {self.config.chains}x{self.config.draws} draws, "
            f"{ok} converged, {out} out of population; verdict: {self.verdict})"
        )

    def _repr_html_(self) -> str:
        return f"<b>Twin</b> — <i>{self.verdict}</i>" + self.summary().to_html(float_format=lambda x: f"{x:.3g}")


def _warn_out_of_population(table: pd.DataFrame) -> None:
    out = table.index[table["out_of_population"].to_numpy(bool)]
    if len(out):
        level = f"{OUT_OF_POPULATION_LEVEL:.0%}"
        names = ", ".join(map(str, out[:5])) + (f" and {len(out) - 5} more" if len(out) > 5 else "")
        warn(
            f"{len(out)} twin(s) outside the population's {level} predictive region "
            f"(random effects more extreme than the population allows): {names}",
            OutOfPopulationWarning,
        )


def _to_datatree(values: dict, stats: dict, patients, family, model=None) -> xr.DataTree:
    """The twins' DataTree; dims named as in the family's PyMC ``model`` (e.g. ``covariate``)."""
    dims = ("patient", "chain", "draw")
    named = model.named_vars_to_dims if model is not None else {}
    post, coords = {}, {"patient": patients}
    for name, arr in values.items():
        own = tuple(named.get(name) or ())
        if name in family.patient_outputs:
            arr = arr[:, :, :, 0]  # one-patient slot
            own = own[1:]
        extra = tuple(own[i] if i < len(own) and own[i] is not None else f"{name}_dim_{i}" for i in range(arr.ndim - 3))
        for i, d in enumerate(extra):
            labels = model.coords.get(d) if model is not None else None
            if labels is not None and len(labels) == arr.shape[3 + i]:
                coords.setdefault(d, list(labels))
        post[name] = (dims + extra, arr)
    posterior = xr.Dataset(post, coords=coords).transpose("chain", "draw", "patient", ...)
    per_draw = ("diverging", "acceptance_rate", "n_steps", "energy")
    per_chain = ("step_size", "khat", "ess_is")
    sample_stats = xr.Dataset(
        {**{k: (dims, stats[k]) for k in per_draw}, **{k: (("patient", "chain"), stats[k]) for k in per_chain}},
        coords={"patient": patients},
    ).transpose("chain", "draw", "patient", ...)
    sample_stats["khat"].attrs["description"] = "Pareto k of the importance weights (importance twins only)"
    sample_stats["ess_is"].attrs["description"] = "PSIS effective sample size of the proposals (importance twins)"
    return xr.DataTree.from_dict({"posterior": posterior, "sample_stats": sample_stats})


def _recorded(cohort):
    """A twin's own measurements for its forecast plots: (rows: patient, time, value; each
    patient's last recorded time, the default start of a candidate therapy; the table's time and
    outcome column names), or None when the cohort's kind is not known here."""
    if hasattr(cohort, "observations") and "DV" in getattr(cohort, "frame", {}):  # NONMEM-style events
        obs = cohort.observations()
        obs = obs[~obs["BLQ"] & np.isfinite(obs["DV"].to_numpy(float))]
        rows = pd.DataFrame({"patient": obs["ID"].astype(str), "time": obs["TIME"], "value": obs["DV"]})
        return rows, cohort.frame.groupby("ID")["TIME"].max(), ("TIME", "DV")
    columns = getattr(cohort, "columns", None)
    frame = getattr(cohort, "frame", None)
    if columns is None or frame is None or "outcome" not in frame:
        return None
    seen = frame[np.isfinite(frame["outcome"].to_numpy(float))]
    rows = pd.DataFrame({"patient": seen["patient"].astype(str), "time": seen["time"], "value": seen["outcome"]})
    return rows, frame.groupby("patient")["time"].max(), (columns.time, columns.outcome)
