"""A site's side of a federated population fit: what it shares, and its tilted distribution.

A site (hospital) keeps its rows. It sends two things, both aggregates:

1. a :func:`schema_summary` of its table (counts, means and sums of squares of the outcome and
   of each numeric covariate, the levels it has seen, its longest time), from which the
   coordinator builds the one :class:`~bayestwin.data.cohort.Schema` every site fits with
   (:func:`shared_schema`: the same standardisation and data-scaled priors a pooled table would
   give);
2. each round, the mean and covariance of its *tilted distribution* over the population
   parameters phi (unconstrained, flattened as the twin programs' ``phi`` blocks): the site's
   own model of its rows, sampled by the engine's NUTS, with the population prior replaced by
   the EP cavity (:func:`tilted_model`, :func:`tilted_moments`).

The tilted target of site k of K, in the sampler's unconstrained space (Vehtari et al. 2020,
JMLR 21(17), section 3 on the prior): with p0 the population prior, p0g a Gaussian fitted to
its draws and g_-k the cavity (which includes p0g, so it is proper from the first round),

    log g_-k(phi) + log p(y_k, theta_k | phi) + (1/K) [log p0(phi) - log p0g(phi)].

The product of the K sites' true factors times p0g is then p0 ∏ p(y_k | phi): the pooled
posterior. The site model's own log density holds log p0 (with its Jacobian) once; a
``pm.Potential`` takes (1 - 1/K) of it away and adds the rest.

**Site effects** (a formula's ``(1 | site)``: each level of a categorical covariate has its own
effects u_j ~ p(u_j | site_sd)) are *local* parameters (Vehtari et al. 2020, sec. 4.1): level
j's effects touch only the rows of the site(s) holding level j. Site k's factor then depends on
its subset S_k of phi, the shared parameters and the effects of the levels its rows hold
(:class:`Share`), and EP works there (:func:`bayestwin.federated.ep.sweep`'s ``subsets``):
the site gets the cavity's marginal over S_k and returns moments over S_k only. The prior of
level j's effects, p(u_j | site_sd), belongs wholly to one site (its *owner*, the first site
holding level j), and p0g is block-diagonal (the shared parameters; each level's effects), so

    f_k = l_k(S_k) [p0s / p0g_shared]^(1/K) ∏_{j owned by k} p(u_j | site_sd) / p0g_j(u_j),

with p0s the prior of the shared parameters; the product over sites is again p0 / p0g times
the likelihood. In the site's model the effects of levels it does not hold are independent
N(0, 1) variables that nothing else touches (left out of its moments). The global Gaussian
covers every level's effects, so twins condition on it as on a pooled fit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pymc as pm
import pytensor.tensor as pt

from bayestwin.data.cohort import OUTCOME, THERAPY, TIME, Cohort, Schema
from bayestwin.data.nonmem import Events
from bayestwin.engine.compile import Block, unconstrained_draws
from bayestwin.engine.fit import FitConfig, sample_model
from bayestwin.federated.ep import Gaussian, SiteError
from bayestwin.review.convergence import diagnostics
from bayestwin.settings import quiet_pymc


# ------------------------------------------------------------------------- the shared schema
def _moments(x: np.ndarray) -> dict:
    """Count, mean and sum of squared deviations (combined exactly by :func:`_pool`)."""
    x = np.asarray(x, float)
    n = len(x)
    mean = float(x.mean()) if n else 0.0
    return {"n": n, "mean": mean, "m2": float(((x - mean) ** 2).sum()) if n else 0.0}


def _pool(parts: Sequence[dict]) -> tuple[int, float, float]:
    """(n, mean, population SD) of the union of samples summarised by :func:`_moments` (Chan et al.)."""
    n, mean, m2 = 0, 0.0, 0.0
    for p in parts:
        nb = p["n"]
        if nb == 0:
            continue
        delta = p["mean"] - mean
        total = n + nb
        mean += delta * nb / total
        m2 += p["m2"] + delta**2 * n * nb / total
        n = total
    return n, mean, float(np.sqrt(m2 / n)) if n else 0.0


def check_cohort(cohort, site: str):
    """The federated fit takes :class:`Cohort` tables (progression, formula and user models, and
    time-to-event tables: ``bt.read_survival`` makes a Cohort of at-risk intervals) and NONMEM
    event tables (``bt.read_nonmem``: the PK families)."""
    if type(cohort) is not Cohort and not isinstance(cohort, Events):
        raise TypeError(
            f"site {site!r}: a federated fit takes a bt.Cohort or bt.read_nonmem events of the site's rows, "
            f"not {type(cohort).__name__} (joint tables are not yet supported across sites)"
        )
    return cohort


class _EventsOnSchema(Events):
    """A site's NONMEM events read with the shared schema (its rows unchanged): the PK families
    scale their priors and covariates by ``schema``, which for events is otherwise computed from
    the site's own rows."""

    def __init__(self, events: Events, schema: Schema):
        self.__dict__.update(events.__dict__)
        self._shared = schema

    @property
    def schema(self) -> Schema:
        return self._shared


def schema_summary(cohort: Cohort, site: str = "this site") -> dict:
    """What a site shares so that every site fits with one schema: aggregates, no row.

    Counts, means and sums of squared deviations of the outcome and of each numeric covariate
    (over patients), the levels of each categorical covariate and the therapies seen, and the
    largest absolute time (the time scale of the default priors). A JSON-able dict.
    """
    check_cohort(cohort, site)
    schema, base, frame = cohort.schema, cohort.baseline, cohort.frame
    if isinstance(cohort, Events):  # NONMEM events: no therapies (the doses say it), levels are DV
        times, therapies = frame["TIME"].to_numpy(float), []
        outcome = frame.loc[frame["EVID"] == 0, "DV"].dropna().to_numpy(float)
    else:
        times, outcome = frame[TIME].to_numpy(float), frame[OUTCOME].to_numpy(float)
        therapies = sorted({str(x) for x in frame[THERAPY]}) if THERAPY in frame else list(schema.therapies)
    t = np.abs(times)
    out = {
        "therapies": therapies,
        "numeric": {c: _moments(base[c].to_numpy(float)) for c in schema.numeric},
        "categorical": {c: sorted({str(x) for x in base[c]}) for c in schema.categorical},
        "time_max": float(t.max()) if len(t) else 0.0,
        "outcome": _moments(outcome),
        "patients": int(cohort.n_patients),
    }
    if isinstance(cohort, Events):
        out["scales"] = _event_scales(cohort.doses()["AMT"].to_numpy(float), outcome, base, schema.numeric)
    return out


def _event_scales(amt: np.ndarray, levels: np.ndarray, base, numeric) -> dict:
    """What the PK family's data-centred priors read from a table (:meth:`Pk.default_priors`), as
    aggregates: the log dose amounts' moments, the largest level, and each numeric covariate's
    log moments over subjects (``base``: one row per subject; its geometric mean is the typical
    subject's)."""

    def logs(x):
        x = np.asarray(x, float)
        return _moments(np.log(x[x > 0]))

    return {
        "log_amt": logs(amt),
        "dv_max": float(levels.max()) if len(levels) else 0.0,
        "log_covariates": {c: logs(base[c].to_numpy(float)) for c in numeric},
    }


def shared_scales(summaries: Mapping[str, dict]) -> dict | None:
    """The pooled table's scales from each site's ``"scales"`` (NONMEM events; ``None`` for
    Cohort tables): geometric mean dose, largest level, each covariate's geometric mean."""
    parts = [s["scales"] for s in summaries.values() if "scales" in s]
    if not parts:
        return None
    if len(parts) < len(summaries):
        raise SiteError(
            "some sites sent NONMEM events and others a Cohort: every site must hold the same kind of table"
        )

    def gm(ms):
        n, mean, _ = _pool(ms)
        return float(np.exp(mean)) if n else 0.0

    return {
        "amt": gm([p["log_amt"] for p in parts]),
        "dv_max": max(p["dv_max"] for p in parts),
        "covariates": {c: gm([p["log_covariates"][c] for p in parts]) for c in parts[0]["log_covariates"]},
    }


def check_summary(summary, site: str) -> dict:
    """A site's :func:`schema_summary` as received: its fields, whole non-negative counts, finite
    means and spreads, lists of levels; else :class:`SiteError` naming the site and field."""
    fields = {"therapies", "numeric", "categorical", "time_max", "outcome", "patients"}
    if not isinstance(summary, Mapping) or set(summary) - {"scales"} != fields:
        got = sorted(summary) if isinstance(summary, Mapping) else type(summary).__name__
        raise SiteError(f"site {site!r} sent a schema summary with fields {got}, not {sorted(fields)}")

    def moments(m, what):
        ok = isinstance(m, Mapping) and set(m) == {"n", "mean", "m2"}
        ok = ok and isinstance(m["n"], int) and not isinstance(m["n"], bool) and m["n"] >= 0
        ok = ok and all(isinstance(m[k], (int, float)) and np.isfinite(m[k]) for k in ("mean", "m2")) and m["m2"] >= 0
        if not ok:
            raise SiteError(f"site {site!r} sent {what} that is not a count, a finite mean and a sum of squares >= 0")

    moments(summary["outcome"], "an outcome summary")
    if "scales" in summary:  # NONMEM events: what the PK priors are centred on
        sc = summary["scales"]
        ok = isinstance(sc, Mapping) and set(sc) == {"log_amt", "dv_max", "log_covariates"}
        ok = ok and isinstance(sc["log_covariates"], Mapping)
        ok = ok and sorted(sc["log_covariates"]) == sorted(summary["numeric"])
        ok = ok and isinstance(sc["dv_max"], (int, float)) and np.isfinite(sc["dv_max"])
        if not ok:
            raise SiteError(
                f"site {site!r} sent scales that are not log dose moments, a largest level and covariate moments"
            )
        moments(sc["log_amt"], "a summary of the log doses")
        for c, m in sc["log_covariates"].items():
            moments(m, f"a summary of log {c!r}")
    if not isinstance(summary["numeric"], Mapping) or not isinstance(summary["categorical"], Mapping):
        raise SiteError(f"site {site!r} sent covariates that are not name -> summary mappings")
    for c, m in summary["numeric"].items():
        moments(m, f"a summary of {c!r}")
    for c, levels in {"therapies": summary["therapies"], **summary["categorical"]}.items():
        if not isinstance(levels, (list, tuple)) or not all(isinstance(x, str) for x in levels):
            raise SiteError(f"site {site!r} sent levels of {c!r} that are not a list of labels")
    t = summary["time_max"]
    if not isinstance(t, (int, float)) or not np.isfinite(t) or t < 0:
        raise SiteError(f"site {site!r} sent a largest time {t!r}, not a finite number >= 0")
    n = summary["patients"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SiteError(f"site {site!r} sent patients={n!r}: a site needs at least one patient")
    return summary


def shared_schema(summaries: Mapping[str, dict], therapies: Sequence[str] | None = None) -> Schema:
    """The schema of the pooled table, from each site's :func:`schema_summary`.

    Numeric covariates are standardised by the pooled mean and SD, levels are the sorted union
    (a site may lack one), the therapies are ``therapies`` (reference first) or the sorted union,
    the time scale the largest, the outcome's mean and SD pooled: what ``Cohort`` derives from
    all rows together. Sites that disagree on the covariates are refused by name.
    """
    if not summaries:
        raise ValueError("no sites: a federated fit needs at least one site's summary")
    names = [str(k) for k in summaries]
    summaries = {str(k): check_summary(s, str(k)) for k, s in summaries.items()}
    first = summaries[names[0]]
    for name in names[1:]:
        s = summaries[name]
        for kind in ("numeric", "categorical"):
            if sorted(s[kind]) != sorted(first[kind]):
                raise SiteError(
                    f"site {name!r} has {kind} covariates {sorted(s[kind])}, site {names[0]!r} has "
                    f"{sorted(first[kind])}: every site must read the same columns the same way"
                )
    numeric = {}
    for c in first["numeric"]:
        n, mean, sd = _pool([summaries[k]["numeric"][c] for k in names])
        numeric[c] = (mean, sd if n > 1 and sd > 0 else 1.0)
    categorical = {
        c: tuple(sorted(set().union(*(summaries[k]["categorical"][c] for k in names)))) for c in first["categorical"]
    }
    seen = sorted(set().union(*(summaries[k]["therapies"] for k in names)))
    if therapies is None:
        therapies = seen
    else:
        therapies = [str(t) for t in therapies]
        unknown = sorted(set(seen) - set(therapies))
        if unknown:
            raise SiteError(f"therapy {unknown[0]!r} is given at a site but not in therapies={therapies}")
    n, mean, sd = _pool([summaries[k]["outcome"] for k in names])
    t_max = max(summaries[k]["time_max"] for k in names)
    return Schema(
        therapies=tuple(therapies),
        numeric=numeric,
        categorical=categorical,
        time_scale=t_max if t_max > 0 else 1.0,
        outcome_mean=mean if n else 0.0,
        outcome_sd=sd if n > 1 and sd > 0 else 1.0,
    )


def on_schema(cohort: Cohort, schema: Schema, site: str, *, subject: str | None = None, against="the shared schema"):
    """The site's cohort read with the shared ``schema`` (its rows unchanged). ``subject`` and
    ``against`` name the cohort and the schema in errors (default: ``site 'name'``, the shared
    schema; a private release: the cohort, the public schema)."""
    check_cohort(cohort, site)
    subject = f"site {site!r}" if subject is None else subject
    therapies = set(cohort.frame[THERAPY].astype(str)) if THERAPY in cohort.frame else set()
    if therapies - set(schema.therapies):
        raise SiteError(f"{subject} has therapy {sorted(therapies - set(schema.therapies))[0]!r}, not in {against}")
    for c, levels in schema.categorical.items():
        extra = set(cohort.baseline[c].astype(str)) - set(levels)
        if extra:
            raise SiteError(f"{subject} has level {sorted(extra)[0]!r} of {c!r}, not in {against}")
    if isinstance(cohort, Events):
        return _EventsOnSchema(cohort, schema)
    out = object.__new__(Cohort)
    out.__dict__.update(cohort.__dict__)
    out.schema = schema
    return out


# ------------------------------------------------------------------- the tilted distribution
def _flat(model: pm.Model, blocks: Sequence[Block]):
    """The model's unconstrained population values as one flat vector, in the blocks' order."""
    parts = []
    for b in blocks:
        value = model.rvs_to_values[model[b.rv]]
        parts.append(pt.flatten(value))
    return pt.concatenate(parts)


class Effects(NamedTuple):
    """Where one site factor's level effects sit in the flat phi: the block of ``rv`` (shape
    (levels, width)) starts at ``start``; level j's ``width`` effects follow each other."""

    factor: str  # the categorical covariate, e.g. "site"
    rv: str  # its effects' variable, e.g. "site_effects"
    start: int
    levels: tuple[str, ...]
    width: int

    def indices(self, level: str) -> np.ndarray:
        """The coordinates of ``level``'s effects in the flat phi."""
        j = self.levels.index(level)
        return self.start + j * self.width + np.arange(self.width)


def _local(effects: Sequence[Effects]) -> np.ndarray:
    """The coordinates of every level's effects in the flat phi."""
    return np.concatenate([e.indices(lv) for e in effects for lv in e.levels])


def local_effects(family, schema: Schema, blocks: Sequence[Block]) -> tuple[Effects, ...]:
    """The family's effects by a site factor (its ``grouping_factors``, e.g. a formula's
    ``(1 | site)``) as local parameters of phi; empty when it has none."""
    starts, at = {}, 0
    for b in blocks:
        starts[b.rv] = (at, b.shape)
        at += b.size
    out = []
    for factor in getattr(family, "grouping_factors", ()):
        rv = f"{factor}_effects"
        levels = tuple(schema.categorical.get(factor, ()))
        if rv not in starts or not levels or starts[rv][1][0] != len(levels):
            raise ValueError(f"the effects by {factor!r} ({rv}) are not a (level, effect) block of the population")
        start, shape = starts[rv]
        out.append(Effects(factor, rv, start, levels, int(np.prod(shape[1:], dtype=int))))
    return tuple(out)


class Share(NamedTuple):
    """One site's part of phi when the population has local parameters (:class:`Effects`):
    the levels its rows hold (``seen``), the levels whose prior it carries (``own``), and its
    subset S_k of phi (the shared coordinates and its seen levels' effects, sorted)."""

    effects: tuple[Effects, ...]
    seen: dict  # factor -> levels its rows hold
    own: dict  # factor -> levels whose prior p(u_j | SDs) is in its factor
    subset: np.ndarray

    @classmethod
    def of(cls, effects: tuple[Effects, ...], d: int, seen: Mapping, own: Mapping) -> Share:
        """The share of a site whose rows hold the levels ``seen`` and that owns ``own`` (each
        factor -> levels), in a phi of ``d`` coordinates."""
        keep = np.setdiff1d(np.arange(d), _local(effects))
        held = [e.indices(lv) for e in effects for lv in e.levels if lv in seen[e.factor]]
        subset = np.sort(np.concatenate([keep, *held])).astype(int)
        return cls(effects, {f: tuple(v) for f, v in seen.items()}, {f: tuple(v) for f, v in own.items()}, subset)

    def shared(self, d: int) -> np.ndarray:
        """phi's shared coordinates (no level's effect)."""
        return np.setdiff1d(np.arange(d), _local(self.effects))

    def owned(self) -> np.ndarray:
        """The coordinates of the effects of the levels this site owns."""
        parts = [e.indices(lv) for e in self.effects for lv in self.own[e.factor]]
        return np.sort(np.concatenate(parts)).astype(int) if parts else np.zeros(0, int)


def owners(effects: tuple[Effects, ...], seen: Mapping[str, Mapping]) -> dict:
    """Each site's owned levels: level j's prior goes to the first site (in ``seen``'s order)
    whose rows hold it. ``seen``: site -> factor -> levels. Returns site -> factor -> levels."""
    out = {k: {e.factor: [] for e in effects} for k in seen}
    for e in effects:
        for lv in e.levels:
            holder = next((k for k, s in seen.items() if lv in s[e.factor]), None)
            if holder is not None:
                out[holder][e.factor].append(lv)
    return out


def prior_gaussian(
    model: pm.Model, blocks: Sequence[Block], *, draws: int = 4000, seed: int = 0, effects: tuple[Effects, ...] = ()
) -> Gaussian:
    """A Gaussian fitted to the population prior's draws in the unconstrained space of ``blocks``.

    The EP approximation starts from it; the sites correct for the difference between it and
    the true prior (see the module docstring), so it need only be proper and roughly right.
    With local ``effects`` it is block-diagonal: the shared coordinates, and each level's effects.
    """
    names = sorted({b.rv for b in blocks})
    with model, quiet_pymc():
        prior = pm.sample_prior_predictive(draws=draws, var_names=names, random_seed=seed)
    x = unconstrained_draws(model, prior.prior.to_dataset(), tuple(blocks))
    if not np.isfinite(x).all():
        raise ValueError("the population prior gave draws that are not finite in the unconstrained space")
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    if effects:  # block-diagonal: the shared coordinates, and each level's effects on their own
        groups = [e.indices(lv) for e in effects for lv in e.levels]
        groups.append(np.setdiff1d(np.arange(len(cov)), _local(effects)))
        mask = np.zeros(cov.shape, bool)
        for g in groups:
            mask[np.ix_(g, g)] = True
        cov = np.where(mask, cov, 0.0)
    q = np.linalg.inv(cov)
    q = 0.5 * (q + q.T)
    return Gaussian(q, q @ x.mean(0))


def _gauss_logpdf(phi, g: Gaussian):
    """log N(phi; g) up to a constant (natural parameters)."""
    q, r = pt.as_tensor(np.asarray(g.precision, float)), pt.as_tensor(np.asarray(g.shift, float))
    return -0.5 * phi @ q @ phi + r @ phi


def tilted_model(
    model: pm.Model,
    population: Sequence[str],
    blocks: Sequence[Block],
    cavity: Gaussian,
    prior: Gaussian,
    n_sites: int,
    share: Share | None = None,
) -> pm.Model:
    """``model`` (the site's fit model) turned into its tilted distribution (module docstring),
    by one ``pm.Potential``. ``population``: the free population variables; every one must be
    among ``blocks`` (the twin programs' phi), so that the tilted space is the twins' space.
    ``share``: the site's part of phi when it has local parameters; ``cavity`` is then over
    ``share.subset``."""
    names = {b.rv for b in blocks}
    if set(population) != names:
        raise ValueError(f"the fit's population variables {sorted(population)} are not the twins' {sorted(names)}")
    if share is not None:
        return _tilted_local(model, names, blocks, cavity, prior, n_sites, share)
    with model:
        phi = _flat(model, blocks)
        log_prior = model.logp(vars=[model[n] for n in sorted(names)], jacobian=True)
        pm.Potential(
            "ep_tilt",
            -(1.0 - 1.0 / n_sites) * log_prior - _gauss_logpdf(phi, prior) / n_sites + _gauss_logpdf(phi, cavity),
        )
    return model


def _tilted_local(model, names, blocks, cavity: Gaussian, prior: Gaussian, n_sites: int, share: Share) -> pm.Model:
    """The tilted distribution of a site with local parameters (module docstring): the shared
    prior's 1/K share, the owned levels' priors whole, the other levels' priors taken away (the
    levels it does not hold: independent N(0, 1) instead), the block-diagonal p0g likewise, and
    the cavity over the site's subset."""
    d = len(prior.shift)
    q, r = np.asarray(prior.precision, float), np.asarray(prior.shift, float)
    common, owned = share.shared(d), share.owned()

    def gauss(x, idx_q, idx):
        g = Gaussian(q[np.ix_(idx_q, idx_q)], r[idx_q])
        return _gauss_logpdf(x[idx], g)

    with model:
        phi = _flat(model, blocks)
        rvs = {e.rv for e in share.effects}
        log_prior = model.logp(vars=[model[n] for n in sorted(names - rvs)], jacobian=True)
        term = -(1.0 - 1.0 / n_sites) * log_prior
        for e in share.effects:
            rv = model[e.rv]
            lp = model.logp(vars=[rv], jacobian=True, sum=False)[0]
            lp = lp.reshape((len(e.levels), -1)).sum(axis=1)  # per level
            u = model.rvs_to_values[rv].reshape((len(e.levels), -1))
            other = np.array([lv not in share.own[e.factor] for lv in e.levels], float)
            unseen = np.array([lv not in share.seen[e.factor] for lv in e.levels], float)
            term = term - (other * lp).sum() - 0.5 * (unseen * pt.sqr(u).sum(axis=1)).sum()
        term = term - gauss(phi, common, common) / n_sites
        if len(owned):
            term = term - gauss(phi, owned, owned)
        pm.Potential("ep_tilt", term + _gauss_logpdf(phi[share.subset], cavity))
    return model


class TiltedMoments(NamedTuple):
    """What a site returns each round: the tilted moments and how well they were estimated."""

    mean: np.ndarray  # (d,)
    cov: np.ndarray  # (d, d)
    draws: int  # the smallest bulk ESS over the coordinates (the moments' effective sample size)
    diagnostics: dict  # max R-hat, min ESS, divergences, E-BFMI of the site's NUTS run

    def to_message(self) -> dict:
        """The message as it crosses the wire (lists of numbers): mean, covariance, draws, diagnostics."""
        return {
            "mean": self.mean.tolist(),
            "cov": self.cov.tolist(),
            "draws": int(self.draws),
            "diagnostics": self.diagnostics,
        }

    def nbytes(self) -> int:
        return len(json.dumps(self.to_message()).encode())


def tilted_moments(
    family,
    cohort: Cohort,
    blocks: Sequence[Block],
    cavity: Gaussian,
    prior: Gaussian,
    n_sites: int,
    cfg: FitConfig,
    *,
    seed: int = 0,
    share: Share | None = None,
) -> TiltedMoments:
    """Sample a site's tilted distribution by the engine's NUTS on its own rows; return its
    moments over the unconstrained population parameters (never a row or a patient's draw);
    with local parameters (``share``), over the site's subset of them only."""
    design = family.design(cohort.frame, cohort.baseline, cohort.schema)
    model, hidden = family.fit_model(design, cohort.schema)
    population = [rv.name for rv in model.free_RVs if rv.name not in (*family.patient_vars, *hidden)]
    model = tilted_model(model, population, blocks, cavity, prior, n_sites, share)
    idata = sample_model(model, population, cfg, seed=seed, drop=hidden)
    post = idata.posterior.to_dataset()
    x = unconstrained_draws(model, post, tuple(blocks))
    if share is not None:
        x = x[:, share.subset]
    table = diagnostics(post[population], idata.sample_stats.to_dataset())
    chains, n = post.sizes["chain"], post.sizes["draw"]
    from bayestwin.review import batched

    ess = batched.diagnose(np.moveaxis(x.reshape(chains, n, -1), -1, 0))[1]
    report = {
        "rhat_max": float(np.nanmax(table["rhat"])),
        "ess_bulk_min": float(np.nanmin(table["ess_bulk"])),
        "ess_tail_min": float(np.nanmin(table["ess_tail"])),
        "divergences": int(table.attrs["divergences"]),
        "bfmi_min": float(table.attrs["bfmi_min"]),
        "table": {k: {c: float(v) for c, v in row.items()} for k, row in table.iterrows()},
    }
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    return TiltedMoments(x.mean(0), 0.5 * (cov + cov.T), int(np.floor(np.nanmin(ess))), report)


# ------------------------------------------------------------------------------ a site's side
class Site:
    """One site's side of a federated fit: its rows stay here; it answers the coordinator.

    Every exchange is a message ``(kind, body)`` of plain JSON-able data, answered by
    :meth:`answer`: the same object serves the local path (the coordinator calls it in the same
    process) and a federation framework (a Flower ``ClientApp`` calls it on the site's machine,
    :mod:`bayestwin.federated.flower`). Three kinds:

    - ``"schema summary"`` (empty body): the site's :func:`schema_summary`;
    - ``"shared schema"``: the schema every site fits with, the family's config, the population
      blocks (phi), the EP prior, the number of sites and the NUTS settings, and, for a family
      with effects by a site factor, the levels whose prior the site owns (``"own"``); the
      site reads its rows with them and answers ``"ready"`` with its table's column names (so
      that the coordinator's population reads new patients' tables the same way);
    - ``"cavity"``: its cavity (precision, shift; with site effects, the marginal over the
      site's subset of phi, :class:`Share`), the sweep and the seed; it answers its
      :class:`TiltedMoments` message.

    A message it cannot use raises :class:`SiteError` naming the site and the field.
    """

    #: the kinds of message a site answers
    KINDS = ("schema summary", "shared schema", "cavity")

    def __init__(self, name: str, cohort: Cohort, *, family=None):
        self.name = str(name)
        self.cohort = check_cohort(cohort, self.name)
        self.family = family  # the local path may hand the family object over (else: from its config)
        self._fit = None  # (family, cohort on the shared schema, blocks, prior, sites, cfg, share) once agreed

    def __repr__(self) -> str:
        return f"Site({self.name!r}, {self.cohort.n_patients} patients; its rows stay here)"

    @property
    def agreed(self) -> bool:
        """Whether the site has read its rows with a shared schema (and can answer a cavity)."""
        return self._fit is not None

    def answer(self, kind: str, body: Mapping) -> dict:
        """The site's reply to one message from the coordinator (module docstring)."""
        if kind == "schema summary":
            return schema_summary(self.cohort, self.name)
        if kind == "shared schema":
            return self._agree(body)
        if kind == "cavity":
            return self._tilted(body)
        raise SiteError(f"site {self.name!r} got a message of kind {kind!r}, not one of {list(self.KINDS)}")

    def _agree(self, body: Mapping) -> dict:
        from bayestwin.families import from_config

        fields = {"schema", "family", "blocks", "prior", "sites", "sampler"}
        if not isinstance(body, Mapping) or set(body) - {"own"} != fields:
            got = sorted(body) if isinstance(body, Mapping) else type(body).__name__
            raise SiteError(f"site {self.name!r} got a shared schema with fields {got}, not {sorted(fields)}")
        try:
            schema = Schema.from_dict(body["schema"])
            same = self.family is not None and self.family.config() == body["family"]
            family = self.family if same else from_config(body["family"])
            blocks = tuple(Block(str(n), str(rv), tuple(int(s) for s in shape)) for n, rv, shape in body["blocks"])
            d = sum(b.size for b in blocks)
            prior = Gaussian(np.asarray(body["prior"]["precision"], float), np.asarray(body["prior"]["shift"], float))
            sampler = dict(body["sampler"])
            cfg = FitConfig.for_family(family, extend=0, **sampler)
            cfg.check()
        except SiteError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever is malformed, the site says which message
            why = f"{type(err).__name__}: {err}"
            raise SiteError(f"site {self.name!r} cannot use the shared schema it got ({why})") from None
        n_sites = body["sites"]
        if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
            raise SiteError(f"site {self.name!r} got sites={n_sites!r}, not a whole number >= 1")
        if prior.precision.shape != (d, d) or prior.shift.shape != (d,) or not np.isfinite(prior.precision).all():
            raise SiteError(f"site {self.name!r} got a prior that is not a finite Gaussian over the {d} blocks' values")
        cohort = on_schema(self.cohort, schema, self.name)
        share = self._share(family, schema, blocks, cohort, d, body.get("own"))
        self._fit = (family, cohort, blocks, prior, n_sites, cfg, share)
        cols = self.cohort.columns  # None for NONMEM events: their column names are fixed
        if cols is None:
            return {"columns": None}
        return {"columns": {f: (list(v) if isinstance(v, tuple) else v) for f, v in cols.__dict__.items()}}

    def _share(self, family, schema, blocks, cohort, d: int, own) -> Share | None:
        """The site's part of phi (:class:`Share`) when the family has effects by a site factor:
        the levels its rows hold, and the levels the coordinator gave it to own (``"own"``,
        which must be among them); ``None`` without such effects (then no ``"own"`` field)."""
        try:
            effects = local_effects(family, schema, blocks)
        except ValueError as err:
            raise SiteError(f"site {self.name!r} cannot use the shared schema it got ({err})") from None
        if not effects:
            if own is not None:
                raise SiteError(f"site {self.name!r} got levels to own, but {family!r} has no effects by a site factor")
            return None
        factors = [e.factor for e in effects]
        if not isinstance(own, Mapping) or sorted(own) != sorted(factors):
            raise SiteError(f"site {self.name!r} got own={own!r}, not the levels it owns of each of {factors}")
        seen = {e.factor: sorted({str(x) for x in cohort.baseline[e.factor]}) for e in effects}
        for f, levels in own.items():
            if not isinstance(levels, (list, tuple)) or not set(levels) <= set(seen[f]):
                raise SiteError(
                    f"site {self.name!r} was given levels {levels!r} of {f!r} to own; its rows hold {seen[f]}"
                )
        return Share.of(effects, d, seen, own)

    def _tilted(self, body: Mapping) -> dict:
        if not self.agreed:
            raise SiteError(f"site {self.name!r} got a cavity before the shared schema")
        if not isinstance(body, Mapping) or set(body) != {"precision", "shift", "seed"}:
            got = sorted(body) if isinstance(body, Mapping) else type(body).__name__
            raise SiteError(f"site {self.name!r} got a cavity with fields {got}, not ['precision', 'seed', 'shift']")
        family, cohort, blocks, prior, n_sites, cfg, share = self._fit
        d = len(prior.shift) if share is None else len(share.subset)
        cav = Gaussian(np.asarray(body["precision"], float), np.asarray(body["shift"], float))
        if cav.precision.shape != (d, d) or cav.shift.shape != (d,):
            raise SiteError(f"site {self.name!r} got a cavity of shapes {cav.precision.shape} and {cav.shift.shape}")
        seed = body["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise SiteError(f"site {self.name!r} got seed={seed!r}, not a whole number >= 0")
        got = tilted_moments(family, cohort, blocks, cav, prior, n_sites, cfg, seed=seed, share=share)
        return got.to_message()
