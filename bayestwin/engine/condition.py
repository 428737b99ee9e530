"""Conditioning a population posterior on patients: pure functions over arrays.

The twin posterior is p(theta_new, phi | Y, y_new) ∝ p(phi | Y) p(theta_new | phi) p(y_new | theta_new, phi).
The population posterior p(phi | Y) is known only through draws; we approximate it by a Gaussian
in the sampler's unconstrained space (mean and covariance of the draws), and sample (phi, theta_new)
jointly by NUTS. Written in whitened coordinates w (phi = m + L w, w ~ N(0, I)), the population
part is a standard normal, so the adapted diagonal metric is near ideal.

Why this approximation, and its limits: in unconstrained space a population posterior of a
cohort of tens of patients or more is close to Gaussian (log-SDs, Cholesky-packed correlations),
and one extra patient moves it little, so the error is small against Monte-Carlo error (checked
against full refits in tests and in ``../shared/STACK-NOTES.md``). It is least accurate where the
population posterior is skewed or multimodal in unconstrained space: very small cohorts (< ~10
patients), variance components near zero, or a patient so unusual that it moves phi far into a
tail. ``Population.condition`` reports, per twin, the shift of phi in whitened units, so such
cases are visible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from bayestwin.engine.compile import TwinProgram, as_jax
from bayestwin.engine.devices import run_chunked
from bayestwin.engine.importance import ImportanceConfig, make_importance_sampler
from bayestwin.engine.nuts import NutsConfig, chain_keys, make_sampler
from bayestwin.engine.stored import Stored
from bayestwin.review.convergence import Thresholds, gate
from bayestwin.review.twins import importance_stats, nuts_stats, twin_table


class GaussianApprox(NamedTuple):
    """p(phi | cohort) ≈ N(mean, chol chol^T) in unconstrained space."""

    mean: jax.Array
    chol: jax.Array

    @classmethod
    def from_draws(cls, draws: np.ndarray) -> GaussianApprox:
        mean = draws.mean(0)
        cov = np.atleast_2d(np.cov(draws, rowvar=False))
        jitter = 1e-10 * np.trace(cov) / len(cov)
        return cls(jnp.asarray(mean), jnp.asarray(np.linalg.cholesky(cov + jitter * np.eye(len(cov)))))


def pad(design_data: dict, patients: list[str], n_pad: int, family=None, slots: dict | None = None):
    """Split a multi-patient design into per-patient arrays padded to ``n_pad`` rows.

    The family's ``inputs`` say how: per-patient arrays (``Axis("patient")``) have one row per
    patient (kept as a one-row slot); those with a ``slot`` axis (e.g. doses) are widened to
    ``slots[slot]`` with the axis's ``fill``. The other arrays have one row per observation.
    Returns the batched data (leading axis: patient) and the mask (1 = observed row).
    """
    inputs = family.inputs
    per_patient = [n for n, a in inputs.items() if a.kind == "patient"]
    slot_axes = {n: a.slot for n, a in inputs.items() if a.slot is not None}
    fill = {n: a.fill for n, a in inputs.items()}
    idx = design_data["patient_idx"]
    B = len(patients)
    out = {}
    mask = np.zeros((B, n_pad))
    for name, arr in design_data.items():
        if name in slot_axes:
            wide = np.full((B, slots[slot_axes[name]], *arr.shape[2:]), fill.get(name, 0), arr.dtype)
            wide[:, : arr.shape[1]] = arr
            arr = wide
        if name in per_patient:
            out[name] = arr[:, None, ...]
        elif name == "patient_idx":
            out[name] = np.zeros((B, n_pad), np.int64)
        else:
            out[name] = np.zeros((B, n_pad, *arr.shape[1:]), arr.dtype)
    for i in range(B):
        rows = np.flatnonzero(idx == i)
        mask[i, : len(rows)] = 1.0
        for name, arr in design_data.items():
            if name not in per_patient and name != "patient_idx":
                out[name][i, : len(rows)] = arr[rows]
    return out, mask


def padded_batch(design, patients: list[str], family):
    """A design split into per-patient padded arrays, as every batched twin program takes them.

    Returns (data, mask, n_rows per patient, n_pad, slots): rows padded to :func:`padded_length`
    of the longest patient, the family's other padded axes (e.g. PK dose slots) likewise.
    """
    n_rows, n_pad, slots = padded_shape(design, patients, family)
    data, mask = pad(design.data, patients, n_pad, family, slots)
    return data, mask, n_rows, n_pad, slots


def padded_shape(design, patients: list[str], family):
    """(n_rows per patient, n_pad, slots) of :func:`padded_batch`, without padding anything."""
    n_rows = np.bincount(design.data["patient_idx"], minlength=len(patients))
    n_pad = padded_length(int(n_rows.max()) if len(n_rows) else 1)
    slots = {k: padded_length(v) for k, v in family.slots(design).items()}
    return n_rows, n_pad, slots


def padded_length(n: int) -> int:
    """Round up to a power of two, at least 4, so that compiled programs are reused across batches.

    Not larger: every padded row (and dose slot) is evaluated in each log density. A PK twin with
    two levels and one dose padded to 8 x 8 instead of 4 x 4 ran the importance path 1.5x and the
    NUTS path 2x slower (measured on 512 twins, 2 CPU cores); 2 x 2 was no faster than 4 x 4.
    """
    n = max(n, 1)
    return int(2 ** np.ceil(np.log2(n))) if n > 4 else 4


def twin_logdensity(program: TwinProgram, approx: GaussianApprox):
    """log p(w, theta | y_new) up to a constant, over the flat position [w, theta]."""
    d_phi = approx.mean.shape[0]

    def logdensity(x, data):
        arrays, mask = data
        w = x[:d_phi]
        return -0.5 * w @ w + program.logp(*_values(program, approx, x), *arrays, mask)[0]

    return logdensity


def make_run(program: TwinProgram, approx: GaussianApprox, cfg: NutsConfig, preconditioned: bool = False):
    """``run(data, mask, seeds, device=None) -> (Draws, outputs)``: condition a batch of patients.

    NUTS over (w, theta) for every patient and chain in one compiled program; chains start from
    draws of the (whitened) prior, so they are overdispersed. ``device``: where to run (chunks on
    different devices run concurrently). Build once per shape and settings, then reuse.

    ``preconditioned``: each patient's ``data`` also holds an affine map, ``PRECONDITION`` =
    (centre (d,), scale (d, d)), e.g. the importance path's final proposal, and NUTS runs on u
    with x = centre + scale u, where the posterior is close to standard normal: a diagonal
    metric and a short warmup suffice. Chains start from u ~ N(0, I); positions come back as x.

    The population's approximation is an argument of the compiled program, not a constant in it
    (:func:`_launcher`): the same family at the same shapes compiles one program for every
    population (a refit, a cross-validation fold, another site's), loaded from the disk cache.
    """
    d = approx.mean.shape[0] + sum(b.size for b in program.patient)
    outputs = _batched_outputs(program)

    def sampler_for(ap: GaussianApprox):
        base = twin_logdensity(program, ap)
        if preconditioned:

            def logdensity(u, data):
                arrays, mask, centre, scale = data
                return base(centre + scale @ u, (arrays, mask))

        else:
            logdensity = base
        return make_sampler(logdensity, cfg)

    @jax.jit
    def go(ap, seeds, arrays, mask, *affine):
        keys = chain_keys(seeds, cfg.chains)
        init = jax.vmap(jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 7), (d,))))(keys)
        draws = sampler_for(ap)(keys, init, (arrays, mask, *affine))
        if affine:
            centre, scale = affine
            x = centre[:, None, None, :] + jnp.einsum("bij,bcdj->bcdi", scale, draws.position)
            draws = draws._replace(position=x)
        return draws, outputs(draws.position, arrays, ap)

    return _launcher(go, program, approx, f"run {cfg!r} preconditioned={preconditioned}")


#: Keys of the affine map in the ``data`` of a preconditioned :func:`make_run`.
PRECONDITION = ("precondition_centre", "precondition_scale")


def make_importance(program: TwinProgram, approx: GaussianApprox, cfg: ImportanceConfig):
    """``run(data, mask, seeds, device=None) -> (ImportanceDraws, outputs)``: the fast path.

    Laplace-proposal importance sampling of the same twin density as :func:`make_run` (see
    :mod:`bayestwin.engine.importance`). Build once per shape and settings, then reuse; the
    approximation is an argument of the program, as in :func:`make_run`.
    """
    d = approx.mean.shape[0] + sum(b.size for b in program.patient)
    outputs = _batched_outputs(program)

    @jax.jit
    def go(ap, seeds, arrays, mask):
        sampler = make_importance_sampler(twin_logdensity(program, ap), d, cfg)
        draws = sampler(chain_keys(seeds, cfg.chains), (arrays, mask))
        return draws, outputs(draws.position, arrays, ap)

    return _launcher(go, program, approx, f"importance {cfg!r}")


def _launcher(go, program: TwinProgram, approx: GaussianApprox, label: str):
    # called through its traced form stored on disk (bayestwin.engine.stored): a new process
    # skips tracing and lowering it
    go = Stored(go, program.identity, label)

    def run(data: dict, mask: np.ndarray, seeds: np.ndarray, device=None):
        # numpy in, one transfer to the device, then the compiled program: nothing here waits
        # for another device's work, so chunks on different devices overlap.
        args = (
            approx,
            np.asarray(seeds, np.uint32),
            tuple(np.asarray(data[n]) for n in program.data_names),
            np.asarray(mask, float),
            *(np.asarray(data[n]) for n in PRECONDITION if n in data),
        )
        return go(*jax.device_put(args, device))

    return run


def _batched_outputs(program: TwinProgram):
    """``f(position (B, C, D, d), arrays, approx) -> {name: (B, C, D, ...)}`` of constrained outputs.

    Traced inside the samplers' programs, so the outputs come back with the draws.
    """

    def one(x, arrs, ap):
        return program.outputs(*_values(program, ap, x), *arrs)

    per_draw = jax.vmap(one, in_axes=(0, None, None))
    per_chain = jax.vmap(per_draw, in_axes=(0, None, None))
    batched = jax.vmap(per_chain, in_axes=(0, 0, None))

    def outputs(position, arrays, approx: GaussianApprox) -> dict:
        return dict(zip(program.output_names, batched(position, arrays, approx), strict=True))

    return outputs


def make_prior_draws(program: TwinProgram, approx: GaussianApprox):
    """Jitted ``f(key, arrays) -> {name: (B, 1, 1, ...)}``: one draw of each patient's outputs from
    the population predictive (phi from the population posterior's approximation, the patient's
    own variables from their prior) — the joint prior of a twin, for virtual patients.
    """
    d = approx.mean.shape[0] + sum(b.size for b in program.patient)
    outputs = _batched_outputs(program)

    @jax.jit
    def draw(ap, key, arrays):
        x = jax.random.normal(key, (arrays[0].shape[0], 1, 1, d))
        return outputs(x, arrays, ap)

    draw = Stored(draw, program.identity, "prior draws")
    return lambda key, arrays: draw(approx, key, arrays)


def make_predict(program: TwinProgram, approx: GaussianApprox):
    """Jitted ``f(position, pred_data) -> (mu, extras)``: the structural prediction ``mu``
    (B, S, C, D, T) and the family's ``observation_params`` (a dict, often empty) on the same axes.

    ``pred_data[name]`` has leading axes (B, S) — patient and scenario (e.g. therapy) — followed
    by the prediction's own shape.
    """

    def one(x, arrs, ap):
        return tuple(program.predict(*_values(program, ap, x), *arrs))

    f = jax.vmap(one, in_axes=(0, None, None))  # draws
    f = jax.vmap(f, in_axes=(0, None, None))  # chains
    f = jax.vmap(f, in_axes=(None, 0, None))  # scenarios
    # patients; called through its traced form on disk when there is one (bayestwin.engine.stored)
    jitted = Stored(jax.jit(jax.vmap(f, in_axes=(0, 0, None))), program.identity, "predict")

    def predict(position, pred_data: dict):
        arrays = tuple(as_jax(pred_data[n]) for n in program.predict_data_names)
        mu, *extra = jitted(position, arrays, approx)
        return mu, dict(zip(program.predict_names[1:], extra, strict=True))

    return predict


def _values(program: TwinProgram, approx: GaussianApprox, x):
    """Flat sampler position [w, theta] -> value arrays in model order (phi = m + L w)."""
    d_phi = approx.mean.shape[0]
    return program.split(approx.mean + approx.chol @ x[:d_phi], x[d_phi:])


class TwinDraws(NamedTuple):
    """What conditioning a batch of patients gives (:func:`condition_batch`)."""

    values: dict  # {name: (patient, chain, draw, ...)} constrained outputs (patient outputs, phi, ...)
    stats: dict  # sampler statistics per patient and chain/draw, with the raw positions
    table: pd.DataFrame  # per-twin diagnostics, as the gate reads them
    n_pad: int  # the padded row count (the compiled program's shape)
    slots: dict  # the padded sizes of the family's other axes (e.g. PK dose slots)


def condition_batch(
    compiled: Callable,
    family,
    approx: GaussianApprox,
    design,
    patients: list[str],
    seeds: np.ndarray,
    cfg: NutsConfig,
    importance: ImportanceConfig | None = None,
    thresholds: Thresholds = Thresholds(),
) -> TwinDraws:
    """Condition the population (``approx``) on each patient of ``design``: the twins' draws.

    By NUTS with ``cfg``; or, with ``importance``, first by Laplace-proposal importance sampling,
    and twins that then fail the gate (Pareto k̂, ESS, R-hat across the independent samplers)
    redone by NUTS, preconditioned by their final importance proposal with
    ``importance.fallback_tune`` warmup steps (0: plain NUTS; ``table["method"]`` says which).
    ``compiled(kind, n_pad, build, **slots)`` returns the jitted program ``build(program,
    approx)`` for a shape, built once (``Population.compiled``); every patient runs in fixed-size
    chunks of one vectorised program (:func:`bayestwin.engine.devices.run_chunked`).
    """
    data, mask, n_rows, n_pad, slots = padded_batch(design, patients, family)
    d_phi = int(approx.mean.shape[0])

    def nuts(sel, run_cfg=cfg, affine=None):
        pre = affine is not None
        build = lambda p, a: make_run(p, a, run_cfg, preconditioned=pre)  # noqa: E731
        run = compiled(("run", run_cfg, pre), n_pad, build, **slots)
        sub = {k: v[sel] for k, v in data.items()}
        if pre:
            sub |= {k: v[sel] for k, v in zip(PRECONDITION, affine, strict=True)}
        return run_chunked(run, sub, mask[sel], seeds[sel], run_cfg.chunk)

    outputs = family.patient_outputs
    if importance is None:
        draws, values = nuts(np.arange(len(patients)))
        stats = nuts_stats(draws)
    else:
        run_is = compiled(("importance", importance), n_pad, lambda p, a: make_importance(p, a, importance), **slots)
        draws, values = run_chunked(run_is, data, mask, seeds, importance.chunk)
        stats = importance_stats(draws)
        affine = (draws.centre, draws.scale)
    table = twin_table(values, stats, patients, n_rows, outputs, d_phi)
    if importance is not None:
        redo = np.flatnonzero(~gate(table, thresholds, by="patient").table["converged"].to_numpy())
        if len(redo):  # the fast path did not pass the gate for these twins: NUTS decides
            if importance.fallback_tune:  # preconditioned by the twin's importance proposal
                draws, sub = nuts(redo, cfg._replace(tune=importance.fallback_tune, diagonal=True), affine)
            else:
                draws, sub = nuts(redo)
            fresh = nuts_stats(draws)
            for k, v in stats.items():
                v[redo] = fresh[k]
            for k, v in values.items():
                v[redo] = sub[k]
            fixed = twin_table(sub, fresh, [patients[i] for i in redo], n_rows[redo], outputs, d_phi)
            table.iloc[redo] = fixed.to_numpy()
    return TwinDraws(values, stats, table, n_pad, slots)
