"""The family contract: what a model family declares and provides, and what it gets for free.

A *family* is a small object that builds one PyMC model from a table's arrays. Everything else in
bayestwin (the population fit, twins, forecasts, decisions, virtual cohorts, review, artifacts) is
shared code that takes any family. This module writes the contract down:

* :class:`Family`, a ``typing.Protocol``: 7 declarations and 7 methods, each with its invariant;
* :class:`FamilyBase`, the base class the built-in families use: it derives the rest (dose-slot
  sizes, covariate arrays of virtual patients, the reference baseline, the default reader and
  table check, sampler defaults, ``config()`` and its inverse, the forecast type) and refuses a
  subclass that lacks a required piece *when the class is defined*, not deep inside a fit;
* :func:`register_family` and :func:`from_config`: an open registry, so a user's family is saved,
  loaded and named in a ``spec.toml`` like the built-in ones (by import path, never by pickle).

A complete family in about 40 lines (random intercepts, Gaussian outcome)::

    import jax, numpy as np, pymc as pm
    import bayestwin as bt
    from bayestwin.families.base import Axis, Design, FamilyBase, register_family

    @register_family
    class Level(FamilyBase):
        name = "level"
        inputs = {"patient_idx": Axis("obs"), "time": Axis("obs"), "y_obs": Axis("obs")}
        patient_vars, patient_outputs, residual_params = ("z",), ("patient_level",), ("sigma",)

        def design(self, frame, baseline, schema):
            patients = list(baseline.index)
            idx = frame["patient"].map({p: i for i, p in enumerate(patients)}).to_numpy(np.int64)
            return Design(patients, {"patient_idx": idx, "time": frame["time"].to_numpy(float),
                                     "y_obs": frame["outcome"].to_numpy(float)})

        def template_design(self, schema, n_obs):
            return Design(["twin"], {"patient_idx": np.zeros(n_obs, np.int64),
                                     "time": np.zeros(n_obs), "y_obs": np.zeros(n_obs)})

        def build_model(self, design, schema):
            d = design.data
            with pm.Model(coords={"patient": design.patients, "obs": np.arange(len(d["y_obs"]))}) as m:
                idx = pm.Data("patient_idx", d["patient_idx"], dims="obs")
                pm.Data("time", d["time"], dims="obs")
                y = pm.Data("y_obs", d["y_obs"], dims="obs")
                level = pm.Normal("level", schema.outcome_mean, 10 * schema.outcome_sd)
                tau, sigma = pm.HalfNormal("tau", schema.outcome_sd), pm.HalfNormal("sigma", schema.outcome_sd)
                z = pm.Normal("z", 0, 1, dims="patient")
                a = pm.Deterministic("patient_level", level + tau * z, dims="patient")
                mu = pm.Deterministic("mu", a[idx], dims="obs")
                pm.Normal("y", mu, sigma, observed=y, dims="obs")
            return m

        def forecast_inputs(self, table, schema, therapies=None, times=None, start=None):
            times = np.asarray(times if times is not None else [0.0, schema.time_scale], float)
            B = len(table.patients)
            return ["as is"], times, {"time": np.broadcast_to(times, (B, 1, len(times)))}

        def scenario_arrays(self, scenarios, times, schema, start=0.0, before=None):
            return ["as is"], {"time": np.asarray(times, float)[None]}

        def observe(self, key, mu, params):
            return mu + params["sigma"] * jax.random.normal(key, mu.shape)

``tests/families/test_contract.py`` runs every registered family through the same checks (data
names, scenario coverage, dims, standard-normal patient variables, config round trip, save and
load, a twin, a forecast, a virtual cohort). For a model you would rather write as a plain PyMC
function, :class:`bayestwin.Model` does all of this from the graph itself.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import pymc as pm


@dataclass(frozen=True)
class Prior:
    """A named PyMC distribution with its parameters, serialisable to a model card.

    Examples
    --------
    >>> Prior("HalfNormal", sigma=10.0)
    Prior('HalfNormal', sigma=10.0)
    """

    dist: str
    params: dict = field(default_factory=dict)

    def __init__(self, dist: str, **params):
        cls = getattr(pm, dist, None) if isinstance(dist, str) else None
        if not (isinstance(cls, type) and issubclass(cls, pm.Distribution)):
            raise ValueError(f"unknown PyMC distribution {dist!r}")
        # PyMC swallows unknown keywords (HalfNormal(sigm=50) would silently be HalfNormal(1)):
        # every keyword must be a parameter of the distribution itself.
        sig = inspect.signature(cls.dist)
        known = [n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        unknown = [k for k in params if k not in known]
        if unknown:
            raise ValueError(f"{dist} has no parameter {unknown[0]!r}; its parameters: {known}")
        for k, v in params.items():
            x = np.asarray(v)
            if x.dtype == object or not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
                raise ValueError(f"{dist} parameter {k}={v!r} is not a finite number (or array of them)")
        object.__setattr__(self, "dist", dist)
        object.__setattr__(self, "params", params)

    def create(self, name: str, **kwargs):
        """Create the random variable ``name`` in the current model."""
        return getattr(pm, self.dist)(name, **self.params, **kwargs)

    def unnamed(self, **kwargs):
        """An unregistered distribution (``.dist``), e.g. for LKJ ``sd_dist``."""
        return getattr(pm, self.dist).dist(**self.params, **kwargs)

    def to_dict(self) -> dict:
        """The prior as plain data (distribution name and parameters), for model cards and specs."""
        return {"dist": self.dist, **{k: np.asarray(v).tolist() for k, v in self.params.items()}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"Prior({self.dist!r}{', ' if args else ''}{args})"


def lkj_cholesky(name: str, dim: str, eta, sd_dist, *, stds_name: str | None = None):
    """A correlated random-effect block with labelled draws: the Cholesky factor of an LKJ
    covariance over the coordinates of ``dim`` (already in the model), returned for ``z @ L.T``.

    ``pm.LKJCholeskyCov`` with every variable named on the model's labels: the packed factor
    ``name`` over ``{name}_element`` (its lower triangle row by row: ``"slope, intercept"`` is
    L[slope, intercept]), the SDs ``{name}_stds`` over ``dim`` and the correlations
    ``{name}_corr`` over ``(dim, {dim}_bis)`` (``stds_name``: another name for the SDs, e.g. the
    formula family's ``patient_sd``). (PyMC's own deterministics have unnamed dims,
    ``re_chol_stds_dim_0``: which index is the intercept, only the source said.)
    """
    model = pm.modelcontext(None)
    labels = [str(x) for x in model.coords[dim]]
    n = len(labels)
    rows, cols = np.tril_indices(n)
    model.add_coord(f"{name}_element", [f"{labels[i]}, {labels[j]}" for i, j in zip(rows, cols, strict=True)])
    if f"{dim}_bis" not in model.coords:
        model.add_coord(f"{dim}_bis", labels)
    chol, corr, sds = pm.LKJCholeskyCov(
        name, n=n, eta=eta, sd_dist=sd_dist, compute_corr=True, store_in_trace=False, dims=f"{name}_element"
    )
    pm.Deterministic(f"{name}_corr", corr, dims=(dim, f"{dim}_bis"))
    pm.Deterministic(stds_name or f"{name}_stds", sds, dims=dim)
    return chol


def check_prior_names(priors: Mapping, known, family: str) -> None:
    """Refuse prior overrides whose name the family does not have (a typo would be ignored)."""
    unknown = set(priors) - set(known)
    if unknown:
        raise ValueError(f"unknown prior name(s) {sorted(unknown)} for family {family!r}; known: {sorted(known)}")


@dataclass
class Design:
    """Numeric arrays a family's PyMC model is built from (one entry per ``pm.Data``)."""

    patients: list[str]
    data: dict[str, np.ndarray]

    @property
    def n_obs(self) -> int:
        return len(self.data["y_obs"])


# ----------------------------------------------------------------------------- the contract
class Axis(NamedTuple):
    """How one ``pm.Data`` input of a family's model is laid out, and so how twins pad it.

    ``kind``: ``"obs"``, one row per observation (padded to the batch's row count, masked);
    ``"patient"``, one row per patient (kept as a one-row slot for each twin). ``slot``: a second,
    padded axis of a per-patient input (``"dose"`` for PK dose slots), widened with ``fill``
    (e.g. 1.0 for an infusion duration, so that an empty slot is still well defined).
    """

    kind: str = "obs"
    slot: str | None = None
    fill: float = 0.0


#: The data names every family's model has (graph convention G1): ``patient_idx`` maps each
#: observation to its patient and ``y_obs`` holds the observed values.
REQUIRED_INPUTS = ("patient_idx", "y_obs")


@runtime_checkable
class Family(Protocol):
    """What every model family declares and provides (see the module docstring for an example).

    Declarations
    ------------
    name : str
        The registry key (``config()["family"]``, ``[family] name`` in a spec).
    inputs : Mapping[str, Axis]
        Every ``pm.Data`` of :meth:`build_model`'s graph, with its layout. Invariant: the keys of
        :meth:`design` ``.data`` and :meth:`template_design` ``.data`` are exactly these names, and
        include ``patient_idx`` and ``y_obs``.
    observed : str
        The observed variable (its observed value is the ``y_obs`` data).
    prediction : str
        The deterministic forecasts report as ``mean`` (dims ``obs``): a function of the
        parameters and the non-observed inputs only.
    patient_vars : tuple[str, ...]
        Free variables with a leading ``patient`` dim; every other free variable is population
        level. Invariant: each is ``Normal(0, 1)`` (non-centred offsets) or a Normal / MvNormal
        whose location and scale depend on population variables only; twins sample their
        standardised form either way.
    patient_outputs : tuple[str, ...]
        Deterministics (dims ``patient``, ...) reported for each twin (``Twin.summary``).
    residual_params : tuple[str, ...]
        Population variables :meth:`observe` needs besides the prediction.

    Methods
    -------
    config() -> dict
        Everything needed to rebuild the family: ``type(f)(**{k: v for k, v in cfg.items() if k
        != "family"})`` equals ``f`` (:class:`FamilyBase` derives it from ``__init__``).
    design(frame, baseline, schema) -> Design
        The model's arrays from a validated table (one ``baseline`` row per patient).
    template_design(schema, n_obs, **slots) -> Design
        A one-patient design of ``n_obs`` zero rows (and slot sizes): only shapes matter; twins
        are compiled from it once per shape.
    build_model(design, schema) -> pm.Model
        The PyMC model, with dims ``patient`` and ``obs``.
    forecast_inputs(table, schema, therapies, times, start) -> (labels, times, data)
        Inputs of ``prediction`` for patients with a history: arrays (patient, scenario, ...).
    scenario_arrays(scenarios, times, schema, start, before) -> (labels, data)
        The same for new patients with no history (virtual cohorts): arrays (scenario, ...).
    observe(key, mu, params) -> jax.Array
        A new measurement given the prediction ``mu`` and ``params`` (``residual_params``),
        broadcast together: the observed variable's own law, in JAX.
    """

    name: str
    inputs: Mapping[str, Axis]
    observed: str
    prediction: str
    patient_vars: tuple[str, ...]
    patient_outputs: tuple[str, ...]
    residual_params: tuple[str, ...]

    def config(self) -> dict: ...
    def design(self, frame: pd.DataFrame, baseline: pd.DataFrame, schema) -> Design: ...
    def template_design(self, schema, n_obs: int, **slots) -> Design: ...
    def build_model(self, design: Design, schema) -> pm.Model: ...
    def forecast_inputs(self, table, schema, therapies=None, times=None, start=None): ...
    def scenario_arrays(self, scenarios, times, schema, start: float = 0.0, before=None): ...
    def observe(self, key, mu, params: Mapping): ...


#: Declarations and methods a family class must define (the rest :class:`FamilyBase` derives).
REQUIRED = (
    "name",
    "inputs",
    "patient_vars",
    "patient_outputs",
    "residual_params",
    "design",
    "template_design",
    "build_model",
    "forecast_inputs",
    "scenario_arrays",
    "observe",
)


class FamilyError(TypeError):
    """A family that does not meet the contract (raised when it is defined or registered)."""


class FamilyBase:
    """Base class of families: derives everything the :class:`Family` contract leaves open.

    A subclass defines the :data:`REQUIRED` pieces; a missing one is refused when the class is
    defined (:class:`FamilyError`). Optional class attributes, with their defaults:

    ``observed = "y"``, ``prediction = "mu"``; ``forecast_kind = "value"`` (``"event"``: the
    prediction is a cumulative hazard and forecasts are :class:`~bayestwin.forecast.EventForecast`);
    ``twin_nuts`` and ``twin_importance`` (per-family NUTS and importance settings for twins);
    ``fit_nuts`` (defaults of the population fit's settings, e.g. ``{"prewarm": 40}``);
    ``table = "cohort"`` (which validated table it reads: ``"cohort"``, ``"events"``,
    ``"survival"``, ``"joint"``).
    """

    name: ClassVar[str]
    inputs: ClassVar[Mapping[str, Axis]]
    observed: ClassVar[str] = "y"
    prediction: ClassVar[str] = "mu"
    forecast_kind: ClassVar[str] = "value"
    twin_nuts: ClassVar[Mapping[str, Any]] = {}
    twin_importance: ClassVar[Mapping[str, Any]] = {}
    fit_nuts: ClassVar[Mapping[str, Any]] = {}
    table: ClassVar[str] = "cohort"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if inspect.isabstract(cls) or cls.__dict__.get("_abstract", False):
            return
        missing = [n for n in REQUIRED if not hasattr(cls, n)]
        if missing:
            raise FamilyError(f"family class {cls.__name__} lacks {missing} (see bayestwin.families.base.Family)")
        inputs = cls.__dict__.get("inputs")
        if isinstance(inputs, Mapping):
            _check_inputs(cls.__name__, inputs)

    # ---------------------------------------------------------- derived pieces
    def config(self) -> dict:
        """The family's name and every ``__init__`` argument (priors as dicts): for model cards."""
        out = {"family": self.name}
        params = inspect.signature(type(self).__init__).parameters.values()
        for p in [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)][1:]:
            value = getattr(self, p)
            if p == "priors":
                value = {k: (v.to_dict() if isinstance(v, Prior) else v) for k, v in value.items()}
            out[p] = value
        if not type(self).__module__.startswith("bayestwin."):
            out["module"] = f"{type(self).__module__}:{type(self).__qualname__}"
        return out

    def slots(self, design: Design) -> dict:
        """Sizes of the padded axes other than observations (e.g. ``{"dose": 3}``), from ``inputs``."""
        out = {}
        for name, axis in self.inputs.items():
            if axis.slot is not None:
                out[axis.slot] = max(out.get(axis.slot, 0), int(np.asarray(design.data[name]).shape[1]))
        return out

    def covariate_arrays(self, baseline: pd.DataFrame, schema) -> dict:
        """Per-patient inputs of virtual patients from a covariate table: ``{"X": (n, 1, p)}``."""
        X = schema.covariate_matrix(baseline) if schema.covariates else np.zeros((len(baseline), 0))
        return {"X": X[:, None, :]}

    def reference_baseline(self, constant: Mapping, schema) -> pd.DataFrame:
        """The fitted cohort's covariates, back from the fit's constant data (``X``)."""
        return schema.baseline_from_matrix(np.asarray(constant["X"]))

    def read(self, rows, *, key=None, schema=None, columns=None, baseline=None):
        """New patients' rows as the fitting table's kind (default: a :class:`~bayestwin.Cohort`)."""
        from bayestwin.data.cohort import Cohort

        c = columns
        return Cohort(
            rows,
            patient=c.patient,
            time=c.time,
            outcome=c.outcome,
            therapy=c.therapy,
            covariates=c.covariates,
            at_risk=getattr(c, "at_risk", None),
            baseline=baseline,
            key=key,
            schema=schema,
            allow_empty=True,
        )

    def check_table(self, table) -> None:
        """Refuse a validated table of another kind than ``table`` says (before a model is built)."""
        from bayestwin.errors import DataError

        found = table_kind(table)
        if found == self.table:
            return
        what = {
            "cohort": ("a Cohort", "bt.Cohort"),
            "events": ("NONMEM-style events", "bt.read_nonmem"),
            "survival": ("at-risk intervals", "bt.read_survival"),
            "joint": ("a biomarker + follow-up table", "bt.read_joint"),
        }
        hint = ": for PK data use bt.fit(events, bt.Pk(...))" if found == "events" else ""
        (want, reader), (got, _) = what[self.table], what[found]
        raise DataError(f"family {self.name!r} reads {want}, not {got} (read its table with {reader}){hint}")

    def fit_model(self, design: Design, schema) -> tuple[pm.Model, tuple[str, ...]]:
        """The model the population fit samples, and raw variables to leave out of its posterior
        (default: :meth:`build_model`, none). A family may fit another parameterisation of the
        same posterior here (the progression family's centred patients)."""
        return self.build_model(design, schema), ()

    def fit_advice(self, design: Design, verdict) -> list[str]:
        """What to try when a fit failed the gate, read from this family's design (default: none)."""
        return []

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k not in ("family", "module", "priors"))
        return f"{type(self).__name__}({args})"


def _check_inputs(owner: str, inputs: Mapping) -> None:
    missing = [n for n in REQUIRED_INPUTS if n not in inputs]
    if missing:
        raise FamilyError(f"{owner}.inputs lacks {missing}: every family's model has patient_idx and y_obs data")
    for n, axis in inputs.items():
        if not isinstance(axis, Axis) or axis.kind not in ("obs", "patient"):
            raise FamilyError(f"{owner}.inputs[{n!r}] must be Axis('obs' | 'patient', slot, fill), not {axis!r}")
        if axis.slot is not None and axis.kind != "patient":
            raise FamilyError(f"{owner}.inputs[{n!r}]: a slot axis belongs to a per-patient input")


def table_kind(table) -> str:
    """Which kind of validated table ``table`` is: cohort, events, survival or joint."""
    from bayestwin.data.joint import JointCohort
    from bayestwin.data.nonmem import Events
    from bayestwin.data.survival import START

    if not (hasattr(table, "frame") and hasattr(table, "baseline")):
        raise TypeError(
            f"expected a validated table (bt.Cohort, bt.read_nonmem, bt.read_survival, bt.read_joint), "
            f"not {type(table).__name__}"
        )
    if isinstance(table, Events):
        return "events"
    if isinstance(table, JointCohort):
        return "joint"
    if START in table.frame.columns:
        return "survival"
    return "cohort"


# ----------------------------------------------------------------------------- registry
#: Registered families by name (built-in ones and any registered with :func:`register_family`).
FAMILIES: dict[str, type] = {}


def register_family(cls: type) -> type:
    """Class decorator: add a family to the registry under ``cls.name``, after checking it.

    A registered family is named in a ``spec.toml`` (``[family] name = ...``) and rebuilt from a
    model card by :func:`from_config`. Cards of families outside bayestwin also store the class's
    import path, so loading imports that (installed) module; nothing is unpickled.
    """
    if not isinstance(cls, type):
        raise FamilyError(f"register_family decorates a class, not {cls!r}")
    missing = [n for n in REQUIRED if not hasattr(cls, n)]
    if missing:
        raise FamilyError(f"family class {cls.__name__} lacks {missing} (see bayestwin.families.base.Family)")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise FamilyError(f"family class {cls.__name__}: name must be an identifier string, not {name!r}")
    known = FAMILIES.get(name)
    if known is not None and f"{known.__module__}.{known.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
        raise FamilyError(f"a family named {name!r} is already registered ({known.__module__}.{known.__qualname__})")
    FAMILIES[name] = cls
    return cls


def import_object(path: str, what: str, owner: str):
    """The object at ``"package.module:name"`` in an installed module, for ``what`` (e.g. "the
    build function") of ``owner`` (e.g. "this Model"); a FamilyError says why not (defined in a
    script or notebook, a module that cannot be imported, no such name)."""
    mod, _, qual = path.partition(":")
    if mod == "__main__" or "<" in qual:
        raise FamilyError(
            f"{what} {path} was defined in a script, notebook or function, so another process "
            f"cannot import it: move it into an installed module to save or load {owner}"
        )
    try:
        obj = importlib.import_module(mod)
    except ImportError as err:
        raise FamilyError(f"{what} lives in {mod!r}, which cannot be imported ({err})") from None
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    return obj


def family_class(name: str, module: str | None = None) -> type:
    """The registered family class ``name``; with ``module`` (``"package.module:Class"``), import
    that installed module first if the name is not registered yet."""
    if name not in FAMILIES and module:
        mod, _, qual = module.partition(":")
        try:
            imported = importlib.import_module(mod)
        except ImportError as err:
            raise LookupError(
                f"family {name!r} lives in module {mod!r}, which cannot be imported here ({err}); install it"
            ) from None
        obj = imported
        for part in qual.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and name not in FAMILIES:
            register_family(obj)
    if name not in FAMILIES:
        raise LookupError(f"unknown family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def from_config(config: Mapping):
    """Rebuild a family from its ``config()`` (a model card's or a spec's): priors back to
    :class:`Prior` objects, the class from the registry (or its stored import path)."""
    cfg = dict(config)
    cls = family_class(cfg.pop("family"), cfg.pop("module", None))
    if "priors" in cfg:
        priors = {}
        for k, v in (cfg.pop("priors") or {}).items():
            if isinstance(v, Mapping) and "dist" in v:
                v = dict(v)
                priors[k] = Prior(v.pop("dist"), **v)
            else:
                priors[k] = v
        cfg["priors"] = priors
    if hasattr(cls, "from_config"):
        return cls.from_config(cfg)
    return cls(**cfg)
