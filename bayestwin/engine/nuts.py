"""Vectorised NUTS: many independent posteriors (patients x chains) in one jitted JAX program.

Each chain runs Stan-style window adaptation (step size and diagonal mass matrix) and then NUTS,
using blackjax's pure kernels. The per-chain program is ``vmap``-ped over chains and then over
patients; patients' data enter as arguments, so one compiled program serves every batch of the
same padded shape. Under ``vmap`` a batch advances at the pace of its slowest chain in each NUTS
step, which is why batches should hold patients of similar size (padding makes them so).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import blackjax
import jax
import jax.numpy as jnp
from blackjax.adaptation.base import get_filter_adapt_info_fn


class NutsConfig(NamedTuple):
    """Sampler settings (the same for every patient in a batch)."""

    chains: int = 4
    tune: int = 1000
    draws: int = 1000
    target_accept: float = 0.8
    max_doublings: int = 10
    diagonal: bool = False  # dense: a twin couples its own parameters to the population's
    # Patients per call of the compiled program (the last chunk is padded). Chains in a call move
    # in lock-step, each NUTS step as long as the longest tree among them: on CPU, where a
    # vmapped batch costs about the sum of its members anyway, small chunks waste the least
    # (4 vs 32 patients: 13.1 vs 7.8 progression twins/s, 3.7x faster for PK twins).
    chunk: int = 4


class Draws(NamedTuple):
    """Raw sampler output, leading axes (batch, chain, draw)."""

    position: jax.Array  # (B, C, D, d)
    diverging: jax.Array  # (B, C, D)
    acceptance_rate: jax.Array
    n_steps: jax.Array
    energy: jax.Array
    step_size: jax.Array  # (B, C)


def make_sampler(logdensity: Callable, cfg: NutsConfig) -> Callable:
    """Build ``run(keys (B, C, 2), init (B, C, d), data (B, ...)) -> Draws``, jitted.

    ``logdensity(position, data)`` is the log density of one chain's position given one
    patient's data.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> run = make_sampler(lambda x, mu: -0.5 * jnp.sum((x - mu) ** 2), NutsConfig(chains=2, tune=100, draws=50))
    >>> keys = jax.random.split(jax.random.key(0), 3 * 2).reshape(3, 2)
    >>> out = run(keys, jnp.zeros((3, 2, 1)), jnp.arange(3.0)[:, None])
    >>> out.position.shape
    (3, 2, 50, 1)
    """

    def one_chain(key, position, data):
        def ld(x):
            return logdensity(x, data)

        warm_key, sample_key = jax.random.split(key)
        warmup = blackjax.window_adaptation(
            blackjax.nuts,
            ld,
            target_acceptance_rate=cfg.target_accept,
            adaptation_info_fn=get_filter_adapt_info_fn(),
            is_mass_matrix_diagonal=cfg.diagonal,
            max_num_doublings=cfg.max_doublings,
        )
        (state, params), _ = warmup.run(warm_key, position, num_steps=cfg.tune)
        step = blackjax.nuts(ld, **params).step  # params carry step size, metric, max doublings

        def one_step(state, k):
            state, info = step(k, state)
            return state, (
                state.position,
                info.is_divergent,
                info.acceptance_rate,
                info.num_integration_steps,
                info.energy,
            )

        _, (pos, div, acc, steps, energy) = jax.lax.scan(one_step, state, jax.random.split(sample_key, cfg.draws))
        return Draws(pos, div, acc, steps, energy, params["step_size"])

    per_patient = jax.vmap(one_chain, in_axes=(0, 0, None))

    return jax.jit(jax.vmap(per_patient, in_axes=(0, 0, 0)))


def chain_keys(seeds: jnp.ndarray, chains: int) -> jax.Array:
    """Independent keys (B, C) from one integer seed per patient: results do not depend on batching."""
    return jax.vmap(lambda s: jax.random.split(jax.random.key(s), chains))(seeds)
