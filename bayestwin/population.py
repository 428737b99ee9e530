"""Population: a family's posterior over a cohort, ready to condition new patients into twins."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

import jax
import numpy as np
import pandas as pd
import pymc as pm
import xarray as xr

from bayestwin.data.cohort import Cohort, Columns, Schema
from bayestwin.engine import condition as cond
from bayestwin.engine.compile import TwinProgram, compile_twin, unconstrained_draws
from bayestwin.engine.fit import FitConfig, sample_model
from bayestwin.engine.importance import ImportanceConfig
from bayestwin.engine.nuts import NutsConfig
from bayestwin.errors import require_whole
from bayestwin.families import get_family
from bayestwin.families.base import Design
from bayestwin.review import advice
from bayestwin.review.convergence import Thresholds, Verdict, diagnostics, free_quantities, gate
from bayestwin.settings import progress_enabled


@dataclass
class Population:
    """A fitted population model.

    Attributes
    ----------
    family
        The model family that built the PyMC model.
    schema
        Therapies, covariate levels and scales the model was fitted with.
    columns
        The column roles of the fitting table (reused for new patients' rows).
    idata
        ArviZ DataTree: posterior, sample_stats, observed_data, log_likelihood.
    verdict
        Convergence gate of the fit.
    """

    family: object
    schema: Schema
    columns: Columns
    idata: xr.DataTree
    verdict: Verdict
    sampler: dict = field(default_factory=dict)
    _programs: dict = field(default_factory=dict, repr=False)
    _compiled: dict = field(default_factory=dict, repr=False)  # jitted samplers/outputs/predict

    @property
    def posterior(self) -> xr.Dataset:
        """The population posterior draws (an xarray Dataset with chain and draw dims)."""
        return self.idata.posterior.to_dataset()

    @property
    def population_vars(self) -> list[str]:
        """Population-level variables (no patient or observation dimension)."""
        return _population_vars(self.posterior)

    def summary(self) -> pd.DataFrame:
        """ArviZ summary of the population-level parameters, one row per element that varies
        (a correlation matrix's diagonal and repeated upper triangle left out:
        :func:`bayestwin.review.convergence.free_quantities`). Covariate effects (``beta_*``) are
        per cohort SD of a numeric covariate: :meth:`effects` gives them per unit of yours."""
        import arviz_stats as azs

        return azs.summary(free_quantities(self.idata, self.population_vars))

    def effects(self, prob: float = 0.9) -> pd.DataFrame:
        """Covariate effects on your own scale, one row per parameter and design column.

        The models see numeric covariates standardised by the cohort's mean and SD, so a
        ``beta_*`` in :meth:`summary` is the effect of one cohort SD. Here a numeric covariate's
        effect is per one unit of your column (the draws divided by its SD; the ``reference``
        value is the cohort mean, where the model's typical values apply), and a categorical
        level's is the contrast with the reference level, which is named. Columns: ``parameter``,
        ``covariate``, ``contrast``, ``reference``, ``mean``, ``sd`` and the central ``prob``
        interval (``lower``, ``upper``).
        """
        if not 0 < prob < 1:
            raise ValueError(f"prob must be between 0 and 1, not {prob!r}")
        schema, post = self.schema, self.posterior
        lo, hi = (1 - prob) / 2, 1 - (1 - prob) / 2
        rows = []
        for name, da in post.data_vars.items():
            if set(da.dims) != {"chain", "draw", "covariate"}:
                continue
            for column in da["covariate"].to_numpy():
                x = da.sel(covariate=column).to_numpy().ravel()
                if column in schema.numeric:
                    centre, scale = schema.numeric[column]
                    x, covariate = x / scale, column
                    contrast, reference = f"per 1 unit of {column}", f"{centre:g} (cohort mean)"
                else:
                    covariate, level = str(column).split("[", 1)
                    level = level[:-1]
                    reference = str(schema.categorical[covariate][0])
                    contrast = f"{level} vs {reference}"
                rows.append(
                    {
                        "parameter": name,
                        "covariate": covariate,
                        "contrast": contrast,
                        "reference": reference,
                        "mean": x.mean(),
                        "sd": x.std(ddof=1),
                        "lower": np.quantile(x, lo),
                        "upper": np.quantile(x, hi),
                    }
                )
        columns = ["parameter", "covariate", "contrast", "reference", "mean", "sd", "lower", "upper"]
        return pd.DataFrame(rows, columns=columns)

    def model(self, cohort: Cohort | None = None) -> pm.Model:
        """The PyMC model (for ``cohort``, or a one-patient template) to print, graph or extend."""
        if cohort is None:
            return self.family.build_model(self.family.template_design(self.schema, 1), self.schema)
        return self.family.build_model(self.family.design(cohort.frame, cohort.baseline, self.schema), self.schema)

    @property
    def federated(self) -> bool:
        """Whether the population was fitted across sites that kept their rows
        (:func:`bayestwin.federated.federated_fit`): it then holds no patient row."""
        return self.sampler.get("method") == "ep"

    @property
    def private(self) -> bool:
        """Whether the population is a differentially private release
        (:func:`bayestwin.privacy.private_fit`): it holds no row and no count of patients."""
        from bayestwin.privacy import METHOD

        return self.sampler.get("method") == METHOD

    @property
    def privacy(self):
        """The :class:`~bayestwin.privacy.DP` budget a private release was made under (None for
        any other population)."""
        from bayestwin.privacy import DP

        return DP(self.sampler["epsilon"], self.sampler["delta"]) if self.private else None

    @property
    def n_patients(self) -> int | None:
        """Patients in the fit (a federated fit: the sum of the counts its sites reported; a
        differentially private release: None, the count is not released)."""
        if self.private:
            return None
        if self.federated:
            return int(sum(self.sampler.get("patients", {}).values()))
        return int(self.fitted_data("counting its patients").sizes.get("patient", 0))

    @property
    def n_observations(self) -> int | None:
        """Observation rows in the fit (a federated fit: the sum of the counts its sites reported;
        a differentially private release: None)."""
        if self.private:
            return None
        if self.federated:
            return int(sum(self.sampler.get("observations", {}).values()))
        return int(self.idata.observed_data.sizes.get("obs", 0)) if "observed_data" in self.idata.children else 0

    def fitted_data(self, purpose: str) -> xr.Dataset:
        """The fit's constant data (the cohort's arrays), needed for ``purpose``. A federated
        population holds none (its rows stayed at the sites): a ``ValueError`` says so."""
        if "constant_data" not in self.idata.children:
            sites = ", ".join(map(str, self.sampler.get("sites", [])))
            why = f": it was fitted across the sites {sites} and its rows stayed there" if self.federated else ""
            if self.private:
                dp = self.privacy
                why = (
                    f": it is a differentially private release (epsilon {dp.epsilon:g}, delta {dp.delta:g}) "
                    "and keeps no row"
                )
            raise ValueError(f"{purpose} needs the fitting cohort's rows, and this population holds none{why}")
        return self.idata.constant_data.to_dataset()

    def cohort_covariates(self) -> pd.DataFrame:
        """The fitting cohort's patients' baseline covariates, one row per patient (what virtual
        cohorts and simulated trials resample when not given covariates)."""
        const = self.fitted_data("resampling the fitting cohort's covariates (give covariates= instead)")
        return self.family.reference_baseline({k: const[k].to_numpy() for k in const.data_vars}, self.schema)

    def fitted_model(self) -> pm.Model:
        """The PyMC model of the fit itself, rebuilt from the DataTree's constant and observed data
        (the cohort's table is not kept): for predictive checks and extensions of this fit."""
        const = self.fitted_data("the fitted model (predictive checks, PSIS-LOO by patient)")
        self.family.template_design(self.schema, 1)  # a family that reads its graph (bt.Model) reads it here
        data = {name: const[name].to_numpy() for name in const.data_vars}
        data.setdefault("y_obs", self.idata.observed_data[self.family.observed].to_numpy())
        design = Design(patients=list(const["patient"].to_numpy()), data=data)
        return self.family.build_model(design, self.schema)

    # ------------------------------------------------------------ conditioning
    def program(self, n_obs: int, **slots) -> TwinProgram:
        """The compiled one-patient program for ``n_obs`` padded rows (and ``slots`` sizes), cached."""
        key = (n_obs, *sorted(slots.items()))
        if key not in self._programs:
            self._programs[key] = compile_twin(self.family, self.schema, n_obs, **slots)
        return self._programs[key]

    def compiled(self, kind, n_obs: int, build, **slots):
        """A jitted function for the ``n_obs`` program, built once by ``build(program, approx)``."""
        key = (kind, n_obs, *sorted(slots.items()))
        if key not in self._compiled:
            self._compiled[key] = build(self.program(n_obs, **slots), self.approx)
        return self._compiled[key]

    @cached_property
    def approx(self) -> cond.GaussianApprox:
        """Gaussian approximation of p(phi | cohort) in unconstrained space."""
        # any program will do (the population's blocks do not depend on a patient's shape): the
        # first patient's, rather than compiling one more just for this
        prog = next(iter(self._programs.values()), None) or self.program(8)
        return cond.GaussianApprox.from_draws(unconstrained_draws(prog.model, self.posterior, prog.phi))

    def cohort(self, rows, *, key=None, baseline=None) -> Cohort:
        """Validate new patients' rows against this population's schema."""
        if hasattr(rows, "baseline") and hasattr(rows, "frame"):
            self.family.check_table(rows)
            return rows  # already validated (a Cohort, or a family's own table such as Events)
        return self.family.read(rows, key=key, schema=self.schema, columns=self.columns, baseline=baseline)

    def condition(
        self,
        rows,
        *,
        key=None,
        baseline: pd.DataFrame | None = None,
        chains: int = 4,
        tune: int | None = None,
        draws: int = 1000,
        target_accept: float | None = None,
        seed: int = 0,
        chunk: int | None = None,
        max_doublings: int = 6,
        thresholds: Thresholds = Thresholds(),
        method: str = "nuts",
        proposals: int = 2000,
    ):
        """Condition the population on one or many patients' rows: their posterior twins.

        Each twin's posterior is p(theta_new, phi | cohort, y_new), sampled by NUTS with
        ``chains`` chains per patient, all patients in one vectorised JAX program per batch.

        Parameters
        ----------
        rows
            A table with the fitting table's columns (or a :class:`Cohort`). Patients listed in
            ``baseline`` with no rows get the population predictive.
        key
            Your pseudonymisation key (the same as for the cohort, to join results back).
        tune, draws, chains, target_accept, max_doublings
            NUTS settings per patient: Stan-style warmup with a dense mass matrix, then draws.
            ``tune`` and ``target_accept`` default to the family's ``twin_nuts`` (progression:
            500 and 0.8; PK: 1000 and 0.99, for the curved posteriors of subjects with only
            a few levels).
            Trees are capped at 2**max_doublings - 1 leapfrog steps: patients run in lock-step,
            so one deep tree would stall the whole chunk (a twin needs ~7 steps per draw).
        chunk
            Patients per call of the compiled vectorised program (default: 4 for NUTS, whose
            chains move in lock-step, and 32 for the importance path; on a GPU, larger).
        seed
            Base seed; each patient's chains are seeded from (seed, pseudonym), so results do not
            depend on batch layout.
        method
            ``"nuts"`` (default): NUTS for every twin. ``"importance"``: the fast path: each of the
            ``chains`` chains is an independent importance sampler with ``proposals`` draws from
            the twin's Laplace approximation, Pareto-smoothed (PSIS) and resampled to ``draws``;
            twins whose k̂, ESS or R-hat then fail ``thresholds`` are redone by NUTS
            (``twin.verdict.table["method"]`` says which), run in the coordinates of the twin's
            final importance proposal (x = centre + scale u, where the posterior is near
            standard normal) with a diagonal metric and ``ImportanceConfig.fallback_tune``
            (500) warmup steps. Same target density either way.

        Returns
        -------
        Twin

        Examples
        --------
        >>> twin = population.condition(new_rows, key=KEY)  # doctest: +SKIP
        >>> twin.predict(times=[12, 24]).summary()  # doctest: +SKIP
        """
        from bayestwin.twin import Twin

        for name, value, least in (("chains", chains, 1), ("draws", draws, 1), ("proposals", proposals, 1)):
            require_whole(name, value, least)  # before any table is read
        for name, value, least in (("tune", tune, 0), ("chunk", chunk, 1)):
            if value is not None:
                require_whole(name, value, least)
        cohort = self.cohort(rows, key=key, baseline=baseline)
        defaults = {"tune": 500, "target_accept": 0.8} | dict(self.family.twin_nuts)
        tune = defaults["tune"] if tune is None else tune
        target_accept = defaults["target_accept"] if target_accept is None else target_accept
        cfg = NutsConfig(
            chains=chains,
            tune=tune,
            draws=draws,
            target_accept=target_accept,
            max_doublings=max_doublings,
            chunk=chunk or NutsConfig._field_defaults["chunk"],
        )
        if method not in ("nuts", "importance"):
            raise ValueError(f"method must be 'nuts' or 'importance', not {method!r}")
        importance = None
        if method == "importance":
            settings = dict(self.family.twin_importance)  # e.g. adaptation steps
            importance = ImportanceConfig(
                chains=chains,
                draws=draws,
                proposals=proposals,
                chunk=chunk or ImportanceConfig._field_defaults["chunk"],
                **settings,
            )
        return Twin.from_cohort(self, cohort, cfg, seed=seed, thresholds=thresholds, importance=importance)

    def draw_patients(self, rows, *, key=None, baseline: pd.DataFrame | None = None, seed: int = 0) -> xr.Dataset:
        """One draw per patient from the population predictive: virtual patients with known truth.

        For each patient in ``rows`` (only their covariates and, for PK, doses matter), the
        population parameters are drawn from this population's posterior (its Gaussian
        approximation, as used by twins) and the patient's own parameters from their
        between-patient distribution given the covariates. Returns a Dataset (dim ``patient``)
        with the patient outputs (e.g. ``patient_cl``) and the residual parameters of that draw,
        e.g. to simulate new measurements whose true generating parameters are known.
        """
        cohort = self.cohort(rows, key=key, baseline=baseline)
        design = self.family.design(cohort.frame, cohort.baseline, self.schema)
        slots = {k: cond.padded_length(v) for k, v in self.family.slots(design).items()}
        data, _ = cond.pad(design.data, cohort.patients, cond.padded_length(1), self.family, slots)
        prog = self.program(cond.padded_length(1), **slots)
        draw = self.compiled("prior", cond.padded_length(1), cond.make_prior_draws, **slots)
        out = draw(jax.random.key(seed), tuple(np.asarray(data[n]) for n in prog.data_names))
        names = [*self.family.patient_outputs, *self.family.residual_params]
        ds = {}
        for n in names:
            x = np.asarray(out[n])[:, 0, 0]
            ds[n] = ("patient", x[:, 0] if n in self.family.patient_outputs else x)
        return xr.Dataset(ds, coords={"patient": cohort.patients})

    def patient_seeds(self, patients: list[str], seed: int) -> np.ndarray:
        """One 32-bit seed per patient from (seed, pseudonym)."""
        return np.array(
            [int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode()).digest()[:4], "little") for p in patients],
            dtype=np.uint32,
        )

    def save(self, path):
        """Save to the folder ``path`` atomically (netCDF + JSON model card with checksums); see
        :func:`bayestwin.io.save`. Reload with ``bt.load(path)``."""
        from bayestwin.io import save

        return save(self, path)

    def __getstate__(self) -> dict:
        """For Dask workers (cloudpickle, in memory only; artifacts on disk are never pickles):
        compiled programs stay behind and are rebuilt where needed."""
        state = dict(self.__dict__)
        state["_programs"], state["_compiled"] = {}, {}
        return state

    def __repr__(self) -> str:
        n = self.idata.posterior.sizes
        restarted = self.sampler.get("restarted_chains")
        note = f", chains {restarted} restarted after stalling in warmup" if restarted else ""
        if self.federated:
            note += f", fitted across {len(self.sampler.get('sites', []))} sites (holds no row)"
        if self.private:
            dp = self.privacy
            note += (
                f", released under ({dp.epsilon:g}, {dp.delta:g})-differential privacy (holds no row; "
                "no fit diagnostics)"
            )
        return (
            f"Population(family={self.family.name!r}, therapies={list(self.schema.therapies)}, "
            f"covariates={self.schema.covariates}, draws={n['chain']}x{n['draw']}{note}, verdict: {self._verdict_text})"
        )

    @property
    def _verdict_text(self) -> str:
        if self.private:
            return "none (a differentially private release: its group fits' diagnostics are not released)"
        return str(self.verdict)

    def _repr_html_(self) -> str:
        where = f", fitted across {len(self.sampler.get('sites', []))} sites" if self.federated else ""
        if self.private:
            where = f", released under ({self.privacy.epsilon:g}, {self.privacy.delta:g})-DP"
        return f"<b>Population</b> ({self.family.name}{where}) — <i>{self._verdict_text}</i>" + self.summary().to_html(
            float_format=lambda x: f"{x:.3g}"
        )


def fit(
    cohort: Cohort,
    family="progression",
    *,
    draws: int = 1000,
    tune: int = 1000,
    chains: int = 4,
    target_accept: float = 0.9,
    mass: str = "block",
    seed: int = 0,
    progressbar: bool | None = None,
    thresholds: Thresholds = Thresholds(),
    max_tree_depth: int = 10,
    extend: int = 3,
    initvals: dict | None = None,
    prewarm: int | None = None,
    jitter: float | None = None,
) -> Population:
    """Fit a family to a cohort by JAX NUTS (numpyro) and return the Population.

    Parameters
    ----------
    cohort
        A validated table (:class:`Cohort`, or a family's own such as NONMEM ``Events``).
    family
        A family instance or name (``"progression"``, ``"pk"``).
    draws
        Draws per chain kept after warmup (NUTS; chains run vectorised in one JAX program,
        split over the cores: :func:`bayestwin.engine.fit.sample_model`).
    tune
        Warmup (adaptation) steps per chain.
    chains
        Number of chains.
    target_accept
        NUTS's target acceptance rate (higher: smaller steps, fewer divergences, slower).
    mass
        Mass matrix: ``"block"`` (default; dense over the population parameters, diagonal over
        the per-patient ones), ``"diag"`` (what ``pm.sample`` gives) or ``"dense"``.
        See :mod:`bayestwin.engine.fit`.
    max_tree_depth
        NUTS's limit on doubling (2**depth - 1 leapfrog steps per draw).
    extend
        When the chains are healthy (no divergences, E-BFMI above its limit, R-hat below 1.05)
        but short of effective draws or R-hat, continue them for ``draws`` more, at most
        ``extend`` times, while the ESS can still reach the gate (:func:`needs_more_draws`);
        ``0`` never does. The posterior's attributes record ``draws_per_chain`` and ``extensions``.
    initvals
        Initial values by variable name (constrained; PyMC jitters each chain around them).
    prewarm
        Iterations of a short first warmup (trees of at most 63 steps) that learns a diagonal
        metric before the main warmup (:func:`bayestwin.engine.fit._prewarm`): for models whose
        scales differ a hundredfold, where the main warmup's first 75 iterations with the
        identity metric take the deepest trees. ``None`` (default): the family's
        ``fit_nuts["prewarm"]`` (the ODE family: 40; the others: 0, none).
    jitter
        Chains start at the model's initial point moved by uniform(-jitter, jitter) on the
        unconstrained scale. ``None`` (default): the family's ``fit_nuts["jitter"]`` (the ODE
        family: 0.2, away from stiff corners where a chain stalls; the others: 1.0, PyMC's own).
    progressbar
        Show the sampler's progress bar; ``None`` (default) follows :func:`bayestwin.options`.

    Notes
    -----
    A chain whose log density over its draws stays far below the others' (e.g. at random-effect
    SDs of ~0 with an inflated residual SD) is restarted once from another chain's last position,
    and every chain warms up and draws again (:func:`bayestwin.engine.fit.stalled_chains`); the
    posterior's attributes say which.

    The chains are split into equal groups over the machine's cores (or accelerators), each group
    vectorised, all in one compiled program; ``population.sampler["devices"]`` records how many.
    The same seed gives the same draws with the same number of devices; another number gives
    other draws from the same posterior (XLA's arithmetic over 2 vectorised chains differs from
    over 4 in the last bits, and NUTS's trees amplify that). ``$BAYESTWIN_CPU_DEVICES=1`` keeps
    every chain on one core (e.g. where other processes own the other cores).

    Examples
    --------
    >>> from bayestwin.families.progression import simulate
    >>> df, _ = simulate(n_patients=30, seed=1)
    >>> cohort = Cohort(df, covariates=["age", "sex"], therapies=["standard", "drug_a", "drug_b"])
    >>> pop = fit(cohort, draws=500, tune=500)  # doctest: +SKIP
    """
    fam = get_family(family)
    fam.check_table(cohort)
    cfg = FitConfig.for_family(
        fam,
        prewarm=prewarm,
        jitter=jitter,
        draws=draws,
        tune=tune,
        chains=chains,
        target_accept=target_accept,
        mass=mass,
        max_tree_depth=max_tree_depth,
        extend=extend,
    )
    cfg.check()  # before the model is built
    design = fam.design(cohort.frame, cohort.baseline, cohort.schema)
    # A family may fit another parameterisation of the same model (e.g. centred random effects)
    # whose raw per-patient variables are left out of the posterior.
    model, hidden = fam.fit_model(design, cohort.schema)
    progressbar = progress_enabled(progressbar)
    population = [rv.name for rv in model.free_RVs if rv.name not in (*fam.patient_vars, *hidden)]

    def fit_table(idata):
        post = idata.posterior.to_dataset()
        return diagnostics(post[_population_vars(post)], idata.sample_stats.to_dataset())

    idata = sample_model(
        model,
        population,
        cfg,
        seed=seed,
        progressbar=progressbar,
        drop=hidden,
        initvals=initvals,
        more=lambda dt: needs_more_draws(fit_table(dt), thresholds, dt.posterior.sizes["draw"], draws * (1 + extend)),
    )
    verdict = gate(fit_table(idata), thresholds)
    if not verdict.converged:  # what to try: the family's reading of its design, then the draws'
        names = _population_vars(idata.posterior.to_dataset())
        try:
            prior = advice.prior_draws(model, names, seed=seed)
        except Exception:  # noqa: BLE001 - advice must not break a fit: without prior draws, no prior check
            prior = None
        verdict.advice = [
            *fam.fit_advice(design, verdict),
            *advice.fit_advice(idata, verdict.table, thresholds, names, max_tree_depth=max_tree_depth, prior=prior),
        ]
    verdict.warn("The population fit")
    idata.attrs.update(verdict.to_attrs())  # the verdict travels with the saved DataTree
    settings = {**cfg._asdict(), "seed": seed, "sampler": "numpyro", "chain_method": "vectorized"}
    # what the sampler did on its own, for the reviewer: draws after continuing, restarted chains
    attrs = idata.posterior.attrs
    settings |= {k: int(attrs[k]) for k in ("draws_per_chain", "extensions", "devices")}
    settings["split"] = attrs.get("split", settings["split"])  # threads when a progress bar was shown
    if "stalled_chains" in attrs:
        settings["restarted_chains"] = json.loads(attrs["stalled_chains"])
    return Population(
        family=fam, schema=cohort.schema, columns=cohort.columns, idata=idata, verdict=verdict, sampler=settings
    )


def needs_more_draws(table, limits: Thresholds, drawn: int, most: int) -> bool:
    """Whether continuing the chains can pass the gate: they are healthy (no divergences, E-BFMI
    above its limit, every R-hat below 1.05: a stuck chain or a second mode is not cured by more
    draws) but some R-hat or ESS falls short, and the smallest ESS, growing in proportion to the
    draws, can reach its limit by ``most`` draws per chain (``drawn`` so far)."""
    if gate(table, limits).converged:
        return False
    if table.attrs["divergences"] > limits.divergences or table.attrs["bfmi_min"] < limits.bfmi:
        return False
    if not (table["rhat"].fillna(1.0) < 1.05).all():
        return False
    ess = float(np.nanmin(table[["ess_bulk", "ess_tail"]].to_numpy()))
    return ess * most / drawn >= min(limits.ess_bulk, limits.ess_tail)


def _population_vars(posterior: xr.Dataset) -> list[str]:
    """Population-level variables; a packed LKJ Cholesky factor (``re_chol``) is shown as its SDs and
    correlations (``re_chol_stds``, ``re_chol_corr``)."""
    return [
        n
        for n, v in posterior.data_vars.items()
        if not {"patient", "obs"} & set(v.dims) and f"{n}_stds" not in posterior.data_vars
    ]
