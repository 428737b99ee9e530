"""Twin: the posterior of one or many patients given the population and their own data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import xarray as xr

from bayestwin.data.cohort import PATIENT, TIME, Cohort
from bayestwin.engine import condition as cond
from bayestwin.engine.nuts import NutsConfig
from bayestwin.review.convergence import Thresholds, Verdict, diagnostics, gate


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
    _positions: jax.Array  # (B, C, D, d) raw sampler positions, for predictions

    @classmethod
    def from_cohort(cls, population, cohort: Cohort, cfg: NutsConfig, *, seed=0, thresholds=Thresholds()) -> Twin:
        fam, schema = population.family, population.schema
        patients = cohort.patients
        design = fam.design(cohort.frame, cohort.baseline, schema)
        n_rows = np.bincount(design.data["patient_idx"], minlength=len(patients))
        n_pad = cond.padded_length(int(n_rows.max()) if len(n_rows) else 1)
        approx = population.approx
        run = population.compiled(("run", cfg), n_pad, lambda p, a: cond.make_run(p, a, cfg))
        outputs = population.compiled("outputs", n_pad, cond.make_outputs)
        data, mask = cond.pad(design.data, patients, n_pad)
        seeds = population.patient_seeds(patients, seed)
        # Fixed-size chunks: one compiled program serves any number of patients. (XLA on CPU also
        # stalled on some large vmapped batches, e.g. exactly 100 or 200 patients, in our runs.)
        chunk = min(cfg.chunk, len(patients))
        devices = jax.local_devices()
        parts, outs = [], []
        for lo in range(0, len(patients), chunk):
            idx = np.minimum(np.arange(lo, lo + chunk), len(patients) - 1)  # pad by repeating the last
            keep = int(min(chunk, len(patients) - lo))
            batch = {k: v[idx] for k, v in data.items()}
            device = devices[(lo // chunk) % len(devices)]  # chunks on different devices overlap
            draws = jax.tree_util.tree_map(lambda x, k=keep: x[:k], run(batch, mask[idx], seeds[idx], device))
            parts.append(draws)
            outs.append(outputs(draws.position, {k: v[:keep] for k, v in batch.items()}))
        draws = jax.tree_util.tree_map(lambda *x: np.concatenate([np.asarray(a) for a in x]), *parts)
        values = {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}
        idata = _to_datatree(values, draws, patients, n_rows, fam)
        table = diagnostics(idata.posterior.to_dataset(), idata.sample_stats.to_dataset(), by="patient")
        shift = np.linalg.norm(np.asarray(draws.position[..., : approx.mean.shape[0]]).mean((1, 2)), axis=-1)
        table["n_obs"] = n_rows
        table["phi_shift"] = shift  # how far the patient moved phi, in population-posterior SDs
        verdict = gate(table, thresholds, by="patient")
        verdict.warn(f"{(~verdict.table['converged']).sum()} of {len(patients)} twin(s)")
        return cls(population, cohort, idata, verdict, cfg, seed, draws.position)

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
        return Twin.from_cohort(self.population, merged, self.config, seed=self.seed + 1 if seed is None else seed)

    # ------------------------------------------------------------- predict
    def predict(self, therapies: Sequence[str] | None = None, times=None, *, start: float | None = None, seed: int = 0):
        """Forecast each patient under each therapy.

        Parameters
        ----------
        therapies
            Candidate therapies (default: all in the population's schema).
        times
            Forecast times (default: from the last visit to one time scale beyond it, 11 points).
        start
            When the candidate therapy starts (default: each patient's last observed time; 0 for
            a patient with no rows). Before it, the patient's observed therapy history applies.

        Returns
        -------
        Forecast
        """
        from bayestwin.forecast import Forecast

        fam, schema = self.population.family, self.population.schema
        therapies = list(therapies or schema.therapies)
        bad = [t for t in therapies if t not in schema.therapies]
        if bad:
            raise ValueError(f"therapy {bad[0]!r} not in the population's therapies {list(schema.therapies)}")
        frame = self.cohort.frame
        last = frame.groupby(PATIENT)[TIME].max().reindex(self.patients).fillna(0.0).to_numpy()
        if times is None:
            t0 = float(np.max(last)) if start is None else float(start)
            times = np.linspace(t0, t0 + schema.time_scale, 11)
        times = np.asarray(times, float)
        X = schema.covariate_matrix(self.cohort.baseline)
        per_patient = []
        for i, p in enumerate(self.patients):
            rows = frame[frame[PATIENT] == p]
            s = last[i] if start is None else float(start)
            scen = [fam.prediction_design(rows, times, th, s, schema) for th in therapies]
            d = {k: np.stack([sc[k] for sc in scen]) for k in scen[0]}
            d["X"] = np.broadcast_to(X[i][None, None, :], (len(therapies), 1, X.shape[1]))
            per_patient.append(d)
        pred = {k: np.stack([d[k] for d in per_patient]) for k in per_patient[0]}
        predict = self.population.compiled("predict", cond.padded_length(1), cond.make_predict)  # shapes free
        mu = predict(self._positions, pred)  # (B, S, C, D, T)
        post = self.posterior
        params = {
            n: jnp.asarray(post[n].transpose("patient", "chain", "draw").to_numpy())[:, None, :, :, None]
            for n in fam.residual_params
        }
        noise = fam.noise(jax.random.key(seed), mu.shape, params)
        mean = np.moveaxis(np.asarray(mu), (2, 3), (0, 1))  # (C, D, B, S, T)
        obs = np.moveaxis(np.asarray(mu + noise), (2, 3), (0, 1))
        coords = {
            "chain": post.chain.values,
            "draw": post.draw.values,
            "patient": self.patients,
            "therapy": therapies,
            "time": times,
        }
        dims = ("chain", "draw", "patient", "therapy", "time")
        ds = xr.Dataset({"mean": (dims, mean), "observation": (dims, obs)}, coords=coords)
        ds["mean"].attrs["description"] = "expected trajectory (structural prediction)"
        ds["observation"].attrs["description"] = "a new measurement (trajectory plus residual)"
        return Forecast(xr.DataTree.from_dict({"posterior_predictive": ds}), verdict=self.verdict)

    def __getitem__(self, patient: str) -> xr.Dataset:
        return self.posterior.sel(patient=patient)

    def __repr__(self) -> str:
        ok = int(self.verdict.table["converged"].sum())
        return (
            f"Twin({len(self.patients)} patient(s), {self.config.chains}x{self.config.draws} draws, "
            f"{ok} converged; verdict: {self.verdict})"
        )

    def _repr_html_(self) -> str:
        return f"<b>Twin</b> — <i>{self.verdict}</i>" + self.summary().to_html(float_format=lambda x: f"{x:.3g}")


def _to_datatree(values: dict, draws, patients, n_rows, family) -> xr.DataTree:
    dims = ("patient", "chain", "draw")
    post = {}
    for name, arr in values.items():
        if name in family.patient_outputs:
            arr = arr[..., 0]  # one-patient slot
        extra = tuple(f"{name}_dim_{i}" for i in range(arr.ndim - 3))
        post[name] = (dims + extra, arr)
    posterior = xr.Dataset(post, coords={"patient": patients}).transpose("chain", "draw", "patient", ...)
    stats = xr.Dataset(
        {
            "diverging": (dims, np.asarray(draws.diverging)),
            "acceptance_rate": (dims, np.asarray(draws.acceptance_rate)),
            "n_steps": (dims, np.asarray(draws.n_steps)),
            "energy": (dims, np.asarray(draws.energy)),
            "step_size": (("patient", "chain"), np.asarray(draws.step_size)),
        },
        coords={"patient": patients},
    ).transpose("chain", "draw", "patient", ...)
    return xr.DataTree.from_dict({"posterior": posterior, "sample_stats": stats})
