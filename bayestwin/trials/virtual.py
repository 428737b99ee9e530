"""Virtual cohorts: new patients drawn from a fitted population model, under every therapy.

A virtual patient carries both kinds of variation a real one would:

- **parameter uncertainty**: each *replicate* (one simulated cohort, or one simulated trial)
  takes its own draw of the population parameters from the population posterior; with
  ``uncertainty="mean"`` every replicate uses the posterior mean instead (what a power
  calculation at fixed assumptions wants);
- **between-patient variability**: each patient draws their own random effects from the
  population distribution given their covariates, and each measurement its residual error.

The trajectories come from the family's own PyMC graph (the ``mu``/``conc`` node compiled to JAX,
the same function twins forecast with), vectorised over replicates, patients, therapies and times
in one jitted program. Randomness is keyed per replicate (``fold_in(seed, replicate)``), so the
draws of a replicate do not depend on how replicates are batched or spread over workers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import xarray as xr

from bayestwin import _memory
from bayestwin.engine.compile import TwinProgram, constrained_draws, unconstrained_draws
from bayestwin.errors import require_whole


# ---------------------------------------------------------------- population draws
@dataclass(frozen=True)
class PopulationDraws:
    """Population parameters per replicate: ``phi`` (R, d) in the sampler's unconstrained space
    (what the compiled graph takes), ``residual`` {name: (R,)} and ``values`` (the constrained
    population parameters, dim ``replicate``)."""

    phi: np.ndarray
    residual: dict
    values: xr.Dataset


def population_draws(
    population,
    replicates: int,
    *,
    seed: int = 0,
    uncertainty: str = "posterior",
    parameters: Mapping | None = None,
) -> PopulationDraws:
    """Draw the population parameters of ``replicates`` replicates.

    ``uncertainty="posterior"``: a posterior draw per replicate (with replacement);
    ``"mean"``: the posterior mean of every parameter in every replicate (a differentially private
    release: the released parameters themselves). ``parameters`` fixes
    named population parameters in every replicate, e.g. ``{"therapy_slope": {"drug_a": 0.0}}``
    (a null scenario) or ``{"sigma": 3.0}``; a scalar sets every element of the variable.
    """
    if uncertainty not in ("posterior", "mean"):
        raise ValueError(f"uncertainty must be 'posterior' or 'mean', not {uncertainty!r}")
    prog = population.program(4, **_slots(population))
    post = population.posterior
    free = [b.rv for b in prog.phi]
    if uncertainty == "mean":
        point = post[list(dict.fromkeys(free + _residual_names(population)))].mean(("chain", "draw"))
        if population.private:  # the release itself (the draws only spread it by its noise)
            released = np.asarray(population.sampler["released_phi"], float)[None, :]
            values = constrained_draws(prog.model, released, prog.phi)
            point = point.copy(
                data={
                    n: np.reshape(values[n][0], point[n].shape) if n in values else point[n].values
                    for n in point.data_vars
                }
            )
        ds = point.expand_dims(replicate=replicates).copy(deep=True)
    else:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
        flat = post.stack(sample=("chain", "draw"))
        idx = rng.integers(0, flat.sizes["sample"], replicates)
        ds = flat[free].isel(sample=idx).drop_vars(["sample", "chain", "draw"]).rename(sample="replicate")
        ds = ds.transpose("replicate", ...)
    ds = _override(ds, parameters or {}, population)
    ds = ds.assign_coords(replicate=np.arange(replicates))
    phi = unconstrained_draws(prog.model, ds.expand_dims(chain=1).rename(replicate="draw"), prog.phi)
    residual = {n: ds[n].to_numpy().astype(float) for n in population.family.residual_params}
    shown = [n for n in population.population_vars if n in ds]
    return PopulationDraws(phi=phi, residual=residual, values=ds[shown])


def _residual_names(population) -> list[str]:
    return [n for n in population.family.residual_params if n in population.posterior]


def _override(ds: xr.Dataset, parameters: Mapping, population) -> xr.Dataset:
    known = sorted(n for n in ds.data_vars)
    for name, value in parameters.items():
        if name not in ds:
            raise ValueError(f"unknown population parameter {name!r}; known: {known}")
        da = ds[name]
        if isinstance(value, Mapping):
            (dim,) = [d for d in da.dims if d != "replicate"] or [None]
            if dim is None:
                raise ValueError(f"population parameter {name!r} is a scalar: give a number, not {dict(value)!r}")
            labels = [str(c) for c in da[dim].values]
            for label, v in value.items():
                if str(label) not in labels:
                    raise ValueError(f"{name!r} has no element {label!r}; its {dim} are {labels}")
                da.loc[{dim: da[dim].values[labels.index(str(label))]}] = float(v)
        else:
            da[...] = np.broadcast_to(np.asarray(value, float), da.shape)
        ds[name] = da
    return ds


def _slots(population) -> dict:
    """Program slot sizes for virtual patients with no history (PK: dose slots set per call)."""
    return {a.slot: 4 for a in population.family.inputs.values() if a.slot is not None}


# ---------------------------------------------------------------- covariates
def draw_covariates(population, n: int, covariates=None, *, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` rows of baseline covariates.

    ``covariates``: None resamples the fitting cohort's patients (with replacement); a DataFrame
    is resampled the same way; a mapping gives each covariate as a constant, a list of values
    (drawn with equal probability), a {level: probability} mapping, a scipy.stats frozen
    distribution (anything with ``.rvs``), or a callable ``f(rng, n)``.
    """
    schema = population.schema
    needed = schema.covariates
    if covariates is None:
        covariates = population.cohort_covariates()
    if isinstance(covariates, pd.DataFrame):
        missing = [c for c in needed if c not in covariates.columns]
        if missing:
            raise ValueError(f"the covariate table lacks column(s) {missing} the population model uses")
        if len(covariates) == 0:
            raise ValueError("the covariate table has no rows to resample")
        rows = rng.integers(0, len(covariates), n)
        return covariates[needed].iloc[rows].reset_index(drop=True)
    if not isinstance(covariates, Mapping):
        raise TypeError(f"covariates must be None, a DataFrame or a mapping, not {type(covariates).__name__}")
    unknown = [c for c in covariates if c not in needed]
    if unknown:
        raise ValueError(f"unknown covariate(s) {unknown}: the population model uses {list(needed)}")
    missing = [c for c in needed if c not in covariates]
    if missing:
        raise ValueError(f"no distribution given for covariate(s) {missing} the population model uses")
    return pd.DataFrame({c: _draw_one(c, covariates[c], n, rng) for c in needed})


def _draw_one(name: str, spec, n: int, rng: np.random.Generator) -> np.ndarray:
    if hasattr(spec, "rvs"):
        return np.asarray(spec.rvs(size=n, random_state=rng))
    if callable(spec):
        out = np.asarray(spec(rng, n))
        if out.shape != (n,):
            raise ValueError(f"covariate {name!r}: the callable returned shape {out.shape}, not ({n},)")
        return out
    if isinstance(spec, Mapping):
        levels, p = list(spec), np.asarray(list(spec.values()), float)
        if (p < 0).any() or not np.isclose(p.sum(), 1.0):
            raise ValueError(f"covariate {name!r}: probabilities {p.tolist()} must be >= 0 and sum to 1")
        return np.asarray(levels, dtype=object)[rng.choice(len(levels), n, p=p)]
    if isinstance(spec, list | tuple | range | np.ndarray | pd.Series | pd.Index):
        values = np.asarray(spec, dtype=object)
        if values.ndim != 1 or len(values) == 0:
            raise ValueError(
                f"covariate {name!r}: a list of values to draw from must be one-dimensional and not empty, "
                f"not of shape {values.shape}"
            )
        return values[rng.integers(0, len(values), n)]
    if not isinstance(spec, str | int | float | np.number):
        raise ValueError(
            f"covariate {name!r}: give a constant, a list of values, a {{level: probability}} mapping, a "
            f"distribution with .rvs or a callable f(rng, n), not {type(spec).__name__}"
        )
    return np.full(n, spec, dtype=object if isinstance(spec, str) else float)


# ---------------------------------------------------------------- the program
def make_simulator(program: TwinProgram, family, d_patient: int) -> Callable:
    """Jitted ``f(keys (R,), phi (R, d), residual {n: (R,)}, patient {n: (R, N, ...)}, scenario
    {n: (S, ...)}) -> (mean, observation)``, each (R, N, S, T).

    Patient effects are drawn from their standard-normal (non-centred) prior, as in
    :func:`bayestwin.engine.condition.make_prior_draws`; the prediction is the family graph's
    own ``prediction`` node.
    """
    names = program.predict_data_names

    def traj(phi, z, pat, scen):
        arrays = [pat[n] if n in pat else scen[n] for n in names]
        return tuple(program.predict(*program.split(phi, z), *arrays))

    per_scenario = jax.vmap(traj, in_axes=(None, None, None, 0))
    per_patient = jax.vmap(per_scenario, in_axes=(None, 0, 0, None))

    def one(key, phi, residual, pat, scen):
        n = jax.tree_util.tree_leaves(pat)[0].shape[0]
        kz, ky = jax.random.split(key)
        z = jax.random.normal(kz, (n, d_patient))
        mean, *extra = per_patient(phi, z, pat, scen)
        params = residual | dict(zip(program.predict_names[1:], extra, strict=True))
        return mean, family.observe(ky, mean, params)

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None)))


def replicate_keys(seed: int, replicates) -> jax.Array:
    """One key per replicate index: fold_in(seed, r), independent of batching."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(np.asarray(replicates), jnp.uint32))


def patient_bucket(n: int) -> int:
    """The number of patient slots a simulation of ``n`` patients runs with: a power of two up to
    256, then a multiple of 256 (at most 2x the work for small cohorts, 25% for large ones).

    One compiled program serves every cohort size in a bucket: a power curve over 8 trial sizes
    (10-120 patients) compiles 4 programs instead of 8. The extra slots repeat the last patient's
    covariates and are dropped; a patient's draws do not depend on the padding (JAX's
    counter-based random bits: the first ``n`` rows of a draw of shape (m, ...) are those of
    shape (n, ...)), so a cohort is the same whatever its bucket.
    """
    n = max(int(n), 1)
    return int(2 ** np.ceil(np.log2(n))) if n <= 256 else -(-n // 256) * 256


def pad_patients(arrays: dict, axis: int = 1) -> dict:
    """Arrays with ``n`` patients along ``axis`` widened to :func:`patient_bucket` (n) by repeating
    the last patient (as :func:`bayestwin.engine.devices.run_chunked` fills its last chunk)."""
    out = {}
    for k, v in arrays.items():
        n = np.shape(v)[axis]
        out[k] = np.take(v, np.minimum(np.arange(patient_bucket(n)), n - 1), axis=axis)
    return out


def simulate_arrays(population, draws: PopulationDraws, replicates, pat: dict, scenario: dict, seed: int):
    """mean, observation (R, N, S, T) numpy arrays for the replicate indices ``replicates``
    (rows of ``draws``); ``pat``: the family's covariate arrays, each (R, N, ...), run in
    :func:`patient_bucket` (N) slots."""
    replicates = np.asarray(replicates)
    scen = _fit_slots(population, scenario)
    run = _simulator_for(population, scen)
    residual = {k: v[replicates] for k, v in draws.residual.items()}
    n = np.asarray(next(iter(pat.values()))).shape[1]
    mean, obs = run(replicate_keys(seed, replicates), draws.phi[replicates], residual, pad_patients(pat), scen)
    return np.asarray(mean)[:, :n], np.asarray(obs)[:, :n]


def _fit_slots(population, scenario: dict) -> dict:
    """Widen PK dose slots to the program's (a power of two, at least 4)."""
    from bayestwin.engine.condition import padded_length

    axes = {n: a.slot for n, a in population.family.inputs.items() if a.slot is not None}
    fill = {n: a.fill for n, a in population.family.inputs.items()}
    out = {}
    for name, arr in scenario.items():
        arr = np.asarray(arr)
        if name in axes:
            m = padded_length(arr.shape[-1])
            wide = np.full((*arr.shape[:-1], m), fill[name], arr.dtype)
            wide[..., : arr.shape[-1]] = arr
            arr = wide
        out[name] = arr
    return out


def _simulator_for(population, scen: dict):
    axes = {n: a.slot for n, a in population.family.inputs.items() if a.slot is not None}
    slots = {axes[n]: int(np.asarray(a).shape[-1]) for n, a in scen.items() if n in axes}
    prog = population.program(4, **slots)
    d_pat = sum(b.size for b in prog.patient)
    return population.compiled("virtual", 4, lambda p, a: make_simulator(p, population.family, d_pat), **slots)


# ---------------------------------------------------------------- public API
def virtual_cohort(
    population,
    n: int,
    *,
    therapies=None,
    times=None,
    replicates: int = 1,
    covariates=None,
    uncertainty: str = "posterior",
    parameters: Mapping | None = None,
    seed: int = 0,
    privacy=None,
) -> xr.Dataset:
    """Virtual patients from a fitted population model, each under every therapy.

    Parameters
    ----------
    population
        A fitted :class:`~bayestwin.population.Population` (progression or PK family).
    n
        Patients per replicate.
    therapies
        Progression: therapy labels (default: all of the population's), each given from time 0.
        PK: a list of :class:`~bayestwin.dosing.Regimen` (required), each started at time 0.
    times
        Time grid (default: 0 to the population's time scale, 11 points).
    replicates
        Independent cohorts, each with its own draw of the population parameters.
    covariates
        See :func:`draw_covariates` (default: resample the fitting cohort's patients).
    uncertainty, parameters
        See :func:`population_draws` (``"mean"`` fixes the population parameters at their
        posterior mean; ``parameters`` overrides named ones, e.g. a therapy effect of 0).
    seed
        Same seed, same cohort (per replicate, whatever the batching).
    privacy
        A :class:`~bayestwin.privacy.DP` budget: the cohort must then come from a population
        released under exactly that budget (:func:`bayestwin.privacy.private_fit`), and
        ``covariates`` must be given (public distributions, not the patients' own). The cohort
        is post-processing of the release and keeps its guarantee; its attributes record it.

    Returns
    -------
    xarray.Dataset with ``mean`` (the expected trajectory) and ``observation`` (a measurement),
    dims (replicate, patient, therapy, time); the covariates (replicate, patient); and the
    population parameters each replicate used (dim replicate).

    Examples
    --------
    >>> vc = virtual_cohort(pop, 500, times=[0, 6, 12], replicates=20)  # doctest: +SKIP
    >>> vc.observation.sel(time=12).mean(["replicate", "patient"])  # doctest: +SKIP
    """
    require_whole("n", n, 1)
    require_whole("replicates", replicates, 1)
    _check_privacy(population, privacy, covariates)
    schema = population.schema
    times = np.linspace(0.0, schema.time_scale, 11) if times is None else np.asarray(times, float)
    if times.ndim != 1 or len(times) == 0 or not np.isfinite(times).all():
        raise ValueError("times must be a non-empty list of finite numbers")
    labels, scenario = population.family.scenario_arrays(therapies, times, schema)
    cells = float(replicates) * patient_bucket(n) * len(labels) * len(times)  # as simulated, padded
    _memory.check(
        cells * 8 * 4,
        f"a virtual cohort of {replicates} x {n:,} patients x {len(labels)} scenarios x {len(times)} times",
        "simulate fewer patients per call, or replicates in several calls",
    )
    draws = population_draws(population, replicates, seed=seed, uncertainty=uncertainty, parameters=parameters)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0]))
    baseline = draw_covariates(population, replicates * n, covariates, rng=rng)
    pat = population.family.covariate_arrays(baseline, schema)
    pat = {k: np.asarray(v).reshape(replicates, n, *np.asarray(v).shape[1:]) for k, v in pat.items()}
    mean, obs = simulate_arrays(population, draws, np.arange(replicates), pat, scenario, seed)
    dims = ("replicate", "patient", "therapy", "time")
    coords = {"replicate": np.arange(replicates), "patient": np.arange(n), "therapy": labels, "time": times}
    ds = xr.Dataset({"mean": (dims, mean), "observation": (dims, obs)}, coords=coords)
    for c in baseline.columns:
        values = baseline[c].to_numpy()
        values = values.astype(float) if c in schema.numeric else values.astype(str)
        ds[c] = (("replicate", "patient"), values.reshape(replicates, n))
    for name, da in draws.values.data_vars.items():
        ds[f"pop_{name}"] = da.rename({d: f"{name}_{d}" for d in da.dims if d != "replicate"})
    ds.attrs.update(
        family=population.family.name, uncertainty=uncertainty, seed=seed, parameters=repr(dict(parameters or {}))
    )
    if population.private:
        ds.attrs.update(dp_epsilon=population.privacy.epsilon, dp_delta=population.privacy.delta)
    return ds


def _check_privacy(population, privacy, covariates) -> None:
    """``privacy=`` asks for a cohort from a release under exactly that budget, with public covariates."""
    from bayestwin.privacy import DP

    if privacy is None:
        return
    if not isinstance(privacy, DP):
        raise TypeError(f"privacy must be a bt.DP(epsilon, delta), not {type(privacy).__name__}")
    if not population.private:
        raise ValueError(
            "virtual_cohort(privacy=...) needs a population released under differential privacy: "
            "bt.private_fit(cohort, family, schema=..., privacy=bt.DP(...)); this one is an ordinary fit, "
            "which carries its cohort's information without a guarantee"
        )
    got = population.privacy
    if got != privacy:
        raise ValueError(
            f"this population was released under epsilon {got.epsilon:g}, delta {got.delta:g}, not the "
            f"epsilon {privacy.epsilon:g}, delta {privacy.delta:g} asked for"
        )
    if covariates is None:
        raise ValueError(
            "a differentially private virtual cohort needs covariates= (public distributions or a public "
            "table): the release holds none of its patients' covariates"
        )
