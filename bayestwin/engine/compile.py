"""PyMC graph -> JAX functions of (parameters, one patient's data).

The family builds its PyMC model once for a single padded patient slot. Every ``pm.Data`` of
that model is replaced by a symbolic input (``graph_replace``), so the compiled JAX functions take
the patient's data as arguments and can be ``vmap``-ped across patients. Nothing here knows the
model's equations: the conditional log-density, the per-patient outputs and the structural
prediction all come from the one PyMC graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.graph.replace import graph_replace

from bayestwin.families.base import Design

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from pymc.sampling.jax import get_jaxified_graph


@dataclass(frozen=True)
class Block:
    """One free variable's place in a flat parameter vector."""

    name: str  # value-variable name (unconstrained), e.g. "sigma_log__"
    rv: str  # random-variable name, e.g. "sigma"
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=int))


@dataclass(frozen=True)
class TwinProgram:
    """JAX functions for one patient slot of ``n_obs`` (padded, masked) observations.

    ``values`` below is the list of all value variables in model order: population blocks
    (``phi``) and patient blocks (``patient``), each in its unconstrained space.
    """

    model: object  # the one-patient PyMC model the functions were compiled from
    phi: tuple[Block, ...]
    patient: tuple[Block, ...]
    order: tuple[str, ...]  # value-variable names in model order
    data_names: tuple[str, ...]
    logp: Callable  # (*values, *data, mask) -> [patient-conditional log density]
    outputs: Callable  # (*values, *data) -> list of constrained outputs
    output_names: tuple[str, ...]
    predict: Callable  # (*values, *prediction data) -> [mu]
    predict_data_names: tuple[str, ...]
    symbolic: dict  # the pytensor log-density before JAX: {"logp", "values", "data", "mask"}

    def split(self, phi_flat, patient_flat) -> list:
        """Flat vectors -> the list of value arrays in model order."""
        parts = {}
        for blocks, flat in ((self.phi, phi_flat), (self.patient, patient_flat)):
            i = 0
            for b in blocks:
                parts[b.name] = flat[i : i + b.size].reshape(b.shape)
                i += b.size
        return [parts[name] for name in self.order]


def template_design(family, schema, n_obs: int, **slots) -> Design:
    """A one-patient design with ``n_obs`` zero rows (and ``slots`` sizes): only the shapes matter."""
    return family.template_design(schema, n_obs, **slots)


def compile_twin(family, schema, n_obs: int, **slots) -> TwinProgram:
    """Compile the family's graph for one patient slot of ``n_obs`` observations.

    ``slots``: sizes of the family's other padded axes (e.g. ``dose`` for PK), fixed per program.
    """
    design = template_design(family, schema, n_obs, **slots)
    model = family.build_model(design, schema)
    data_names = tuple(n for n in design.data if n != "patient_idx")
    inputs = {
        name: pt.tensor(f"{name}_in", dtype=model[name].dtype, shape=(None,) * model[name].ndim) for name in data_names
    }
    replace = {model[name]: inputs[name] for name in data_names}
    # One patient slot: every row belongs to patient 0. A constant (not an input) lets pytensor's
    # rewrites turn the per-row gather into a broadcast, which vectorises far better.
    replace[model["patient_idx"]] = pt.zeros(inputs["time"].shape, dtype=model["patient_idx"].dtype)
    mask = pt.vector("mask", dtype=pytensor.config.floatX)

    patient_rvs = [model[n] for n in family.patient_vars]
    terms = model.logp(vars=[*patient_rvs, model[family.observed]], sum=False)
    own = [t.sum() for t in terms[:-1]]  # none when the family has no per-patient variables
    logp = pt.add(*own) + (terms[-1] * mask).sum() if own else (terms[-1] * mask).sum()
    [logp] = graph_replace([logp], replace, strict=False)

    blocks_phi, blocks_pat = [], []
    point = model.initial_point()
    for v in model.value_vars:
        rv = model.values_to_rvs[v]
        block = Block(v.name, rv.name, tuple(point[v.name].shape))
        (blocks_pat if rv.name in family.patient_vars else blocks_phi).append(block)

    names = [*family.patient_outputs, *family.residual_params]
    names += [b.rv for b in blocks_phi if b.rv not in names] + [
        d.name for d in model.deterministics if d.name.startswith("re_chol_")
    ]
    outs = graph_replace(model.replace_rvs_by_values([model[n] for n in names]), replace, strict=False)

    pred_names = tuple(n for n in data_names if n != "y_obs")  # patient_idx is implied
    [mu] = graph_replace(model.replace_rvs_by_values([model[family.prediction]]), replace, strict=False)

    values = list(model.value_vars)
    data_in = [inputs[n] for n in data_names]
    logp_fn = get_jaxified_graph(inputs=[*values, *data_in, mask], outputs=[logp])
    out_fn = get_jaxified_graph(inputs=[*values, *data_in], outputs=outs)
    pred_fn = get_jaxified_graph(inputs=[*values, *[inputs[n] for n in pred_names]], outputs=[mu])
    return TwinProgram(
        model=model,
        phi=tuple(blocks_phi),
        patient=tuple(blocks_pat),
        order=tuple(v.name for v in values),
        data_names=data_names,
        logp=logp_fn,
        outputs=out_fn,
        output_names=tuple(names),
        predict=pred_fn,
        predict_data_names=pred_names,
        symbolic={"logp": logp, "values": values, "data": inputs, "mask": mask},
    )


def unconstrained_draws(model, posterior, blocks: tuple[Block, ...]) -> np.ndarray:
    """Population draws mapped into the sampler's unconstrained space, flattened: (S, d).

    ``posterior`` is a Dataset with dims (chain, draw, ...). Uses each variable's own PyMC
    transform (``forward``), so the space matches the one the twin's log-density is written in.
    """
    cols = []
    for b in blocks:
        rv = model[b.rv]
        x = posterior[b.rv].to_numpy().reshape(-1, *b.shape)
        transform = model.rvs_to_transforms.get(rv)
        if transform is not None:
            sym = pt.tensor("x", dtype=rv.dtype, shape=(None,) * rv.ndim)
            fn = pytensor.function([sym], transform.forward(sym, *rv.owner.inputs), on_unused_input="ignore")
            x = np.stack([fn(xi) for xi in x])
        cols.append(x.reshape(len(x), -1))
    return np.concatenate(cols, axis=1)


def as_jax(tree):
    """numpy leaves -> jax arrays (the jaxified graphs need jax arrays, not numpy)."""
    return jax.tree_util.tree_map(jnp.asarray, tree)


def twin_pymc_model(program: TwinProgram, mean: np.ndarray, chol: np.ndarray, data: dict, mask: np.ndarray):
    """The same twin posterior as a standalone PyMC model, for one patient.

    ``pm.sample`` on it is the baseline the batched engine is measured against: identical
    density (whitened population part ``w ~ N(0, I)`` plus the patient-conditional terms).
    """
    import pymc as pm

    sym = program.symbolic
    d_phi = len(mean)
    d_pat = sum(b.size for b in program.patient)
    with pm.Model() as model:
        w = pm.Normal("w", 0.0, 1.0, shape=d_phi)
        theta = pm.Flat("theta", shape=d_pat)  # its prior is inside the patient-conditional terms
        phi = pt.as_tensor(mean) + pt.as_tensor(chol) @ w
        parts, i = {}, 0
        for b in program.phi:
            parts[b.name] = phi[i : i + b.size].reshape(b.shape)
            i += b.size
        i = 0
        for b in program.patient:
            parts[b.name] = theta[i : i + b.size].reshape(b.shape)
            i += b.size
        replace = {v: parts[v.name] for v in sym["values"]}
        replace |= {sym["data"][n]: pt.as_tensor(np.asarray(data[n])) for n in sym["data"]}
        replace[sym["mask"]] = pt.as_tensor(np.asarray(mask, dtype=pytensor.config.floatX))
        [logp] = graph_replace([sym["logp"]], replace, strict=False)
        pm.Potential("patient_conditional", logp)
    return model
