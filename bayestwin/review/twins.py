"""Per-twin diagnostics: the sampler's statistics per patient, the gate's table, and the
out-of-population distance of each twin's standardised patient variables."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from bayestwin.review import batched


def nuts_stats(draws) -> dict:
    B, C = draws.step_size.shape
    return {
        "position": np.asarray(draws.position),
        "diverging": np.asarray(draws.diverging),
        "acceptance_rate": np.asarray(draws.acceptance_rate),
        "n_steps": np.asarray(draws.n_steps),
        "energy": np.asarray(draws.energy),
        "step_size": np.asarray(draws.step_size),
        "khat": np.full((B, C), np.nan),
        "ess_is": np.full((B, C), np.nan),
        "method": np.full(B, "nuts", dtype=object),
    }


def importance_stats(draws) -> dict:
    B, C, D = draws.position.shape[:3]
    return {
        "position": np.asarray(draws.position),
        "diverging": np.zeros((B, C, D), bool),
        "acceptance_rate": np.full((B, C, D), np.nan),
        "n_steps": np.zeros((B, C, D), np.int64),
        "energy": np.full((B, C, D), np.nan),
        "step_size": np.full((B, C), np.nan),
        "khat": np.asarray(draws.khat),
        "ess_is": np.asarray(draws.ess),
        "method": np.full(B, "importance", dtype=object),
    }


def twin_table(values: dict, stats: dict, patients, n_rows, patient_outputs, d_phi: int) -> pd.DataFrame:
    """Per-patient diagnostics: R-hat, bulk/tail ESS, divergences, E-BFMI, and k̂ for importance twins.

    NUTS twins: the worst rank-normalised R-hat and bulk/tail ESS over every posterior quantity
    (ArviZ's estimators, computed batched by :mod:`bayestwin.review.batched`). Importance twins:
    R-hat across the independent samplers on the patient's own parameters, and as ESS the
    resampled importance ESS Σ_chains 1 / (1/ESS_psis + 1/draws) (their draws are resampled from
    weighted proposals, so an autocorrelation ESS would count duplicates as new draws).
    """
    B, C, D = stats["position"].shape[:3]
    is_imp = stats["method"] == "importance"
    rhat, bulk, tail = np.full(B, np.nan), np.full(B, np.nan), np.full(B, np.nan)

    def series(names, sel):  # (patients, quantities, chain, draw)
        x = np.concatenate([values[n][sel].reshape(len(sel), C, D, -1) for n in names], axis=-1)
        return np.moveaxis(x, -1, 1)

    sel = np.flatnonzero(~is_imp)
    if len(sel):
        x = series(list(values), sel)
        r, b, t = batched.diagnose(x)
        constant = x.std(axis=(-2, -1)) < 1e-12  # e.g. the unit diagonal of a correlation matrix
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rhat[sel] = np.nanmax(np.where(constant, np.nan, r), axis=1)
            bulk[sel] = np.nanmin(np.where(constant, np.nan, b), axis=1)
            tail[sel] = np.nanmin(np.where(constant, np.nan, t), axis=1)
    sel = np.flatnonzero(is_imp)
    if len(sel):
        rhat[sel] = batched.rhat(series(list(patient_outputs), sel)).max(axis=1)
        bulk[sel] = tail[sel] = (1.0 / (1.0 / stats["ess_is"][sel] + 1.0 / D)).sum(1)
    energy = stats["energy"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bfmi = (np.diff(energy, axis=-1) ** 2).mean(-1) / energy.var(-1, ddof=1)  # E-BFMI per chain
        bfmi_min = np.nanmin(bfmi, axis=1)
    table = pd.DataFrame(
        {
            "rhat": rhat,
            "ess_bulk": bulk,
            "ess_tail": tail,
            "divergences": stats["diverging"].sum((1, 2)).astype(int),
            "bfmi_min": bfmi_min,
            "method": stats["method"],
            "khat": stats["khat"].max(1),
            "n_obs": n_rows,
            # how far the patient moved phi, in population-posterior SDs
            "phi_shift": np.linalg.norm(stats["position"][..., :d_phi].mean((1, 2)), axis=-1),
            **out_of_population(stats["position"][..., d_phi:]),
        },
        index=pd.Index(patients, name="patient"),
    )
    return table


#: The population predictive region a twin's random effects are checked against.
OUT_OF_POPULATION_LEVEL = 0.99


def out_of_population(z: np.ndarray, level: float = OUT_OF_POPULATION_LEVEL) -> dict:
    """Per patient: the posterior median of |z|² and whether it exceeds the ``level`` region.

    ``z`` (patients, chain, draw, k) are the patient's standardised random effects (the families'
    non-centred offsets: z ~ N(0, I) under the population, so |z|² ~ χ²_k, the squared
    Mahalanobis distance of the random effects from the population centre). A patient is outside
    the population's ``level`` predictive region when the posterior median of |z|² exceeds the χ²_k
    ``level`` quantile: more likely than not, their random effects are more extreme than 99% of
    the population's. A patient without data keeps the prior (median χ²_k(0.5)): never flagged.
    """
    from scipy.stats import chi2

    k = z.shape[-1]
    d2 = np.median((z**2).sum(-1).reshape(z.shape[0], -1), axis=1)
    return {"re_distance2": d2, "out_of_population": d2 > chi2.ppf(level, k)}
