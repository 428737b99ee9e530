"""Family ``progression``: hierarchical longitudinal model of a continuous outcome.

For patient *i* at time *t*::

    a_i   = intercept + X_i · beta_level + u_i0              (level at t = 0)
    b_i   = slope     + X_i · beta_slope + u_i1              (rate of change, reference therapy)
    mu_it = a_i + b_i t + Σ_k therapy_slope_k · E_ik(t) [+ Σ_k therapy_level_k · on_ik(t)]
    y_it  ~ Normal(mu_it, sigma)   or   StudentT(nu, mu_it, sigma)

with ``u_i = L · z_i``, ``z_i ~ N(0, I)`` (the non-centred form twins condition on; the population
fit by default samples patients whose own data outweigh the prior as centred ``(a_i, b_i)``
instead, ``parameterisation="auto"``: the same posterior), ``L`` the Cholesky factor of an
LKJ(eta)-correlated covariance with Gamma(2) SDs (zero-avoiding). ``E_ik(t)`` is the time patient *i* has
spent on therapy *k* up to *t* (therapy switches are piecewise constant) and ``on_ik(t)`` flags
therapy *k* being given at *t*. Covariates are standardised (numeric) or one-hot (categorical).

Default priors are weakly informative and scaled from the data: ``s_y`` the outcome SD, ``T`` the
largest time. Override any of them by name with :class:`~bayestwin.families.base.Prior`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt
from pytensor.tensor.slinalg import solve_triangular

from bayestwin.data.cohort import OUTCOME, PATIENT, THERAPY, TIME, Schema
from bayestwin.families.base import Axis, Design, FamilyBase, Prior, check_prior_names, lkj_cholesky, register_family

EFFECTS = ("intercept", "slope")
#: How the population fit parameterises each patient's random effects (twins always condition on
#: the non-centred offsets ``z``; the population posterior is the same distribution either way).
PARAMETERISATIONS = ("noncentred", "centred", "auto")


def informative_patients(design: Design, ratio: float = 2.0) -> np.ndarray:
    """Patients whose own data outweigh the population prior on both their level and their slope.

    A rough first pass on the design, before any fit: each patient with 3 or more visits gets a
    least-squares line; ``s2`` is the residual variance pooled over them, ``t2_a`` and ``t2_b``
    the between-patient variances of their levels and slopes less the average sampling variance.
    A patient is centred when its data's precision on each effect is at least ``ratio`` times the
    prior's (``n_i t2_a / s2`` and ``S_tt,i t2_b / s2``, ``S_tt,i`` the spread of its visit
    times). The default 2 leaves a margin for these moment estimates: between 1 and 2 neither
    form is clearly better, and the centred one diverged (a sleepstudy fold of 12 subjects, all
    between 1 and 2: 1 to 6 divergences at 3 seeds, none non-centred). Non-centred offsets suit
    patients with little data (a funnel otherwise), centred ones patients with much (a ridge
    between the population mean and the offsets otherwise):
    Betancourt & Girolami (2015), Stan's user guide on reparameterisation.
    """
    d = design.data
    idx, t, y = d["patient_idx"], d["time"], d["y_obs"]
    n_p = len(design.patients)
    n = np.bincount(idx, minlength=n_p).astype(float)
    stt = np.zeros(n_p)
    fits, ss, dof = [], 0.0, 0.0
    for i in np.flatnonzero(n >= 1):
        m = idx == i
        stt[i] = float(np.sum((t[m] - t[m].mean()) ** 2))
        if n[i] >= 3 and stt[i] > 0:
            A = np.column_stack([np.ones(int(n[i])), t[m] - t[m].mean()])
            coef, *_ = np.linalg.lstsq(A, y[m], rcond=None)
            ss += float(np.sum((y[m] - A @ coef) ** 2))
            dof += n[i] - 2
            fits.append((i, coef[0] - coef[1] * t[m].mean(), coef[1]))
    if len(fits) < 3 or dof <= 0:
        return np.zeros(n_p, bool)  # too little to judge: keep the non-centred default
    s2 = max(ss / dof, 1e-300)
    ids = np.array([f[0] for f in fits])
    levels, slopes = np.array([f[1] for f in fits]), np.array([f[2] for f in fits])
    var_slope = s2 / stt[ids]
    var_level = s2 * (1.0 / n[ids] + (t[np.isin(idx, ids)].mean() ** 2) / stt[ids])
    t2_a = max(float(np.var(levels)) - float(np.mean(var_level)), 1e-12)
    t2_b = max(float(np.var(slopes)) - float(np.mean(var_slope)), 1e-12)
    return (n * t2_a / s2 >= ratio) & (stt * t2_b / s2 >= ratio)


def exposure(times: np.ndarray, bounds: np.ndarray, codes: np.ndarray, n_therapies: int):
    """Cumulative time on each therapy, and the therapy given, at ``times``.

    The schedule is piecewise constant: ``codes[j]`` is given on ``(bounds[j-1], bounds[j]]``
    (``bounds[-1]`` may be ``inf``; the first segment starts at 0). Times before 0 (pre-treatment
    visits, centred times) have no exposure and no therapy given.

    Returns
    -------
    cumulative : (len(times), n_therapies) array of time spent on each therapy
    current : (len(times), n_therapies) one-hot array of the therapy given at each time
    """
    times = np.asarray(times, float)
    hi = np.asarray(bounds, float)
    lo = np.concatenate([[0.0], hi[:-1]])
    onehot = np.eye(n_therapies)[np.asarray(codes, int)]
    overlap = np.clip(np.minimum(times[:, None], hi[None, :]) - lo[None, :], 0.0, None)
    segment = np.minimum(np.searchsorted(hi, times, side="left"), len(hi) - 1)
    # Time 0 is when therapy starts: a row at a negative time (a centred time, a visit before
    # randomisation) is before any therapy, with no exposure and no level effect.
    return overlap @ onehot, onehot[segment] * (times >= 0)[:, None]


def frame_exposure(frame: pd.DataFrame, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """:func:`exposure` for every row of a Cohort's frame (rows grouped by patient, each row's
    therapy given over the interval that ends at it): (cumulative, current), each (rows, therapies)."""
    K = len(schema.therapies)
    code = {t: k for k, t in enumerate(schema.therapies)}
    n = len(frame)
    cumulative, current = np.zeros((n, K)), np.zeros((n, K))
    times = frame[TIME].to_numpy(float)
    codes = frame[THERAPY].map(code).to_numpy()
    ids = frame[PATIENT].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if n else []
    for lo, hi in zip(starts, np.r_[starts[1:], n], strict=True) if n else ():
        t = times[lo:hi]
        cumulative[lo:hi], current[lo:hi] = exposure(t, np.concatenate([t[:-1], [np.inf]]), codes[lo:hi], K)
    return cumulative, current


@register_family
class Progression(FamilyBase):
    """Hierarchical linear progression model (see module docstring).

    Parameters
    ----------
    residual
        ``"normal"`` or ``"student"`` (Student-t, robust to outlying visits).
    level_effects
        Also let each therapy shift the level while it is given (not only the slope).
    priors
        Overrides by name: ``intercept``, ``slope``, ``beta_level``, ``beta_slope``,
        ``therapy_slope``, ``therapy_level``, ``re_sd`` (SDs of intercept and slope),
        ``sigma``, ``nu``; and ``re_corr_eta`` (a float, the LKJ shape).

    Examples
    --------
    >>> fam = Progression(residual="student", priors={"sigma": Prior("HalfNormal", sigma=5.0)})
    >>> fam.name
    'progression'
    """

    name = "progression"
    inputs = {
        "X": Axis("patient"),
        "patient_idx": Axis("obs"),
        "time": Axis("obs"),
        "exposure": Axis("obs"),
        "on_therapy": Axis("obs"),
        "y_obs": Axis("obs"),
    }
    #: Free variables that belong to one patient; every other free variable is population-level.
    patient_vars = ("z",)
    #: Deterministics that describe one patient, reported for each twin.
    patient_outputs = ("patient_intercept", "patient_slope")
    prediction = "mu"
    #: The importance path's proposal for twins: the Laplace approximation alone. A progression
    #: twin is linear-Gaussian given the population parameters, close to Gaussian overall
    #: (median Pareto k̂ 0.41, no NUTS fallbacks in 1,000 benchmark twins); moment-matching
    #: steps lowered k̂ to 0.25 but cost 14% of the throughput.
    twin_importance = {"adapt_steps": 0}

    def __init__(
        self,
        residual: str = "normal",
        level_effects: bool = False,
        priors: Mapping | None = None,
        parameterisation: str = "auto",
    ):
        if residual not in ("normal", "student"):
            raise ValueError(f"residual must be 'normal' or 'student', not {residual!r}")
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, not {parameterisation!r}")
        self.residual = residual
        self.parameterisation = parameterisation
        self.level_effects = level_effects
        self.priors = dict(priors or {})
        known = {
            "intercept",
            "slope",
            "beta_level",
            "beta_slope",
            "therapy_slope",
            "therapy_level",
            "re_sd",
            "sigma",
            "nu",
            "re_corr_eta",
        }
        check_prior_names(self.priors, known, self.name)

    @property
    def residual_params(self) -> tuple[str, ...]:
        """Residual-error parameters: ``sigma`` (and ``nu`` for a Student-t residual)."""
        return ("sigma", "nu") if self.residual == "student" else ("sigma",)

    def default_priors(self, schema: Schema) -> dict:
        """Weakly informative priors scaled from the data (outcome mean and SD, time scale); each can be overridden by
        name with ``priors=``."""
        sy, T, ybar = schema.outcome_sd, schema.time_scale, schema.outcome_mean
        return {
            "intercept": Prior("Normal", mu=ybar, sigma=2.5 * sy),
            "slope": Prior("Normal", mu=0.0, sigma=2.5 * sy / T),
            "beta_level": Prior("Normal", mu=0.0, sigma=sy),
            "beta_slope": Prior("Normal", mu=0.0, sigma=sy / T),
            "therapy_slope": Prior("Normal", mu=0.0, sigma=sy / T),
            "therapy_level": Prior("Normal", mu=0.0, sigma=sy),
            # zero-avoiding Gamma(2) on the random-effect SDs (Chung et al. 2013): with HalfNormal,
            # chains could stall at an SD of ~0 with a large residual SD (seen on simulated cohorts)
            "re_sd": Prior("Gamma", alpha=2.0, beta=2.0 / np.array([sy, sy / T])),
            "sigma": Prior("HalfNormal", sigma=sy),
            "nu": Prior("Gamma", alpha=2.0, beta=0.1),
            "re_corr_eta": 2.0,
        }

    # ---------------------------------------------------------------- design
    def design(self, frame: pd.DataFrame, baseline: pd.DataFrame, schema: Schema) -> Design:
        """Arrays for :meth:`build_model` from a Cohort's validated frame and baseline table."""
        patients = list(baseline.index)
        index = {p: i for i, p in enumerate(patients)}
        cumulative, current = frame_exposure(frame, schema)
        data = {
            "X": schema.covariate_matrix(baseline),
            "patient_idx": frame[PATIENT].map(index).to_numpy(np.int64),
            "time": frame[TIME].to_numpy(float),
            "exposure": cumulative[:, 1:],
            "on_therapy": current[:, 1:],
            "y_obs": frame[OUTCOME].to_numpy(float),
        }
        return Design(patients=patients, data=data)

    def prediction_design(self, rows: pd.DataFrame, times: np.ndarray, therapy: str, start: float, schema: Schema):
        """Data for ``mu`` at ``times`` when ``therapy`` is given from ``start`` on.

        Before ``start`` the patient's observed therapy history applies (the last observed
        therapy continues until ``start``).
        """
        code = {t: k for k, t in enumerate(schema.therapies)}
        K = len(schema.therapies)
        t_obs = rows[TIME].to_numpy(float)
        given = rows[THERAPY].map(code).to_numpy(int)
        keep = t_obs < start
        if (~keep).any():  # the interval that contains `start` was observed
            carry = given[keep.sum()]
        elif keep.any():  # the last observed therapy continues until `start`
            carry = given[-1]
        else:
            carry = code[therapy]
        bounds = np.concatenate([t_obs[keep], [start, np.inf]])
        codes = np.concatenate([given[keep], [carry, code[therapy]]])
        cumulative, current = exposure(times, bounds, codes, K)
        return {"time": np.asarray(times, float), "exposure": cumulative[:, 1:], "on_therapy": current[:, 1:]}

    def forecast_inputs(self, cohort, schema: Schema, therapies=None, times=None, start=None):
        """Scenario labels, forecast times and the data for ``mu``: arrays (patient, scenario, ...).

        Each scenario is a therapy given from ``start`` on (default: each patient's last observed
        time; 0 for a patient with no rows); before it, the patient's observed history applies.
        Default ``times``: from the latest visit to one time scale beyond it, 11 points.
        """
        therapies = list(therapies or schema.therapies)
        bad = [t for t in therapies if t not in schema.therapies]
        if bad:
            raise ValueError(f"therapy {bad[0]!r} not in the population's therapies {list(schema.therapies)}")
        frame, patients = cohort.frame, cohort.patients
        last = frame.groupby(PATIENT)[TIME].max().reindex(patients).fillna(0.0).to_numpy()
        if times is None:
            t0 = float(np.max(last)) if start is None else float(start)
            times = np.linspace(t0, t0 + schema.time_scale, 11)
        times = np.asarray(times, float)
        X = schema.covariate_matrix(cohort.baseline)
        per_patient = []
        for i, p in enumerate(patients):
            rows = frame[frame[PATIENT] == p]
            s = last[i] if start is None else float(start)
            scen = [self.prediction_design(rows, times, th, s, schema) for th in therapies]
            d = {k: np.stack([sc[k] for sc in scen]) for k in scen[0]}
            d["X"] = np.broadcast_to(X[i][None, None, :], (len(therapies), 1, X.shape[1]))
            per_patient.append(d)
        data = {k: np.stack([d[k] for d in per_patient]) for k in per_patient[0]}
        return therapies, times, data

    # --------------------------------------------------- virtual patients
    def scenario_arrays(self, scenarios, times, schema: Schema, start: float = 0.0, before=None):
        """Labels and prediction inputs (scenario, ...) for a new patient who is given each
        therapy from ``start`` on (the virtual patients of a trial), and ``before`` (default:
        the reference therapy) from time 0 until then (a run-in)."""
        labels = list(scenarios or schema.therapies)
        bad = [t for t in [*labels, before or schema.therapies[0]] if t not in schema.therapies]
        if bad:
            raise ValueError(f"therapy {bad[0]!r} not in the population's therapies {list(schema.therapies)}")
        history = pd.DataFrame({TIME: [0.0], THERAPY: [before or schema.therapies[0]]})
        times = np.asarray(times, float)
        scen = [
            self.prediction_design(history.iloc[:0] if start <= 0 else history, times, th, start, schema)
            for th in labels
        ]
        return labels, {k: np.stack([s[k] for s in scen]) for k in scen[0]}

    def template_design(self, schema: Schema, n_obs: int) -> Design:
        """A one-patient design with ``n_obs`` zero rows, for compiling the twin program."""
        k = len(schema.therapies) - 1
        data = {
            "X": np.zeros((1, len(schema.design_columns))),
            "patient_idx": np.zeros(n_obs, np.int64),
            "time": np.zeros(n_obs),
            "exposure": np.zeros((n_obs, k)),
            "on_therapy": np.zeros((n_obs, k)),
            "y_obs": np.zeros(n_obs),
        }
        return Design(patients=["twin"], data=data)

    # ----------------------------------------------------------------- model
    def build_model(self, design: Design, schema: Schema) -> pm.Model:
        """The PyMC model for ``design``: print it, graph it, sample it (non-centred offsets ``z``:
        the form twins condition on)."""
        return self._model(design, schema, None)

    def fit_model(self, design: Design, schema: Schema) -> tuple[pm.Model, tuple[str, ...]]:
        """The model the population fit samples, and the names of its raw per-patient variables
        (left out of the posterior, which keeps ``z`` as a deterministic). With
        ``parameterisation="centred"`` every patient's effects are centred, with ``"auto"`` those
        of :func:`informative_patients`; the population posterior is the same distribution."""
        if self.parameterisation == "noncentred":
            return self._model(design, schema, None), ()
        n = len(design.patients)
        centred = np.ones(n, bool) if self.parameterisation == "centred" else informative_patients(design)
        if not centred.any():
            return self._model(design, schema, None), ()
        return self._model(design, schema, centred), ("theta_centred", "z_noncentred")

    def fit_advice(self, design: Design, verdict) -> list[str]:
        """What to try when a fit failed the gate: the likely cause for this design, in words."""
        out = []
        share = float(informative_patients(design).mean()) if len(design.patients) else 0.0
        if self.parameterisation == "noncentred" and share >= 0.5:
            out.append(
                f"{share:.0%} of the patients have enough visits to pin their own level and slope, which "
                "leaves a ridge between the intercept and the non-centred offsets; fit "
                "bt.Progression(parameterisation='auto') (it centres those patients)"
            )
        if self.parameterisation != "noncentred" and any("divergent" in f for f in verdict.failing):
            fewer = "'noncentred'" if self.parameterisation == "auto" else "'auto' or 'noncentred'"
            out.append(f"divergences with centred patients point to a funnel: centre fewer (parameterisation={fewer})")
        return out

    def _model(self, design: Design, schema: Schema, centred: np.ndarray | None) -> pm.Model:
        pri = self.default_priors(schema) | self.priors
        d = design.data
        n_cov = d["X"].shape[1]
        n_th = len(schema.therapies) - 1
        coords = {
            "patient": design.patients,
            "obs": np.arange(len(d["y_obs"])),
            "effect": list(EFFECTS),
            "covariate": schema.design_columns,
            "therapy_effect": list(schema.therapies[1:]),
        }
        with pm.Model(coords=coords) as model:
            X = pm.Data("X", d["X"], dims=("patient", "covariate"))
            idx = pm.Data("patient_idx", d["patient_idx"], dims="obs")
            t = pm.Data("time", d["time"], dims="obs")
            E = pm.Data("exposure", d["exposure"], dims=("obs", "therapy_effect"))
            on = pm.Data("on_therapy", d["on_therapy"], dims=("obs", "therapy_effect"))
            y_obs = pm.Data("y_obs", d["y_obs"], dims="obs")

            intercept = pri["intercept"].create("intercept")
            slope = pri["slope"].create("slope")
            chol = lkj_cholesky("re_chol", "effect", eta=pri["re_corr_eta"], sd_dist=pri["re_sd"].unnamed(shape=2))
            if centred is None:  # non-centred offsets: the graph twins condition on
                z = pm.Normal("z", 0.0, 1.0, dims=("patient", "effect"))
                u = z @ chol.T
                a = intercept + u[:, 0]
                b = slope + u[:, 1]
                if n_cov:
                    a = a + X @ pri["beta_level"].create("beta_level", dims="covariate")
                    b = b + X @ pri["beta_slope"].create("beta_slope", dims="covariate")
            else:  # centred patients' (level, slope) are free, centred on their population mean
                n = len(design.patients)
                a0, b0 = intercept + pt.zeros(n), slope + pt.zeros(n)
                if n_cov:
                    a0 = a0 + X @ pri["beta_level"].create("beta_level", dims="covariate")
                    b0 = b0 + X @ pri["beta_slope"].create("beta_slope", dims="covariate")
                m = pt.stack([a0, b0], axis=1)
                c_idx, nc_idx = np.flatnonzero(centred), np.flatnonzero(~centred)
                model.add_coord("patient_centred", [design.patients[i] for i in c_idx])
                theta_c = pm.MvNormal("theta_centred", mu=m[c_idx], chol=chol, dims=("patient_centred", "effect"))
                theta = pt.set_subtensor(m[c_idx], theta_c)
                if len(nc_idx):
                    model.add_coord("patient_noncentred", [design.patients[i] for i in nc_idx])
                    z_nc = pm.Normal("z_noncentred", 0.0, 1.0, dims=("patient_noncentred", "effect"))
                    theta = pt.set_subtensor(theta[nc_idx], m[nc_idx] + z_nc @ chol.T)
                pm.Deterministic("z", solve_triangular(chol, (theta - m).T, lower=True).T, dims=("patient", "effect"))
                a, b = theta[:, 0], theta[:, 1]
            a = pm.Deterministic("patient_intercept", a, dims="patient")
            b = pm.Deterministic("patient_slope", b, dims="patient")
            mu = a[idx] + b[idx] * t
            if n_th:
                mu = mu + E @ pri["therapy_slope"].create("therapy_slope", dims="therapy_effect")
                if self.level_effects:
                    mu = mu + on @ pri["therapy_level"].create("therapy_level", dims="therapy_effect")
            mu = pm.Deterministic("mu", mu, dims="obs")
            sigma = pri["sigma"].create("sigma")
            if self.residual == "student":
                nu = pri["nu"].create("nu")
                pm.StudentT("y", nu=nu, mu=mu, sigma=sigma, observed=y_obs, dims="obs")
            else:
                pm.Normal("y", mu=mu, sigma=sigma, observed=y_obs, dims="obs")
        return model

    def observe(self, key, mu, params: Mapping) -> jax.Array:
        """A new measurement around ``mu`` (same law as ``y`` above); ``params`` broadcast with ``mu``."""
        sigma = params["sigma"]
        if self.residual == "student":
            return mu + sigma * jax.random.t(key, params["nu"], mu.shape)
        return mu + sigma * jax.random.normal(key, mu.shape)


def simulate(
    n_patients: int = 60,
    times=(0.0, 3.0, 6.0, 9.0, 12.0),
    therapies=("standard", "drug_a", "drug_b"),
    *,
    intercept: float = 50.0,
    slope: float = 1.0,
    therapy_slope=(-0.8, -1.4),
    beta_level_age: float = 3.0,
    beta_slope_female: float = -0.3,
    re_sd=(6.0, 0.5),
    re_corr: float = 0.3,
    sigma: float = 2.5,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Simulate a progression cohort with known truth (therapy per patient, age and sex covariates).

    Returns the long table (columns patient, time, outcome, therapy, age, sex) and the truth,
    including each patient's intercept and slope.

    Examples
    --------
    >>> df, truth = simulate(n_patients=4, seed=1)
    >>> sorted(df.columns)
    ['age', 'outcome', 'patient', 'sex', 'therapy', 'time']
    """
    rng = np.random.default_rng(seed)
    times = np.asarray(times, float)
    age = rng.normal(60, 10, n_patients).round()
    female = rng.random(n_patients) < 0.5
    arm = rng.integers(0, len(therapies), n_patients)
    cov = np.array([[re_sd[0] ** 2, re_corr * re_sd[0] * re_sd[1]], [re_corr * re_sd[0] * re_sd[1], re_sd[1] ** 2]])
    u = rng.multivariate_normal(np.zeros(2), cov, n_patients)
    a = intercept + beta_level_age * (age - 60) / 10 + u[:, 0]
    b = slope + beta_slope_female * female + u[:, 1]
    eff = np.concatenate([[0.0], therapy_slope])[arm]
    rows = []
    for i in range(n_patients):
        mu = a[i] + (b[i] + eff[i]) * times
        y = mu + sigma * rng.standard_normal(len(times))
        for tt, yy in zip(times, y, strict=True):
            rows.append((f"sim-{i:04d}", tt, yy, therapies[arm[i]], age[i], "F" if female[i] else "M"))
    df = pd.DataFrame(rows, columns=["patient", "time", "outcome", "therapy", "age", "sex"])
    truth = {
        "intercept": intercept,
        "slope": slope,
        "therapy_slope": dict(zip(therapies[1:], therapy_slope, strict=True)),
        "re_sd": re_sd,
        "re_corr": re_corr,
        "sigma": sigma,
        "patient_intercept": dict(zip(df.patient.unique(), a, strict=True)),
        "patient_slope": dict(zip(df.patient.unique(), b, strict=True)),
    }
    return df, truth
