"""Family ``survival``: Bayesian proportional hazards with a flexible baseline hazard.

For patient *i* at time *t* on therapy *k* (therapy may change between at-risk intervals)::

    h_i(t) = h0(t) · exp(X_i · beta + log_hr_k + sigma_f · z_i)

* baseline ``"piecewise"`` (default): h0 constant on pieces (0, c_1], (c_1, c_2], ..., (c_K-1, ∞);
  log h0 is a Gaussian random walk over the pieces (``log_hazard0`` for the first,
  ``hazard_step`` the prior of each step, Normal(0, 0.5)), which smooths pieces with few events
  (the step SD is fixed: learnt, it made funnels). Cut points: ``cuts``, or
  ``pieces`` equal pieces of the fitting data's longest follow-up.
* baseline ``"weibull"``: h0(t) = (shape / scale) (t / scale)^(shape - 1).
* ``frailty="patient"``: a log-normal shared frailty per patient (``z_i ~ N(0, 1)``,
  ``sigma_f = frailty_sd``) for recurrent events; the patient's own variable, so a twin learns
  it from the patient's history. Without frailty a twin has no variable of its own: conditioning
  reweights the population posterior by the patient's own event-free follow-up.

Each at-risk interval (start, stop] with event indicator d contributes
``d · log h(stop) − (H(stop) − H(start))``, H the cumulative hazard: right censoring (d = 0),
delayed entry (start > 0 on the first interval) and recurrent events need nothing else.
Covariates are standardised (numeric) or one-hot (categorical), so ``beta`` is the log hazard
ratio per covariate SD (or against the reference level) and ``log_hr`` the log hazard
ratio of each therapy against the reference therapy. The structural prediction ``cumhaz`` is the
cumulative hazard of each interval: a forecast's survival from t0 to t is exp(−cumhaz(t0, t)).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt

from bayestwin.data.cohort import OUTCOME, PATIENT, THERAPY, TIME, Schema
from bayestwin.data.survival import START
from bayestwin.families.base import Axis, Design, FamilyBase, Prior, check_prior_names, register_family

BASELINES = ("piecewise", "weibull")


def interval_logp(value, log_h, cumhaz):
    """log-likelihood of an at-risk interval: event · log h(stop) − cumulative hazard over it."""
    return pt.switch(value > 0, log_h, 0.0) - cumhaz


def _interval_random(log_h, cumhaz, rng=None, size=None):
    """An event in the interval if the patient were followed to its end: Bernoulli(1 − exp(−H))."""
    p = -np.expm1(-np.asarray(cumhaz))
    return (rng.random(size=size if size is not None else p.shape) < p).astype(float)


@register_family
class Survival(FamilyBase):
    """Proportional-hazards family (see module docstring).

    Parameters
    ----------
    baseline
        ``"piecewise"`` (piecewise-constant, random-walk smoothed) or ``"weibull"``.
    pieces, cuts
        Piecewise baseline: ``pieces`` equal pieces up to the longest follow-up, or the inner
        cut points ``cuts`` (same time unit as the data).
    frailty
        ``None`` or ``"patient"`` (log-normal frailty per patient, for recurrent events).
    priors
        Overrides by name: ``log_hazard0``, ``hazard_step`` (piecewise), ``log_scale``,
        ``shape`` (Weibull), ``beta``, ``log_hr`` (therapies), ``frailty_sd``.

    Examples
    --------
    >>> Survival(baseline="weibull").parameters
    ('log_scale', 'shape', 'beta', 'log_hr')
    """

    name = "survival"
    table = "survival"
    inputs = {
        "X": Axis("patient"),
        "patient_idx": Axis("obs"),
        "time": Axis("obs"),
        "start": Axis("obs"),
        "treat": Axis("obs"),
        "y_obs": Axis("obs"),
    }
    prediction = "cumhaz"
    patient_outputs = ("patient_log_hazard",)
    residual_params: tuple[str, ...] = ()
    forecast_kind = "event"
    #: A twin without frailty is the population posterior reweighted by one patient's
    #: follow-up: the Laplace proposal is near exact (no adaptation steps needed).
    twin_importance = {"adapt_steps": 0}

    def __init__(
        self,
        baseline: str = "piecewise",
        *,
        pieces: int = 8,
        cuts=None,
        frailty: str | None = None,
        priors: Mapping | None = None,
    ):
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, not {baseline!r}")
        if frailty not in (None, "patient"):
            raise ValueError(f"frailty must be None or 'patient', not {frailty!r}")
        if cuts is not None:
            cuts = [float(c) for c in cuts]
            if any(c <= 0 for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
                raise ValueError(f"cuts must be positive and increasing, got {cuts}")
        elif int(pieces) < 1:
            raise ValueError(f"pieces must be at least 1, not {pieces!r}")
        self.baseline, self.pieces, self.cuts, self.frailty = baseline, int(pieces), cuts, frailty
        self.priors = dict(priors or {})
        known = {"log_hazard0", "hazard_step", "log_scale", "shape", "beta", "log_hr", "frailty_sd"}
        check_prior_names(self.priors, known, self.name)

    @property
    def patient_vars(self) -> tuple[str, ...]:
        """Per-patient random variables: the frailty's standardised offset ``z`` when ``frailty="patient"``."""
        return ("z",) if self.frailty else ()

    @property
    def parameters(self) -> tuple[str, ...]:
        """Population parameters: the baseline hazard's, log hazard ratios per covariate and therapy, the frailty SD."""
        base = ("log_hazard0", "hazard_steps") if self.baseline == "piecewise" else ("log_scale", "shape")
        return (*base, "beta", "log_hr") + (("frailty_sd",) if self.frailty else ())

    def cut_points(self, schema: Schema) -> np.ndarray:
        """Inner cut points of the piecewise baseline (fixed by the schema: twins share them)."""
        return piecewise_cuts(self.cuts, self.pieces, schema)

    def default_priors(self, schema: Schema) -> dict:
        """Weakly informative, on the scale of the data.

        The baseline log hazard is centred on (event fraction / half the longest follow-up), a
        crude event rate, with SD 2 (a factor of ~50 either way at 95%); log hazard ratios get
        Normal(0, 1) (hazard ratios of 0.14 to 7 at 95%, per covariate SD).
        """
        rate = max(schema.outcome_mean, 0.01) / (0.5 * schema.time_scale)
        return {
            "log_hazard0": Prior("Normal", mu=float(np.log(rate)), sigma=2.0),
            "hazard_step": Prior("Normal", mu=0.0, sigma=0.5),  # log h0 from one piece to the next
            "log_scale": Prior("Normal", mu=float(np.log(1.0 / rate)), sigma=2.0),
            "shape": Prior("LogNormal", mu=0.0, sigma=0.5),
            "beta": Prior("Normal", mu=0.0, sigma=1.0),
            "log_hr": Prior("Normal", mu=0.0, sigma=1.0),
            "frailty_sd": Prior("Gamma", alpha=2.0, beta=4.0),  # mean 0.5, zero-avoiding
        }

    # ---------------------------------------------------------------- design
    def read(self, rows, *, key=None, schema: Schema | None = None, columns=None, baseline=None):
        """New patients' at-risk intervals, in the fitting table's columns (patients listed only
        in ``baseline`` have no follow-up yet)."""
        from bayestwin.data.survival import read_survival

        c = columns
        kw = {} if c is None else {"patient": c.patient, "time": c.time, "event": c.outcome, "therapy": c.therapy}
        if c is not None and c.start and c.start in rows.columns:
            kw["start"] = c.start
        covariates = schema.covariates if schema is not None else ()
        return read_survival(
            rows, covariates=covariates, key=key, schema=schema, baseline=baseline, allow_empty=True, **kw
        )

    def design(self, frame: pd.DataFrame, baseline: pd.DataFrame, schema: Schema) -> Design:
        """Arrays for :meth:`build_model` from a time-to-event Cohort's frame and baseline."""
        patients = list(baseline.index)
        index = {p: i for i, p in enumerate(patients)}
        code = {t: k for k, t in enumerate(schema.therapies)}
        treat = np.eye(len(schema.therapies))[frame[THERAPY].map(code).to_numpy(int)][:, 1:]
        data = {
            "X": schema.covariate_matrix(baseline) if schema.covariates else np.zeros((len(patients), 0)),
            "patient_idx": frame[PATIENT].map(index).to_numpy(np.int64),
            "time": frame[TIME].to_numpy(float),
            "start": frame[START].to_numpy(float) if START in frame else np.zeros(len(frame)),
            "treat": treat,
            "y_obs": frame[OUTCOME].to_numpy(float),
        }
        return Design(patients=patients, data=data)

    def template_design(self, schema: Schema, n_obs: int) -> Design:
        """A one-patient design with ``n_obs`` zero rows, for compiling the twin program."""
        data = {
            "X": np.zeros((1, len(schema.design_columns))),
            "patient_idx": np.zeros(n_obs, np.int64),
            "time": np.zeros(n_obs),
            "start": np.zeros(n_obs),
            "treat": np.zeros((n_obs, len(schema.therapies) - 1)),
            "y_obs": np.zeros(n_obs),
        }
        return Design(patients=["twin"], data=data)

    # ----------------------------------------------------------------- model
    def build_model(self, design: Design, schema: Schema) -> pm.Model:
        """The PyMC model for ``design``: print it, graph it, sample it."""
        pri = self.default_priors(schema) | self.priors
        d = design.data
        coords = {
            "patient": design.patients,
            "obs": np.arange(len(d["y_obs"])),
            "covariate": schema.design_columns,
            "therapy_effect": list(schema.therapies[1:]),
        }
        if self.baseline == "piecewise":
            cuts = self.cut_points(schema)
            coords["piece"] = np.arange(len(cuts) + 1)
        with pm.Model(coords=coords) as model:
            X = pm.Data("X", d["X"], dims=("patient", "covariate"))
            idx = pm.Data("patient_idx", d["patient_idx"], dims="obs")
            stop = pm.Data("time", d["time"], dims="obs")
            start = pm.Data("start", d["start"], dims="obs")
            treat = pm.Data("treat", d["treat"], dims=("obs", "therapy_effect"))
            y_obs = pm.Data("y_obs", d["y_obs"], dims="obs")

            if self.baseline == "piecewise":
                a = pri["log_hazard0"].create("log_hazard0")
                # A random walk with a fixed step SD (a prior on how fast the hazard may change
                # between pieces). A learnt step SD made funnels: non-centred, a GBSG2 chain stuck at
                # SD 27; centred, divergences on a 150-patient cohort with 8 pieces.
                # step k: from piece k-1's log hazard to piece k's
                pm.modelcontext(None).add_coord("hazard_step", np.arange(1, len(cuts) + 1))
                steps = pri["hazard_step"].create("hazard_steps", dims="hazard_step")
                walk = pt.concatenate([pt.zeros(1), pt.cumsum(steps)]) if len(cuts) else pt.zeros(1)
                log_h0 = pm.Deterministic("log_baseline_hazard", a + walk, dims="piece")
                lo = np.concatenate([[0.0], cuts])
                hi = np.concatenate([cuts, [np.inf]])

                def cum0(t):
                    overlap = pt.clip(pt.minimum(t[:, None], hi[None, :]) - lo[None, :], 0.0, np.inf)
                    return overlap @ pt.exp(log_h0)

                def log_haz0(t):
                    piece = (t[:, None] > cuts[None, :]).sum(axis=1) if len(cuts) else pt.zeros_like(t, dtype="int64")
                    return log_h0[piece]

            else:
                log_scale = pri["log_scale"].create("log_scale")
                shape = pri["shape"].create("shape")

                def cum0(t):
                    return pt.exp(shape * (pt.log(pt.maximum(t, 1e-12)) - log_scale))

                def log_haz0(t):
                    return pt.log(shape) - log_scale + (shape - 1.0) * (pt.log(pt.maximum(t, 1e-12)) - log_scale)

            lp_patient = pt.zeros(X.shape[0])
            if d["X"].shape[1]:
                lp_patient = X @ pri["beta"].create("beta", dims="covariate")
            if self.frailty:
                f_sd = pri["frailty_sd"].create("frailty_sd")
                z = pm.Normal("z", 0.0, 1.0, dims="patient")
                lp_patient = lp_patient + f_sd * z
            lp_patient = pm.Deterministic("patient_log_hazard", lp_patient, dims="patient")
            lp = lp_patient[idx]
            if len(schema.therapies) > 1:
                lp = lp + treat @ pri["log_hr"].create("log_hr", dims="therapy_effect")
            cumhaz = pm.Deterministic("cumhaz", (cum0(stop) - cum0(start)) * pt.exp(lp), dims="obs")
            log_h = log_haz0(stop) + lp
            pm.CustomDist("y", log_h, cumhaz, logp=interval_logp, random=_interval_random, observed=y_obs, dims="obs")
        return model

    # --------------------------------------------------------------- forecasts
    def forecast_inputs(self, cohort, schema: Schema, therapies=None, times=None, start=None):
        """Scenario labels, forecast times and the data for ``cumhaz``: arrays (patient, scenario, ...).

        Each scenario is a therapy given from ``start`` (default: the end of each patient's
        follow-up; 0 for a patient without rows) on; ``cumhaz`` is the cumulative hazard from
        then to each forecast time (0 for times before it). Default ``times``: 41 points from 0
        (or the latest follow-up) to one time scale beyond.
        """
        therapies, times, data, _ = interval_forecast(cohort, schema, therapies, times, start)
        return therapies, times, data

    # --------------------------------------------------- virtual patients
    def scenario_arrays(self, scenarios, times, schema: Schema, start: float = 0.0, before=None):
        """Labels and prediction inputs (scenario, ...) for a new patient given each therapy from
        ``start`` on: cumulative hazard from ``start`` to each time."""
        labels = list(scenarios or schema.therapies)
        bad = [t for t in labels if t not in schema.therapies]
        if bad:
            raise ValueError(f"therapy {bad[0]!r} not in the population's therapies {list(schema.therapies)}")
        times = np.asarray(times, float)
        code = {t: k for k, t in enumerate(schema.therapies)}
        onehot = np.eye(len(schema.therapies))[[code[t] for t in labels]][:, 1:]
        S, T = len(labels), len(times)
        return labels, {
            "time": np.broadcast_to(times, (S, T)).copy(),
            "start": np.broadcast_to(np.minimum(start, times), (S, T)).copy(),
            "treat": np.broadcast_to(onehot[:, None, :], (S, T, onehot.shape[1])).copy(),
        }

    def observe(self, key, mu, params: Mapping) -> jax.Array:
        """An event by each time (Bernoulli(1 − exp(−cumhaz))), for a forecast's ``observation``."""
        return (jax.random.uniform(key, mu.shape) < -jax.numpy.expm1(-mu)).astype(float)


def piecewise_cuts(cuts, pieces: int, schema: Schema) -> np.ndarray:
    """Inner cut points of a piecewise baseline: ``cuts``, or ``pieces`` equal pieces of the
    schema's time scale (fixed by the schema, so a population's twins share them)."""
    if cuts is not None:
        return np.asarray(cuts, float)
    return np.linspace(0.0, schema.time_scale, pieces + 1)[1:-1]


def interval_forecast(cohort, schema: Schema, therapies=None, times=None, start=None):
    """Forecast inputs of an event family: (therapies, times, data, t0).

    ``data`` (arrays (patient, scenario, ...)) holds ``X``, and the at-risk interval from t0
    (``start``, default each patient's end of follow-up, 0 without rows) to each forecast time
    under each therapy: ``time``, ``start`` (t0, or the time itself before t0) and ``treat``.
    Default ``times``: 41 points from the latest t0 to one time scale beyond.
    """
    therapies = list(therapies or schema.therapies)
    bad = [t for t in therapies if t not in schema.therapies]
    if bad:
        raise ValueError(f"therapy {bad[0]!r} not in the population's therapies {list(schema.therapies)}")
    frame, patients = cohort.frame, cohort.patients
    last = frame.groupby(PATIENT)[TIME].max().reindex(patients).fillna(0.0).to_numpy()
    t0 = last if start is None else np.full(len(patients), float(start))
    if times is None:
        first = float(np.max(t0))
        times = np.linspace(first, first + schema.time_scale, 41)
    times = np.asarray(times, float)
    B, S, T = len(patients), len(therapies), len(times)
    code = {t: k for k, t in enumerate(schema.therapies)}
    onehot = np.eye(len(schema.therapies))[[code[t] for t in therapies]][:, 1:]
    X = schema.covariate_matrix(cohort.baseline) if schema.covariates else np.zeros((B, 0))
    data = {
        "X": np.broadcast_to(X[:, None, None, :], (B, S, 1, X.shape[1])),
        "time": np.broadcast_to(times, (B, S, T)).copy(),
        "start": np.broadcast_to(np.minimum(t0[:, None, None], times[None, None, :]), (B, S, T)).copy(),
        "treat": np.broadcast_to(onehot[None, :, None, :], (B, S, T, onehot.shape[1])).copy(),
    }
    return therapies, times, data, t0


def simulate(
    n_patients: int = 300,
    therapies=("control", "drug"),
    *,
    log_hr=(-0.4,),
    beta_age: float = 0.3,
    shape: float = 1.3,
    scale: float = 5.0,
    follow_up: float = 6.0,
    entry: float = 0.0,
    frailty_sd: float = 0.0,
    recurrent: bool = False,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Simulate a Weibull proportional-hazards cohort with known truth.

    Each patient gets a therapy at random, an age (beta_age per 10 years about 60), administrative
    censoring at ``follow_up`` times U(0.5, 1) (staggered entry) and, with ``entry > 0``, delayed
    entry at U(0, entry) (patients with an event before it are never seen: left truncation).
    ``recurrent``: events recur (calendar time scale, log-normal frailty ``frailty_sd``), one row
    per interval. Returns the table (patient, start, time, event, therapy, age) and the truth.
    """
    rng = np.random.default_rng(seed)
    arm = rng.integers(0, len(therapies), n_patients)
    age = rng.normal(60, 10, n_patients).round()
    eff = np.concatenate([[0.0], log_hr])[arm]
    log_frail = frailty_sd * rng.standard_normal(n_patients)
    lp = beta_age * (age - 60) / 10 + eff + log_frail
    cens = follow_up * rng.uniform(0.5, 1.0, n_patients)
    enter = rng.uniform(0.0, entry, n_patients) if entry > 0 else np.zeros(n_patients)
    rows = []
    for i in range(n_patients):
        t = enter[i]
        while True:  # next event time given none up to t: invert H0(T) - H0(t) = E / exp(lp)
            e = rng.exponential() / np.exp(lp[i])
            nxt = scale * ((t / scale) ** shape + e) ** (1.0 / shape)
            if nxt >= cens[i]:
                rows.append((f"sv-{i:04d}", t, cens[i], 0, therapies[arm[i]], age[i]))
                break
            rows.append((f"sv-{i:04d}", t, nxt, 1, therapies[arm[i]], age[i]))
            if not recurrent:
                break
            t = nxt
    df = pd.DataFrame(rows, columns=["patient", "start", "time", "event", "therapy", "age"])
    truth = {
        "therapy_effect": dict(zip(therapies[1:], log_hr, strict=True)),
        "beta_age_per_10y": beta_age,
        "shape": shape,
        "scale": scale,
        "frailty_sd": frailty_sd,
        "log_frailty": dict(zip([f"sv-{i:04d}" for i in range(n_patients)], log_frail, strict=True)),
    }
    return df, truth
