"""Twin: the posterior of one or many patients given the population and their own data."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import xarray as xr

from bayestwin.data.cohort import PATIENT, Cohort
from bayestwin.engine import condition as cond
from bayestwin.engine.importance import ImportanceConfig
from bayestwin.engine.nuts import NutsConfig
from bayestwin.errors import OutOfPopulationWarning
from bayestwin.review import batched
from bayestwin.review.convergence import Thresholds, Verdict, gate


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
        fam, schema = population.family, population.schema
        patients = cohort.patients
        design = fam.design(cohort.frame, cohort.baseline, schema)
        data, mask, n_rows, n_pad, slots = cond.padded_batch(design, patients, fam)
        approx = population.approx
        seeds = population.patient_seeds(patients, seed)

        def nuts(sel, run_cfg=cfg, affine=None):
            pre = affine is not None
            build = lambda p, a: cond.make_run(p, a, run_cfg, preconditioned=pre)  # noqa: E731
            run = population.compiled(("run", run_cfg, pre), n_pad, build, **slots)
            sub = {k: v[sel] for k, v in data.items()}
            if pre:
                sub |= {k: v[sel] for k, v in zip(cond.PRECONDITION, affine, strict=True)}
            return _chunked(run, sub, mask[sel], seeds[sel], run_cfg.chunk)

        everyone = np.arange(len(patients))
        if importance is None:
            draws, values = nuts(everyone)
            stats = _nuts_stats(draws)
        else:
            run_is = population.compiled(
                ("importance", importance), n_pad, lambda p, a: cond.make_importance(p, a, importance), **slots
            )
            draws, values = _chunked(run_is, data, mask, seeds, importance.chunk)
            stats = _importance_stats(draws)
            affine = (draws.centre, draws.scale)
        table = _table(values, stats, patients, n_rows, fam, approx)
        if importance is not None:
            redo = np.flatnonzero(~gate(table, thresholds, by="patient").table["converged"].to_numpy())
            if len(redo):  # the fast path did not pass the gate for these twins: NUTS decides
                if importance.fallback_tune:  # preconditioned by the twin's importance proposal
                    fallback = cfg._replace(tune=importance.fallback_tune, diagonal=True)
                    draws, sub = nuts(redo, fallback, affine)
                else:
                    draws, sub = nuts(redo)
                fresh = _nuts_stats(draws)
                for k, v in stats.items():
                    v[redo] = fresh[k]
                for k, v in values.items():
                    v[redo] = sub[k]
                fixed = _table(sub, fresh, [patients[i] for i in redo], n_rows[redo], fam, approx)
                table.iloc[redo] = fixed.to_numpy()
        verdict = gate(table, thresholds, by="patient")
        verdict.warn(f"{(~verdict.table['converged']).sum()} of {len(patients)} twin(s)")
        _warn_out_of_population(table)
        idata = _to_datatree(values, stats, patients, fam, population.program(n_pad, **slots).model)
        idata.attrs.update(verdict.to_attrs())
        return cls(population, cohort, idata, verdict, cfg, seed, stats["position"], importance)

    # --------------------------------------------------------------- access
    @property
    def patients(self) -> list[str]:
        return self.cohort.patients

    @property
    def posterior(self) -> xr.Dataset:
        return self.idata.posterior.to_dataset()

    def summary(self, var_names: Sequence[str] | None = None) -> pd.DataFrame:
        """Posterior mean, SD and 90% interval of each patient-level quantity, one row per patient."""
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
    def predict(self, therapies=None, times=None, *, start: float | None = None, seed: int = 0):
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
        labels, times, pred = fam.forecast_inputs(self.cohort, schema, therapies, times, start)
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
        obs = fam.observe(jax.random.key(seed), mu, params)
        mean = np.moveaxis(np.asarray(mu), (2, 3), (0, 1))  # (C, D, B, S, T)
        obs = np.moveaxis(np.asarray(obs), (2, 3), (0, 1))
        dims = ("chain", "draw", "patient", "therapy", "time")
        ds = xr.Dataset({"mean": (dims, mean), "observation": (dims, obs)}, coords=coords)
        ds["mean"].attrs["description"] = f"expected {fam.prediction} (structural prediction)"
        ds["observation"].attrs["description"] = "a new measurement (prediction plus residual error)"
        return Forecast(xr.DataTree.from_dict({"posterior_predictive": ds}), verdict=self.verdict)

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
        warnings.warn(
            f"{len(out)} twin(s) outside the population's {level} predictive region "
            f"(random effects more extreme than the population allows): {names}",
            OutOfPopulationWarning,
            stacklevel=3,
        )


def _chunked(run, data: dict, mask: np.ndarray, seeds: np.ndarray, chunk: int):
    """``run`` over fixed-size chunks of patients; numpy results concatenated along patients.

    Fixed-size chunks let one compiled program serve any number of patients (the last chunk is
    padded by repeating its last patient). XLA on CPU also stalled on some large vmapped batches,
    e.g. exactly 100 or 200 patients, in our runs. Chunks alternate between local devices.
    """
    n = len(seeds)  # every call has the full chunk's shape: a new shape would compile again
    devices = _devices()
    starts = list(range(0, n, chunk))
    result = {}  # leaf path -> preallocated (n, ...) array, filled chunk by chunk in the workers

    def one(lo):
        idx = np.minimum(np.arange(lo, lo + chunk), n - 1)
        device = devices[(lo // chunk) % len(devices)]
        out = run({k: v[idx] for k, v in data.items()}, mask[idx], seeds[idx], device)
        keep = int(min(chunk, n - lo))
        leaves, treedef = jax.tree_util.tree_flatten(out)
        for i, leaf in enumerate(leaves):
            a = np.asarray(leaf)  # waits for this chunk only
            if i not in result:
                result.setdefault(i, np.empty((n, *a.shape[1:]), a.dtype))
            result[i][lo : lo + keep] = a[:keep]
        return treedef

    # One thread per device: XLA runs a CPU device's program on the calling thread with the GIL
    # released, so threads let chunks on different cores overlap (and copy out in parallel).
    with ThreadPoolExecutor(len(devices)) as pool:
        treedefs = list(pool.map(one, starts))
    return jax.tree_util.tree_unflatten(treedefs[0], [result[i] for i in range(len(result))])


def _devices() -> list:
    """Devices to spread chunks over: every accelerator, or on CPU one host device per core
    (at most ``$BAYESTWIN_CPU_DEVICES``).

    (PyMC's JAX module asks XLA for 100 host devices; a program is compiled once per device it
    runs on, so rotating over all of them would mostly compile.)
    """
    devices = jax.local_devices()
    if devices[0].platform == "cpu":  # $BAYESTWIN_CPU_DEVICES caps it, e.g. 1 in a Dask worker owning one core
        cores = int(os.environ.get("BAYESTWIN_CPU_DEVICES") or os.cpu_count() or 1)
        devices = devices[: max(1, min(len(devices), cores))]
    return devices


def _nuts_stats(draws) -> dict:
    B, C = draws.step_size.shape
    return {
        "position": np.asarray(draws.position),
        "diverging": np.asarray(draws.diverging),
        "acceptance_rate": np.asarray(draws.acceptance_rate),
        "n_steps": np.asarray(draws.n_steps),
        "energy": np.asarray(draws.energy),
        "step_size": np.asarray(draws.step_size),
        "khat": np.full((B, C), np.nan),
        "ess_is": np.full((B, C), np.nan),
        "method": np.full(B, "nuts", dtype=object),
    }


def _importance_stats(draws) -> dict:
    B, C, D = draws.position.shape[:3]
    return {
        "position": np.asarray(draws.position),
        "diverging": np.zeros((B, C, D), bool),
        "acceptance_rate": np.full((B, C, D), np.nan),
        "n_steps": np.zeros((B, C, D), np.int64),
        "energy": np.full((B, C, D), np.nan),
        "step_size": np.full((B, C), np.nan),
        "khat": np.asarray(draws.khat),
        "ess_is": np.asarray(draws.ess),
        "method": np.full(B, "importance", dtype=object),
    }


def _table(values: dict, stats: dict, patients, n_rows, family, approx) -> pd.DataFrame:
    """Per-patient diagnostics: R-hat, bulk/tail ESS, divergences, E-BFMI, and k̂ for importance twins.

    NUTS twins: the worst rank-normalised R-hat and bulk/tail ESS over every posterior quantity
    (ArviZ's estimators, computed batched by :mod:`bayestwin.review.batched`). Importance twins:
    R-hat across the independent samplers on the patient's own parameters, and as ESS the
    resampled importance ESS Σ_chains 1 / (1/ESS_psis + 1/draws) (their draws are resampled from
    weighted proposals, so an autocorrelation ESS would count duplicates as new draws).
    """
    B, C, D = stats["position"].shape[:3]
    is_imp = stats["method"] == "importance"
    rhat, bulk, tail = np.full(B, np.nan), np.full(B, np.nan), np.full(B, np.nan)

    def series(names, sel):  # (patients, quantities, chain, draw)
        x = np.concatenate([values[n][sel].reshape(len(sel), C, D, -1) for n in names], axis=-1)
        return np.moveaxis(x, -1, 1)

    sel = np.flatnonzero(~is_imp)
    if len(sel):
        x = series(list(values), sel)
        r, b, t = batched.diagnose(x)
        constant = x.std(axis=(-2, -1)) < 1e-12  # e.g. the unit diagonal of a correlation matrix
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rhat[sel] = np.nanmax(np.where(constant, np.nan, r), axis=1)
            bulk[sel] = np.nanmin(np.where(constant, np.nan, b), axis=1)
            tail[sel] = np.nanmin(np.where(constant, np.nan, t), axis=1)
    sel = np.flatnonzero(is_imp)
    if len(sel):
        rhat[sel] = batched.rhat(series(list(family.patient_outputs), sel)).max(axis=1)
        bulk[sel] = tail[sel] = (1.0 / (1.0 / stats["ess_is"][sel] + 1.0 / D)).sum(1)
    energy = stats["energy"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bfmi = (np.diff(energy, axis=-1) ** 2).mean(-1) / energy.var(-1, ddof=1)  # E-BFMI per chain
        bfmi_min = np.nanmin(bfmi, axis=1)
    table = pd.DataFrame(
        {
            "rhat": rhat,
            "ess_bulk": bulk,
            "ess_tail": tail,
            "divergences": stats["diverging"].sum((1, 2)).astype(int),
            "bfmi_min": bfmi_min,
            "method": stats["method"],
            "khat": stats["khat"].max(1),
            "n_obs": n_rows,
            # how far the patient moved phi, in population-posterior SDs
            "phi_shift": np.linalg.norm(stats["position"][..., : approx.mean.shape[0]].mean((1, 2)), axis=-1),
            **out_of_population(stats["position"][..., approx.mean.shape[0] :]),
        },
        index=pd.Index(patients, name="patient"),
    )
    return table


#: The population predictive region a twin's random effects are checked against.
OUT_OF_POPULATION_LEVEL = 0.99


def out_of_population(z: np.ndarray, level: float = OUT_OF_POPULATION_LEVEL) -> dict:
    """Per patient: the posterior median of |z|² and whether it exceeds the ``level`` region.

    ``z`` (patients, chain, draw, k) are the patient's standardised random effects (the families'
    non-centred offsets: z ~ N(0, I) under the population, so |z|² ~ χ²_k, the squared
    Mahalanobis distance of the random effects from the population centre). A patient is outside
    the population's ``level`` predictive region when the posterior median of |z|² exceeds the χ²_k
    ``level`` quantile: more likely than not, their random effects are more extreme than 99% of
    the population's. A patient without data keeps the prior (median χ²_k(0.5)): never flagged.
    """
    from scipy.stats import chi2

    k = z.shape[-1]
    d2 = np.median((z**2).sum(-1).reshape(z.shape[0], -1), axis=1)
    return {"re_distance2": d2, "out_of_population": d2 > chi2.ppf(level, k)}


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
