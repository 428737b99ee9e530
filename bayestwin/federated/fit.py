"""A federated population fit: sites keep their rows; a coordinator runs expectation propagation.

:func:`federated_fit` is the local (one-process) path: each site's work runs here in turn, and
everything the sites and the coordinator exchange goes through a :class:`Ledger` that records
each message (who sent it, what it holds, its size), so that a reviewer can check that no row
or pseudonym left a site. The result is a :class:`~bayestwin.population.Population` whose
population posterior is EP's Gaussian in the twins' unconstrained space, the same form a pooled
fit's twins condition on (:attr:`Population.approx`), so twins are conditioned exactly as from
a pooled fit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import xarray as xr

from bayestwin.data.cohort import Cohort, Columns
from bayestwin.engine import condition as cond
from bayestwin.engine.compile import compile_twin, constrained_draws
from bayestwin.engine.fit import FitConfig
from bayestwin.errors import require_whole
from bayestwin.families import get_family
from bayestwin.federated import ep
from bayestwin.federated.site import (
    Share,
    Site,
    local_effects,
    owners,
    prior_gaussian,
    shared_scales,
    shared_schema,
)
from bayestwin.review.convergence import Thresholds, Verdict


@dataclass
class Ledger:
    """Every message between the coordinator and the sites, in order: what crossed the wire."""

    messages: list[dict] = field(default_factory=list)

    def record(self, round_: int, site: str, direction: str, kind: str, payload: dict) -> dict:
        """Log one message (its JSON form is what would be sent) and return the payload."""
        body = json.dumps(payload, sort_keys=True)
        self.messages.append(
            {
                "round": round_,
                "site": site,
                "direction": direction,
                "kind": kind,
                "bytes": len(body.encode()),
                "body": body,
            }
        )
        return payload

    def table(self) -> pd.DataFrame:
        """One row per message: round, site, direction (``to site``/``from site``), kind, bytes."""
        cols = ["round", "site", "direction", "kind", "bytes"]
        return pd.DataFrame([{k: m[k] for k in cols} for m in self.messages], columns=cols)

    @property
    def nbytes(self) -> int:
        """The bytes of every message's JSON body, in total (what the sites and coordinator sent)."""
        return sum(m["bytes"] for m in self.messages)


def _with_priors(family, schema, scales: dict):
    """``family`` with its data-centred priors fixed from the pooled aggregates (each site would
    centre them on its own rows): the model every site fits and the population keeps. A prior
    the user gave stays."""
    from bayestwin.families import from_config

    if not callable(getattr(family, "federated_priors", None)):
        raise ValueError(
            f"{family!r} does not fit NONMEM events across sites: its default priors are centred on "
            "each table's own scales (the PK family fixes them from the sites' aggregates)"
        )
    fixed = family.federated_priors(schema, scales)
    config = family.config()
    config["priors"] = {k: v.to_dict() for k, v in fixed.items()} | config["priors"]
    return from_config(config)


def _columns(d) -> Columns | None:
    """The sites' column names as the population keeps them (a :class:`Columns`; ``None`` for
    NONMEM events, whose names are fixed)."""
    if d is None:
        return None
    try:
        return Columns(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except (AttributeError, TypeError) as err:
        raise ep.SiteError(f"the sites sent column names that are not a table's columns ({err})") from None


def _gaussian_message(g: ep.Gaussian) -> dict:
    return {"precision": np.asarray(g.precision).tolist(), "shift": np.asarray(g.shift).tolist()}


class Coordinator:
    """The coordinator of a federated fit: the shared schema, EP's state, and the sweeps.

    Its state (the site factors, the global approximation, the history) changes only when a
    whole sweep has come back: a site that fails or drops out mid-sweep raises a
    :class:`~bayestwin.federated.ep.SiteError` naming it, and the coordinator keeps the state of
    the last complete sweep (call :meth:`run` again to go on).

    ``sites`` maps each site's name to its :class:`Cohort` or NONMEM events (the local path:
    each site's work runs in this process, by a :class:`~bayestwin.federated.site.Site`) or to any object with the
    site's ``answer(kind, body) -> dict`` (a site on another machine: the Flower path,
    :mod:`bayestwin.federated.flower`, answers through Flower messages). Every exchange goes
    through :meth:`ask`, which logs it in the :class:`Ledger`.
    """

    def __init__(
        self,
        sites: Mapping[str, Cohort],
        family="progression",
        *,
        therapies=None,
        draws: int = 1000,
        tune: int = 1000,
        chains: int = 4,
        target_accept: float = 0.9,
        seed: int = 0,
        ledger: Ledger | None = None,
    ):
        if not isinstance(sites, Mapping) or not sites:
            raise ValueError("sites must be a non-empty mapping of site name -> that site's bt.Cohort")
        self.names = [str(k) for k in sites]
        if len(set(self.names)) < len(self.names):
            raise ValueError(f"site names must be distinct, not {self.names}")
        self.family = get_family(family)
        self._sites = {
            str(k): s if callable(getattr(s, "answer", None)) else Site(str(k), s, family=self.family)
            for k, s in sites.items()
        }
        self.cfg = FitConfig.for_family(
            self.family, draws=draws, tune=tune, chains=chains, target_accept=target_accept, extend=0
        )
        self.cfg.check()
        self.ledger = Ledger() if ledger is None else ledger
        summaries = self._ask_all("schema summary", dict.fromkeys(self.names, {}), 0)
        self.schema = shared_schema(summaries, therapies)
        scales = shared_scales(summaries)
        if (scales is not None) != (self.family.table == "events"):  # the sites' tables against the family's
            held = "NONMEM events (bt.read_nonmem)" if scales is not None else "Cohort tables"
            raise ValueError(f"{self.family!r} does not fit the sites' tables: they hold {held}")
        if scales is not None:  # NONMEM events: the PK priors centred once, from every site's aggregates
            self.family = _with_priors(self.family, self.schema, scales)  # sent to the sites with the schema
        # what each site reported of its size (counts only): the population's patients and rows
        self.sizes = {
            "patients": {k: int(m["patients"]) for k, m in summaries.items()},
            "observations": {k: int(m["outcome"]["n"]) for k, m in summaries.items()},
        }
        self.program = compile_twin(self.family, self.schema, cond.padded_length(1))
        # effects by a site factor ((1 | site)) are local parameters: each site's factor lives on
        # the shared coordinates and the levels its rows hold (bayestwin.federated.site)
        effects = local_effects(self.family, self.schema, self.program.phi)
        self.prior = prior_gaussian(self.program.model, self.program.phi, seed=seed, effects=effects)
        d = len(self.prior.shift)
        self.subsets = own = None
        if effects:
            seen = {k: {e.factor: set(summaries[k]["categorical"][e.factor]) for e in effects} for k in self.names}
            own = owners(effects, seen)
            self.subsets = [Share.of(effects, d, seen[k], own[k]).subset for k in self.names]
        agreed = {
            "schema": self.schema.to_dict(),
            "family": self.family.config(),
            "blocks": [[b.name, b.rv, list(b.shape)] for b in self.program.phi],
            "prior": _gaussian_message(self.prior),
            "sites": len(self.names),
            "sampler": {k: getattr(self.cfg, k) for k in ("draws", "tune", "chains", "target_accept")},
        }
        bodies = {k: agreed if own is None else agreed | {"own": own[k]} for k in self.names}
        columns = self._ask_all("shared schema", bodies, 0)
        first = columns[self.names[0]]
        for k, c in columns.items():
            if not isinstance(c, Mapping) or c.get("columns") != first.get("columns"):
                raise ep.SiteError(
                    f"site {k!r} reads its table with columns {c.get('columns') if isinstance(c, Mapping) else c!r}, "
                    f"site {self.names[0]!r} with {first.get('columns')}: every site must name its columns the same"
                )
        self.columns = _columns(first["columns"])
        self.seed = seed
        self.sites = tuple(ep.Gaussian.flat(len(self.prior.shift)) for _ in self.names)
        self.approx = self._previous = self.prior
        self.tol = self.damping = None
        self.history: list[dict] = []
        self.reports: dict[str, dict] = {}

    #: the kind of each answer, by the kind of request
    ANSWERS = {"schema summary": "schema summary", "shared schema": "ready", "cavity": "tilted moments"}

    def ask(self, site: str, kind: str, body: dict, sweep: int) -> dict:
        """Send ``site`` one message and return its answer, both logged in the ledger (an empty
        request, such as the first ``"schema summary"``, carries nothing and is not logged)."""
        if body:
            self.ledger.record(sweep, site, "to site", kind, body)
        reply = self._sites[site].answer(kind, body)
        return self.ledger.record(sweep, site, "from site", self.ANSWERS[kind], reply)

    def _ask_all(self, kind: str, bodies: Mapping[str, dict], sweep: int, failed=None) -> dict:
        """Send each site its message of ``kind`` and return each site's answer, all logged.
        Sites whose handles can answer all at once (``answer_all``: Flower) get their messages at
        the same time and work in parallel; otherwise one after the other. A site's error is
        raised (the first in the sites' order), through ``failed(site, error)`` when given."""

        def fail(site, err):
            if failed is not None:
                failed(site, err)  # raises the error it makes of err
            raise err

        handles = [self._sites[n] for n in self.names]
        together = getattr(type(handles[0]), "answer_all", None)
        replies = {}
        if together is not None and all(type(h) is type(handles[0]) for h in handles):
            for name in self.names:
                if bodies[name]:
                    self.ledger.record(sweep, name, "to site", kind, bodies[name])
            answers = together(handles, kind, [bodies[n] for n in self.names])
            for name, reply in zip(self.names, answers, strict=True):
                if isinstance(reply, Exception):
                    fail(name, reply)
                replies[name] = self.ledger.record(sweep, name, "from site", self.ANSWERS[kind], reply)
            return replies
        for name in self.names:
            try:
                replies[name] = self.ask(name, kind, bodies[name], sweep)
            except Exception as err:  # noqa: BLE001 - a site that fails or drops out is named
                fail(name, err)
        return replies

    def _ask_sweep(self, sweep: int) -> dict:
        """Send every site its cavity (the sweep's approximation without the site's factor, as
        :func:`~bayestwin.federated.ep.sweep` computes it) and return each site's answer
        (:meth:`_ask_all`). A site that fails or does not answer raises :class:`SiteError` naming
        it (the first in the sites' order)."""
        approx = ep.product([self.prior, *self.sites])
        bodies = {}
        for k, (name, old) in enumerate(zip(self.names, self.sites, strict=True)):
            cav = ep.cavity(approx, old, name)
            if self.subsets is not None:  # the marginal over the site's part of phi
                cav = ep.marginal(cav, self.subsets[k])
            bodies[name] = _gaussian_message(cav) | {"seed": self.seed + 1000 * sweep + k}

        def failed(site, err):
            if isinstance(err, ep.SiteError):
                raise err
            raise ep.SiteError(
                f"site {site!r} did not answer sweep {sweep} ({type(err).__name__}: {err}); "
                f"the coordinator keeps the state of sweep {sweep - 1}"
            ) from err

        return self._ask_all("cavity", bodies, sweep, failed)

    def run(self, iterations: int = 6, *, damping: float = 1.0, tol: float = 0.1) -> Coordinator:
        """Run EP sweeps until one moves the approximation by less than ``tol`` (means in
        posterior SDs, SDs relatively: :func:`~bayestwin.federated.ep.shift_in_sds`), at most
        ``iterations``. The first sweep is undamped (the site factors start flat), later ones
        damped by ``damping`` (default 1, none); a sweep whose updates would leave the global
        approximation or a site's next cavity improper (noisy moments from small sites) is
        damped further, halving until they do not (:func:`~bayestwin.federated.ep.sweep`), and
        its move is scaled back to the damping asked for before the stopping rule sees it.

        Why undamped: damping by delta leaves (1 - delta) of the distance to EP's fixed point
        after each sweep, so a sweep that moved the approximation by ``tol`` leaves about
        tol (1 - delta) / delta still to go; measured on 40 simulated patients in three sites
        split by age, damping 0.5 stopped (at tol 0.1) 0.13 pooled SDs from the pooled mean,
        undamped sweeps settle in 2-3 sweeps to within the sites' Monte-Carlo noise, which
        :attr:`estimate` then halves by averaging the last two sweeps."""
        require_whole("iterations", iterations, 1)
        ep._check_damping(damping)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"tol must be a number >= 0 (posterior SDs), not {tol!r}")
        self.tol, self.damping = tol, damping
        for _ in range(iterations):
            sweep = len(self.history) + 1
            reports = {}

            replies = self._ask_sweep(sweep)

            def tilted(k: int, cav: ep.Gaussian, replies=replies, reports=reports):
                site = self.names[k]
                msg = replies[site]
                if not isinstance(msg, Mapping) or not {"mean", "cov", "draws", "diagnostics"} <= set(msg):
                    raise ep.SiteError(f"site {site!r} sent a message without mean, cov, draws and diagnostics")
                mean, cov, draws = ep.check_moments(msg["mean"], msg["cov"], msg["draws"], len(cav.shift), site)
                reports[site] = msg["diagnostics"]
                return mean, cov, draws

            sites, new, used = ep.sweep(
                self.prior,
                self.sites,
                tilted,
                damping=1.0 if sweep == 1 else damping,
                names=self.names,
                subsets=self.subsets,
            )
            asked = 1.0 if sweep == 1 else damping
            # a sweep the coordinator had to damp further moved less than a full step would have:
            # its move, scaled to the damping asked for, is what the stopping rule compares
            moved = ep.shift_in_sds(self.approx, new) * asked / used if sweep > 1 else float("inf")
            # the sweep came back whole: only now does the state change
            self._previous = self.approx
            self.sites, self.approx, self.reports = sites, new, reports
            mean, cov = new.moments()
            self.history.append(
                {
                    "sweep": sweep,
                    "mean": mean.tolist(),
                    "sd": np.sqrt(np.diag(cov)).tolist(),
                    "moved": moved,
                    "damping": used,
                }
            )
            if moved < tol:
                break
        return self

    @property
    def estimate(self) -> ep.Gaussian:
        """The population posterior: the global approximation averaged (in natural parameters)
        over the last two sweeps once EP has settled (the last moved less than ``tol``), which
        averages the sites' independent Monte-Carlo noise; otherwise the last sweep's."""
        if len(self.history) >= 2 and self.history[-1]["moved"] < self.tol:
            a, b = self._previous, self.approx
            return ep.Gaussian(0.5 * (a.precision + b.precision), 0.5 * (a.shift + b.shift))
        return self.approx

    def population(self, thresholds: Thresholds = Thresholds()):
        """The federated population: EP's Gaussian as its posterior (whitened draws), its verdict
        from the sites' last NUTS runs and EP's convergence; ``sampler`` records the sweeps."""
        if not self.history:
            raise ValueError("no sweep has run: call run() first")
        from bayestwin.population import Population

        cfg = self.cfg
        idata = _ep_datatree(self.program.model, self.program.phi, self.estimate, cfg.chains, cfg.draws, self.seed)
        moved = self.history[-1]["moved"]
        verdict = _verdict(self.reports, moved, self.tol, thresholds)
        verdict.warn("The federated population fit")
        idata.attrs.update(verdict.to_attrs())
        sampler = {
            "method": "ep",
            "sites": list(self.names),
            "sweeps": len(self.history),
            "damping": self.damping,
            "tol": self.tol,
            "history": self.history,
            "bytes_sent": self.ledger.nbytes,
            "messages": len(self.ledger.messages),
            **self.sizes,
            **{k: v for k, v in cfg._asdict().items() if k in ("draws", "tune", "chains", "target_accept")},
            "seed": self.seed,
        }
        return Population(
            family=self.family, schema=self.schema, columns=self.columns, idata=idata, verdict=verdict, sampler=sampler
        )


def federated_fit(
    sites: Mapping[str, Cohort],
    family="progression",
    *,
    therapies=None,
    iterations: int = 6,
    damping: float = 1.0,
    tol: float = 0.1,
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    target_accept: float = 0.9,
    seed: int = 0,
    thresholds: Thresholds = Thresholds(),
    ledger: Ledger | None = None,
):
    """Fit a population across sites that keep their rows: expectation propagation over sites.

    Parameters
    ----------
    sites
        Site name -> that site's :class:`Cohort` or NONMEM events (``bt.read_nonmem``, the PK
        family: its priors are then fixed from the sites' aggregates, ``Pk.federated_priors``);
        in a real federation each lives on its own machine; here each site's work runs in this
        process, through the same messages.
    family
        A family instance or name; its population parameters are what the sites learn together.
    therapies
        The therapies, reference first (default: the sorted union of the sites').
    iterations, damping, tol
        EP sweeps (at most), the damping of each site's update after the first sweep (1: none;
        see :meth:`Coordinator.run`), and the stopping rule: a sweep that moves every
        population mean by less than ``tol`` posterior SDs (and every SD by less than ``tol``
        relatively) ends the fit.
    draws, tune, chains, target_accept
        Each site's NUTS run on its tilted distribution, each sweep.
    ledger
        Where to log the messages (default: a new :class:`Ledger`).

    Returns
    -------
    Population
        Its posterior holds draws of EP's Gaussian over the population parameters (whitened, so
        that their mean and covariance are the Gaussian's: twins condition on exactly it);
        ``population.sampler`` has ``"method": "ep"``, the sweeps, their history and the bytes
        sent. Its verdict is the sites' NUTS diagnostics of the last sweep (worst over sites)
        and EP's own: a last sweep that moved the approximation by ``tol`` or more fails it.

    Notes
    -----
    See :class:`Coordinator` (the same fit, step by step, keeping its state when a site drops
    out) and :mod:`bayestwin.federated.site` (what a site computes and sends). The shared schema
    is agreed first from each site's counts, means, sums of squares, levels and largest time.
    """
    coord = Coordinator(
        sites,
        family,
        therapies=therapies,
        draws=draws,
        tune=tune,
        chains=chains,
        target_accept=target_accept,
        seed=seed,
        ledger=ledger,
    )
    return coord.run(iterations, damping=damping, tol=tol).population(thresholds)


def _ep_datatree(model, blocks, approx: ep.Gaussian, chains: int, draws: int, seed: int) -> xr.DataTree:
    """Draws of the Gaussian ``approx`` as a posterior (chain, draw, ...): standard normal draws
    whitened so that their mean is 0 and covariance the identity exactly, then moved to the
    Gaussian and mapped to each variable's constrained space."""
    mean, cov = approx.moments()
    n, d = chains * draws, len(mean)
    z = np.random.default_rng(seed).standard_normal((n, d))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    flat = mean + z @ np.linalg.cholesky(cov).T
    values = constrained_draws(model, flat, tuple(blocks))
    post = {}
    for b in blocks:
        x = values[b.rv].reshape(chains, draws, *values[b.rv].shape[1:])
        dims = ["chain", "draw", *(f"{b.rv}_dim_{j}" for j in range(x.ndim - 2))]
        named = model.named_vars_to_dims.get(b.rv)
        if named and len(named) == x.ndim - 2:
            dims = ["chain", "draw", *named]
        post[b.rv] = (dims, x)
    coords = {"chain": np.arange(chains), "draw": np.arange(draws)}
    for name, values_ in model.coords.items():
        if any(name in v[0] for v in post.values()):
            coords[name] = list(values_)
    ds = xr.Dataset(post, coords=coords)
    ds.attrs["method"] = "expectation propagation over sites (Gaussian in the unconstrained space)"
    return xr.DataTree.from_dict({"posterior": ds})


def _verdict(reports: Mapping[str, dict], moved: float, tol: float, limits: Thresholds) -> Verdict:
    """The fit's verdict: each site's last NUTS run against ``limits`` (worst over sites, per
    population variable), and EP's convergence (the last sweep moved less than ``tol``)."""
    rows: dict[str, dict] = {}
    for rep in reports.values():
        for var, r in rep["table"].items():
            row = rows.setdefault(var, {"rhat": -np.inf, "ess_bulk": np.inf, "ess_tail": np.inf})
            row["rhat"] = max(row["rhat"], r["rhat"])
            row["ess_bulk"] = min(row["ess_bulk"], r["ess_bulk"])
            row["ess_tail"] = min(row["ess_tail"], r["ess_tail"])
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.attrs.update(
        divergences=int(sum(r["divergences"] for r in reports.values())),
        bfmi_min=float(min(r["bfmi_min"] for r in reports.values())),
    )
    from bayestwin.review.convergence import gate

    verdict = gate(table, limits)
    if not np.isfinite(moved):  # one sweep: the first moves from the prior, with nothing to compare
        verdict.failing.append("EP ran a single sweep: whether it settled shows only in a second one (iterations >= 2)")
        verdict.converged = False
    elif not moved < tol:
        verdict.failing.append(
            f"EP did not settle: the last sweep moved the population posterior by {moved:.3g} SD (tol {tol})"
        )
        verdict.converged = False
    return verdict
