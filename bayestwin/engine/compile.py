"""PyMC graph -> JAX functions of (parameters, one patient's data).

The family builds its PyMC model once for a single padded patient slot. Every ``pm.Data`` of
that model is replaced by a symbolic input (``graph_replace``), so the compiled JAX functions take
the patient's data as arguments and can be ``vmap``-ped across patients. Nothing here knows the
model's equations: the conditional log-density, the per-patient outputs and the structural
prediction all come from the one PyMC graph.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.graph.replace import graph_replace

from bayestwin.engine.stored import program_identity
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
    predict: Callable  # (*values, *prediction data) -> [mu, *observation params]
    predict_data_names: tuple[str, ...]
    predict_names: tuple[str, ...]  # the family's prediction, then its observation_params
    symbolic: Callable  # () -> the pytensor log-density before JAX: {"logp", "values", "data", "mask"}
    # what the program is built from, as a digest (bayestwin.engine.stored.program_identity):
    # the key of its traced forms on disk; None when the family names code outside this package
    identity: str | None = None

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


def standardised(model, name: str):
    """A patient variable written through its standard-normal offsets: ``(z, theta)``.

    ``z`` is a new symbolic input shaped like the variable, ``theta`` the variable as a graph of
    ``z`` and the population's value variables: ``mu + sigma z`` for a Normal, ``mu + z Lᵀ`` for
    an MvNormal (L the Cholesky factor of its covariance). Under the population, z ~ N(0, I)
    whatever parameterisation the model uses, and p(theta | phi) dtheta = N(z; 0, I) dz, so the
    twin's density over (phi, z) is exact and its prior part is standard normal: the same
    chain starts, prior draws and out-of-population distance serve every model. ``None`` when
    the variable already is a ``Normal(0, 1)`` offset (the built-in families' ``z``).
    """
    from bayestwin.families.base import FamilyError

    rv = model[name]
    op = rv.owner.op
    params = op.dist_params(rv.owner)
    value = model.rvs_to_values[rv]
    if op.name == "normal":
        mu, sigma = params
        if _constant(mu) == 0.0 and _constant(sigma) == 1.0:
            return None
        z = pt.tensor(f"{value.name}__std", dtype=value.dtype, shape=(None,) * value.ndim)
        mu, sigma = model.replace_rvs_by_values([mu, sigma])
        return z, mu + sigma * z
    if op.name == "multivariate_normal":
        mu, cov = model.replace_rvs_by_values(list(params))
        z = pt.tensor(f"{value.name}__std", dtype=value.dtype, shape=(None,) * value.ndim)
        chol = pt.linalg.cholesky(cov)
        return z, mu + pt.einsum("...ij,...j->...i", chol, z)
    raise FamilyError(
        f"patient variable {name!r} is {type(op).__name__.removesuffix('RV')}: twins condition on Normal or "
        "MvNormal patient variables (write others as a transform of one, e.g. exp of a Normal)"
    )


def _constant(x) -> float | None:
    """The value of a constant scalar graph (broadcast dims allowed), or None."""
    try:
        v = np.asarray(pt.get_underlying_scalar_constant_value(x))
    except Exception:  # noqa: BLE001 - not a constant
        return None
    return float(v) if v.size == 1 else None


def compile_twin(family, schema, n_obs: int, **slots) -> TwinProgram:
    """Compile the family's graph for one patient slot of ``n_obs`` observations.

    ``slots``: sizes of the family's other padded axes (e.g. ``dose`` for PK), fixed per program.
    Patient variables enter through their standardised offsets (:func:`standardised`).
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
    # Its length is that of another per-observation input, so that predictions (no y_obs) have it.
    rows = next((n for n in data_names if n != "y_obs" and family.inputs[n].kind == "obs"), "y_obs")
    replace[model["patient_idx"]] = pt.zeros(inputs[rows].shape[:1], dtype=model["patient_idx"].dtype)
    mask = pt.vector("mask", dtype=pytensor.config.floatX)

    # Patient variables: standard-normal offsets as they are, other Normals through theirs.
    swap = {}
    for n in family.patient_vars:
        std = standardised(model, n)
        if std is not None:
            swap[model.rvs_to_values[model[n]]] = std
    to_z = {v: theta for v, (z, theta) in swap.items()}

    def rewrite(graphs):
        graphs = graph_replace(graphs, to_z, strict=False) if to_z else graphs
        return graph_replace(graphs, replace, strict=False)

    blocks_phi, blocks_pat = [], []
    # the value variables' shapes (not model.initial_point(): it compiles a function with
    # pytensor's default linker, numba, 0.5 s of a first twin)
    shapes = model.eval_rv_shapes()
    values = [swap[v][0] if v in swap else v for v in model.value_vars]
    for v, sym in zip(model.value_vars, values, strict=True):
        rv = model.values_to_rvs[v]
        block = Block(sym.name, rv.name, tuple(int(s) for s in shapes[v.name]))
        (blocks_pat if rv.name in family.patient_vars else blocks_phi).append(block)

    names = [*family.patient_outputs, *family.residual_params]
    names += [b.rv for b in blocks_phi if b.rv not in names] + [
        d.name for d in model.deterministics if d.name.startswith("re_chol_")
    ]

    # The log density and the outputs as pytensor graphs, built on first use: a program read
    # traced from disk (bayestwin.engine.stored) never needs them, and PyMC's log-probability
    # rewrites are a good part of building a program (0.3 of 0.9 s for the Theoph model).
    @functools.cache
    def graphs() -> dict:
        own = []
        for n in family.patient_vars:
            v = model.rvs_to_values[model[n]]
            if v in swap:
                z = swap[v][0]
                own.append(-0.5 * (z**2).sum() - 0.5 * np.log(2 * np.pi) * z.size)
            else:
                own.append(model.logp(vars=[model[n]], sum=True))
        [lik] = rewrite(model.logp(vars=[model[family.observed]], sum=False))
        logp = pt.add(*rewrite(own)) + (lik * mask).sum() if own else (lik * mask).sum()
        outs = rewrite(model.replace_rvs_by_values([model[n] for n in names]))
        return {"logp": logp, "outputs": outs}

    pred_names = tuple(n for n in data_names if n != "y_obs")  # patient_idx is implied
    shown = [family.prediction, *getattr(family, "observation_params", ())]
    pred = rewrite(model.replace_rvs_by_values([model[n] for n in shown]))

    data_in = [inputs[n] for n in data_names]
    logp_fn = _Deferred(lambda: get_jaxified_graph(inputs=[*values, *data_in, mask], outputs=[graphs()["logp"]]))
    out_fn = _Deferred(lambda: get_jaxified_graph(inputs=[*values, *data_in], outputs=graphs()["outputs"]))
    pred_fn = _Deferred(lambda: get_jaxified_graph(inputs=[*values, *[inputs[n] for n in pred_names]], outputs=pred))
    symbolic = lambda: {"logp": graphs()["logp"], "values": values, "data": inputs, "mask": mask}  # noqa: E731
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
        predict_names=tuple(shown),
        symbolic=symbolic,
        identity=program_identity(family, schema, n_obs, slots),
    )


#: pytensor mode for small functions run once on numpy arrays: the Python linker with few rewrites
#: compiles in milliseconds; pytensor's default (numba) took 0.5 s per function.
QUICK = "FAST_COMPILE"


class _Deferred:
    """A JAX function built on its first call: a twin needs the prediction only when it forecasts
    (and the log density only when its program is traced), so their pytensor rewrites (part of a
    first twin's time) wait until then."""

    def __init__(self, build: Callable):
        self._build, self._fn = build, None

    def __call__(self, *args):
        if self._fn is None:
            with jax.ensure_compile_time_eval():  # its constants are concrete arrays, even when first called in a trace
                self._fn = self._build()
        return self._fn(*args)


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
            x = _forward(transform, rv, x)
        cols.append(x.reshape(len(x), -1))
    return np.concatenate(cols, axis=1)


def constrained_draws(model, flat: np.ndarray, blocks: tuple[Block, ...]) -> dict[str, np.ndarray]:
    """The inverse of :func:`unconstrained_draws`: flat unconstrained draws (S, d) -> each block's
    random variable's constrained draws (S, *shape), by its PyMC transform's ``backward``."""
    out, i = {}, 0
    for b in blocks:
        x = np.asarray(flat[:, i : i + b.size]).reshape(len(flat), *b.shape)
        i += b.size
        rv = model[b.rv]
        transform = model.rvs_to_transforms.get(rv)
        out[b.rv] = x if transform is None else _forward(transform, rv, x, inverse=True)
    return out


def _forward(transform, rv, x: np.ndarray, inverse: bool = False) -> np.ndarray:
    """``transform.forward`` (``backward`` if ``inverse``) of every draw in ``x`` (draws first).
    PyMC's transforms act on the last axes (``x[..., i]``), so one call over all draws is tried
    first (a Python loop over 4,000 draws took 0.3-0.5 s of a first twin) and kept only if its
    first and last draws equal those of the draw-by-draw call; otherwise draw by draw."""
    fn = transform.backward if inverse else transform.forward
    ndim = x.ndim - 1
    sym = pt.tensor("x", dtype=rv.dtype, shape=(None,) * ndim)
    compiled = lambda i, o: pytensor.function(i, o, on_unused_input="ignore", mode=QUICK)  # noqa: E731
    one = compiled([sym], fn(sym, *rv.owner.inputs))
    try:
        many = pt.tensor("xs", dtype=rv.dtype, shape=(None,) * (ndim + 1))
        out = compiled([many], fn(many, *rv.owner.inputs))(x)
        ok = out.shape[0] == len(x) and all(np.allclose(out[i], one(x[i]), rtol=1e-12, atol=0) for i in (0, -1))
    except Exception:  # noqa: BLE001 - a transform that cannot take a batch: draw by draw
        ok = False
    return out if ok else np.stack([one(xi) for xi in x])


def as_jax(tree):
    """numpy leaves -> jax arrays (the jaxified graphs need jax arrays, not numpy)."""
    return jax.tree_util.tree_map(jnp.asarray, tree)


def twin_pymc_model(program: TwinProgram, mean: np.ndarray, chol: np.ndarray, data: dict, mask: np.ndarray):
    """The same twin posterior as a standalone PyMC model, for one patient.

    ``pm.sample`` on it is the baseline the batched engine is measured against: identical
    density (whitened population part ``w ~ N(0, I)`` plus the patient-conditional terms).
    """
    import pymc as pm

    sym = program.symbolic()
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
