"""Sampling a whole PyMC model (the population fit) with numpyro's NUTS and a block-dense metric.

``pm.sample(nuts_sampler="numpyro")`` hands numpyro the parameters as a flat list, so it can only
ask for a diagonal or a fully dense mass matrix. A hierarchical model wants neither: its few
population parameters are strongly correlated with each other (an intercept with the coefficient
of an uncentred one-hot covariate, the SDs with the correlations), while the many per-patient
standard-normal offsets are nearly independent. Here numpyro gets the parameters by name, so the
population block gets a *dense* metric and the patient block a diagonal one (numpyro's
``dense_mass=[(names...)]``). On the 60-patient benchmark cohort that gives about 1.5x the bulk
ESS at two thirds of the leapfrog steps per draw of the diagonal metric; a fully dense metric
over all ~130 parameters was ten times slower per step on CPU.

Everything else matches ``pm.sample``: PyMC's jittered initial points, the constrained variables
and deterministics computed from the raw draws by the model's own (jaxified) graph, sample
statistics under ArviZ's names, and an ArviZ DataTree with ``posterior``, ``sample_stats``,
``log_likelihood`` (computed in the same JAX pass, elementwise per observation),
``observed_data`` and ``constant_data``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pymc as pm
import xarray as xr
from arviz_base import from_dict
from pymc.backends.arviz import coords_and_dims_for_inferencedata, find_constants, find_observations
from pymc.util import get_default_varnames

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from pymc.sampling.jax import _get_batched_jittered_initial_points, get_jaxified_graph

MASS = ("block", "diag", "dense")


class FitConfig(NamedTuple):
    """Settings of the population fit."""

    draws: int = 1000
    tune: int = 1000
    chains: int = 4
    target_accept: float = 0.9
    mass: str = "block"  # dense over the population parameters, diagonal over the patients'
    max_tree_depth: int = 10


def sample_model(
    model: pm.Model,
    population: Sequence[str],
    cfg: FitConfig,
    *,
    seed: int = 0,
    progressbar: bool = False,
    drop: Sequence[str] = (),
) -> xr.DataTree:
    """NUTS (numpyro, chains vectorised) on ``model``; returns an ArviZ DataTree.

    Parameters
    ----------
    model
        Any PyMC model.
    population
        Names of the random variables that share the dense block of the metric (with
        ``cfg.mass="block"``); every other free variable gets a diagonal metric.
    drop
        Variables sampled but left out of the posterior (e.g. the raw pieces of a reparameterised
        random effect whose deterministic is kept), with the dims only they use.
    """
    from numpyro.infer import MCMC, NUTS

    if cfg.mass not in MASS:
        raise ValueError(f"mass must be one of {MASS}, not {cfg.mass!r}")
    values = list(model.value_vars)
    names = [v.name for v in values]
    logp_fn = get_jaxified_graph(inputs=values, outputs=[model.logp()])

    def potential(params: dict):
        return -logp_fn(*[params[n] for n in names])[0]

    init = _get_batched_jittered_initial_points(
        model=model,
        chains=cfg.chains,
        initvals=None,
        random_seed=seed,
        logp_fn=lambda x: -logp_fn(*x)[0],
    )
    if cfg.chains == 1:
        init = [np.asarray(a)[None] for a in init]
    block = tuple(v.name for v in values if model.values_to_rvs[v].name in set(population))
    dense = {"diag": False, "dense": True, "block": [block] if block else False}[cfg.mass]
    kernel = NUTS(
        potential_fn=potential,
        target_accept_prob=cfg.target_accept,
        dense_mass=dense,
        max_tree_depth=cfg.max_tree_depth,
    )
    mcmc = MCMC(
        kernel,
        num_warmup=cfg.tune,
        num_samples=cfg.draws,
        num_chains=cfg.chains,
        chain_method="vectorized",
        progress_bar=progressbar,
    )
    keys = jax.random.split(jax.random.key(seed), cfg.chains)
    fields = ("num_steps", "potential_energy", "energy", "adapt_state.step_size", "accept_prob", "diverging")
    start = {n: jnp.asarray(a) if cfg.chains > 1 else jnp.asarray(a[0]) for n, a in zip(names, init, strict=True)}
    mcmc.run(keys if cfg.chains > 1 else keys[0], init_params=start, extra_fields=fields)
    raw = mcmc.get_samples(group_by_chain=True)
    extra = mcmc.get_extra_fields(group_by_chain=True)

    # Constrained variables, deterministics and the pointwise log-likelihood in one JAX pass.
    keep = [
        v for v in get_default_varnames(model.unobserved_value_vars, include_transformed=False) if v.name not in drop
    ]
    observed = list(model.observed_RVs)
    loglik = model.logp(vars=observed, sum=False)
    fn = get_jaxified_graph(inputs=values, outputs=[*keep, *loglik])
    outs = jax.jit(jax.vmap(jax.vmap(fn)))(*[raw[n] for n in names])
    outs = [np.asarray(o) for o in outs]
    posterior = {v.name: o for v, o in zip(keep, outs, strict=False)}
    log_likelihood = {rv.name: o for rv, o in zip(observed, outs[len(keep) :], strict=True)}

    stats = {
        "lp": -np.asarray(extra["potential_energy"]),
        "energy": np.asarray(extra["energy"]),
        "step_size": np.asarray(extra["adapt_state.step_size"]),
        "acceptance_rate": np.asarray(extra["accept_prob"]),
        "diverging": np.asarray(extra["diverging"]),
        "n_steps": np.asarray(extra["num_steps"]),
    }
    stats["tree_depth"] = np.log2(stats["n_steps"]).astype(int) + 1
    coords, dims = coords_and_dims_for_inferencedata(model)
    if drop:  # the dropped variables' own dims go with them
        dropped = {d for n in drop for d in model.named_vars_to_dims.get(n, ())}
        dims = {k: v for k, v in dims.items() if k not in drop}
        used = {d for v in dims.values() for d in v}
        coords = {k: v for k, v in coords.items() if k in used or k not in dropped}
    groups = {"posterior": posterior, "sample_stats": stats, "log_likelihood": log_likelihood}
    if (obs := find_observations(model)) is not None:
        groups["observed_data"] = obs
    if (const := find_constants(model)) is not None:
        groups["constant_data"] = const
    settings = {
        "sampler": "numpyro NUTS",
        "mass_matrix": cfg.mass,
        "dense_block": ", ".join(block) if cfg.mass == "block" else "",
        "tuning_steps": cfg.tune,
        "target_accept": cfg.target_accept,
    }
    return from_dict(
        groups,
        coords=coords,
        dims=dims,
        sample_dims=["chain", "draw"],
        attrs={"posterior": {"inference_library": "numpyro", **settings}},
    )
