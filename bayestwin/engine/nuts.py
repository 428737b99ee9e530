"""Vectorised NUTS: many independent posteriors (patients x chains) in one jitted JAX program.

Each chain runs Stan-style window adaptation (step size and diagonal mass matrix) and then NUTS,
using blackjax's pure kernels. The per-chain program is ``vmap``-ped once over every (patient,
chain) pair; patients' data enter as arguments, so one compiled program serves every batch of the
same padded shape. Under ``vmap`` a batch advances at the pace of its slowest chain in each NUTS
step, which is why batches should hold patients of similar size (padding makes them so).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from blackjax.adaptation.mass_matrix import mass_matrix_adaptation
from blackjax.adaptation.step_size import dual_averaging_adaptation
from blackjax.adaptation.window_adaptation import build_schedule
from blackjax.mcmc.metrics import default_metric


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

    kernel = blackjax.nuts.build_kernel()
    mm_init, mm_update, mm_final = mass_matrix_adaptation(cfg.diagonal)
    da_init, da_update, da_final = dual_averaging_adaptation(cfg.target_accept)
    # Stan's windows over the warmup steps, then the draws (stage -1: nothing adapts); concrete
    # even when the sampler is built inside a trace (a twin program taking the population as an argument)
    with jax.ensure_compile_time_eval():
        schedule = np.asarray(build_schedule(cfg.tune), int).reshape(-1, 2)
    stage = np.concatenate([schedule[:, 0], np.full(cfg.draws, -1)])
    window_end = np.concatenate([schedule[:, 1], np.zeros(cfg.draws, int)]).astype(bool)
    steps = np.arange(cfg.tune + cfg.draws)

    def one_chain(key, position, data):
        def ld(x):
            return logdensity(x, data)

        warm_key, sample_key = jax.random.split(key)
        keys = jnp.concatenate([jax.random.split(warm_key, cfg.tune), jax.random.split(sample_key, cfg.draws)])
        imm_state = mm_init(position.shape[-1])
        start = (
            blackjax.nuts.init(position, ld),
            da_init(1.0),
            imm_state,
            jnp.asarray(1.0),
            imm_state.inverse_mass_matrix,
        )

        def adapt(i, st, end, new_state, info, ss, imm_state, step_size, imm):
            """One step of Stan's window adaptation (as blackjax's window_adaptation does it)."""
            ss = da_update(ss, info.acceptance_rate)
            imm_state = jax.lax.cond(st == 1, lambda s: mm_update(s, new_state.position), lambda s: s, imm_state)
            step_size = jnp.exp(ss.log_step_size)

            def close_window(a):
                ss, imm_state, _, _ = a
                imm_state = mm_final(imm_state)
                ss = da_init(da_final(ss))
                return ss, imm_state, jnp.exp(ss.log_step_size), imm_state.inverse_mass_matrix

            ss, imm_state, step_size, imm = jax.lax.cond(
                end, close_window, lambda a: a, (ss, imm_state, step_size, imm)
            )
            step_size = jnp.where(i == cfg.tune - 1, jnp.exp(ss.log_step_size_avg), step_size)  # the final one
            return ss, imm_state, step_size, imm

        def one_step(carry, xs):
            state, ss, imm_state, step_size, imm = carry
            i, k, st, end = xs
            state, info = kernel(k, state, ld, step_size, guarded(imm), max_num_doublings=cfg.max_doublings)
            adapted = jax.lax.cond(
                st >= 0,
                lambda a: adapt(i, st, end, state, info, *a),
                lambda a: a,
                (ss, imm_state, step_size, imm),
            )
            return (state, *adapted), (
                state.position,
                info.is_divergent,
                info.acceptance_rate,
                info.num_integration_steps,
                info.energy,
            )

        # One scan over warmup and draws: the NUTS kernel (and the log density in it) is traced
        # and compiled once, not once for the warmup and again for the draws.
        last, (pos, div, acc, n, energy) = jax.lax.scan(one_step, start, (steps, keys, stage, window_end))
        keep = slice(cfg.tune, None)
        return Draws(pos[keep], div[keep], acc[keep], n[keep], energy[keep], last[3])

    def run(keys, init, data):
        # One vmap over every (patient, chain) pair, each chain given its patient's data: vmap
        # traces the NUTS loops once per level, so this halves the tracing of nested vmaps
        # (chains, then patients), most of a first twin's time once XLA's programs are on disk.
        b, c = keys.shape[:2]
        per_chain = jax.tree_util.tree_map(lambda a: jnp.repeat(a, c, axis=0), data)
        out = jax.vmap(one_chain)(keys.reshape(b * c), init.reshape(b * c, *init.shape[2:]), per_chain)
        return jax.tree_util.tree_map(lambda a: a.reshape(b, c, *a.shape[1:]), out)

    return jax.jit(run)


def guarded(inverse_mass_matrix):
    """blackjax's Euclidean metric, with a kinetic energy of +inf where it is not a finite number.

    A leapfrog step far into a tail can meet gradients near 1e220: the momentum's kinetic energy
    p^T M^-1 p then overflows, and with a dense metric the sum of +inf and -inf products can come
    out as -inf. blackjax turns a NaN energy into a divergence but takes an energy of -inf as a
    perfect proposal: the chain jumps there (|w| ~ 50, a log density of -1e219) and every later
    step diverges (the step size falls to 1e-29). Measured on a count-model twin at its seed 5: a
    step of 7.8, the dual averaging's first after a metric update, landed there. Stan counts a
    non-finite energy as a divergence; so does this. Finite energies are untouched, so draws are
    bit-identical to blackjax's wherever it was right.
    """
    metric = default_metric(inverse_mass_matrix)

    def kinetic_energy(momentum, position=None):
        k = metric.kinetic_energy(momentum, position)
        return jnp.where(jnp.isfinite(k), k, jnp.inf)

    return metric._replace(kinetic_energy=kinetic_energy)


def chain_keys(seeds: jnp.ndarray, chains: int) -> jax.Array:
    """Independent keys (B, C) from one integer seed per patient: results do not depend on batching."""
    return jax.vmap(lambda s: jax.random.split(jax.random.key(s), chains))(seeds)
