"""Simulation-based calibration (Talts, Betancourt, Simpson, Vehtari & Gelman 2018).

If data are simulated from the prior and the model's own likelihood, the rank of each true
parameter among posterior draws is uniform, whatever the model, when (and only when, for the
tested quantities) the inference is right. Two steps of bayestwin are checked:

* :func:`sbc_twins`: the conditioning step. The twin's prior is the population's predictive
  (population parameters from the population posterior's approximation, the patient's random
  effects from their prior), so a true (phi, z) per virtual patient, simulated visits, and the
  twin conditioned on them give one replicate per patient; every patient of a batch is one
  replicate, so hundreds cost seconds.
* :func:`sbc_fit`: the population fit. True population parameters and data from the model's
  prior predictive on a fixed design, a full :func:`bayestwin.fit` per replicate.

Ranks use ``L`` posterior draws chosen at random (thinning: NUTS draws are autocorrelated, the
importance path's are resampled) and are tested with a χ² test of the histogram in ``bins``
equal bins (``SBC.table``: p-value per quantity; ``SBC.plot``: histograms with a 99% band for
uniform counts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from scipy import stats

from bayestwin._atomic import OutputError, check_target, file_head, folder_lock, write_file
from bayestwin.errors import require_whole
from bayestwin.settings import progress_bar, quiet_pymc


@dataclass
class SBC:
    """Ranks of the true values (``ranks``: one row per replicate, one column per quantity)."""

    ranks: pd.DataFrame
    L: int  # posterior draws each rank is taken among (ranks are 0..L)
    bins: int = 10

    @property
    def table(self) -> pd.DataFrame:
        """Per quantity: replicates, mean rank / L (0.5 when calibrated), χ² statistic and p-value."""
        rows = {}
        for name, r in self.ranks.items():
            counts = self.counts(name)
            chi2, p = stats.chisquare(counts)
            rows[name] = {"reps": len(r), "mean_rank": float(r.mean()) / self.L, "chi2": chi2, "p_value": p}
        return pd.DataFrame.from_dict(rows, orient="index")

    def counts(self, name: str) -> np.ndarray:
        """Histogram of the ranks of ``name`` in ``bins`` equal bins of 0..L."""
        return np.histogram(self.ranks[name], bins=self.bins, range=(0, self.L + 1))[0]

    def plot(self, axes=None):
        """Rank histograms with the 99% band of counts under uniformity (binomial)."""
        import matplotlib.pyplot as plt

        names = list(self.ranks.columns)
        if axes is None:
            _, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
            axes = axes[0]
        n = len(self.ranks)
        lo, hi = stats.binom.ppf([0.005, 0.995], n, 1 / self.bins)
        for ax, name in zip(axes, names, strict=True):
            ax.bar(np.arange(self.bins), self.counts(name), width=1.0, color="C0", alpha=0.7, align="edge")
            ax.axhspan(lo, hi, color="k", alpha=0.12)
            ax.axhline(n / self.bins, color="k", lw=1)
            ax.set(title=f"{name} (p = {self.table.loc[name, 'p_value']:.2f})", xticks=[], yticks=[])
        return axes

    def __repr__(self) -> str:
        p = self.table["p_value"]
        return f"SBC({len(self.ranks)} replicates, {len(p)} quantities, smallest χ² p-value {p.min():.3f})"


def ranks_of(truth: np.ndarray, draws: np.ndarray, L: int, rng: np.random.Generator) -> np.ndarray:
    """Rank of each ``truth[i]`` among ``L`` draws picked at random from ``draws[i]`` (ties split at random)."""
    pick = np.stack([rng.choice(d.size, L, replace=False) for d in draws])
    sub = np.take_along_axis(draws.reshape(len(draws), -1), pick, axis=1)
    below = (sub < truth[:, None]).sum(1)
    ties = (sub == truth[:, None]).sum(1)
    return below + rng.integers(0, ties + 1)


def sbc_twins(population, rows, *, key, L: int = 99, bins: int = 10, method: str = "importance", seed: int = 0):
    """SBC of the twin conditioning step, one replicate per patient of ``rows``.

    ``rows``: a template of virtual patients in the fitting table's columns (their visit times,
    therapies and covariates are used, or for PK their doses, sampling times and covariates;
    their outcomes or levels are replaced by simulated ones). Each
    patient gets a true draw of the population parameters (from the population posterior's
    Gaussian approximation, as twins use) and of their random effects (prior), visits simulated
    from the family's likelihood, and a twin; the ranks of the true patient-level quantities
    (e.g. ``patient_intercept``) and residual parameters among the twin's draws are returned.
    """
    from bayestwin.engine import condition as cond

    fam = population.family
    cohort = population.cohort(rows, key=key)  # a Cohort, or a family's own table (PK: Events)
    design = fam.design(cohort.frame, cohort.baseline, population.schema)
    patients = cohort.patients
    data, _, n_rows, n_pad, slots = cond.padded_batch(design, patients, fam)
    prog, approx = population.program(n_pad, **slots), population.approx
    d = approx.mean.shape[0] + sum(b.size for b in prog.patient)
    k_x, k_y = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k_x, (len(patients), 1, 1, d))
    truth = cond._batched_outputs(prog)(x, tuple(np.asarray(data[n]) for n in prog.data_names), approx)
    pred = {n: np.asarray(data[n])[:, None] for n in prog.predict_data_names}
    mu, extra = cond.make_predict(prog, approx)(x, pred)
    mu = mu[:, 0, 0, 0, :]  # (patients, n_pad) at their own visits
    params = {r: truth[r][:, 0, 0].reshape(len(patients), 1) for r in fam.residual_params}
    params |= {k: v[:, 0, 0, 0] for k, v in extra.items()}
    y = np.asarray(fam.observe(k_y, mu, params))
    idx = design.data["patient_idx"]
    outcome = np.empty(len(idx))
    for i in range(len(patients)):  # design rows are the (observation) rows of the frame, in order
        outcome[idx == i] = y[i, : n_rows[i]]
    twin = population.condition(cohort.with_outcome(outcome), seed=seed, method=method)
    rng = np.random.default_rng(seed)
    names = [*fam.patient_outputs, *fam.residual_params]
    out = {}
    for n in names:
        true = np.asarray(truth[n])[:, 0, 0].reshape(len(patients))
        draws = twin.posterior[n].transpose("patient", "chain", "draw").to_numpy().reshape(len(patients), -1)
        out[n] = ranks_of(true, draws, L, rng)
    return SBC(pd.DataFrame(out, index=pd.Index(patients, name="patient")), L, bins), twin


def sbc_fit(
    cohort,
    family=None,
    *,
    reps: int,
    quantities: Sequence[str] | None = None,
    L: int = 99,
    bins: int = 10,
    seed: int = 0,
    say=None,
    partial=None,
    **fit_kwargs,
) -> SBC:
    """SBC of the population fit: ``reps`` data sets drawn from the prior predictive on ``cohort``'s design.

    Each replicate draws the population parameters and the outcomes from the family's priors
    (``pm.sample_prior_predictive`` on the model of ``cohort``), refits with
    :func:`bayestwin.fit` (``fit_kwargs``, e.g. ``draws=500``), and ranks the true values of
    ``quantities`` (default: the scalar population parameters, by name) among the posterior draws.
    Replicates whose fit fails the convergence gate are kept and counted in ``SBC.ranks.attrs``.
    ``partial``: a CSV path that receives the ranks so far after every replicate (written
    atomically, with a JSON of the run's settings beside it). A later call with the same settings
    and ``partial`` resumes after the replicates it holds: each replicate's data, fit seed and
    rank draws depend only on ``seed`` and its index, so a resumed run equals an uninterrupted one.
    """
    import warnings

    from bayestwin.families import get_family
    from bayestwin.population import fit

    fam = family if family is not None else get_family("progression")
    if not callable(getattr(cohort, "with_outcome", None)):
        kind = type(cohort).__name__
        raise ValueError(f"sbc_fit needs data that can take simulated outcomes (with_outcome()); {kind} cannot")
    prior, ys = prior_replicates(cohort, fam, reps, seed)
    if quantities is None:
        quantities = scalar_quantities(prior)
    rows, failed = _resume(
        partial, {"reps": reps, "seed": seed, "L": L, "quantities": list(quantities), **fit_kwargs}, say
    )
    if rows and say is not None:
        say(f"  resuming after {len(rows)} replicates from {partial}")
    for r in progress_bar(range(len(rows), reps), desc="SBC replicates"):
        rng = np.random.default_rng([seed, r])  # per replicate: resumable
        rep = cohort.with_outcome(ys[r])  # design rows are the frame's rows, in order
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pop = fit(rep, fam, seed=seed + r, progressbar=False, **fit_kwargs)
        failed += not pop.verdict.converged
        jax.clear_caches()  # each fit compiles its own programs: 200 of them exhausted 24 GB
        post = pop.posterior
        true = {q: np.array([prior[q].to_numpy().ravel()[r]]) for q in quantities}
        ranks = {q: int(ranks_of(true[q], post[q].to_numpy().reshape(1, -1), L, rng)[0]) for q in quantities}
        rows.append({**ranks, "converged": bool(pop.verdict.converged)})
        if partial is not None:
            write_file(partial, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
        if say is not None and ((r + 1) % 10 == 0 or r + 1 == reps):
            say(f"  fit replicate {r + 1}/{reps} ({failed} not converged so far)")
    ranks = pd.DataFrame(rows, columns=[*quantities, "converged"])
    ranks.attrs["not_converged"] = int((~ranks.pop("converged").astype(bool)).sum())
    return SBC(ranks, L, bins)


def prior_replicates(cohort, family, reps: int, seed: int = 0):
    """The fit SBC's replicates: ``reps`` draws of every parameter and of the outcomes from the
    prior predictive of ``family``'s model on ``cohort``'s design (``seed``). Returns the prior
    draws (an xarray Dataset, dims chain and draw) and the outcomes, (reps, rows) in the design's
    row order, as ``cohort.with_outcome`` takes them."""
    import pymc as pm

    design = family.design(cohort.frame, cohort.baseline, cohort.schema)
    model = family.build_model(design, cohort.schema)
    with quiet_pymc():
        draws = pm.sample_prior_predictive(draws=reps, model=model, random_seed=seed)
    prior = draws.prior.to_dataset() if hasattr(draws.prior, "to_dataset") else draws.prior
    return prior, draws.prior_predictive[family.observed].to_numpy().reshape(reps, -1)


def pk_design(seed: int = 0):
    """The PK fit SBC's design: 12 simulated subjects, one 100 mg oral dose, levels at 0.5, 1, 2,
    4, 8, 12 and 24 h (``seed``), read with the SBC's key."""
    from bayestwin.data.nonmem import read_nonmem
    from bayestwin.families.pk import simulate

    rows, _ = simulate(12, seed=seed, times=(0.5, 1, 2, 4, 8, 12, 24))
    return read_nonmem(rows, key=design_key(seed))


def design_key(seed: int) -> bytes:
    """The pseudonymisation key of the SBC designs (fixed per ``seed``: results are reproducible)."""
    return b"sbc-design-key-" + str(seed).encode()


def scalar_quantities(prior) -> list[str]:
    """The scalar parameters of a prior draw (dims chain and draw only), sorted by name.

    Sorted because PyMC's prior group orders its variables by set iteration, which follows
    PYTHONHASHSEED: unsorted, the per-replicate rank draws (and a resumed run's partial file)
    would depend on the process, not only on ``seed``."""

    return sorted(n for n, v in prior.data_vars.items() if set(v.dims) == {"chain", "draw"})


def _partial_path(out):
    """``out``/sbc_fit_partial.csv (``out`` made by :func:`check_outputs`), or None."""
    return None if out is None else Path(out) / PARTIAL


def _resume(partial, settings: dict, say=None) -> tuple[list[dict], int]:
    """The replicates already in ``partial`` (and how many failed the gate) when its settings
    match; otherwise they are discarded (said through ``say``) and the settings written beside it."""
    if partial is None:
        return [], 0
    partial = Path(partial)
    meta = partial.with_suffix(".json")
    # only an earlier run's partial file and settings are read, replaced or discarded
    check_target(partial, is_ours=OUTPUTS[PARTIAL], what="SBC partial file")
    check_target(meta, is_ours=_is_partial_settings, what="SBC partial file's settings")
    settings = json.loads(json.dumps(settings, default=str))
    if partial.exists() and meta.exists() and json.loads(meta.read_text()) == settings:
        done = pd.read_csv(partial)
        if list(done.columns) == [*settings["quantities"], "converged"] and len(done) <= settings["reps"]:
            rows = done.to_dict("records")
            return rows, int((~done["converged"].astype(bool)).sum())
    if partial.exists() and say is not None:
        say(f"  discarding {partial}: written with other settings than {settings}")
    write_file(meta, json.dumps(settings, indent=1))
    partial.unlink(missing_ok=True)
    return [], 0


PARTIAL = "sbc_fit_partial.csv"
PNG_TITLE = "bayestwin SBC rank histograms"


def _first_line(path) -> bytes:
    return file_head(path).split(b"\n", 1)[0].rstrip(b"\r")


def _is_partial_settings(path) -> bool:
    try:
        got = json.loads(file_head(path, 1 << 20))
    except ValueError:
        return False
    return isinstance(got, dict) and {"reps", "seed", "L", "quantities"} <= set(got)


def _is_rank_plot(path) -> bool:
    head = file_head(path)
    return head.startswith(b"\x89PNG\r\n\x1a\n") and PNG_TITLE.encode() in head


#: What ``run_sbc`` writes into its ``out`` folder, each with how an earlier one is recognised:
#: only those files are replaced (``overwrite=True`` / ``--force`` replaces any).
OUTPUTS = {
    "sbc.csv": lambda p: _first_line(p).startswith(b"step,quantity,"),
    "sbc_fit.png": _is_rank_plot,
    "sbc_twins.png": _is_rank_plot,
    PARTIAL: lambda p: _first_line(p).endswith(b",converged"),
    "sbc_fit_partial.json": _is_partial_settings,
}


def check_outputs(out, overwrite: bool = False) -> Path:
    """Refuse (:class:`~bayestwin._atomic.OutputError`), before anything is computed, an ``out``
    folder holding a file of an SBC output's name that an SBC run did not write (or anything not
    a regular file there); make the folder. Returns it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder: not writing the SBC outputs there")
    out.mkdir(parents=True, exist_ok=True)
    for name, ours in OUTPUTS.items():
        check_target(out / name, is_ours=ours, force=overwrite, what=f"SBC output ({name})")
    return out


def run_sbc(
    family: str = "progression",
    *,
    reps: int = 20,
    twins: int = 200,
    out=None,
    seed: int = 0,
    draws: int = 500,
    say=print,
    overwrite: bool = False,
) -> dict[str, SBC]:
    """The SBC of ``bayestwin validate sbc``: the population fit (``reps`` replicates) and the
    twin conditioning step (``twins`` virtual patients), on a simulated design.

    Design: 16 simulated patients with visits at 0, 3, 6 and 9 on two therapies (fit SBC); the
    twins' population is fitted to 40 simulated patients and each virtual patient has 3 visits.
    ``family="pk"``: 12 simulated subjects under frozen priors (see :func:`_run_sbc_pk`). Writes ``sbc_fit.png`` and
    ``sbc_twins.png`` (rank histograms) and ``sbc.csv`` (the tables) into ``out`` when given,
    with ``sbc_fit_partial.csv`` (and its settings, ``.json``) after each fit replicate, from which
    a stopped run resumes. Files of those names that no SBC run wrote are refused before anything
    is computed (``overwrite=True`` replaces them), and one run at a time writes a folder.
    Returns {"fit": SBC, "twins": SBC} (no "fit" when ``reps`` is 0).
    """
    if family not in ("progression", "pk"):
        raise ValueError(f"SBC is implemented for the families 'progression' and 'pk', not {family!r}")
    for name, value, least in (("reps", reps, 0), ("twins", twins, 1), ("draws", draws, 1), ("seed", seed, 0)):
        require_whole(name, value, least)
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a folder path (str or Path), not {type(out).__name__}")
    if out is None:
        return _run_sbc(family, reps=reps, twins=twins, out=None, seed=seed, draws=draws, say=say)
    out = check_outputs(out, overwrite)
    with folder_lock(out, "SBC output folder"):
        return _run_sbc(family, reps=reps, twins=twins, out=out, seed=seed, draws=draws, say=say)


def _run_sbc(family: str, *, reps: int, twins: int, out, seed: int, draws: int, say) -> dict[str, SBC]:
    import warnings

    from bayestwin.data.cohort import Cohort
    from bayestwin.families.progression import simulate
    from bayestwin.population import fit

    key = design_key(seed)
    if family == "pk":
        return _run_sbc_pk(reps=reps, twins=twins, out=out, seed=seed, key=key, draws=draws, say=say)
    arms = ("standard", "drug_a")
    results = {}
    rows, _ = simulate(n_patients=16, therapies=arms, therapy_slope=(-0.8,), times=(0, 3, 6, 9), seed=seed)
    design = Cohort(rows, covariates=["age", "sex"], therapies=arms, key=key)
    say(f"SBC of the population fit: {reps} replicates on {design} ...")
    part = _partial_path(out)
    results["fit"] = sbc_fit(design, reps=reps, seed=seed, draws=draws, tune=draws, say=say, partial=part)
    say(results["fit"].table.to_string(float_format=lambda x: f"{x:.3f}"))
    say(f"({results['fit'].ranks.attrs['not_converged']} of {reps} fits failed the convergence gate)")
    train, _ = simulate(n_patients=40, therapies=arms, therapy_slope=(-0.8,), seed=seed + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pop = fit(Cohort(train, covariates=["age", "sex"], therapies=arms, key=key), seed=seed, progressbar=False)
    virtual, _ = simulate(n_patients=twins, therapies=arms, therapy_slope=(-0.8,), seed=seed + 2)
    say(f"SBC of the twin conditioning step: {twins} virtual patients with 3 visits ...")
    results["twins"], _ = sbc_twins(pop, virtual[virtual.time <= 6.0], key=key, seed=seed)
    say(results["twins"].table.to_string(float_format=lambda x: f"{x:.3f}"))
    _write(results, out, say)
    return results


def frozen_pk_family(events, *, sigma: float = 0.5):
    """The PK family with its priors frozen for SBC on ``events``' design.

    The default priors are centred from the data (volume from dose / largest level), so a
    prior-predictive data set would be refitted under other priors than it was drawn from. SBC
    needs one fixed prior: the defaults computed once on the design data, with the log typical
    values' prior SD narrowed to ``sigma`` (the defaults' SD of 2 puts ka and the elimination rate
    on top of each other often enough that flip-flop data sets dominate the check) and the
    residual errors' priors narrowed to clinical ranges (proportional HalfNormal(0.15), additive
    HalfNormal(5% of the median level)): under the defaults' HalfNormal(0.5) a drawn proportional
    error of 50-130% makes data sets no assay produces, on which no fit converges.
    """
    from bayestwin.families.base import Prior
    from bayestwin.families.pk import Pk

    fam = Pk()
    pri = fam.default_priors(events.schema, fam.design(events.frame, events.baseline, events.schema))
    for k, v in list(pri.items()):
        if k.startswith("log_") and isinstance(v, Prior):
            pri[k] = Prior("Normal", mu=v.params["mu"], sigma=sigma)
    obs = events.observations()
    level = float(obs.loc[obs["DV"] > 0, "DV"].median())
    pri["sigma_prop"] = Prior("HalfNormal", sigma=0.15)
    pri["sigma_add"] = Prior("HalfNormal", sigma=0.05 * level)
    return Pk(priors=pri)


def _run_sbc_pk(*, reps: int, twins: int, out, seed: int, key: bytes, draws: int, say) -> dict[str, SBC]:
    """PK: the population fit on 12 simulated subjects (one oral dose, 7 levels) under frozen
    priors (:func:`frozen_pk_family`), then the twin step."""
    import warnings

    from bayestwin.data.nonmem import read_nonmem
    from bayestwin.families.pk import Pk, simulate
    from bayestwin.population import fit

    results = {}
    if reps:
        design = pk_design(seed)
        fam = frozen_pk_family(design)
        say(f"SBC of the PK population fit: {reps} replicates on {design} (priors frozen) ...")
        part = _partial_path(out)
        results["fit"] = sbc_fit(design, fam, reps=reps, seed=seed, draws=draws, tune=draws, say=say, partial=part)
        say(results["fit"].table.to_string(float_format=lambda x: f"{x:.3f}"))
        say(f"({results['fit'].ranks.attrs['not_converged']} of {reps} fits failed the convergence gate)")
    train, _ = simulate(40, seed=seed + 1, times=(0.5, 1, 2, 4, 8, 12, 24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pop = fit(read_nonmem(train, key=key), Pk(), seed=seed, progressbar=False)
    virtual, _ = simulate(twins, seed=seed + 2, id_start=10_000, times=(1.0, 4.0, 8.0))
    say(f"SBC of the PK twin step: {twins} virtual subjects, one oral dose, levels at 1, 4 and 8 h ...")
    results["twins"] = sbc_twins(pop, virtual, key=key, seed=seed)[0]
    say(results["twins"].table.to_string(float_format=lambda x: f"{x:.3f}"))
    _write(results, out, say)
    return results


def _write(results: dict, out, say) -> None:
    """Rank histograms (sbc_<step>.png) and the tables (sbc.csv) into ``out``."""

    import matplotlib.pyplot as plt

    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, res in results.items():
            axes = res.plot()
            axes[0].figure.suptitle(f"SBC ranks, {name} ({len(res.ranks)} replicates; band: 99% for uniform)")
            fig = axes[0].figure
            fig.tight_layout()
            write_file(
                out / f"sbc_{name}.png",
                lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=100, metadata={"Title": PNG_TITLE}),
            )
            plt.close(fig)
        table = pd.concat({k: v.table for k, v in results.items()}, names=["step", "quantity"])
        write_file(out / "sbc.csv", lambda tmp: table.to_csv(tmp))
        say(f"wrote {', '.join(str(out / f'sbc_{k}.png') for k in results)} and {out / 'sbc.csv'}")
