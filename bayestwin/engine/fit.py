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

import contextlib
import json
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pymc as pm
import xarray as xr
from arviz_base import from_dict
from pymc.backends.arviz import coords_and_dims_for_inferencedata, find_constants, find_observations
from pymc.util import get_default_varnames

from bayestwin.cache import uncached
from bayestwin.engine.devices import chain_groups
from bayestwin.errors import require_whole

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from pymc.sampling.jax import _get_batched_jittered_initial_points, get_jaxified_graph

MASS = ("block", "diag", "dense")
SPLITS = ("shard", "threads")


class FitConfig(NamedTuple):
    """Settings of the population fit."""

    draws: int = 1000
    tune: int = 1000
    chains: int = 4
    target_accept: float = 0.9
    mass: str = "block"  # dense over the population parameters, diagonal over the patients'
    max_tree_depth: int = 10
    #: At most this many more rounds of ``draws`` per chain when a fit is healthy (no divergences,
    #: E-BFMI fine, R-hat < 1.05) but short of effective draws: see :func:`sample_model`'s ``more``.
    extend: int = 3
    #: Restart chains that stall far below the others (see :func:`stalled_chains`).
    restart_stalled: bool = True
    #: Iterations of a short first warmup (trees at most 2**6 - 1 steps) that learns a diagonal
    #: metric for the main warmup to start from (0: none; see :func:`sample_model`).
    prewarm: int = 0
    #: Chains start at PyMC's initial point moved by uniform(-jitter, jitter) on the unconstrained
    #: scale (1.0: PyMC's own jitter; an ODE model's stiff corners want less).
    jitter: float = 1.0
    #: How chains split over several devices run: ``"shard"`` (one program over all of them) or
    #: ``"threads"`` (one per device: for log densities ``shard_map`` cannot trace; see :func:`_start`).
    split: str = "shard"

    @classmethod
    def for_family(cls, family, *, prewarm: int | None = None, jitter: float | None = None, **settings) -> FitConfig:
        """Settings for a fit of ``family``: ``prewarm``, ``jitter`` (when ``None``) and ``split``
        from its ``fit_nuts`` (the ODE family's own start), the rest from ``settings``."""
        own = family.fit_nuts
        return cls(
            prewarm=own.get("prewarm", 0) if prewarm is None else prewarm,
            jitter=own.get("jitter", 1.0) if jitter is None else jitter,
            split=own.get("split", "shard"),
            **settings,
        )

    def check(self) -> None:
        """Refuse settings the driver cannot run (before any model is built)."""
        for name, least in (("chains", 1), ("draws", 1), ("tune", 0)):
            require_whole(name, getattr(self, name), least)
        if self.mass not in MASS:
            raise ValueError(f"mass must be one of {MASS}, not {self.mass!r}")
        if not (isinstance(self.jitter, (int, float)) and 0.0 <= self.jitter <= 2.0):
            raise ValueError(f"jitter must be a number in [0, 2] (the unconstrained scale), not {self.jitter!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {self.split!r}")
        if not (isinstance(self.prewarm, int) and (self.prewarm == 0 or self.prewarm >= 20)):
            raise ValueError(f"prewarm must be 0 (none) or a whole number of iterations >= 20, not {self.prewarm!r}")


def stalled_chains(lp: np.ndarray, n_params: int) -> np.ndarray:
    """Chains whose log density over their draws sits far below the others'.

    ``lp`` is (chain, draw): the log density of each draw. A chain stalls when its
    mean is below the best chain's by more than ``max(20, 10 sd)``, ``sd`` the larger of the
    median within-chain SD and ``sqrt(n_params / 2)`` (the SD of a ``n_params``-dimensional
    Gaussian's log density): chains in one typical set differ by a fraction of that. Seen on
    real cohorts: a chain settled at random-effect SDs of ~0 with the residual SD inflated,
    1,387 nats below the others, at the maximum tree depth, never leaving.
    """
    if lp.shape[0] < 2:
        return np.zeros(lp.shape[0], bool)
    mean = lp.mean(axis=1)
    sd = max(float(np.median(lp.std(axis=1))), float(np.sqrt(n_params / 2.0)))
    return mean < mean.max() - max(20.0, 10.0 * sd)


@uncached  # the fit's program holds the cohort's rows as constants: never written to the disk cache
def sample_model(
    model: pm.Model,
    population: Sequence[str],
    cfg: FitConfig,
    *,
    seed: int = 0,
    progressbar: bool = False,
    drop: Sequence[str] = (),
    more: Callable[[xr.DataTree], bool] | None = None,
    initvals: dict | None = None,
) -> xr.DataTree:
    """NUTS (numpyro, chains vectorised) on ``model``; returns an ArviZ DataTree.

    The chains are split into equal groups over the local devices (one per core on CPU, at most
    ``$BAYESTWIN_CPU_DEVICES``; :func:`~bayestwin.engine.devices.chain_groups`), vectorised within
    each group, in one program: 4 chains on a 2-core machine run 2 and 2 at the same time.

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
    more
        Asked after the draws: ``True`` continues every chain for ``cfg.draws`` more draws from
        where it stopped (no new warmup: the same adapted step size and metric), at most
        ``cfg.extend`` times. The population fit asks for more when the chains are healthy but
        short of effective draws (:func:`bayestwin.population.needs_more_draws`).
    initvals
        Initial values by variable name (PyMC's ``initvals``: constrained values); PyMC jitters
        each chain's start around them.

    Warmup and draws run as one compiled loop. A chain whose log density over its draws stays far
    below the others' (:func:`stalled_chains`) is restarted from another chain's last position
    and every chain warms up and draws again, once; the restart is recorded in the posterior's attributes
    (``stalled_chains``, ``stall_lp``) so that a reviewer sees it. Extra draws are recorded as
    ``draws_per_chain`` and ``extensions``, the number of device groups as ``devices`` (and, with
    more than one, how they ran as ``split``).
    """
    from numpyro.infer import MCMC, NUTS

    cfg.check()
    values = list(model.value_vars)
    names = [v.name for v in values]
    logp_fn = get_jaxified_graph(inputs=values, outputs=[model.logp()])

    # Jitted once here: numpyro initialises vectorised chains eagerly (``vmap`` without ``jit``),
    # which otherwise compiles every primitive of the log density as its own small XLA program
    # (about 200 of them for a random-slope model: 8 s of a 30 s fit).
    @jax.jit
    def potential(params: dict):
        return -logp_fn(*[params[n] for n in names])[0]

    def listed_potential(x):  # the potential of values listed in ``names`` order (PyMC's initial points)
        return potential(dict(zip(names, x, strict=True)))

    init = _get_batched_jittered_initial_points(
        model=model,
        chains=cfg.chains,
        initvals=initvals,
        random_seed=seed,
        logp_fn=listed_potential,
        jitter=cfg.jitter == 1.0,
    )
    if cfg.chains == 1:
        init = [np.asarray(a)[None] for a in init]
    if 0.0 < cfg.jitter != 1.0:
        init = _jittered(init, cfg.jitter, seed, listed_potential)
    block = tuple(v.name for v in values if model.values_to_rvs[v].name in set(population))
    dense = {"diag": False, "dense": True, "block": [block] if block else False}[cfg.mass]

    one = cfg.chains == 1
    start = {n: jnp.asarray(a) for n, a in zip(names, init, strict=True)}  # (chain, ...) each
    keys = jax.random.split(jax.random.key(seed), 3 * cfg.chains).reshape(3, cfg.chains)
    inverse_mass, step_size = None, 1.0
    if cfg.prewarm > 0:
        first = {n: a[0] for n, a in start.items()} if one else start
        start, inverse_mass, step_size = _prewarm(potential, first, cfg, keys[2][0] if one else keys[2], dense, names)
        start = {n: jnp.asarray(a)[None] for n, a in start.items()} if one else start

    def new_mcmc(chains: int, method, bar: bool) -> MCMC:  # fresh: numpyro's NUTS cannot be initialised twice
        kernel = NUTS(
            potential_fn=potential,
            inverse_mass_matrix=inverse_mass,
            step_size=step_size,
            target_accept_prob=cfg.target_accept,
            dense_mass=dense,
            max_tree_depth=cfg.max_tree_depth,
        )
        return MCMC(
            kernel,
            num_warmup=cfg.tune,
            num_samples=cfg.draws,
            num_chains=chains,
            chain_method=method,
            progress_bar=bar,
        )

    fields = ("num_steps", "potential_energy", "energy", "adapt_state.step_size", "accept_prob", "diverging")
    groups = chain_groups(cfg.chains)  # the chains split over the cores (or accelerators)
    # numpyro shows no progress bar for a sharded run: with a bar asked for, threads (the first
    # group's chains show theirs), at the cost of one compilation per device
    split = "threads" if progressbar and len(groups) > 1 else cfg.split

    # Warmup and draws in one run: numpyro compiles one loop per call of ``run``/``warmup`` (its
    # loop body is a new jitted function each call), so a separate warmup doubled the compile.
    # A chain stalled far below the others (the log density over its draws) is restarted once
    # from another chain's last position, and every chain warms up again.
    runs = _start(groups, new_mcmc, keys[0], start, fields, progressbar, split)
    stalls = {}
    if cfg.restart_stalled and cfg.tune >= 20:
        lp = -_by_chain(runs, lambda m: m.get_extra_fields(group_by_chain=True))["potential_energy"]
        n_params = sum(int(np.prod(np.shape(a)[1:])) for a in init)
        stalled = stalled_chains(lp, n_params)
        if stalled.any():
            good = np.flatnonzero(~stalled)
            donors = good[np.arange(int(stalled.sum())) % len(good)]
            z = _by_chain(runs, lambda m: {n: _chain_axis(m, a) for n, a in m.last_state.z.items()})
            restart = {n: jnp.asarray(z[n]).at[np.flatnonzero(stalled)].set(jnp.asarray(z[n])[donors]) for n in names}
            stalls = {
                "stalled_chains": [int(c) for c in np.flatnonzero(stalled)],
                "stall_lp": [round(float(m), 1) for m in lp.mean(axis=1)],
            }
            runs = _start(groups, new_mcmc, keys[1], restart, fields, progressbar, split)
    raws = [_by_chain(runs, lambda m: m.get_samples(group_by_chain=True))]
    extras = [_by_chain(runs, lambda m: m.get_extra_fields(group_by_chain=True))]

    outputs = _outputs(model, values, drop)
    extensions = 0
    while True:
        raw = {n: np.concatenate([r[n] for r in raws], axis=1) for n in names}
        extra = {f: np.concatenate([e[f] for e in extras], axis=1) for f in fields}
        idata = _datatree(model, names, outputs, raw, extra, drop, cfg, block)
        if more is None or extensions >= cfg.extend or not more(idata):
            break
        _continue(runs, fields)
        raws.append(_by_chain(runs, lambda m: m.get_samples(group_by_chain=True)))
        extras.append(_by_chain(runs, lambda m: m.get_extra_fields(group_by_chain=True)))
        extensions += 1
    idata.posterior.attrs.update(
        {"draws_per_chain": int(raw[names[0]].shape[1]), "extensions": extensions, "devices": len(groups)}
        | ({"split": split} if len(groups) > 1 else {})
        | {k: json.dumps(v) for k, v in stalls.items()}
    )
    return idata


def _start(groups: list, new_mcmc, keys, start: dict, fields, progressbar: bool, split: str) -> list:
    """Warm up and draw every chain (``keys`` (chain,), ``start`` name -> (chain, ...)); returns
    the runs, each ``(MCMC, device)`` (device ``None``: the MCMC places its own work).

    One group: numpyro's vectorised chains, as ``pm.sample`` would run them. Several groups (the
    chains split over devices, :func:`~bayestwin.engine.devices.chain_groups`), ``split``:

    - ``"shard"``: one MCMC whose ``chain_method`` (:func:`_across`) shards the chains over the
      devices and vectorises each group: one compiled program running on every device at once;
    - ``"threads"``: one vectorised MCMC per group, each on its device in its own thread (XLA
      runs a CPU device's program on the calling thread with the GIL released): the same
      chains, at the cost of compiling once per device. For log densities ``shard_map`` cannot
      trace: diffrax's ODE solves today (equinox's closure conversion refuses the values
      ``shard_map`` hands it: https://github.com/patrick-kidger/diffrax/issues/765, a fix is
      proposed in equinox #1261), and a failed trace leaves equinox's caches holding tracers,
      so the family says so beforehand (``fit_nuts["split"]``) rather than the fit trying.
    """
    if len(groups) == 1:
        mcmc = new_mcmc(len(keys), "vectorized", progressbar)
        key, init = _chains(keys, start, groups[0][1])
        mcmc.run(key, init_params=init, extra_fields=fields)
        return [(mcmc, None)]
    if split == "shard":
        mcmc = new_mcmc(len(keys), _across(groups), False)  # numpyro shows no bar for a split
        mcmc.run(keys, init_params=start, extra_fields=fields)
        return [(mcmc, None)]

    def one(group):
        device, idx = group
        with jax.default_device(device):
            mcmc = new_mcmc(len(idx), "vectorized", progressbar and idx[0] == 0)
            key, init = jax.device_put(_chains(keys, start, idx), device)
            mcmc.run(key, init_params=init, extra_fields=fields)
        return mcmc, device

    with ThreadPoolExecutor(len(groups)) as pool:
        return list(pool.map(one, groups))


def _chains(keys, start: dict, idx: np.ndarray) -> tuple:
    """The keys and starts of chains ``idx`` as numpyro takes them: one chain without the chain
    axis."""
    if len(idx) == 1:
        return keys[idx[0]], {n: a[idx[0]] for n, a in start.items()}
    return keys[idx], {n: a[idx] for n, a in start.items()}


def _continue(runs: list, fields) -> None:
    """Continue every run for as many draws again, from where it stopped (same step size and
    metric, no new warmup); runs on their own devices in their own threads."""

    def one(run):
        mcmc, device = run
        with jax.default_device(device) if device is not None else contextlib.nullcontext():
            mcmc.post_warmup_state = mcmc.last_state
            mcmc.run(mcmc.post_warmup_state.rng_key, extra_fields=fields)

    if len(runs) == 1:
        one(runs[0])
        return
    with ThreadPoolExecutor(len(runs)) as pool:
        list(pool.map(one, runs))


def _chain_axis(mcmc, a) -> np.ndarray:
    """``a`` with a leading chain axis (numpyro leaves it out of a one-chain MCMC's state)."""
    a = np.asarray(a)
    return a[None] if mcmc.num_chains == 1 else a


def _by_chain(runs: list, get) -> dict:
    """``get(mcmc)`` (name -> (chain, ...)) of each run, joined along chains in order."""
    parts = [get(mcmc) for mcmc, _ in runs]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts], axis=0) for k in parts[0]}


def _across(groups: list) -> Callable:
    """numpyro's ``chain_method`` for chains split into equal groups, one group per device:
    ``shard_map`` over the devices of ``vmap`` over each group's chains. One program, compiled
    once, runs on every device at the same time (XLA runs each CPU device on its own thread), and
    each device's loops stop when its own chains are done.

    Chains keep their own keys and starts; the draws equal a one-device fit's in distribution, not
    bit for bit (XLA's arithmetic over 2 vectorised chains differs in the last bits from over 4).
    (``jax.pmap`` fails here on diffrax's checkpointed ODE loops: equinox's closure conversion.)
    """
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.array([d for d, _ in groups]), ("chains",))

    def transform(fn):
        spec = PartitionSpec("chains")
        return jax.jit(jax.shard_map(jax.vmap(fn), mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))

    return transform


def _jittered(init: list, scale: float, seed: int, potential) -> list:
    """``init`` (each chain's unjittered start) moved by uniform(-scale, scale), drawn again
    (up to 10 times) where the potential is not finite."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for c in range(np.shape(init[0])[0]):  # chains
        base = [np.asarray(a)[c] for a in init]
        for _ in range(10):
            moved = [b + rng.uniform(-scale, scale, np.shape(b)) for b in base]
            if np.isfinite(float(potential([jnp.asarray(m) for m in moved]))):
                break
        out.append(moved)
    return [np.stack([o[j] for o in out]) for j in range(len(init))]


def _prewarm(potential, start: dict, cfg: FitConfig, key, dense, names: list[str]):
    """A short first warmup: ``cfg.prewarm`` NUTS iterations with trees of at most 63 steps and
    a diagonal metric adapted over them. Returns the chains' last positions, that metric
    (the median over chains) in the layout the main kernel's ``dense`` takes, and the step size
    adapted with it (the median): the main warmup's step-size adaptation starts there, not at
    1, whose first too-long steps diverge and drive it down to 0.006 for ten iterations.

    Why: the main warmup keeps the identity metric for its first 75 iterations (Stan's schedule).
    Where the scales differ a hundredfold (a Friberg PK/PD cohort: subjects' clearances pinned by
    their levels, the myelosuppression parameters loose), those iterations take trees of 255 to
    1,023 steps at a step size of 0.01; after this 40-iteration start they take 63 to 127 at
    0.1 (one chain, 20 subjects: warmup 109-193 s -> 16 + 38 s)."""
    from jax.flatten_util import ravel_pytree
    from numpyro.infer import MCMC, NUTS

    kernel = NUTS(
        potential_fn=potential,
        target_accept_prob=cfg.target_accept,
        max_tree_depth=min(6, cfg.max_tree_depth),
    )
    pre = MCMC(
        kernel,
        num_warmup=cfg.prewarm,
        num_samples=1,
        num_chains=cfg.chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    pre.warmup(key, init_params=start)
    state = pre.last_state
    inv = state.adapt_state.inverse_mass_matrix
    flat = np.asarray(next(iter(inv.values())) if isinstance(inv, dict) else inv)
    flat = np.median(flat.reshape(-1, flat.shape[-1]), axis=0)  # over chains
    if not isinstance(dense, list):
        return dict(state.z), jnp.asarray(flat), _median_step(state)
    # by name: numpyro flattened one chain's positions with ravel_pytree, whose unravel undoes it
    one_chain = {n: jnp.asarray(a[0] if cfg.chains > 1 else a) for n, a in state.z.items()}
    by_name = ravel_pytree(one_chain)[1](jnp.asarray(flat))
    metric = {b: jnp.concatenate([jnp.ravel(by_name[n]) for n in b]) for b in dense}
    rest = tuple(sorted(set(names) - {n for b in dense for n in b}))
    if rest:
        metric[rest] = jnp.concatenate([jnp.ravel(by_name[n]) for n in rest])
    return dict(state.z), metric, _median_step(state)


def _median_step(state) -> float:
    return float(np.median(np.asarray(state.adapt_state.step_size)))


def _outputs(model, values, drop):
    """The kept variables, the observed ones, and one JAX function of the raw values giving the
    constrained variables, deterministics and pointwise log-likelihood (built once per fit)."""
    keep = [
        v for v in get_default_varnames(model.unobserved_value_vars, include_transformed=False) if v.name not in drop
    ]
    observed = list(model.observed_RVs)
    loglik = model.logp(vars=observed, sum=False)
    fn = get_jaxified_graph(inputs=values, outputs=[*keep, *loglik])
    return keep, observed, jax.jit(jax.vmap(jax.vmap(fn)))


def _datatree(model, names, outputs, raw, extra, drop, cfg, block) -> xr.DataTree:
    """The DataTree of raw NUTS draws: constrained variables, deterministics and the pointwise
    log-likelihood computed in one JAX pass, sample statistics under ArviZ's names."""
    keep, observed, fn = outputs
    outs = fn(*[raw[n] for n in names])
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
