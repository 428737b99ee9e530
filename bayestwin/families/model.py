"""``bt.Model``: your own hierarchical PyMC model as a family, found from its graph.

Write a function ``build(data) -> pm.Model`` in plain PyMC. ``data`` (:class:`ModelData`) holds a
Cohort's arrays under fixed names; declare the ones the model uses with ``pm.Data`` under the
same names and dims, give per-patient variables a leading ``patient`` dim, and observe the
outcome through ``pm.Data("y_obs", ...)``::

    def seizures(data):
        with pm.Model(coords=data.coords) as model:
            idx = pm.Data("patient_idx", data["patient_idx"], dims="obs")
            X = pm.Data("X", data["X"], dims=("patient", "covariate"))
            on = pm.Data("on_therapy", data["on_therapy"], dims=("obs", "therapy_effect"))
            y = pm.Data("y_obs", data["y_obs"], dims="obs")
            b0 = pm.Normal("intercept", 1.0, 2.0)
            beta = pm.Normal("beta", 0.0, 1.0, dims="covariate")
            effect = pm.Normal("therapy_coef", 0.0, 1.0, dims="therapy_effect")
            tau = pm.HalfNormal("tau", 1.0)
            u = pm.Normal("u", 0.0, tau, dims="patient")          # centred: fine
            log_rate = b0 + (X @ beta)[idx] + u[idx] + on @ effect
            pm.Poisson("y", pm.math.exp(log_rate), observed=y, dims="obs")
        return model

    population = bt.fit(cohort, bt.Model(seizures))

What bayestwin reads from the graph, so that nothing else is needed:

* **patient variables**: free variables whose first dim is ``patient``. Each must be a Normal or
  MvNormal given the population variables (centred or non-centred: twins condition on their
  standardised form, :func:`bayestwin.engine.compile.standardised`, so the conditional density
  p(θ_new | φ) p(y_new | θ_new, φ) is the same either way);
* **population variables**: every other free variable;
* **the observation law**: the one observed variable (Normal, Student-t, Poisson, negative
  binomial, Bernoulli, binomial, categorical / ordered logistic, log-normal); forecasts report
  its expected value as ``mean`` (a count's rate, a response probability, an ordinal score's
  expectation) and draws from it as ``observation``, unless ``prediction=`` names another
  deterministic;
* **patient outputs**: the patient variables and every deterministic whose first dim is
  ``patient``, reported per twin.

Data names (``data.coords`` has the matching coordinates):

========================  =================  ===================================================
name                      dims               what
========================  =================  ===================================================
``patient_idx``           obs                the patient of each row (required)
``y_obs``                 obs                the outcome (required; integers for discrete laws)
``time``                  obs                the row's time
``therapy``               obs                the therapy given at the row (0 = reference)
``on_therapy``            obs, therapy_effect one-hot of the non-reference therapy given
``exposure``              obs, therapy_effect time spent on each non-reference therapy so far
``X``                     patient, covariate  baseline covariates (numeric standardised, one-hot)
``log_at_risk``           obs                log of the time at risk the row covers (a count's
                                             exposure offset; 0 without ``Cohort(at_risk=)``)
========================  =================  ===================================================

Forecasts give each therapy from ``start`` on (before it, the recorded history), as in the
progression family; a forecast row covers as much time at risk as the patient's last row (virtual
patients: one unit). Saving needs ``build`` importable from an installed module (the model card
stores its import path; nothing is pickled).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt

from bayestwin.data.cohort import AT_RISK, OUTCOME, PATIENT, TIME, Schema
from bayestwin.families.base import Axis, Design, FamilyBase, FamilyError, import_object, register_family
from bayestwin.families.progression import frame_exposure

#: The arrays ``build`` may declare, with their layout.
DATA = {
    "X": Axis("patient"),
    "patient_idx": Axis("obs"),
    "time": Axis("obs"),
    "therapy": Axis("obs"),
    "on_therapy": Axis("obs"),
    "exposure": Axis("obs"),
    "log_at_risk": Axis("obs"),
    "y_obs": Axis("obs"),
}


class ModelData(dict):
    """The arrays a :class:`Model`'s ``build`` function reads (a dict), with ``coords`` for
    ``pm.Model(coords=data.coords)`` (``patient``, ``obs``, ``covariate``, ``therapy``,
    ``therapy_effect``) and the cohort's ``schema`` (therapies, covariate levels and scales,
    outcome mean and SD: the same when twins rebuild the model, unlike the arrays' values)."""

    def __init__(self, arrays: Mapping, coords: Mapping, schema: Schema | None = None):
        super().__init__(arrays)
        self.coords = dict(coords)
        self.schema = schema


# ------------------------------------------------------------------ observation laws
def _mean_normal(mu, sigma):
    return mu


def _mean_t(nu, mu, sigma):
    return mu


def _mean_lognormal(mu, sigma):
    return pt.exp(mu + 0.5 * sigma**2)


def _mean_poisson(mu):
    return mu


def _mean_bernoulli(p):
    return p


def _mean_binomial(n, p):
    return n * p


def _mean_nbinom(n, p):
    return n * (1.0 - p) / p


def _mean_categorical(p):
    return (p * pt.arange(p.shape[-1])).sum(-1)


def _draw(law: str, key, params, shape):
    if law == "normal":
        mu, sigma = params
        return mu + sigma * jax.random.normal(key, shape)
    if law == "t":
        nu, mu, sigma = params
        return mu + sigma * jax.random.t(key, nu, shape)
    if law == "lognormal":
        mu, sigma = params
        return jnp.exp(mu + sigma * jax.random.normal(key, shape))
    if law == "poisson":
        (mu,) = params
        return jax.random.poisson(key, jnp.broadcast_to(mu, shape)).astype(float)
    if law == "bernoulli":
        (p,) = params
        return (jax.random.uniform(key, shape) < p).astype(float)
    if law == "binomial":
        n, p = params
        return jax.random.binomial(key, jnp.broadcast_to(n, shape), jnp.broadcast_to(p, shape)).astype(float)
    if law == "negative_binomial":  # a gamma mixture of Poissons: rate ~ Gamma(n, (1 - p) / p)
        n, p = params
        k1, k2 = jax.random.split(key)
        rate = jax.random.gamma(k1, jnp.broadcast_to(n, shape)) * (1.0 - p) / p
        return jax.random.poisson(k2, rate).astype(float)
    if law == "categorical":
        (p,) = params
        return jax.random.categorical(key, jnp.log(p), axis=-1, shape=shape).astype(float)
    raise AssertionError(law)


#: Observation laws a Model may use: the RandomVariable's name -> its expectation (pytensor).
LAWS: dict[str, Callable] = {
    "normal": _mean_normal,
    "t": _mean_t,
    "lognormal": _mean_lognormal,
    "poisson": _mean_poisson,
    "bernoulli": _mean_bernoulli,
    "binomial": _mean_binomial,
    "negative_binomial": _mean_nbinom,
    "categorical": _mean_categorical,
}


def _import_path(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', '?')}"


def resolve(path: str) -> Callable:
    """The function at ``"package.module:name"`` (imported from an installed module)."""
    if not isinstance(path, str) or ":" not in path:
        raise FamilyError(f"a Model's build function is stored as 'package.module:function', not {path!r}")
    obj = import_object(path, "the build function", "this Model")
    if not callable(obj):
        raise FamilyError(f"{path} is not a function in an installed module")
    return obj


@register_family
class Model(FamilyBase):
    """Any hierarchical PyMC model written as ``build(data) -> pm.Model`` (see the module docstring).

    Parameters
    ----------
    build
        The model builder, or its import path ``"package.module:function"``.
    prediction
        The deterministic (dims ``obs``) forecasts report as ``mean``; default: the observation
        law's expected value (added as the deterministic ``expected_<observed>``).

    Examples
    --------
    >>> from bayestwin.families.glmm import poisson_glmm
    >>> Model(poisson_glmm).config()["build"]
    'bayestwin.families.glmm:poisson_glmm'
    """

    name = "model"
    table = "cohort"
    residual_params = ()  # the observation law's parameters come from the forecast program
    #: Twins of a GLMM: a few moment-matching steps of the Laplace proposal (the per-patient
    #: posterior of a count or binary outcome is skewed), NUTS settings as the progression family's.
    twin_importance = {"adapt_steps": 2}

    def __init__(self, build, *, prediction: str | None = None):
        if isinstance(build, str):
            build = resolve(build)
        if not callable(build):
            raise TypeError(f"build must be a function data -> pm.Model, not {type(build).__name__}")
        self.build, self.prediction_name = build, prediction
        self._graph: dict | None = None  # what the graph says, read on the first build

    # ----------------------------------------------------------- what the graph says
    @property
    def inputs(self) -> dict:
        """The data the model's graph reads (names and axes): the inputs a design must provide."""
        g = self._graph
        return DATA if g is None else {n: DATA[n] for n in g["data"]}

    @property
    def patient_vars(self) -> tuple[str, ...]:
        """Per-patient random variables of the graph, as its builder declares them."""
        return self._read("patient_vars")

    @property
    def patient_outputs(self) -> tuple[str, ...]:
        """Per-patient quantities reported for each twin (``Twin.summary``), as the builder declares them."""
        return self._read("patient_outputs")

    @property
    def observed(self) -> str:
        return self._read("observed")

    @property
    def prediction(self) -> str:
        return self.prediction_name or f"expected_{self.observed}"

    @property
    def law(self) -> str:
        """The observation law read from the graph (``"poisson"``, ``"bernoulli"``, ...)."""
        return self._read("law")

    @property
    def observation_params(self) -> tuple[str, ...]:
        """Per-observation parameters of the observation law beyond its mean (e.g. a dispersion)."""
        return tuple(f"{self.observed}_param_{i}" for i in range(self._read("n_params")))

    def _ensure(self, schema: Schema) -> None:
        if self._graph is None:
            self.template_design(schema, 1)

    def _read(self, what: str):
        if self._graph is None:
            raise FamilyError("a Model's graph is read when it first sees data: fit it or condition with it first")
        return self._graph[what]

    def config(self) -> dict:
        return {"family": self.name, "build": _import_path(self.build), "prediction": self.prediction_name}

    @classmethod
    def from_config(cls, cfg: Mapping) -> Model:
        """The family back from its saved configuration (the builder's import path)."""
        return cls(resolve(cfg["build"]), prediction=cfg.get("prediction"))

    # ------------------------------------------------------------------ design
    def _arrays(self, frame: pd.DataFrame, baseline: pd.DataFrame, schema: Schema) -> ModelData:
        patients = list(baseline.index)
        index = {p: i for i, p in enumerate(patients)}
        n = len(frame)
        times = frame[TIME].to_numpy(float)
        cumulative, current = frame_exposure(frame, schema)
        X = schema.covariate_matrix(baseline) if schema.covariates else np.zeros((len(patients), 0))
        arrays = {
            "X": X,
            "patient_idx": frame[PATIENT].map(index).to_numpy(np.int64),
            "time": times,
            "therapy": np.argmax(np.c_[np.full(n, 0.5), current[:, 1:]], axis=1).astype(np.int64),
            "on_therapy": current[:, 1:],
            "exposure": cumulative[:, 1:],
            "log_at_risk": np.log(frame[AT_RISK].to_numpy(float)) if AT_RISK in frame else np.zeros(n),
            "y_obs": self._outcome(frame[OUTCOME].to_numpy(float), frame),
        }
        return ModelData(arrays, _coords(patients, n, schema), schema)

    def _outcome(self, y: np.ndarray, frame: pd.DataFrame) -> np.ndarray:
        if self._graph is None or not self._graph["discrete"]:
            return y
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            from bayestwin.errors import DataError

            i = bad[0]
            raise DataError(
                f"outcome {float(y[i]):g} is not a whole number: the model's {self._graph['law']} law needs one",
                patient=frame[PATIENT].iloc[i],
                row=frame.index[i],
                column=OUTCOME,
            )
        return y.astype(np.int64)

    def design(self, frame: pd.DataFrame, baseline: pd.DataFrame, schema: Schema) -> Design:
        """The model's arrays from a Cohort's frame and baseline (those ``build`` declares)."""
        self._ensure(schema)
        data = self._arrays(frame, baseline, schema)
        return Design(patients=list(baseline.index), data={n: data[n] for n in self._graph["data"]})

    def template_design(self, schema: Schema, n_obs: int) -> Design:
        """A one-patient design with ``n_obs`` zero rows (the shapes twins are compiled for)."""
        k, p = len(schema.therapies) - 1, len(schema.design_columns) if schema.covariates else 0
        arrays = {
            "X": np.zeros((1, p)),
            "patient_idx": np.zeros(n_obs, np.int64),
            "time": np.zeros(n_obs),
            "therapy": np.zeros(n_obs, np.int64),
            "on_therapy": np.zeros((n_obs, k)),
            "exposure": np.zeros((n_obs, k)),
            "log_at_risk": np.zeros(n_obs),
            "y_obs": np.zeros(n_obs),
        }
        if self._graph is None:
            self._learn(ModelData(arrays, _coords(["twin"], n_obs, schema), schema))
        if self._graph["discrete"]:
            arrays["y_obs"] = arrays["y_obs"].astype(np.int64)
        return Design(patients=["twin"], data={n: arrays[n] for n in self._graph["data"]})

    def _learn(self, data: ModelData) -> None:
        """Read the roles from a first build (float outcome; rebuilt with integers for a discrete law)."""
        model = self._call(data)
        obs = _observed(model)
        if obs.dtype.startswith("int"):
            data = ModelData({**data, "y_obs": data["y_obs"].astype(np.int64)}, data.coords, data.schema)
            model = self._call(data)
            obs = _observed(model)
        self._graph = _roles(model, obs, self.prediction_name)

    def _call(self, data: ModelData) -> pm.Model:
        model = self.build(data)
        if not isinstance(model, pm.Model):
            raise FamilyError(f"{_import_path(self.build)} returned {type(model).__name__}, not a pm.Model")
        return model

    # ------------------------------------------------------------------- model
    def fit_model(self, design: Design, schema: Schema) -> tuple[pm.Model, tuple[str, ...]]:
        """The population fit samples the user's model as written (no forecast deterministics)."""
        arrays = {n: design.data[n] for n in design.data}
        return self._call(ModelData(arrays, _coords(design.patients, len(arrays["y_obs"]), schema), schema)), ()

    def build_model(self, design: Design, schema: Schema) -> pm.Model:
        """The user's model for ``design``, plus deterministics for the observation law's
        parameters and its expected value (what forecasts report)."""
        d = design.data
        arrays = {n: d[n] for n in d}
        model = self._call(ModelData(arrays, _coords(design.patients, len(d["y_obs"]), schema), schema))
        if self._graph is None:
            self._graph = _roles(model, _observed(model), self.prediction_name)
        obs = model[self._graph["observed"]]
        params = obs.owner.op.dist_params(obs.owner)
        # labelled like the observations where one per observation; a parameter may also be a
        # scalar shared by every observation (no dims), never broadcast: predictions have no y
        dims = model.named_vars_to_dims.get(obs.name)
        with model:
            for i, p in enumerate(params):
                pm.Deterministic(f"{obs.name}_param_{i}", p, dims=dims if p.ndim == obs.ndim else None)
            if self.prediction_name is None:
                expected = LAWS[self._graph["law"]](*params)
                pm.Deterministic(f"expected_{obs.name}", expected, dims=dims if expected.ndim == obs.ndim else None)
        return model

    # --------------------------------------------------------------- forecasts
    def forecast_inputs(self, cohort, schema: Schema, therapies=None, times=None, start=None):
        """As the progression family's: each therapy from ``start`` (default: each patient's last
        visit) on, the recorded history before it; arrays (patient, scenario, ...)."""
        from bayestwin.families.progression import Progression

        self._ensure(schema)
        therapies, times, data = Progression.forecast_inputs(self, cohort, schema, therapies, times, start)
        frame = cohort.frame
        if AT_RISK in frame:  # a forecast row covers as much time at risk as the patient's last row
            last = frame.groupby(PATIENT)[AT_RISK].last().reindex(cohort.patients).fillna(1.0).to_numpy()
        else:
            last = np.ones(len(cohort.patients))
        data["log_at_risk"] = np.broadcast_to(np.log(last)[:, None, None], data["time"].shape).copy()
        return therapies, times, self._scenario_data(data)

    def prediction_design(self, rows, times, therapy, start, schema):
        """Forecast data for one patient under ``therapy`` from ``start`` (the progression family's design)."""
        from bayestwin.families.progression import Progression

        return Progression.prediction_design(self, rows, times, therapy, start, schema)

    def scenario_arrays(self, scenarios, times, schema: Schema, start: float = 0.0, before=None):
        """Each therapy from ``start`` on for new patients (``before`` until then): arrays (scenario, ...)."""
        from bayestwin.families.progression import Progression

        self._ensure(schema)
        labels, data = Progression.scenario_arrays(self, scenarios, times, schema, start, before)
        return labels, self._scenario_data(data)

    def _scenario_data(self, data: dict) -> dict:
        data.setdefault("log_at_risk", np.zeros(data["time"].shape))  # new patients: per unit at risk
        on = data["on_therapy"]
        data["therapy"] = np.argmax(np.concatenate([np.full((*on.shape[:-1], 1), 0.5), on], -1), -1).astype(np.int64)
        return {n: v for n, v in data.items() if n in self._graph["data"]}

    def covariate_arrays(self, baseline: pd.DataFrame, schema: Schema) -> dict:
        self._ensure(schema)
        return super().covariate_arrays(baseline, schema) if "X" in self._graph["data"] else {}

    def reference_baseline(self, constant: Mapping, schema: Schema) -> pd.DataFrame:
        self._ensure(schema)
        if "X" not in constant:  # the model uses no covariates: the fitted patients, without any
            n = len(next(iter(constant.values()))) if constant else 0
            return pd.DataFrame(index=pd.RangeIndex(n))
        return super().reference_baseline(constant, schema)

    def observe(self, key, mu, params: Mapping) -> jax.Array:
        """A new outcome from the observation law, its parameters from the forecast program."""
        law = self._read("law")
        values = [params[n] for n in self.observation_params]
        shape = mu.shape
        return _draw(law, key, values, shape)

    def __repr__(self) -> str:
        return f"Model({_import_path(self.build)}" + (
            f", prediction={self.prediction_name!r})" if self.prediction_name else ")"
        )


def _coords(patients, n_obs: int, schema: Schema) -> dict:
    return {
        "patient": list(patients),
        "obs": np.arange(n_obs),
        "covariate": list(schema.design_columns) if schema.covariates else [],
        "therapy": list(schema.therapies),
        "therapy_effect": list(schema.therapies[1:]),
    }


def _observed(model: pm.Model):
    if len(model.observed_RVs) != 1:
        names = [rv.name for rv in model.observed_RVs]
        raise FamilyError(f"a Model needs exactly one observed variable, found {len(names)}: {names}")
    return model.observed_RVs[0]


def _roles(model: pm.Model, obs, prediction: str | None) -> dict:
    """The patient variables, outputs, data and observation law of a user's model, checked."""
    from bayestwin.engine.compile import standardised

    data = [v.name for v in model.data_vars]
    unknown = [n for n in data if n not in DATA]
    if unknown:
        raise FamilyError(
            f"pm.Data {unknown[0]!r} is not one of the arrays bt.Model provides: {list(DATA)} (use data[...] names)"
        )
    if not [n for n in data if DATA[n].kind == "obs" and n not in ("patient_idx", "y_obs")]:
        raise FamilyError(
            "the model declares no per-observation input besides patient_idx and y_obs: declare "
            "pm.Data('time', data['time'], dims='obs') (or a therapy input) so that forecasts have rows"
        )
    for n in ("patient_idx", "y_obs"):
        if n not in data:
            raise FamilyError(
                f"the model must declare pm.Data({n!r}, data[{n!r}]): twins feed each patient's rows there"
            )
    value = model.rvs_to_values[obs]
    if value.owner is not None and len(value.owner.inputs) == 1 and "Cast" in str(value.owner.op):
        value = value.owner.inputs[0]  # PyMC casts the data to the law's dtype
    if value is not model["y_obs"]:
        raise FamilyError(
            f"the observed variable {obs.name!r} must observe pm.Data('y_obs', data['y_obs']) directly "
            f"(of its dtype, {obs.dtype}), so that twins can condition on a patient's own outcomes"
        )
    law = obs.owner.op.name
    if law not in LAWS:
        raise FamilyError(
            f"the observation law of {obs.name!r} ({type(obs.owner.op).__name__}) is not one bt.Model forecasts; "
            f"known: {sorted(LAWS)}"
        )
    dims = model.named_vars_to_dims
    patient = tuple(rv.name for rv in model.free_RVs if (dims.get(rv.name) or (None,))[0] == "patient")
    if not patient:
        raise FamilyError("no free variable has a leading 'patient' dim: a twin needs patient-level variables")
    for name in patient:
        standardised(model, name)  # Normal or MvNormal given the population, or a clear error
    for rv in model.free_RVs:
        if rv.name not in patient and "patient" in (dims.get(rv.name) or ()):
            raise FamilyError(f"variable {rv.name!r} has a 'patient' dim that is not its first")
    if model.potentials:
        raise FamilyError("pm.Potential terms are not supported in a Model (twins would leave them out)")
    outputs = patient + tuple(d.name for d in model.deterministics if (dims.get(d.name) or (None,))[0] == "patient")
    if prediction is not None and prediction not in model.named_vars:
        raise FamilyError(f"prediction {prediction!r} is not a variable of the model")
    params = obs.owner.op.dist_params(obs.owner)
    return {
        "data": [n for n in DATA if n in data],
        "observed": obs.name,
        "law": law,
        "discrete": obs.dtype.startswith("int"),
        "n_params": len(params),
        "patient_vars": patient,
        "patient_outputs": outputs,
    }
