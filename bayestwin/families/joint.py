"""Family ``joint``: a longitudinal biomarker linked to the hazard of an event.

Biomarker (as the progression family, one therapy per patient)::

    m_i(t) = a_i + b_i t,   a_i = intercept + X_i · beta_level + u_i0,
                            b_i = slope + X_i · beta_slope + therapy_slope_k + u_i1
    y_it ~ Normal(m_i(t), sigma)

with correlated random effects ``u_i = L z_i`` (LKJ, Gamma(2) SDs). Event (proportional hazards
with a piecewise-constant baseline, as the survival family)::

    h_i(t) = h0(t) · exp(X_i · beta_event + log_hr_k + alpha · (m_i(t) − m̄))  link="value"
    h_i(t) = h0(t) · exp(X_i · beta_event + log_hr_k + alpha · b_i)         link="slope"

``alpha`` is the log hazard ratio per unit of the biomarker's current value (or slope); m̄, the
cohort's mean measurement, only re-references h0 (it would otherwise trade off against alpha). The
cumulative hazard is exact: on each piece of the baseline, the integral of exp(alpha b t) is
closed-form. The patient's own variables are the random effects ``z``: a twin conditioned on new
biomarker readings learns ``a_i`` and ``b_i``, and with them its event risk.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt

from bayestwin.data.cohort import OUTCOME, PATIENT, THERAPY, TIME, Schema
from bayestwin.data.joint import KIND
from bayestwin.data.survival import START
from bayestwin.families.base import Axis, Design, FamilyBase, Prior, check_prior_names, lkj_cholesky, register_family
from bayestwin.families.survival import Survival, interval_forecast, piecewise_cuts

EFFECTS = ("intercept", "slope")


def joint_logp(value, kind, mu, sigma, log_h, cumhaz):
    """A row's log-likelihood: a Normal measurement (kind 0) or an at-risk interval (kind 1)."""
    z = (value - mu) / sigma
    measurement = -0.5 * z**2 - pt.log(sigma) - 0.5 * np.log(2 * np.pi)
    interval = pt.switch(value > 0, log_h, 0.0) - cumhaz
    return pt.switch(kind > 0, interval, measurement)


def _exp_integral(k, lo, hi):
    """∫_lo^hi exp(k s) ds for lo <= hi (elementwise), stable near k = 0."""
    k_safe = pt.switch(pt.abs(k) < 1e-8, 1e-8, k)
    return pt.exp(k_safe * lo) * pt.expm1(k_safe * (hi - lo)) / k_safe


@register_family
class Joint(FamilyBase):
    """Joint longitudinal-survival family (see module docstring).

    Parameters
    ----------
    link
        ``"value"`` (the biomarker's current value) or ``"slope"`` (its rate of change).
    pieces, cuts
        Piecewise-constant baseline hazard: ``pieces`` equal pieces up to the longest follow-up,
        or the inner cut points ``cuts``.
    priors
        Overrides by name: ``intercept``, ``slope``, ``beta_level``, ``beta_slope``,
        ``therapy_slope``, ``re_sd``, ``sigma``, ``log_hazard0``, ``hazard_step``,
        ``beta_event``, ``log_hr``, ``alpha``; ``re_corr_eta`` (a float).
    """

    name = "joint"
    table = "joint"
    inputs = {
        "X": Axis("patient"),
        "patient_idx": Axis("obs"),
        "time": Axis("obs"),
        "start": Axis("obs"),
        "kind": Axis("obs"),
        "treat": Axis("obs"),
        "exposure0": Axis("obs"),
        "switch": Axis("obs"),
        "y_obs": Axis("obs"),
    }
    patient_vars = ("z",)
    prediction = "cumhaz"
    patient_outputs = ("patient_intercept", "patient_slope")
    residual_params = ("sigma",)
    forecast_kind = "event"
    twin_importance = {"adapt_steps": 2}

    def __init__(self, link: str = "value", *, pieces: int = 6, cuts=None, priors: Mapping | None = None):
        if link not in ("value", "slope"):
            raise ValueError(f"link must be 'value' or 'slope', not {link!r}")
        self.link, self.pieces = link, int(pieces)
        self.cuts = None if cuts is None else [float(c) for c in cuts]
        self.priors = dict(priors or {})
        known = {
            "intercept", "slope", "beta_level", "beta_slope", "therapy_slope", "re_sd", "sigma", "re_corr_eta",
            "log_hazard0", "hazard_step", "beta_event", "log_hr", "alpha",
        }  # fmt: skip
        check_prior_names(self.priors, known, self.name)

    def cut_points(self, schema: Schema) -> np.ndarray:
        """The cut points of the piecewise-constant baseline hazard, on the data's time scale."""
        return piecewise_cuts(self.cuts, self.pieces, schema)

    def default_priors(self, schema: Schema) -> dict:
        """Weakly informative priors scaled from the data (the biomarker's as in the progression family, the hazard's
        from the follow-up); each can be overridden by name."""
        sy, T, ybar = schema.outcome_sd, schema.time_scale, schema.outcome_mean
        return {
            "intercept": Prior("Normal", mu=ybar, sigma=2.5 * sy),
            "slope": Prior("Normal", mu=0.0, sigma=2.5 * sy / T),
            "beta_level": Prior("Normal", mu=0.0, sigma=sy),
            "beta_slope": Prior("Normal", mu=0.0, sigma=sy / T),
            "therapy_slope": Prior("Normal", mu=0.0, sigma=sy / T),
            # log-normal around the data's scales: with several readings per patient, a chain
            # whose slope SD reached ~0 early in warmup stayed there (residual SD inflated) under
            # the progression family's Gamma(2); a log-normal walls that neck off
            "re_sd": Prior("LogNormal", mu=np.log(np.array([sy, sy / T]) / 2), sigma=1.0),
            "sigma": Prior("HalfNormal", sigma=sy),
            "re_corr_eta": 2.0,
            # a crude event rate: one event per patient over the longest follow-up, SD 2.5 on the log scale
            "log_hazard0": Prior("Normal", mu=float(np.log(1.0 / T)), sigma=2.5),
            "hazard_step": Prior("Normal", mu=0.0, sigma=0.5),  # log h0 from one piece to the next
            "beta_event": Prior("Normal", mu=0.0, sigma=1.0),
            "log_hr": Prior("Normal", mu=0.0, sigma=1.0),
            # a log hazard ratio of +-2 per biomarker SD (or per SD / time scale of slope) at 1 SD
            "alpha": Prior("Normal", mu=0.0, sigma=2.0 / sy if self.link == "value" else 2.0 * T / sy),
        }

    # ---------------------------------------------------------------- design
    def read(self, rows, *, key=None, schema: Schema | None = None, columns=None, baseline=None):
        """New patients' measurements and follow-up, in the fitting table's columns."""
        from bayestwin.data.joint import read_joint

        c = columns
        kw = {}
        if c is not None:
            kw = {"patient": c.patient, "time": c.time, "marker": c.outcome, "therapy": c.therapy}
            kw["event"] = c.event or "event"
        covariates = schema.covariates if schema is not None else ()
        return read_joint(
            rows, covariates=covariates, key=key, schema=schema, baseline=baseline, allow_empty=True, **kw
        )

    def design(self, frame: pd.DataFrame, baseline: pd.DataFrame, schema: Schema) -> Design:
        """The design of a joint table: biomarker rows, at-risk intervals, covariates and therapies."""
        patients = list(baseline.index)
        index = {p: i for i, p in enumerate(patients)}
        code = {t: k for k, t in enumerate(schema.therapies)}
        treat = np.eye(len(schema.therapies))[frame[THERAPY].map(code).to_numpy(int)][:, 1:]
        data = {
            "X": schema.covariate_matrix(baseline) if schema.covariates else np.zeros((len(patients), 0)),
            "patient_idx": frame[PATIENT].map(index).to_numpy(np.int64),
            "time": frame[TIME].to_numpy(float),
            "start": frame[START].to_numpy(float),
            "kind": frame[KIND].to_numpy(float),
            "treat": treat,
            "exposure0": np.zeros_like(treat),  # one therapy per patient, from time 0
            "switch": np.zeros(len(frame)),
            "y_obs": frame[OUTCOME].to_numpy(float),
        }
        return Design(patients=patients, data=data)

    def template_design(self, schema: Schema, n_obs: int) -> Design:
        """A one-patient design of ``n_obs`` padded rows, from which twins' programs are compiled."""
        data = {
            "X": np.zeros((1, len(schema.design_columns))),
            "patient_idx": np.zeros(n_obs, np.int64),
            "time": np.zeros(n_obs),
            "start": np.zeros(n_obs),
            "kind": np.zeros(n_obs),
            "treat": np.zeros((n_obs, len(schema.therapies) - 1)),
            "exposure0": np.zeros((n_obs, len(schema.therapies) - 1)),
            "switch": np.zeros(n_obs),
            "y_obs": np.zeros(n_obs),
        }
        return Design(patients=["twin"], data=data)

    # ----------------------------------------------------------------- model
    def build_model(self, design: Design, schema: Schema) -> pm.Model:
        """The joint PyMC model: random intercept and slope of the biomarker, linked to a piecewise hazard."""
        pri = self.default_priors(schema) | self.priors
        d = design.data
        cuts = self.cut_points(schema)
        coords = {
            "patient": design.patients,
            "obs": np.arange(len(d["y_obs"])),
            "effect": list(EFFECTS),
            "covariate": schema.design_columns,
            "therapy_effect": list(schema.therapies[1:]),
            "piece": np.arange(len(cuts) + 1),
        }
        n_cov, n_th = d["X"].shape[1], len(schema.therapies) - 1
        with pm.Model(coords=coords) as model:
            X = pm.Data("X", d["X"], dims=("patient", "covariate"))
            idx = pm.Data("patient_idx", d["patient_idx"], dims="obs")
            t = pm.Data("time", d["time"], dims="obs")
            start = pm.Data("start", d["start"], dims="obs")
            kind = pm.Data("kind", d["kind"], dims="obs")
            treat = pm.Data("treat", d["treat"], dims=("obs", "therapy_effect"))
            exposure0 = pm.Data("exposure0", d["exposure0"], dims=("obs", "therapy_effect"))
            switch = pm.Data("switch", d["switch"], dims="obs")
            y_obs = pm.Data("y_obs", d["y_obs"], dims="obs")

            # biomarker
            intercept = pri["intercept"].create("intercept")
            slope = pri["slope"].create("slope")
            chol = lkj_cholesky("re_chol", "effect", eta=pri["re_corr_eta"], sd_dist=pri["re_sd"].unnamed(shape=2))
            z = pm.Normal("z", 0.0, 1.0, dims=("patient", "effect"))
            u = z @ chol.T
            a, b = intercept + u[:, 0], slope + u[:, 1]
            lp_patient = pt.zeros(X.shape[0])
            if n_cov:
                a = a + X @ pri["beta_level"].create("beta_level", dims="covariate")
                b = b + X @ pri["beta_slope"].create("beta_slope", dims="covariate")
                lp_patient = X @ pri["beta_event"].create("beta_event", dims="covariate")
            a = pm.Deterministic("patient_intercept", a, dims="patient")
            b = pm.Deterministic("patient_slope", b, dims="patient")  # on the reference therapy
            # m(s) = a + b s + exposure0 · ts + (treat · ts) (s − switch): the row's therapy given
            # since `switch`, with the exposure to each therapy before it (fitting rows: one therapy
            # from 0; a forecast: the recorded therapy until t0, the scenario's after it)
            b_row = b[idx]
            lp = lp_patient[idx]
            shift = pt.zeros_like(t)  # m(s) = a + shift + b_row s on the row's interval
            if n_th:
                ts = pri["therapy_slope"].create("therapy_slope", dims="therapy_effect")
                b_row = b_row + treat @ ts
                shift = exposure0 @ ts - (treat @ ts) * switch
                lp = lp + treat @ pri["log_hr"].create("log_hr", dims="therapy_effect")
            mu = pm.Deterministic("mu", a[idx] + shift + b_row * t, dims="obs")
            sigma = pri["sigma"].create("sigma")

            # event
            # alpha on the scale of its prior: the sampler's initial points are jittered by +-1 in
            # each unconstrained coordinate, and +-1 of alpha itself is a hazard ratio of e^10
            # across a cohort's biomarker range (a chain started there stalled in our runs)
            if pri["alpha"].dist != "Normal":
                raise ValueError(f"the prior of alpha must be Normal, not {pri['alpha'].dist}")
            alpha_z = pm.Normal("alpha_z", 0.0, 1.0)
            alpha = pm.Deterministic("alpha", pri["alpha"].params["mu"] + pri["alpha"].params["sigma"] * alpha_z)
            a0 = pri["log_hazard0"].create("log_hazard0")
            walk = pt.zeros(1)
            if len(cuts):  # a random walk with a fixed step SD: an SD learnt from the few events
                # per piece of a joint cohort made a funnel (16 divergences in 6,000 draws)
                # step k: from piece k-1's log hazard to piece k's
                pm.modelcontext(None).add_coord("hazard_step", np.arange(1, len(cuts) + 1))
                steps = pri["hazard_step"].create("hazard_steps", dims="hazard_step")
                walk = pt.concatenate([walk, pt.cumsum(steps)])
            log_h0 = pm.Deterministic("log_baseline_hazard", a0 + walk, dims="piece")
            lo = np.concatenate([[0.0], cuts])
            hi = np.concatenate([cuts, [np.inf]])
            piece = (t[:, None] > cuts[None, :]).sum(axis=1) if len(cuts) else pt.zeros_like(t, dtype="int64")
            seg_lo = pt.clip(pt.maximum(start[:, None], lo[None, :]), 0.0, t[:, None])  # (obs, piece)
            seg_hi = pt.clip(pt.minimum(t[:, None], hi[None, :]), 0.0, t[:, None])
            seg_hi = pt.maximum(seg_hi, seg_lo)
            if self.link == "value":  # about the cohort's mean level: alpha and h0 nearly uncorrelated
                level = lp + alpha * (a[idx] + shift - schema.outcome_mean)
                k = (alpha * b_row)[:, None]
                cum = (pt.exp(log_h0)[None, :] * _exp_integral(k, seg_lo, seg_hi)).sum(axis=1) * pt.exp(level)
                log_h = log_h0[piece] + level + alpha * b_row * t
            else:
                level = lp + alpha * b_row
                cum = ((seg_hi - seg_lo) * pt.exp(log_h0)[None, :]).sum(axis=1) * pt.exp(level)
                log_h = log_h0[piece] + level
            cumhaz = pm.Deterministic("cumhaz", cum, dims="obs")
            pm.CustomDist("y", kind, mu, sigma, log_h, cumhaz, logp=joint_logp, observed=y_obs, dims="obs")
        return model

    # --------------------------------------------------------------- forecasts
    def forecast_inputs(self, cohort, schema: Schema, therapies=None, times=None, start=None):
        """As the survival family's: the cumulative hazard from ``start`` (default: the end of
        each patient's follow-up or last measurement) to each time, per therapy. The patient's
        recorded therapy applies until ``start`` and each scenario's after it (the biomarker's
        slope changes there; the exposure so far is kept)."""
        therapies, times, data, t0 = interval_forecast(cohort, schema, therapies, times, start)
        B, S, T = data["time"].shape
        # the recorded therapy (the reference for a patient without rows) was given until t0
        code = {t: k for k, t in enumerate(schema.therapies)}
        given = cohort.frame.groupby(PATIENT)[THERAPY].first().reindex(cohort.patients).fillna(schema.therapies[0])
        recorded = np.eye(len(schema.therapies))[given.map(code).to_numpy(int)][:, 1:] * t0[:, None]
        data["kind"] = np.ones((B, S, T))
        data["exposure0"] = np.broadcast_to(recorded[:, None, None, :], (B, S, T, recorded.shape[1])).copy()
        data["switch"] = np.broadcast_to(t0[:, None, None], (B, S, T)).copy()
        return therapies, times, data

    def scenario_arrays(self, scenarios, times, schema: Schema, start: float = 0.0, before=None):
        """Labels and prediction inputs (scenario, ...) for a new patient given each therapy from
        time 0 (``before`` is unused): the cumulative hazard from ``start`` to each time, the
        biomarker on that therapy throughout (virtual cohorts, trial simulation)."""
        labels, data = Survival.scenario_arrays(self, scenarios, times, schema, start=start)
        S, T = data["time"].shape
        data["kind"] = np.ones((S, T))
        data["exposure0"] = np.zeros_like(data["treat"])
        data["switch"] = np.zeros((S, T))
        return labels, data

    def observe(self, key, mu, params: Mapping) -> jax.Array:
        """Simulated event indicators: an event with probability 1 - exp(-cumulative hazard)."""
        return (jax.random.uniform(key, mu.shape) < -jax.numpy.expm1(-mu)).astype(float)


def simulate(
    n_patients: int = 200,
    therapies=("control", "drug"),
    *,
    intercept: float = 10.0,
    slope: float = 1.0,
    therapy_slope=(-0.8,),
    re_sd=(2.0, 0.4),
    sigma: float = 1.0,
    alpha: float = 0.3,
    log_hr=(0.0,),
    hazard0: float = 0.002,
    visits=(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0),
    follow_up: float = 8.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Simulate a joint cohort with known truth: biomarker m(t) = a + b t measured at ``visits``
    until the event or censoring, hazard hazard0 · exp(log_hr_k + alpha · m(t)) (constant
    baseline, so event times come from the exact inverse cumulative hazard).

    Returns the long table (patient, time, marker, event, therapy, age) and the truth.
    """
    rng = np.random.default_rng(seed)
    arm = rng.integers(0, len(therapies), n_patients)
    age = rng.normal(60, 10, n_patients).round()
    u = rng.standard_normal((n_patients, 2)) * np.asarray(re_sd)
    a = intercept + u[:, 0]
    b_ref = slope + u[:, 1]  # on the reference therapy (the model's patient_slope)
    b = b_ref + np.concatenate([[0.0], therapy_slope])[arm]
    lp = np.concatenate([[0.0], log_hr])[arm]
    cens = follow_up * rng.uniform(0.6, 1.0, n_patients)
    rows = []
    for i in range(n_patients):
        c0 = hazard0 * np.exp(lp[i] + alpha * a[i])
        k = alpha * b[i]
        e = rng.exponential()
        arg = 1.0 + e * k / c0  # H(t) = c0 (exp(k t) - 1) / k = e
        t_event = np.log(arg) / k if abs(k) > 1e-12 and arg > 0 else (e / c0 if abs(k) <= 1e-12 else np.inf)
        end, d = (t_event, 1) if t_event < cens[i] else (cens[i], 0)
        pid = f"jt-{i:04d}"
        for v in visits:
            if v <= end:
                y = a[i] + b[i] * v + sigma * rng.standard_normal()
                rows.append((pid, v, y, np.nan, therapies[arm[i]], age[i]))
        rows.append((pid, end, np.nan, d, therapies[arm[i]], age[i]))
    df = pd.DataFrame(rows, columns=["patient", "time", "marker", "event", "therapy", "age"])
    ids = [f"jt-{i:04d}" for i in range(n_patients)]
    truth = {
        "intercept": intercept,
        "slope": slope,
        "therapy_slope": dict(zip(therapies[1:], therapy_slope, strict=True)),
        "alpha": alpha,
        "log_hr": dict(zip(therapies[1:], log_hr, strict=True)),
        "sigma": sigma,
        "patient_intercept": dict(zip(ids, a, strict=True)),
        "patient_slope": dict(zip(ids, b_ref, strict=True)),
    }
    return df, truth
