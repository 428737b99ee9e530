"""``bt.Formula``: a mixed-model formula, as in lme4, brms and Bambi, turned into a twin-ready model.

    bt.fit(cohort, bt.Formula("y ~ time * therapy + age + (time | patient)", likelihood="poisson"))

The formula is parsed by ``formulae`` (the parser Bambi uses) and compiled into a PyMC model
*symbolically*: every design column is a product of the cohort's arrays (``time``, the therapy
given, the patient's covariates), so a twin of a new patient, a forecast under another therapy
or a virtual patient evaluates the same design on its own rows. The result is a
:class:`~bayestwin.families.model.Model`: everything it does, this does.

Variables are the cohort's roles: ``time``, ``therapy`` (treatment coding against the first
therapy), ``patient`` (the one grouping factor) and the covariates by name (numeric ones
standardised as the cohort standardises them; categorical ones with treatment coding against the
first level). ``*`` and ``:`` make interactions; ``0 +`` drops the intercept. One group term
``(expr | patient)`` gives correlated patient effects (an LKJ(2) correlation, non-centred). A
group term by a categorical covariate, ``(1 | site)`` or ``(1 + time | site)``, gives each of its
levels (hospitals, centres) its own effects: population parameters ``site_effects`` (centred, SDs
``site_sd``), added to the rows of every patient of that level; twins and virtual patients take
the effects of their own level.
Function terms (``I()``, ``log()``, ``scale()``) are refused: add the column to the table.

Likelihoods and links: ``gaussian`` (identity), ``t`` (identity), ``poisson`` (log),
``negativebinomial`` (log; with ``Cohort(at_risk=)``, the log of each row's time at risk is an
exposure offset), ``bernoulli`` (logit), ``ordinal`` (cumulative logit over ``levels``
ordered categories coded 0 .. levels - 1, as brms's ``cumulative()`` or ``ordinal::clmm``: the
intercept is absorbed by the ``levels - 1`` ordered cut points, ``Normal(0, 2.5)`` around
equally spaced logits; forecasts report the expected category and draw categories).

Priors are weakly informative on the link scale and fixed from the cohort's schema (outcome mean
and SD, the time scale): for a Gaussian outcome ``Normal(ȳ, 2.5 s_y)`` on the intercept,
``Normal(0, 2.5 s_y / scale)`` on a coefficient (``scale``: the time scale for terms with
``time``, 1 otherwise), ``Gamma(2, 2 / (s_y / scale))`` on patient-effect SDs, ``HalfNormal(s_y)``
on the residual SD; on the log or logit scale ``s_y = 1`` and the intercept is centred at the link
of ȳ.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import pymc as pm
import pytensor.tensor as pt

from bayestwin.families.base import FamilyError, lkj_cholesky, register_family
from bayestwin.families.model import Model, ModelData

#: likelihood -> link
LIKELIHOODS = {
    "gaussian": "identity",
    "t": "identity",
    "poisson": "log",
    "negativebinomial": "log",
    "bernoulli": "logit",
    "ordinal": "cumulative logit",
}


def _parse(formula: str):
    """(intercept, common terms, group intercept, group terms, other groups): terms as tuples of
    variable names; ``other groups`` maps each grouping factor other than ``patient`` (a site, a
    centre) to its (intercept, terms)."""
    try:
        from formulae import model_description
    except ImportError:
        raise ImportError("bt.Formula needs the formulae package: pip install 'bayestwin[formula]'") from None
    if not isinstance(formula, str) or "~" not in formula:
        raise FamilyError(f"a formula reads 'outcome ~ terms', not {formula!r}")
    groups = re.findall(r"\(([^()|]*)\|([^()]*)\)", formula)
    factors = [f.strip() for _, f in groups]
    if factors.count("patient") > 1:
        raise FamilyError(
            "write the patient effects as one group term, e.g. (1 + time | patient): they form one correlated block"
        )
    repeated = sorted({f for f in factors if factors.count(f) > 1})
    if repeated:
        raise FamilyError(f"write the effects by {repeated[0]!r} as one group term, e.g. (1 + time | {repeated[0]})")
    try:
        md = model_description(formula)
    except Exception as err:  # noqa: BLE001 - formulae's own parse errors
        raise FamilyError(f"cannot parse the formula {formula!r}: {err}") from None

    def names(term, where):
        if type(term).__name__ == "Intercept":
            return ()
        out = []
        for c in term.components:
            if type(c).__name__ != "Variable":
                raise FamilyError(
                    f"{where} term {c.name!r}: function terms are not supported; add the transformed column"
                )
            out.append(c.name)
        return tuple(out)

    common = [t for t in md.common_terms]
    intercept = any(type(t).__name__ == "Intercept" for t in common)
    terms = [names(t, "the") for t in common if type(t).__name__ != "Intercept"]
    by: dict[str, tuple[bool, list]] = {}
    for g in md.group_terms:
        factor = [c.name for c in g.factor.components]
        if len(factor) != 1 or factor[0] in ("time", "therapy"):
            raise FamilyError(
                f"a group term is by patient or by one categorical covariate (a site), not by {factor}: "
                "write (... | patient) or (1 | site)"
            )
        g_intercept, g_terms = by.get(factor[0], (False, []))
        if type(g.expr).__name__ == "Intercept":
            g_intercept = True
        else:
            g_terms = [*g_terms, names(g.expr, "the group")]
        by[factor[0]] = (g_intercept, g_terms)
    if "patient" not in by:
        raise FamilyError("the formula has no (... | patient) term: a twin needs patient-level effects")
    for factor, (_, g_terms) in by.items():
        nested = sorted({v for t in g_terms for v in t} & {*by, "patient"})
        if nested:
            raise FamilyError(f"the group term by {factor!r} has the variable {nested[0]!r}: a factor varies by group")
    fixed = sorted({v for t in terms for v in t} & set(by))
    if fixed:
        raise FamilyError(
            f"{fixed[0]!r} is both a grouping factor and a common term: its levels are random effects "
            f"(drop the common term {fixed[0]!r})"
        )
    g_intercept, g_terms = by.pop("patient")
    return intercept, terms, g_intercept, g_terms, by


@register_family
class Formula(Model):
    """A mixed-model formula as a family (see the module docstring).

    Parameters
    ----------
    formula
        ``"y ~ fixed terms + (expr | patient)"``, and optionally ``+ (expr | site)`` for any
        categorical covariate ``site``; the left-hand side names the outcome (any name: the
        cohort's outcome column is used).
    likelihood
        ``"gaussian"``, ``"t"``, ``"poisson"``, ``"negativebinomial"``, ``"bernoulli"`` or
        ``"ordinal"`` (with ``levels``, the number of ordered categories).
    prediction
        As for :class:`~bayestwin.families.model.Model` (default: the expected outcome).

    Examples
    --------
    >>> Formula("y ~ time * therapy + (1 | patient)", likelihood="poisson").config()["likelihood"]
    'poisson'
    """

    name = "formula"

    def __init__(
        self, formula: str, likelihood: str = "gaussian", *, levels: int | None = None, prediction: str | None = None
    ):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {sorted(LIKELIHOODS)}, not {likelihood!r}")
        if (likelihood == "ordinal") != (levels is not None):
            raise ValueError(
                "levels (the number of ordered categories) goes with likelihood='ordinal', and only with it"
            )
        if levels is not None and (not isinstance(levels, int) or isinstance(levels, bool) or levels < 2):
            raise ValueError(f"levels must be an integer of at least 2, not {levels!r}")
        self.formula, self.likelihood, self.levels = formula, likelihood, levels
        self._terms = _parse(formula)
        super().__init__(self._build, prediction=prediction)

    @property
    def grouping_factors(self) -> tuple[str, ...]:
        """The categorical covariates with a group term of their own (sites), besides ``patient``."""
        return tuple(self._terms[4])

    def config(self) -> dict:
        return {
            "family": self.name,
            "formula": self.formula,
            "likelihood": self.likelihood,
            "prediction": self.prediction_name,
        }

    @classmethod
    def from_config(cls, cfg: Mapping) -> Formula:
        """The family back from its saved configuration (``config``), as artifacts store it."""
        return cls(cfg["formula"], cfg["likelihood"], levels=cfg.get("levels"), prediction=cfg.get("prediction"))

    @classmethod
    def from_bambi(cls, model) -> Formula:
        """The same formula and likelihood as a ``bambi.Model`` (its variables must be the
        cohort's roles: ``time``, ``therapy``, ``patient`` and covariate names)."""
        family = getattr(getattr(model, "family", None), "name", None)
        formula = getattr(getattr(model, "formula", None), "main", None)
        if family is None or formula is None:
            raise TypeError(f"expected a bambi.Model, not {type(model).__name__}")
        return cls(formula, family)

    def __repr__(self) -> str:
        return f"Formula({self.formula!r}, likelihood={self.likelihood!r})"

    # ------------------------------------------------------------ the model
    def _columns(self, terms, intercept: bool, data: ModelData, get) -> tuple[list, list[str], list[float]]:
        """Design columns (symbolic, one value per observation), their names and scales."""
        schema = data.schema
        known = ["time", "therapy", *schema.covariates]
        blocks = {}

        def block(var):
            if var not in blocks:
                if var == "time":
                    blocks[var] = ([get("time")], ["time"], [schema.time_scale])
                elif var == "therapy":
                    on = get("on_therapy")
                    levels = list(schema.therapies[1:])
                    blocks[var] = (
                        [on[:, k] for k in range(len(levels))],
                        [f"therapy[{lv}]" for lv in levels],
                        [1.0] * len(levels),
                    )
                elif var in schema.covariates:
                    X, idx = get("X"), get("patient_idx")
                    cols = [j for j, c in enumerate(schema.design_columns) if c == var or c.startswith(f"{var}[")]
                    blocks[var] = (
                        [X[idx, j] for j in cols],
                        [schema.design_columns[j] for j in cols],
                        [1.0] * len(cols),
                    )
                else:
                    raise FamilyError(f"the formula's variable {var!r} is not one of the cohort's: {known}")
            return blocks[var]

        cols, names, scales = [], [], []
        if intercept:
            cols.append(pt.ones_like(get("time")))
            names.append("Intercept")
            scales.append(None)
        for term in terms:
            parts = [block(v) for v in term]
            combos = [([], [], 1.0)]
            for c, n, s in parts:
                combos = [
                    (a + [ci], b + [ni], sc * si) for a, b, sc in combos for ci, ni, si in zip(c, n, s, strict=True)
                ]
            for c, n, s in combos:
                col = c[0]
                for other in c[1:]:
                    col = col * other
                cols.append(col)
                names.append(":".join(n))
                scales.append(s)
        return cols, names, scales

    def _build(self, data: ModelData) -> pm.Model:
        schema = data.schema
        intercept, terms, g_intercept, g_terms, others = self._terms
        intercept = intercept and self.likelihood != "ordinal"  # the cut points hold it
        vars_used = {v for t in [*terms, *g_terms, *(t for _, ts in others.values() for t in ts)] for v in t}
        for factor in others:
            if factor not in schema.categorical:
                raise FamilyError(
                    f"the group term (... | {factor}) needs {factor!r} to be a categorical covariate of the cohort "
                    f"(categorical: {list(schema.categorical)}): its levels (the sites) get the random effects"
                )
        link = LIKELIHOODS[self.likelihood]
        sy = schema.outcome_sd if link == "identity" else 1.0
        ybar = schema.outcome_mean
        if link == "log":
            centre = float(np.log(max(ybar, 1e-3)))
        elif link == "logit":
            p = min(max(ybar, 1e-3), 1 - 1e-3)
            centre = float(np.log(p / (1 - p)))
        else:
            centre = ybar
        with pm.Model(coords=data.coords) as model:
            declared = {
                "patient_idx": pm.Data("patient_idx", data["patient_idx"], dims="obs"),
                "time": pm.Data("time", data["time"], dims="obs"),
            }
            if "therapy" in vars_used:
                declared["on_therapy"] = pm.Data("on_therapy", data["on_therapy"], dims=("obs", "therapy_effect"))
            if (vars_used | set(others)) & set(schema.covariates):
                declared["X"] = pm.Data("X", data["X"], dims=("patient", "covariate"))
            if link == "log":  # counts: log(time at risk) is an offset (0 without Cohort(at_risk=))
                declared["log_at_risk"] = pm.Data("log_at_risk", data["log_at_risk"], dims="obs")
            y = pm.Data("y_obs", data["y_obs"], dims="obs")
            get = declared.__getitem__

            cols, names, scales = self._columns(terms, intercept, data, get)
            eta = declared["log_at_risk"] if link == "log" else pt.zeros_like(declared["time"])
            if cols:
                model.add_coord("term", names)
                mu0 = np.array([centre if s is None else 0.0 for s in scales])
                sd0 = np.array([2.5 * sy if s is None else 2.5 * sy / s for s in scales])
                beta = pm.Normal("beta", mu=mu0, sigma=sd0, dims="term")
                eta = eta + pt.stack(cols, axis=1) @ beta
            gcols, gnames, gscales = self._columns(g_terms, g_intercept, data, get)
            b = _group_effects("patient", gnames, gscales, sy, model)
            eta = eta + (pt.stack(gcols, axis=1) * b[declared["patient_idx"]]).sum(axis=1)
            for factor, (f_intercept, f_terms) in others.items():
                fcols, fnames, fscales = self._columns(f_terms, f_intercept, data, get)
                taken = sorted({factor, f"{factor}_effect"} & set(model.coords))
                if taken:
                    raise FamilyError(f"the group term by {factor!r} needs the dim {taken[0]!r}, which the model uses")
                model.add_coord(factor, list(schema.categorical[factor]))
                effects = _group_effects(factor, fnames, fscales, sy, model)
                level = _levels(schema, factor, get("X"))[declared["patient_idx"]]  # each row's level
                eta = eta + (pt.stack(fcols, axis=1) * effects[level]).sum(axis=1)
            if self.likelihood == "gaussian":
                pm.Normal("y", mu=eta, sigma=pm.HalfNormal("sigma", sy), observed=y, dims="obs")
            elif self.likelihood == "t":
                nu = pm.Gamma("nu", alpha=2.0, beta=0.1)
                pm.StudentT("y", nu=nu, mu=eta, sigma=pm.HalfNormal("sigma", sy), observed=y, dims="obs")
            elif self.likelihood == "poisson":
                pm.Poisson("y", mu=pt.exp(eta), observed=y, dims="obs")
            elif self.likelihood == "negativebinomial":
                alpha = pm.Gamma("alpha", alpha=2.0, beta=0.2)
                pm.NegativeBinomial("y", mu=pt.exp(eta), alpha=alpha, observed=y, dims="obs")
            elif self.likelihood == "bernoulli":
                pm.Bernoulli("y", logit_p=eta, observed=y, dims="obs")
            else:
                k = self.levels - 1
                start = np.linspace(-2.0, 2.0, k) if k > 1 else np.zeros(1)
                cut = pm.Normal(
                    "cutpoints", mu=start, sigma=2.5, transform=pm.distributions.transforms.ordered, initval=start
                )
                pm.OrderedLogistic("y", eta=eta, cutpoints=cut, compute_p=False, observed=y, dims="obs")
        return model


def _group_effects(factor: str, names: list[str], scales: list, sy: float, model: pm.Model):
    """Each level's effects (level, effect) of the group term by ``factor``, with zero-avoiding
    Gamma(2) SDs (scaled like the effects they multiply), LKJ(2)-correlated when there are several.

    Patients' effects are non-centred offsets ``z`` ~ N(0, 1) times the SDs: the variables twins
    condition on, and the right form for patients with few rows. Any other factor's effects (a
    site's) are population parameters, centred (``{factor}_effects`` ~ N(0, SDs) itself): a site
    holds many patients' rows, so its effect is well determined by its data, where non-centred
    offsets leave a funnel at large SDs (measured: 65 divergences at ``site_sd`` on four sites of
    nine patients, none centred; Betancourt & Girolami 2015)."""
    scale = np.array([sy if s is None else sy / s for s in scales])
    model.add_coord(f"{factor}_effect", names)
    dims = (factor, f"{factor}_effect")
    z = pm.Normal("z", 0.0, 1.0, dims=dims) if factor == "patient" else None  # first: the variables' order
    prior = pm.Gamma.dist(alpha=2.0, beta=2.0 / scale, shape=len(names))
    if len(names) > 1:
        chol = lkj_cholesky(f"{factor}_chol", f"{factor}_effect", eta=2.0, sd_dist=prior, stds_name=f"{factor}_sd")
    else:
        sd = pm.Gamma(f"{factor}_sd", alpha=2.0, beta=2.0 / scale, dims=f"{factor}_effect")
    if z is None:  # a site's effects, centred
        if len(names) > 1:
            return pm.MvNormal(f"{factor}_effects", mu=pt.zeros(len(names)), chol=chol, dims=dims)
        return pm.Normal(f"{factor}_effects", 0.0, sd, dims=dims)
    b = z @ chol.T if len(names) > 1 else z * sd
    return pm.Deterministic(f"{factor}_effects", b, dims=dims)


def _levels(schema, factor: str, X):
    """Each patient's level of the categorical covariate ``factor`` (0 the reference), read back
    from its one-hot columns in the design matrix ``X``."""
    cols = [j for j, c in enumerate(schema.design_columns) if c.startswith(f"{factor}[")]
    if not cols:
        return pt.zeros(X.shape[0], dtype="int64")
    return pt.cast(pt.round(X[:, cols] @ np.arange(1.0, len(cols) + 1.0)), "int64")
