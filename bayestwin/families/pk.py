"""Family ``pk``: population pharmacokinetics of NONMEM-style event data.

For subject *i* with doses (t_d, amt_d, duration_d) and an observation at time *t*::

    log θ_ik = log θ_k + [allometry] + X_i · beta_k + η_ik        θ = (CL, V, ka) or (CL, V1, Q, V2, ka)
    C_i(t)   = Σ_d  c(t - t_d; amt_d, duration_d, θ_i)            closed forms, :mod:`pk_analytic`
    y_it     ~ Normal(C_i(t), sqrt(σ_add² + (σ_prop · C_i(t))²))  (additive, proportional or combined)

with ``η_i = L · z_i``, ``z_i ~ N(0, I)`` (non-centred) and ``L`` the Cholesky factor of an
LKJ-correlated covariance with Gamma(2) SDs (between-subject variability on the log scale);
``bsv=`` names the parameters that have it (the others: none) and ``correlated=`` is one block
(True), diagonal (False) or a list of blocks. The covariate model is either ``covariates=``,
effects per parameter (:mod:`pk_covariates`: power, linear, exponential, categorical), or the
older ``weight=`` shortcut: (WT/70)^0.75 on clearances and (WT/70)^1 on volumes, fixed, with the
other covariates on CL only (standardised numeric, one-hot categorical, e.g. a CYP2D6
phenotype). Steady-state doses (SS 1 and 2) and resets (EVID 3 and 4) are modelled: see
:mod:`pk_analytic` and :func:`~bayestwin.data.nonmem.episodes`. Doses with RATE > 0 are zero-order infusions into
the central compartment; the others are absorbed first-order (``route="oral"``) or are IV boluses
(``route="iv"``). For one compartment with oral doses, ``log_ka`` is the log of the *excess*
ka - k (so ka > k: no flip-flop; the likelihood alone cannot tell ka from k).
``parameterisation="rate"`` uses (ke, ka, CL) as nlme's ``SSfol`` does, with V = CL/ke, and
``correlated=False`` makes the between-subject variability diagonal (nlme's ``pdDiag``).
``lag=True`` adds an absorption lag time ``tlag`` (log-normal, with between-subject variability)
to oral doses: nothing is absorbed before ``t_dose + tlag``. ``bioavailability=True`` adds ``f``,
the fraction of an oral (depot) dose that reaches the circulation (log-normal, with between-subject
variability unless ``bsv=`` leaves it out): every depot dose enters as ``f * AMT``, doses into the
central compartment (CMT 2, infusions) as ``AMT``. With IV and oral doses in the data (a crossover
study) the data determine F; with oral doses only they determine CL/F and V/F, and F rests on its
prior (give an informative ``priors={"log_f": ...}``, e.g. a published F, to read CL and V as absolute).
Observations below the LLOQ (BLQ = 1) enter by the M3 method: the likelihood
is P(y < LLOQ), not a dropped row (:func:`m3_logp`). ``centred=`` (parameter names, or True)
makes the population fit sample those parameters' subject values centred on their covariate
model, for parameters each subject's data determine well (:meth:`Pk.fit_model`); the posterior,
its ``z`` and the twins are the same.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt

from bayestwin.data.cohort import Schema
from bayestwin.data.nonmem import episodes, expand_doses
from bayestwin.families import pk_analytic as pka
from bayestwin.families import pk_covariates as pkc
from bayestwin.families.base import Axis, Design, FamilyBase, Prior, check_prior_names, lkj_cholesky, register_family
from bayestwin.families.pk_covariates import coefficient_name, effect_from_dict, effect_to_dict

EFFECT_TYPES = tuple(pkc.EFFECTS.values())
#: Fixed allometric exponents of ``weight=`` (clearances 0.75, volumes 1; ke = CL/V: -0.25).
ALLOMETRY = {"cl": 0.75, "q": 0.75, "v": 1.0, "v1": 1.0, "v2": 1.0, "ke": -0.25, "ka": 0.0, "tlag": 0.0, "f": 0.0}


def record_check(frame: pd.DataFrame):
    """``fail(problem, mask, column)``: a DataError naming the ID, row and column of the first
    record of ``frame`` where ``mask`` holds (nothing if none does)."""
    from bayestwin.errors import DataError

    def fail(problem, mask, column):
        mask = np.asarray(mask, bool)
        if mask.any():
            i = int(np.argmax(mask))
            raise DataError(problem, patient=frame["ID"].iloc[i], row=frame.index[i], column=column)

    return fail


def refuse_time_varying(frame: pd.DataFrame, covariates, fail) -> None:
    """Refuse a covariate whose value changes within an ID through ``fail`` (the ODE family
    models those declared ``time_varying``)."""
    for c in covariates:
        first = frame.groupby("ID", sort=False)[c].transform("first")
        fail(
            f"covariate {c} changes within the ID: time-varying covariates are modelled by the ODE family "
            f"when declared (time_varying=['{c}'])",
            frame[c].ne(first).to_numpy(bool),
            c,
        )


def refuse_long_steady_infusions(frame: pd.DataFrame, fail) -> None:
    """Refuse a steady-state infusion longer than its interval II through ``fail`` (the
    infusions of its train would overlap)."""
    if "SS" in frame:
        rate, amt = frame["RATE"].to_numpy(float), frame["AMT"].to_numpy(float)
        duration = np.where(rate > 0, amt / np.where(rate > 0, rate, 1.0), 0.0)
        fail(
            "a steady-state infusion (SS > 0) that lasts longer than its interval II is not modelled "
            "(its infusions would overlap)",
            (frame["SS"].to_numpy() > 0) & (duration > frame["II"].to_numpy(float)),
            "RATE",
        )


def refuse_occasions(frame: pd.DataFrame, fail, why: str) -> None:
    """Refuse an OCC that changes within an ID (``why``: what would model it) through ``fail``."""
    if "OCC" in frame:
        first = frame.groupby("ID", sort=False)["OCC"].transform("first")
        fail(f"OCC changes within the ID, but {why}", frame["OCC"].ne(first).to_numpy(bool), "OCC")


def _created(pri: Mapping, name: str, **kwargs):
    """The model's variable ``name``, created from its prior the first time it is asked for (the
    covariate terms of baseline and of each later period share their coefficients)."""
    model = pm.modelcontext(None)
    return model[name] if name in model.named_vars else pri[name].create(name, **kwargs)


def _listed(value, what: str) -> list:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be a list of parameter names, not {value!r}")
    return list(value)


ERRORS = ("additive", "proportional", "combined")
#: Dose-slot inputs of the model and the :meth:`Pk.routed_doses` columns they are read from.
DOSE_COLUMNS = {
    "t_dose": "TIME",
    "amt": "AMT",
    "duration": "DURATION",
    "infusion": "INPUT",
    "ss_ii": "SS_II",
    "dose_episode": "EPISODE",
}


def m3_logp(value, mu, sigma, blq):
    """Normal log density of a level, or log P(y < LLOQ) for a BLQ row (``value`` = LLOQ): M3.

    Written with a safe argument in each branch: ``pm.Censored`` evaluates the censored branch
    at every row, and where a level lies far above its prediction, log(1 - Φ(z)) is -inf there;
    its gradient is NaN, and ``where`` passes NaN on even for the rows that do not use it (seen
    as NaN gradients of PK twins, i.e. NUTS divergences and failed mode searches).
    """
    z = (value - mu) / sigma
    log_pdf = -0.5 * z**2 - pt.log(sigma) - 0.5 * np.log(2 * np.pi)
    log_cdf = log_ndtr(pt.where(blq > 0, z, 0.0))
    return pt.where(blq > 0, log_cdf, log_pdf)


def log_ndtr(z):
    """log Φ(z) with finite gradients everywhere (pytensor graph).

    ``pm.logcdf(Normal)`` compiled to JAX has a NaN gradient below z ≈ -10 (a level far above
    the LLOQ's prediction makes a BLQ row exactly that). Here: ``log(erfc(-z/√2)/2)`` down to
    z = -8, and below it the asymptotic series of Mills' ratio, -z²/2 - log(-z√(2π)) +
    log(1 - 1/z² + 3/z⁴ - 15/z⁶ + 105/z⁸) (relative error < 1e-6 there), each branch evaluated
    at a safe argument.
    """
    cut = -8.0
    upper = pt.maximum(z, cut)
    lower = pt.minimum(z, cut)
    direct = pt.log(pt.erfc(-upper / np.sqrt(2.0)) / 2.0)
    r = 1.0 / lower**2
    series = -0.5 * lower**2 - pt.log(-lower * np.sqrt(2 * np.pi)) + pt.log1p(r * (-1 + r * (3 + r * (-15 + 105 * r))))
    return pt.where(z >= cut, direct, series)


def _m3_random(mu, sigma, blq, rng=None, size=None):
    """A new level (uncensored: whether it is below the LLOQ is for the caller to decide)."""
    return rng.normal(mu, sigma, size=size)


@register_family
class Pk(FamilyBase):
    """Population PK family (1 or 2 compartments; oral or IV; bolus and infusion doses).

    Examples
    --------
    >>> fam = Pk(compartments=1, error="additive")
    >>> fam.parameters
    ('cl', 'v', 'ka')
    >>> Pk(compartments=2, lag=True).parameters
    ('cl', 'v1', 'q', 'v2', 'ka', 'tlag')
    >>> Pk(bioavailability=True).parameters
    ('cl', 'v', 'ka', 'f')
    """

    name = "pk"
    table = "events"
    inputs = {
        "X": Axis("patient"),
        "log_wt": Axis("patient"),
        "cov": Axis("patient"),  # covariate models (covariates=): raw numeric values, one-hot levels
        "patient_idx": Axis("obs"),
        "time": Axis("obs"),
        "y_obs": Axis("obs"),
        "blq": Axis("obs"),
        "episode": Axis("obs"),  # between resets (EVID 3/4, SS=1): doses act within their own episode
        # one row per subject, a padded dose axis; an empty slot (amt 0) still needs a positive duration
        "t_dose": Axis("patient", "dose"),
        "amt": Axis("patient", "dose"),
        "duration": Axis("patient", "dose", fill=1.0),
        "infusion": Axis("patient", "dose"),
        "ss_ii": Axis("patient", "dose"),  # a steady-state dose's interval (0: a single dose)
        "dose_episode": Axis("patient", "dose"),
    }
    patient_vars = ("z",)  # the subject's own variables, sampled per twin
    prediction = "conc"
    #: NUTS settings for twins: a subject with one or two levels has a curved posterior in
    #: (CL, V, ka), and one whose levels disagree with the population (e.g. a slow absorber when
    #: ka varies little) a funnel-like one; smaller steps and a longer warmup keep divergences rare
    #: (Theoph subject 12 from its levels up to 3 h, 6 seeds x 8,000 draws: a divergence in 1 run
    #: at 0.95, in none at 0.99).
    twin_nuts = {"tune": 1000, "target_accept": 0.99}
    #: Two moment-matching steps of the importance proposal (the posterior of a subject with one
    #: or two levels is curved): NUTS fallbacks 23% -> 4% of simulated twins with absorption-phase
    #: levels only.
    twin_importance = {"adapt_steps": 2}

    def __init__(
        self,
        compartments: int = 1,
        route: str = "oral",
        error: str = "combined",
        weight: str | None = None,
        priors: Mapping | None = None,
        parameterisation: str = "clearance",
        correlated: bool | list = True,
        lag: bool = False,
        covariates: Mapping | None = None,
        bsv: list | tuple | None = None,
        bioavailability: bool = False,
        centred: bool | list | tuple = False,
    ):
        if compartments not in (1, 2):
            raise ValueError(f"compartments must be 1 or 2, not {compartments!r}")
        if route not in ("oral", "iv"):
            raise ValueError(f"route must be 'oral' or 'iv', not {route!r}")
        if error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS}, not {error!r}")
        if parameterisation not in ("clearance", "rate"):
            raise ValueError(f"parameterisation must be 'clearance' or 'rate', not {parameterisation!r}")
        if parameterisation == "rate" and compartments != 1:
            raise ValueError("parameterisation='rate' (ke, ka, cl) is for one compartment")
        if lag and route != "oral":
            raise ValueError("lag=True is an absorption lag time: it needs route='oral'")
        if not isinstance(bioavailability, bool):
            raise TypeError(f"bioavailability is True or False, not {bioavailability!r}")
        if bioavailability and route != "oral":
            raise ValueError("bioavailability=True is the fraction of an oral dose absorbed: it needs route='oral'")
        self.bioavailability = bioavailability
        if weight is not None and not isinstance(weight, str):
            raise TypeError(f"weight is the name of the body-weight covariate, not {weight!r}")
        weight = weight.upper() if weight else None  # NONMEM column names are read upper-case
        self.compartments, self.route, self.error, self.weight = compartments, route, error, weight
        self.parameterisation, self.lag = parameterisation, lag
        if covariates is not None and weight is not None:
            raise ValueError(
                "give weight= (the fixed allometric shortcut) or covariates= (a covariate model per "
                "parameter, e.g. {'CL': [bt.Power('WT', ref=70, exponent=0.75)]}), not both"
            )
        for name, option in (("tlag", "lag=True"), ("f", "bioavailability=True")):  # say which option adds it
            if f"log_{name}" in (priors or {}) and name not in self.parameters:
                raise ValueError(f"a prior for log_{name} needs {option} (this model has no {name})")
        self._structure(priors, covariates, bsv, correlated, centred, extra_priors={"beta_cl"})

    def _structure(self, priors, covariates, bsv, correlated, centred, extra_priors=frozenset()) -> None:
        """Set and check the options every PK-like family shares: priors (names checked),
        covariate model, BSV, its blocks and which parameters the fit centres."""
        self.priors = dict(priors or {})
        self.effects = self._effects(covariates)
        self.covariates = (
            None
            if covariates is None
            else {p.upper(): [effect_to_dict(e) for e in es] for p, es in self.effects.items()}
        )
        self.bsv = None if bsv is None else [self._parameter(p, "bsv").upper() for p in _listed(bsv, "bsv")]
        if self.bsv is not None and len(set(self.bsv)) < len(self.bsv):
            raise ValueError(f"a parameter is listed twice in bsv={bsv!r}")
        self.correlated = self._blocks(correlated)
        self.centred = self._centring(centred)
        known = {f"log_{p}" for p in self.parameters} | {"bsv_sd", "bsv_corr_eta", *self.residual_params}
        known |= set(extra_priors) | {coefficient_name(p, e) for p, es in self.effects.items() for e in es}
        check_prior_names(self.priors, known, self.name)

    # ------------------------------------------------------ structure options
    def _parameter(self, name, what: str) -> str:
        """The model's name (lower case) of a parameter named in ``what`` (any case)."""
        if not isinstance(name, str) or name.lower() not in self.parameters:
            known = ", ".join(p.upper() for p in self.parameters)
            raise ValueError(f"{what}: {name!r} is not a parameter of this model ({known})")
        return name.lower()

    def _effects(self, covariates) -> dict:
        """{parameter: (effect, ...)} from ``covariates=`` (effects, or their card mappings)."""
        if covariates is None:
            return {}
        if not isinstance(covariates, Mapping):
            raise TypeError(f"covariates maps parameter names to lists of effects, not {covariates!r}")
        out = {}
        for name, effects in covariates.items():
            p = self._parameter(name, "covariates")
            if p in out:
                raise ValueError(f"covariates: parameter {name!r} is given twice")
            effects = [effects] if isinstance(effects, (Mapping, *EFFECT_TYPES)) else list(effects)
            parsed = tuple(effect_from_dict(e) for e in effects)
            columns = [e.column.upper() for e in parsed]
            dup = [c for c in columns if columns.count(c) > 1]
            if dup:
                raise ValueError(f"covariates: {dup[0]} acts twice on {name!r}")
            out[p] = tuple(type(e)(**{**e.__dict__, "column": e.column.upper()}) for e in parsed)
        return out

    def _blocks(self, correlated):
        """``correlated`` as given (True, False, or groups of parameter names), checked."""
        if isinstance(correlated, bool):
            return correlated
        if not isinstance(correlated, (list, tuple)):
            raise TypeError(
                f"correlated is True, False or a list of parameter groups, e.g. [['CL', 'V']]; not {correlated!r}"
            )
        groups = list(correlated)
        if not groups or not all(isinstance(g, (list, tuple)) for g in groups):
            raise TypeError(
                f"correlated is True, False or a list of parameter groups, e.g. [['CL', 'V']]; not {correlated!r}"
            )
        out, seen = [], set()
        for g in groups:
            names = [self._parameter(x, "correlated").upper() for x in g]
            if len(names) < 2:
                raise ValueError(f"correlated: a block needs two parameters or more, not {list(g)!r}")
            if seen & set(names) or len(set(names)) < len(names):
                raise ValueError(f"correlated: a parameter is in two blocks ({list(g)!r})")
            missing = [n for n in names if n.lower() not in self.bsv_parameters]
            if missing:
                raise ValueError(f"correlated: {missing[0]} has no between-subject variability (bsv=)")
            seen |= set(names)
            out.append(names)
        return out

    def _centring(self, centred):
        """``centred`` as given (True, False, or parameter names), checked: each needs BSV, and
        a correlated block is centred whole or not at all."""
        if isinstance(centred, bool):
            return centred
        if not isinstance(centred, (list, tuple)) or not all(isinstance(x, str) for x in centred):
            raise TypeError(f"centred is True, False or a list of parameter names, e.g. ['CL', 'V']; not {centred!r}")
        names = [self._parameter(x, "centred").upper() for x in centred]
        if len(set(names)) < len(names):
            raise ValueError(f"a parameter is listed twice in centred={list(centred)!r}")
        missing = [n for n in names if n.lower() not in self.bsv_parameters]
        if missing:
            raise ValueError(f"centred: {missing[0]} has no between-subject variability (bsv=), nothing to centre")
        blocks = (
            [[p.upper() for p in self.bsv_parameters]]
            if self.correlated is True and len(self.bsv_parameters) > 1
            else (self.correlated or [])
        )
        for block in blocks:
            inside = [n for n in block if n in names]
            if inside and len(inside) < len(block):
                raise ValueError(
                    f"centred names {inside} but not {[n for n in block if n not in names]} of one correlated "
                    "block; a block is centred whole or not at all"
                )
        return names

    @property
    def centred_parameters(self) -> tuple[str, ...]:
        """Parameters whose subject values the population fit samples centred (``centred=``),
        in model order; twins and the saved posterior use the non-centred ``z`` either way."""
        if self.centred is True:
            return self.bsv_parameters
        return tuple(p for p in self.bsv_parameters if p.upper() in (self.centred or ()))

    @property
    def bsv_parameters(self) -> tuple[str, ...]:
        """Parameters with between-subject variability (``bsv=``; default all), in model order."""
        if self.bsv is None:
            return self.parameters
        return tuple(p for p in self.parameters if p.upper() in self.bsv)

    def covariate_columns(self, schema: Schema) -> list[str]:
        """Columns of the ``cov`` input (covariate models): each numeric covariate an effect uses
        (raw values), and each non-reference level of a categorical one (``COL[level]``)."""
        cols = []
        for c in self.effect_columns:
            if c in schema.categorical:
                cols += [f"{c}[{lvl}]" for lvl in schema.categorical[c][1:]]
            else:
                cols.append(c)
        return cols

    @property
    def effect_columns(self) -> list[str]:
        """Covariates the covariate model uses, each once, in order of first use."""
        return list(dict.fromkeys(e.column for es in self.effects.values() for e in es))

    def _check_covariates(self, baseline: pd.DataFrame, schema: Schema) -> None:
        """Every covariate read is in the covariate model and every one it names is read, of the
        right kind; a power effect's covariate is positive (else a DataError naming ID and column)."""
        from bayestwin.errors import DataError

        read = list(schema.covariates)
        for c in self.effect_columns:
            if c not in read:
                raise DataError(
                    f"the covariate model uses {c}, which is not a covariate of these events "
                    f"(covariates: {read}); read it with covariates=[...]",
                    column=c,
                )
        unused = [c for c in read if c not in self.effect_columns]
        if unused:
            raise DataError(
                f"covariate {unused[0]} is read but no parameter's covariate model uses it: add an effect "
                "for it to covariates=, or leave it out when reading (a covariate is modelled or refused)",
                column=unused[0],
            )
        for p, effects in self.effects.items():
            for e in effects:
                cat = e.column in schema.categorical
                if (e.kind == "categorical") != cat:
                    how = "categorical (read it with categorical=[...])" if e.kind == "categorical" else "numeric"
                    raise DataError(f"the {e.kind} effect on {p.upper()} needs {e.column} {how}", column=e.column)
                if e.kind == "power":
                    x = baseline[e.column].to_numpy(float)
                    if (x <= 0).any():
                        i = int(np.argmax(x <= 0))
                        raise DataError(
                            f"a power effect needs {e.column} > 0 (it is (x / ref) ** exponent)",
                            patient=baseline.index[i],
                            column=e.column,
                        )

    def _cov_matrix(self, baseline: pd.DataFrame, schema: Schema) -> np.ndarray:
        """The ``cov`` input (patients x :meth:`covariate_columns`) from one row per patient."""
        cols = []
        for c in self.effect_columns:
            if c in schema.categorical:
                values = baseline[c].astype(str).to_numpy()
                cols += [(values == lvl).astype(float) for lvl in schema.categorical[c][1:]]
            else:
                cols.append(baseline[c].to_numpy(float))
        return np.column_stack(cols) if cols else np.zeros((len(baseline), 0))

    @property
    def parameters(self) -> tuple[str, ...]:
        """Log-normal parameters with between-subject variability, in model order."""
        absorption = ("tlag",) * self.lag + ("f",) * self.bioavailability  # oral only (checked in __init__)
        if self.parameterisation == "rate":  # as nlme's SSfol: lKe, lKa, lCl
            return ("ke", "ka", "cl", *absorption) if self.route == "oral" else ("ke", "cl")
        base = ("cl", "v") if self.compartments == 1 else ("cl", "v1", "q", "v2")
        return base + (("ka", *absorption) if self.route == "oral" else ())

    @property
    def patient_outputs(self) -> tuple[str, ...]:
        """Per-subject PK parameters reported for each twin (``patient_cl``, ``patient_v``, ...)."""
        return tuple(f"patient_{p}" for p in self.parameters)

    @property
    def residual_params(self) -> tuple[str, ...]:
        """Residual-error parameters of the error model (additive, proportional or both)."""
        return {"additive": ("sigma_add",), "proportional": ("sigma_prop",)}.get(
            self.error, ("sigma_add", "sigma_prop")
        )

    def default_priors(self, schema: Schema, design: Design) -> dict:
        """Weakly informative, on the log scale, centred from the data's own scales.

        V around (median dose / largest level), rates around a few per observation span, a lag
        time around 1/48 of the span (half an hour for a day's sampling). These are the scales
        of the data's median subject; a typical value is the *reference* subject's, so each is
        moved by what the covariate model (or ``weight=``) gives the median subject at the
        coefficients' prior means: e.g. neonates of 1.5 kg and ``Power("WT", ref=70,
        exponent=1)`` on V put the prior of log V log(70 / 1.5) = 3.8 above the data's scale.
        """
        d = design.data
        amt = d["amt"][d["amt"] > 0]
        dv = d["y_obs"][d["blq"] == 0]
        v0 = float(np.median(amt) / dv.max()) if len(amt) and len(dv) and dv.max() > 0 else 1.0
        k0 = 3.0 / schema.time_scale  # elimination over a third of the sampling span
        centres = {"cl": np.log(v0 * k0), "v": np.log(v0), "v1": np.log(v0), "q": np.log(v0 * k0), "ke": np.log(k0)}
        centres |= {"v2": np.log(2 * v0), "ka": np.log(10.0 / schema.time_scale)}
        if self.lag:
            centres["tlag"] = np.log(schema.time_scale / 48)
        centres["f"] = np.log(0.7)  # with a prior SD of 0.5 below: F in (0.26, 1.9) with 95%
        # the data's scales are those of its typical subject: the typical value is the reference
        # subject's, so take off what the covariate model gives the typical subject (at the prior)
        shift = self._typical_shift(design, schema)
        pri = {
            f"log_{p}": Prior("Normal", mu=float(centres[p] - shift[p]), sigma={"tlag": 1.5, "f": 0.5}.get(p, 2.0))
            for p in self.parameters
        }
        for p, effects in self.effects.items():
            for e in effects:
                if not (e.kind == "power" and e.exponent is not None):
                    sd = schema.numeric.get(e.column, (0.0, 1.0))[1]
                    pri[coefficient_name(p, e)] = pkc.prior(p, e, sd)
        pri |= {
            "beta_cl": Prior("Normal", mu=0.0, sigma=1.0),
            "bsv_sd": Prior("Gamma", alpha=2.0, beta=4.0),  # mean 0.5 on the log scale, zero-avoiding
            "bsv_corr_eta": 2.0,
            "sigma_add": Prior("HalfNormal", sigma=schema.outcome_sd),
            "sigma_prop": Prior("HalfNormal", sigma=0.5),
        }
        return pri

    def federated_priors(self, schema: Schema, scales: dict) -> dict:
        """The typical values' priors of :meth:`default_priors` centred on pooled aggregates, for a
        fit across sites where no one holds the pooled rows (:mod:`bayestwin.federated`): the
        geometric mean dose in place of the median, the largest level of any site, each
        covariate's geometric mean over subjects for the typical subject. Every site then fits
        the same model, and a pooled fit with these priors is that model too.

        ``scales``: ``{"amt": float, "dv_max": float, "covariates": {column: geometric mean}}``.
        """
        gm = scales["covariates"]
        columns = self.covariate_columns(schema)
        log_wt = np.log(gm[self.weight] / 70.0) if self.weight and gm.get(self.weight, 0) > 0 else 0.0
        pseudo = Design(
            patients=["typical"],
            data={
                "amt": np.array([[scales["amt"]]]),
                "y_obs": np.array([scales["dv_max"]]),
                "blq": np.zeros(1),
                "log_wt": np.array([log_wt]) if self.weight else np.zeros(0),
                "cov": np.array([[gm.get(c, 0.0) for c in columns]]),
            },
        )
        return {k: v for k, v in self.default_priors(schema, pseudo).items() if k.startswith("log_")}

    def _typical_shift(self, design: Design, schema: Schema) -> dict:
        """Each parameter's covariate-model term (log scale) for the data's median subject, at the
        coefficients' prior means (power effects only: the others are 0 there)."""
        shift = dict.fromkeys(self.parameters, 0.0)
        if self.weight is not None and len(design.data["log_wt"]):
            typical = float(np.median(design.data["log_wt"]))
            shift = {p: ALLOMETRY[p] * typical for p in self.parameters}
        if not self.effects:
            return shift
        columns = self.covariate_columns(schema)
        cov = np.asarray(design.data["cov"], float)
        for p, effects in self.effects.items():
            for e in effects:
                if e.kind != "power":
                    continue
                x = cov[:, columns.index(e.column)] if len(cov) else np.zeros(0)
                if (x > 0).any():  # (a template design for twins holds zeros)
                    exponent = e.exponent if e.exponent is not None else pkc.ALLOMETRY.get(p, 0.0)
                    shift[p] += exponent * np.log(np.median(x[x > 0]) / e.ref)
        return shift

    # ---------------------------------------------------------------- design
    def read(self, rows, *, key=None, schema: Schema | None = None, columns=None, baseline=None):
        """New subjects' event rows for conditioning (IDs without levels yet are allowed). NONMEM
        column names are fixed and covariates sit in the rows: ``columns`` and ``baseline`` are
        not used."""
        from bayestwin.data.nonmem import read_nonmem

        covariates = schema.covariates if schema is not None else ()
        return read_nonmem(rows, covariates=covariates, key=key, allow_no_observations=True)

    def template_design(self, schema: Schema, n_obs: int, dose: int = 1) -> Design:
        """A one-subject design with ``n_obs`` observation rows and ``dose`` dose slots (zeros)."""
        p = len(self._x_columns(schema))
        data = {
            "X": np.zeros((1, p)),
            "log_wt": np.zeros(1),
            "cov": np.zeros((1, len(self.covariate_columns(schema)))),
            "patient_idx": np.zeros(n_obs, np.int64),
            "time": np.zeros(n_obs),
            "y_obs": np.zeros(n_obs),
            "blq": np.zeros(n_obs),
            "episode": np.zeros(n_obs),
            "t_dose": np.zeros((1, dose)),
            "amt": np.zeros((1, dose)),
            "duration": np.ones((1, dose)),
            "infusion": np.zeros((1, dose)),
            "ss_ii": np.zeros((1, dose)),
            "dose_episode": np.zeros((1, dose)),
        }
        return Design(patients=["twin"], data=data)

    #: Codes of the ``infusion`` input, one per dose slot: how the dose enters.
    DEPOT_OR_ROUTE, INFUSION, CENTRAL_BOLUS = 0, 1, 2

    def check(self, frame: pd.DataFrame, covariates) -> None:
        """Refuse, with a :class:`DataError` naming ID, row and column, every record this family
        would otherwise model wrongly: a steady-state infusion longer than its interval,
        time-varying covariates, occasions (OCC), compartments (CMT) it has no route for, levels of an ID with no
        dose, and an ID whose every level precedes its first dose."""
        fail = record_check(frame)
        evid = frame["EVID"].to_numpy()
        refuse_long_steady_infusions(frame, fail)
        refuse_time_varying(frame, covariates, fail)
        refuse_occasions(
            frame, fail, "this family has no inter-occasion variability (the ODE family has: bt.Ode(..., iov=['CL']))"
        )
        ids = frame["ID"].to_numpy()
        has_dose = pd.Series(np.isin(evid, [1, 4])).groupby(ids).transform("any").to_numpy()
        fail("levels of an ID that has no dose record (a PK level needs a dose)", (evid == 0) & ~has_dose, "EVID")
        before = frame["before_first_dose"].to_numpy(bool) | (evid != 0)
        all_before = pd.Series(before).groupby(ids).transform("all").to_numpy() & has_dose
        fail(
            "every level of this ID precedes its first dose (check TIME's units and the dose time)",
            (evid == 0) & all_before,
            "TIME",
        )
        central = 2 if self.route == "oral" else 1
        cmt = frame["CMT"].to_numpy(int) if "CMT" in frame else np.zeros(len(frame), int)
        dose, obs = np.isin(evid, [1, 4]), evid == 0
        infusion = dose & (frame["RATE"].to_numpy(float) > 0)
        fail(
            f"an infusion goes into the central compartment (CMT {central}, or 0 for the default)"
            + ("; zero-order input into the depot (CMT 1) is not modelled" if self.route == "oral" else ""),
            infusion & ~np.isin(cmt, [0, central]),
            "CMT",
        )
        allowed = [0, 1, 2] if self.route == "oral" else [0, 1]
        fail(
            f"a {self.route} dose goes into CMT {'1 (depot) or 2 (central)' if self.route == 'oral' else '1 (central)'}"
            " (0: the default); other compartments are not modelled",
            dose & ~infusion & ~np.isin(cmt, allowed),
            "CMT",
        )
        fail(
            f"levels are central-compartment concentrations (CMT {central}, or 0 for the default); "
            "other compartments are not modelled",
            obs & ~np.isin(cmt, [0, central]),
            "CMT",
        )

    def routed_doses(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Every dose (ADDL expanded) with ``INPUT``: 1 an infusion into the central compartment,
        2 a bolus into the central compartment of an oral model (CMT 2), 0 the route's own input
        (first-order absorption for ``route="oral"``, an IV bolus for ``route="iv"``)."""
        doses = expand_doses(frame)
        cmt = doses["CMT"].to_numpy(int)
        central_bolus = (self.route == "oral") & (cmt == 2)
        doses["INPUT"] = np.where(
            doses["DURATION"].to_numpy(float) > 0,
            self.INFUSION,
            np.where(central_bolus, self.CENTRAL_BOLUS, self.DEPOT_OR_ROUTE),
        ).astype(float)
        return doses

    #: Dose-slot inputs and the :meth:`routed_doses` columns they are read from.
    DOSE_COLUMNS = DOSE_COLUMNS

    #: The state a new regimen's doses enter (ODE models; the route decides it here).
    default_dose_state = 0

    def obs_inputs(self, obs: pd.DataFrame, patients: list) -> dict:
        """Inputs a subclass adds from the observation rows (per row, or per patient)."""
        return {}

    def _forecast_extra(self, plans: list, shape: tuple, m: int, times) -> dict:
        """Forecast inputs a subclass adds (``plans``: :func:`~bayestwin.dosing.regimen_doses` per
        patient; ``shape``: (patients, scenarios, times); ``m``: dose slots; ``times``)."""
        return {}

    def current_doses(self, frame: pd.DataFrame) -> pd.DataFrame:
        """:meth:`routed_doses` of each ID's current episode (after its last reset): the doses
        that still act after its last record, on which forecasts and dose searches build."""
        doses = self.routed_doses(frame)
        last = pd.Series(episodes(frame), index=frame["ID"].to_numpy()).groupby(level=0).last()
        return doses[doses["EPISODE"].to_numpy() == last.reindex(doses["ID"]).to_numpy()].reset_index(drop=True)

    def design(self, frame: pd.DataFrame, baseline: pd.DataFrame, schema: Schema) -> Design:
        """Arrays for :meth:`build_model` from an :class:`~bayestwin.data.nonmem.Events` frame."""
        self.check(frame, list(baseline.columns))
        if self.weight is not None and self.weight not in baseline.columns:
            from bayestwin.errors import DataError

            known = list(baseline.columns)
            hint = [c for c in known if c.upper() == str(self.weight).upper()]
            raise DataError(
                f"weight={self.weight!r} is not a covariate of these events (covariates: {known})"
                + (f"; did you mean {hint[0]!r}?" if hint else "; read it with covariates=[...]"),
                column=self.weight,
            )
        patients = list(baseline.index)
        index = {p: i for i, p in enumerate(patients)}
        doses = self.routed_doses(frame)
        d_id = doses["ID"].map(index).to_numpy()
        slot = pd.Series(d_id).groupby(d_id).cumcount().to_numpy()  # position among the subject's doses
        m = max(int(slot.max()) + 1 if len(slot) else 0, 1)
        slots = {}
        for name, col in self.DOSE_COLUMNS.items():
            slots[name] = np.zeros((len(patients), m))
            slots[name][d_id, slot] = doses[col].to_numpy(float)
        is_obs = (frame["EVID"] == 0).to_numpy()
        obs = frame[is_obs]
        blq = obs["BLQ"].to_numpy(int) > 0
        if self.covariates is not None:
            self._check_covariates(baseline, schema)
        data = {
            "X": self._x_matrix(baseline, schema),
            "cov": self._cov_matrix(baseline, schema),
            "log_wt": (
                np.log(baseline[self.weight].to_numpy(float) / 70.0) if self.weight else np.zeros(len(patients))
            ),
            "patient_idx": obs["ID"].map(index).to_numpy(np.int64),
            "time": obs["TIME"].to_numpy(float),
            "y_obs": np.where(blq, obs["LLOQ"].to_numpy(float), obs["DV"].to_numpy(float)),
            "blq": blq.astype(float),
            "episode": episodes(frame)[is_obs].astype(float),
            **self.obs_inputs(obs, patients),
            **slots,
            "duration": np.where(slots["duration"] > 0, slots["duration"], 1.0),  # padding: any positive value
        }
        return Design(patients=patients, data=data)

    def _x_columns(self, schema: Schema) -> list[str]:
        """Columns of ``X``: standardised covariates acting on CL (without a covariate model)."""
        if self.covariates is not None:
            return []
        return [c for c in schema.design_columns if c != self.weight]

    def _x_matrix(self, baseline: pd.DataFrame, schema: Schema) -> np.ndarray:
        cols = self._x_columns(schema)
        if not cols:
            return np.zeros((len(baseline), 0))
        X = schema.covariate_matrix(baseline)
        return X[:, [j for j, c in enumerate(schema.design_columns) if c in cols]]

    # ----------------------------------------------------------------- model
    def build_model(self, design: Design, schema: Schema) -> pm.Model:
        """The PyMC model for ``design``: print it, graph it, sample it (the subjects' non-centred
        offsets ``z``, the form twins condition on)."""
        return self._model(design, schema, ())

    def fit_model(self, design: Design, schema: Schema) -> tuple[pm.Model, tuple[str, ...]]:
        """The model the population fit samples, and the raw variables left out of its
        posterior: with ``centred=``, those parameters' subject values are sampled centred on
        their covariate model (``log_theta_centred``; the rest as ``z_noncentred``) and ``z`` is
        kept as a deterministic. The same posterior distribution as :meth:`build_model`'s."""
        if not self.centred_parameters:
            return self.build_model(design, schema), ()
        partly = len(self.centred_parameters) < len(self.bsv_parameters)  # some subjects' values stay offsets
        hidden = ("log_theta_centred",) + (("z_noncentred",) if partly else ())
        return self._model(design, schema, self.centred_parameters), hidden

    def fit_advice(self, design: Design, verdict) -> list[str]:
        """What to try when a fit failed the gate: the subjects' parameterisation, in words."""
        diverged = any("divergent" in f for f in verdict.failing)
        if self.centred_parameters and diverged:
            names = [p.upper() for p in self.centred_parameters]
            return [
                f"divergences with centred subjects ({names}) point to a funnel: centre only the parameters "
                "each subject's levels determine well (centred=[...] with fewer names, or False)"
            ]
        if not self.centred_parameters and not diverged:
            return [
                "slow mixing of typical values whose subjects are well determined by their own levels "
                "(rich sampling) is a ridge of the non-centred form: fit with those parameters centred, "
                "e.g. centred=['CL', 'V'] (see the pharmacometrician guide)"
            ]
        return []

    def _model(self, design: Design, schema: Schema, centred: tuple[str, ...]) -> pm.Model:
        pri = self.default_priors(schema, design) | self.priors
        d = design.data
        names = self.parameters
        cov_cols = self._x_columns(schema)
        coords = {
            "patient": design.patients,
            "obs": np.arange(len(d["y_obs"])),
            "pk_param": list(self.bsv_parameters),
            "covariate": cov_cols,
            "cov_column": self.covariate_columns(schema),
            "dose": np.arange(d["t_dose"].shape[1]),
        }
        coords |= {a.slot: np.arange(d[n].shape[1]) for n, a in self.inputs.items() if a.slot and a.slot not in coords}
        coords |= {
            f"{c}_level": list(schema.categorical[c][1:]) for c in self.effect_columns if c in schema.categorical
        }
        with pm.Model(coords=coords) as model:
            X = pm.Data("X", d["X"], dims=("patient", "covariate"))
            log_wt = pm.Data("log_wt", d["log_wt"], dims="patient")
            cov = pm.Data("cov", d["cov"], dims=("patient", "cov_column"))
            idx = pm.Data("patient_idx", d["patient_idx"], dims="obs")
            t = pm.Data("time", d["time"], dims="obs")
            y_obs = pm.Data("y_obs", d["y_obs"], dims="obs")
            blq = pm.Data("blq", d["blq"], dims="obs")
            episode = pm.Data("episode", d["episode"], dims="obs")
            t_dose = pm.Data("t_dose", d["t_dose"], dims=("patient", "dose"))
            amt = pm.Data("amt", d["amt"], dims=("patient", "dose"))
            duration = pm.Data("duration", d["duration"], dims=("patient", "dose"))
            infusion = pm.Data("infusion", d["infusion"], dims=("patient", "dose"))
            ss_ii = pm.Data("ss_ii", d["ss_ii"], dims=("patient", "dose"))
            dose_episode = pm.Data("dose_episode", d["dose_episode"], dims=("patient", "dose"))

            typical = pt.stack([pri[f"log_{p}"].create(f"log_{p}") for p in names])

            def fixed(log_theta):  # the covariate model's terms, added in this order
                if self.effects:
                    log_theta = log_theta + self._covariate_terms(pri, cov, schema)
                if self.weight is not None:
                    log_theta = log_theta + log_wt[:, None] * np.array([ALLOMETRY[p] for p in names])[None, :]
                if cov_cols:
                    beta = pri["beta_cl"].create("beta_cl", dims="covariate")
                    j = names.index("cl")
                    log_theta = pt.set_subtensor(log_theta[:, j], log_theta[:, j] + X @ beta)
                return log_theta

            if centred:  # each subject's centred parameters are free, around their covariate model
                mean = fixed(pt.zeros((len(design.patients), len(names))) + typical[None, :])
                log_theta = self._centred_effects(pri, mean, centred)
            else:  # the non-centred offsets z: the graph twins condition on
                log_theta = fixed(typical[None, :] + self._random_effects(pri))
            theta = {p: pt.exp(log_theta[:, j]) for j, p in enumerate(names)}
            theta = {p: pm.Deterministic(f"patient_{p}", v, dims="patient") for p, v in self._derived(theta).items()}
            inputs = {
                "patient_idx": idx,
                "time": t,
                "episode": episode,
                "t_dose": t_dose,
                "amt": amt,
                "duration": duration,
                "infusion": infusion,
                "ss_ii": ss_ii,
                "dose_episode": dose_episode,
            }
            inputs |= {n: pm.Data(n, d[n], dims=self._dims(n)) for n in self.extra_inputs}
            inputs |= self._time_terms(pri, cov, inputs, schema)
            conc = pm.Deterministic("conc", self.levels(theta, inputs), dims="obs")
            self._likelihood(pri, conc, blq, y_obs, inputs)
        return model

    #: Inputs a subclass adds to the model (built by :meth:`build_model` from its ``inputs``).
    extra_inputs: tuple[str, ...] = ()

    def _time_terms(self, pri, cov, inputs: dict, schema: Schema) -> dict:
        """Inputs for :meth:`levels` from parameters that change over time (none here: this
        family's parameters are constant per subject; the ODE family's may change)."""
        return {}

    def _dims(self, name: str) -> tuple[str, ...]:
        axis = self.inputs[name]
        return ("obs",) if axis.kind == "obs" else ("patient",) + ((axis.slot,) if axis.slot else ())

    def _derived(self, theta: dict) -> dict:
        """The structural parameters from the sampled ones (V = CL/ke; one compartment oral: ka = k + excess)."""
        if "ke" in theta:
            theta["v"] = theta["cl"] / theta["ke"]
        if self.route == "oral" and self.compartments == 1:
            # No flip-flop: ka = k + exp(.), so absorption is faster than elimination. The
            # one-compartment oral likelihood is symmetric in ka and k (with V rescaled), and
            # without this the posterior has a mirror mode that chains fall into.
            theta["ka"] = theta["cl"] / theta["v"] + theta["ka"]
        return theta

    def levels(self, theta: dict, d: dict):
        """The predicted level of each observation row (pytensor): every dose of the row's
        episode, by superposition of the closed forms (:meth:`concentration`)."""
        idx = d["patient_idx"]
        per_obs = {p: v[idx][:, None] for p, v in theta.items()}
        doses = (d["t_dose"][idx], d["amt"][idx], d["duration"][idx], d["infusion"][idx])
        per_dose = self.concentration(pt, per_obs, d["time"][:, None], *doses, ii=d["ss_ii"][idx])
        same = pt.eq(d["dose_episode"][idx], d["episode"][:, None])  # a reset ends what came before it
        return pt.where(same, per_dose, 0.0).sum(axis=1)

    def _likelihood(self, pri, conc, blq, y_obs, d: dict) -> None:
        """Residual error around ``conc`` and the M3 likelihood of BLQ rows."""
        if self.error == "additive":
            sd = pri["sigma_add"].create("sigma_add")
        elif self.error == "proportional":
            sd = pri["sigma_prop"].create("sigma_prop") * conc + 1e-9
        else:
            s_add, s_prop = pri["sigma_add"].create("sigma_add"), pri["sigma_prop"].create("sigma_prop")
            sd = pt.sqrt(s_add**2 + (s_prop * conc) ** 2)
        sd = pt.broadcast_to(sd, conc.shape)
        pm.CustomDist("y", conc, sd, blq, logp=m3_logp, random=_m3_random, observed=y_obs, dims="obs")

    def _random_effects(self, pri):
        """Between-subject deviations (patient, parameter) on the log scale: ``L z`` with ``z`` the
        subject's N(0, I) offsets over :attr:`bsv_parameters` and ``L`` (:meth:`_scales`);
        zero for a parameter without BSV."""
        z = pm.Normal("z", 0.0, 1.0, dims=("patient", "pk_param"))
        return self._deviations(z, self._scales(pri))

    def _deviations(self, z, scales):
        """``L z`` over the BSV parameters, widened to every parameter (zero without BSV)."""
        bsv = list(self.bsv_parameters)
        n = len(bsv)
        eta = z * scales[None, :] if scales.ndim == 1 else z @ scales.T
        if n == len(self.parameters):
            return eta
        select = np.zeros((n, len(self.parameters)))  # parameters without BSV get no deviation
        select[np.arange(n), [self.parameters.index(p) for p in bsv]] = 1.0
        return eta @ select

    def _centred_effects(self, pri, mean, centred: tuple[str, ...]):
        """Log-scale parameters (patient, parameter) with the ``centred`` ones sampled centred:
        ``log_theta_centred ~ N(mean, Σ)`` over them (their blocks closed, so Σ's Cholesky
        factor is ``L``'s own rows and columns), the rest from N(0, 1) offsets
        ``z_noncentred``; ``z`` (what twins condition on) recovered as ``L⁻¹ (θ - mean)``."""
        from pytensor.tensor.slinalg import solve_triangular

        model = pm.modelcontext(None)
        bsv = list(self.bsv_parameters)
        scales = self._scales(pri)
        c = [bsv.index(p) for p in centred]
        nc = [j for j in range(len(bsv)) if j not in c]
        cols = [self.parameters.index(p) for p in centred]
        m_c = mean[:, cols]
        model.add_coord("centred_param", list(centred))
        if scales.ndim == 1:
            sd = scales[c]
            w = pm.Normal("log_theta_centred", m_c, sd[None, :], dims=("patient", "centred_param"))
            z_c = (w - m_c) / sd[None, :]
        else:
            L = scales[c][:, c]
            w = pm.MvNormal("log_theta_centred", mu=m_c, chol=L, dims=("patient", "centred_param"))
            z_c = solve_triangular(L, (w - m_c).T, lower=True).T
        z = pt.zeros((mean.shape[0], len(bsv)))
        z = pt.set_subtensor(z[:, c], z_c)
        if nc:
            model.add_coord("noncentred_param", [bsv[j] for j in nc])
            z = pt.set_subtensor(z[:, nc], pm.Normal("z_noncentred", 0.0, 1.0, dims=("patient", "noncentred_param")))
        z = pm.Deterministic("z", z, dims=("patient", "pk_param"))
        log_theta = mean + self._deviations(z, scales)
        return pt.set_subtensor(log_theta[:, cols], w)  # the centred values themselves, not L (L⁻¹ w)

    def _scales(self, pri):
        """The BSV's scale on the log scale, creating its variables: a vector of SDs (diagonal,
        ``correlated=False`` or one parameter) or a lower-triangular ``L`` (one LKJ block,
        ``correlated=True``; blocks given as groups, the rest diagonal)."""
        bsv = list(self.bsv_parameters)
        n = len(bsv)
        if self.correlated is True and n > 1:
            return lkj_cholesky("re_chol", "pk_param", eta=pri["bsv_corr_eta"], sd_dist=pri["bsv_sd"].unnamed(shape=n))
        elif not self.correlated or n == 1:
            return pri["bsv_sd"].create("bsv_sd", dims="pk_param")
        else:
            blocked = [bsv.index(x.lower()) for g in self.correlated for x in g]
            diag = [j for j in range(n) if j not in blocked]
            L = pt.zeros((n, n))
            if diag:
                model = pm.modelcontext(None)
                model.add_coord("diag_param", [bsv[j] for j in diag])
                sd = pri["bsv_sd"].create("bsv_sd", dims="diag_param")
                L = pt.set_subtensor(L[diag, diag], sd)
            for b, g in enumerate(self.correlated):
                j = [bsv.index(x.lower()) for x in g]
                pm.modelcontext(None).add_coord(f"block_{b}_param", [bsv[i] for i in j])
                chol = lkj_cholesky(
                    f"re_chol_{b}",
                    f"block_{b}_param",
                    eta=pri["bsv_corr_eta"],
                    sd_dist=pri["bsv_sd"].unnamed(shape=len(j)),
                )
                L = pt.set_subtensor(L[np.ix_(j, j)], chol)
            return L

    def _covariate_terms(self, pri, cov, schema: Schema):
        """The covariate model's log-scale terms (..., parameter) of covariate rows ``cov``
        (..., :meth:`covariate_columns`): per subject, or per subject and period."""
        columns = self.covariate_columns(schema)
        terms = []
        for p in self.parameters:
            term = pt.zeros_like(cov[..., 0]) if cov.type.shape[-1] != 0 else pt.zeros(cov.shape[:-1])
            for e in self.effects.get(p, ()):
                name = coefficient_name(p, e)
                if e.kind == "categorical":
                    j = [columns.index(f"{e.column}[{lvl}]") for lvl in schema.categorical[e.column][1:]]
                    coef = _created(pri, name, dims=f"{e.column}_level")
                    term = term + pkc.log_effect(pt, e, cov[..., j], coef)
                    continue
                x = cov[..., columns.index(e.column)]
                coef = e.exponent if e.kind == "power" and e.exponent is not None else _created(pri, name)
                term = term + pkc.log_effect(pt, e, x, coef)
            terms.append(term)
        return pt.stack(terms, axis=-1)

    def concentration(self, xp, theta: Mapping, t, t_dose, amt, duration, infusion, ii=0.0):
        """Each dose's contribution to the central concentration at ``t`` (broadcast, not summed).

        ``theta`` maps parameter names (``cl``, ``v`` or ``v1``/``q``/``v2``, ``ka``, ``tlag``, ``f``) to arrays
        broadcastable against ``t - t_dose``. ``infusion`` codes how each dose enters: 1 an
        infusion over ``duration`` into the central compartment, 2 a bolus into the central
        compartment (CMT 2 of an oral model), 0 the route's own input (oral: first-order
        absorption from the depot; iv: a bolus). ``ii`` > 0 makes a dose a steady-state dose
        (the latest of a train every ``ii``; :mod:`~bayestwin.families.pk_analytic`). The one
        formula behind the PyMC model and the dose search.
        """
        if self.compartments == 1:
            struct = {"cl": theta["cl"], "v": theta["v"]}
            bolus_fn, inf_fn, oral_fn = pka.one_cmt_bolus, pka.one_cmt_infusion, pka.one_cmt_oral
        else:
            struct = {k: theta[k] for k in ("cl", "v1", "q", "v2")}
            bolus_fn, inf_fn, oral_fn = pka.two_cmt_bolus, pka.two_cmt_infusion, pka.two_cmt_oral
        bolus = bolus_fn(xp, t, t_dose, amt, **struct, ii=ii)
        if self.route == "oral":
            absorbed = {"ka": theta["ka"], "tlag": theta.get("tlag", 0.0), "f": theta.get("f", 1.0)}
            oral = oral_fn(xp, t, t_dose, amt, **absorbed, **struct, ii=ii)
            first = xp.where(infusion > 1.5, bolus, oral)
        else:
            first = bolus
        infused = inf_fn(xp, t, t_dose, amt, duration, **struct, ii=ii)
        return xp.where((infusion > 0.5) & (infusion < 1.5), infused, first)

    def forecast_inputs(self, events, schema: Schema, regimens=None, times=None, start=None):
        """Scenario labels, forecast times and the data for ``conc``: arrays (patient, scenario, ...).

        Each scenario is a :class:`~bayestwin.dosing.Regimen` given from ``start`` (default: each
        subject's last recorded event) on top of the doses already recorded; with no regimens,
        the one scenario ``"as recorded"`` (the recorded doses alone, ADDL included). ``times``
        are absolute (the event table's clock); default: from the latest event over one time
        scale, 25 points.
        """
        from bayestwin.dosing import regimen_doses

        regimens = list(regimens or [])
        labels = [r.label for r in regimens] or ["as recorded"]
        patients = events.patients
        design = self.design(events.frame, events.baseline, schema)
        last = events.frame.groupby("ID")["TIME"].max().reindex(patients).to_numpy(float)
        starts = last if start is None else np.full(len(patients), float(start))
        if times is None:
            t0 = float(np.max(starts))
            times = np.linspace(t0, t0 + schema.time_scale, 25)
        times = np.asarray(times, float)
        doses = self.current_doses(events.frame)
        into = self.default_dose_state
        plans = [regimen_doses(regimens, starts[i], doses[doses["ID"] == p], into) for i, p in enumerate(patients)]
        m = max(pl["t_dose"].shape[1] for pl in plans)

        def widen(a, fill):
            return np.concatenate([a, np.full((a.shape[0], m - a.shape[1]), fill)], axis=1)

        B, S, T = len(patients), len(labels), len(times)
        data = {
            "X": np.broadcast_to(design.data["X"][:, None, None, :], (B, S, 1, design.data["X"].shape[1])),
            "cov": np.broadcast_to(design.data["cov"][:, None, None, :], (B, S, 1, design.data["cov"].shape[1])),
            "log_wt": np.broadcast_to(design.data["log_wt"][:, None, None], (B, S, 1)),
            "time": np.broadcast_to(times, (B, S, T)),
            "blq": np.zeros((B, S, T)),
            "episode": np.zeros((B, S, T)),  # the current episode's doses only (current_doses)
            "t_dose": np.stack([widen(pl["t_dose"], 0.0) for pl in plans])[:, :, None, :],
            "amt": np.stack([widen(pl["amt"], 0.0) for pl in plans])[:, :, None, :],
            "duration": np.stack([widen(pl["dur"], 1.0) for pl in plans])[:, :, None, :],
            "infusion": np.stack([widen(pl["inf"], 0.0) for pl in plans])[:, :, None, :],
            "ss_ii": np.stack([widen(pl["ii"], 0.0) for pl in plans])[:, :, None, :],
            "dose_episode": np.zeros((B, S, 1, m)),
        }
        data |= self._forecast_extra(plans, (B, S, T), m, times)
        return labels, times, data

    # --------------------------------------------------- virtual patients
    def covariate_arrays(self, baseline: pd.DataFrame, schema: Schema) -> dict:
        """Per-subject prediction inputs of a covariate table (vectorised): X, log_wt, cov (n, 1, ...)."""
        n = len(baseline)
        X = self._x_matrix(baseline, schema)
        log_wt = np.log(baseline[self.weight].to_numpy(float) / 70.0) if self.weight is not None else np.zeros(n)
        cov = self._cov_matrix(baseline, schema)
        return {"X": X[:, None, :], "log_wt": log_wt[:, None], "cov": cov[:, None, :]}

    def scenario_arrays(self, scenarios, times, schema: Schema, start: float = 0.0, before=None):
        """Labels and prediction inputs (scenario, ...) for a new subject with no dosing history
        who starts each :class:`~bayestwin.dosing.Regimen` at ``start`` (``before`` is unused)."""
        from bayestwin.dosing import Regimen, regimen_doses

        regimens = list(scenarios or [])
        if not regimens or not all(isinstance(r, Regimen) for r in regimens):
            raise ValueError("a PK virtual cohort needs its scenarios as a list of Regimen objects")
        plan = regimen_doses(regimens, float(start), state=self.default_dose_state)
        times = np.asarray(times, float)
        R = len(regimens)
        data = {
            "time": np.broadcast_to(times, (R, len(times))).copy(),
            "blq": np.zeros((R, len(times))),
            "episode": np.zeros((R, len(times))),
            "t_dose": plan["t_dose"][:, None, :],
            "amt": plan["amt"][:, None, :],
            "duration": plan["dur"][:, None, :],
            "infusion": plan["inf"][:, None, :],
            "ss_ii": plan["ii"][:, None, :],
            "dose_episode": np.zeros_like(plan["amt"][:, None, :]),
        }
        extra = self._forecast_extra([plan], (1, R, len(times)), plan["amt"].shape[1], times)
        data |= {k: v[0] for k, v in extra.items()}
        return [r.label for r in regimens], data

    def reference_baseline(self, constant: Mapping, schema: Schema) -> pd.DataFrame:
        """The fitted subjects' baseline covariates, back from the fit's constant data."""
        if self.covariates is not None:
            cov = np.asarray(constant["cov"], float)
            columns = self.covariate_columns(schema)
            out = {}
            for c in self.effect_columns:
                if c in schema.categorical:
                    levels = schema.categorical[c]
                    hot = cov[:, [columns.index(f"{c}[{lvl}]") for lvl in levels[1:]]]
                    pick = (
                        np.where(hot.any(axis=1), hot.argmax(axis=1) + 1, 0)
                        if hot.shape[1]
                        else np.zeros(len(cov), int)
                    )
                    out[c] = pd.Categorical(np.asarray(levels, dtype=object)[pick], categories=list(levels))
                else:
                    out[c] = cov[:, columns.index(c)]
            return pd.DataFrame(out, columns=list(schema.covariates))
        cols = self._x_columns(schema)
        table = schema.baseline_from_matrix(np.asarray(constant["X"]), cols)
        if self.weight is not None:
            table[self.weight] = 70.0 * np.exp(np.asarray(constant["log_wt"], float))
        return table

    def observe(self, key, mu, params: Mapping) -> jax.Array:
        """A new measured level around ``mu`` with the family's residual error (``params`` broadcast)."""
        sd = 0.0
        if "sigma_add" in params:
            sd = sd + params["sigma_add"] ** 2
        if "sigma_prop" in params:
            sd = sd + (params["sigma_prop"] * mu) ** 2
        return mu + jax.numpy.sqrt(sd) * jax.random.normal(key, mu.shape)


#: Relative clearance by CYP2D6 phenotype used by :func:`simulate` (illustrative values of the
#: order reported for CYP2D6 substrates; poor metabolisers clear the drug slowest).
CYP2D6 = {"normal": 1.0, "poor": 0.3, "intermediate": 0.6, "ultrarapid": 1.8}
CYP2D6_FREQ = {"normal": 0.55, "poor": 0.1, "intermediate": 0.25, "ultrarapid": 0.1}


def simulate(
    n_subjects: int = 40,
    *,
    dose: float = 100.0,
    interval: float = 12.0,
    n_doses: int = 1,
    times=(0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0),
    cl: float = 2.0,
    v: float = 30.0,
    ka: float = 1.2,
    bsv=(0.3, 0.2, 0.4),
    tlag: float = 0.0,
    bsv_tlag: float = 0.3,
    sigma_add: float = 0.05,
    sigma_prop: float = 0.1,
    weight: bool = False,
    phenotype: Mapping[str, float] | None = None,
    lloq: float | None = None,
    seed: int = 0,
    id_start: int = 1,
) -> tuple[pd.DataFrame, dict]:
    """Simulate a one-compartment oral PK study as a NONMEM-style event table, with the truth.

    Each subject gets ``n_doses`` doses of ``dose`` every ``interval`` (one dose row with ADDL/II)
    and levels at ``times`` after the *last* dose. Individual parameters are log-normal around
    (``cl``, ``v``, ``ka``) with SDs ``bsv`` on the log scale; ``tlag`` > 0 adds an absorption lag
    time, log-normal with SD ``bsv_tlag``; with ``weight``, a body weight
    (``WT``, kg) scales CL by (WT/70)^0.75 and V by WT/70; with ``phenotype`` (level ->
    relative CL, e.g. :data:`CYP2D6`), a ``CYP2D6`` column is drawn with :data:`CYP2D6_FREQ`
    (or equal frequencies for other levels) and multiplies CL. Observations carry combined
    error (``sigma_add``, ``sigma_prop``) truncated at 0; below ``lloq`` they are flagged BLQ.

    Returns
    -------
    table : DataFrame with ID, TIME, AMT, DV, EVID, II, ADDL (and WT, CYP2D6, BLQ, LLOQ)
    truth : dict with the population values and each subject's ``cl``, ``v``, ``ka`` (by ID)

    Examples
    --------
    >>> table, truth = simulate(n_subjects=3, seed=1)
    >>> sorted(truth["cl"])
    [1, 2, 3]
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(id_start, id_start + n_subjects)
    eta = rng.standard_normal((n_subjects, 3)) * np.asarray(bsv, float)
    wt = np.round(np.exp(rng.normal(np.log(70.0), 0.2, n_subjects)), 1) if weight else np.full(n_subjects, 70.0)
    ind_cl = cl * np.exp(eta[:, 0]) * (wt / 70.0) ** 0.75
    ind_v = v * np.exp(eta[:, 1]) * wt / 70.0
    ind_ka = ka * np.exp(eta[:, 2])
    # drawn only when asked for: with tlag = 0 the random stream, and the simulation, are unchanged
    ind_tlag = tlag * np.exp(rng.standard_normal(n_subjects) * bsv_tlag) if tlag > 0 else np.zeros(n_subjects)
    levels = None
    if phenotype is not None:
        names = list(phenotype)
        freq = np.array([CYP2D6_FREQ.get(n, 1.0) for n in names])
        levels = rng.choice(names, size=n_subjects, p=freq / freq.sum())
        ind_cl = ind_cl * np.array([phenotype[lv] for lv in levels])
    last = interval * (n_doses - 1)
    t_obs = last + np.asarray(times, float)
    t_dose = interval * np.arange(n_doses)
    fam = Pk(lag=tlag > 0)
    theta = {"cl": ind_cl[:, None, None], "v": ind_v[:, None, None], "ka": ind_ka[:, None, None]}
    theta["tlag"] = ind_tlag[:, None, None]
    conc = fam.concentration(np, theta, t_obs[None, :, None], t_dose[None, None, :], dose, 1.0, 0.0).sum(-1)
    sd = np.sqrt(sigma_add**2 + (sigma_prop * conc) ** 2)
    dv = np.maximum(conc + sd * rng.standard_normal(conc.shape), 0.0)
    rows = []
    for i, pid in enumerate(ids):
        cov = {}
        if weight:
            cov["WT"] = wt[i]
        if levels is not None:
            cov["CYP2D6"] = levels[i]
        rows.append({"ID": pid, "TIME": 0.0, "AMT": dose, "DV": np.nan, "EVID": 1, **cov})
        if n_doses > 1:
            rows[-1] |= {"II": interval, "ADDL": n_doses - 1}
        for t, y in zip(t_obs, dv[i], strict=True):
            row = {"ID": pid, "TIME": t, "AMT": 0.0, "DV": y, "EVID": 0, **cov}
            if lloq is not None:
                row |= {"BLQ": int(y < lloq), "LLOQ": lloq}
                row["DV"] = np.nan if y < lloq else y
            rows.append(row)
    table = pd.DataFrame(rows)
    if levels is not None:  # reference level first (normal metabolisers for CYP2D6)
        table["CYP2D6"] = pd.Categorical(table["CYP2D6"], categories=list(phenotype))
    for c in ("II", "ADDL"):
        if c in table:
            table[c] = table[c].fillna(0)
    truth = {
        "cl": dict(zip(ids.tolist(), ind_cl, strict=True)),
        "v": dict(zip(ids.tolist(), ind_v, strict=True)),
        "ka": dict(zip(ids.tolist(), ind_ka, strict=True)),
        "tlag": dict(zip(ids.tolist(), ind_tlag, strict=True)),
        "population": {
            "cl": cl,
            "v": v,
            "ka": ka,
            "tlag": tlag,
            "bsv": tuple(bsv),
            "sigma_add": sigma_add,
            "sigma_prop": sigma_prop,
        },
        "phenotype": dict(zip(ids.tolist(), map(str, levels), strict=True)) if levels is not None else None,
        "weight": dict(zip(ids.tolist(), wt.tolist(), strict=True)) if weight else None,
    }
    return table, truth
