"""Predictive checks and model comparison for population fits.

* :func:`predictive_check`: prior or posterior predictive draws of the observations (PyMC's
  ``sample_prior_predictive`` / ``sample_posterior_predictive`` on the family's own model), in
  a DataTree with the observed data, ready for ArviZ's ``plot_ppc_dist``.
* :func:`loo`: PSIS-LOO (Vehtari, Gelman & Gabry 2017) with Pareto k̂ per observation, or per
  patient (``by="patient"``: leave one *patient* out, the right unit when the question is how
  the model predicts a new patient; each patient's log-likelihood is the sum over their rows).
* :func:`compare`: several fitted variants of a family on the same data (e.g. Normal vs
  Student-t residual, with vs without a covariate), ranked by ELPD with ArviZ's ``compare``.

ArviZ does the estimation; this module only builds the right log-likelihood grouping.
"""

from __future__ import annotations

from collections.abc import Mapping

import arviz_stats as azs
import numpy as np
import pandas as pd
import xarray as xr

from bayestwin.settings import quiet_pymc

UNITS = ("obs", "patient")


def log_likelihood(population, by: str = "obs") -> xr.DataTree:
    """The fit's posterior and pointwise log-likelihood, per observation or summed per patient."""
    if by not in UNITS:
        raise ValueError(f"by must be one of {UNITS}, not {by!r}")
    name = population.family.observed
    if "log_likelihood" not in population.idata.children:
        population.fitted_data("the pointwise log-likelihood (PSIS-LOO)")
    ll = population.idata.log_likelihood[name]
    if by == "patient":
        const = population.fitted_data("the log-likelihood by patient")
        idx, patients = const["patient_idx"].to_numpy(), const["patient"].to_numpy()
        per = np.zeros((ll.sizes["chain"], ll.sizes["draw"], len(patients)))
        np.add.at(per, (slice(None), slice(None), idx), ll.transpose("chain", "draw", "obs").to_numpy())
        ll = xr.DataArray(
            per,
            dims=("chain", "draw", "patient"),
            coords={"chain": ll.chain, "draw": ll.draw, "patient": patients},
        )
    return xr.DataTree.from_dict(
        {"posterior": population.idata.posterior.to_dataset(), "log_likelihood": xr.Dataset({name: ll})}
    )


def loo(population, by: str = "obs"):
    """PSIS-LOO of a population fit, with Pareto k̂ per observation or per patient.

    Returns ArviZ's ``ELPDData`` (``elpd``, ``se``, ``p``, ``pareto_k`` labelled by ``obs`` or
    ``patient``, ``good_k``: the threshold for the number of draws, ``warning``: ``True`` when some
    k̂ is above it). ArviZ's own warning about it is not repeated on standard error: it is in
    ``warning``, and a k̂ above the threshold by patient is expected (the reviewer report explains
    why). Examples: ``loo(pop, by="patient").pareto_k``.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Estimated shape parameter of Pareto distribution")
        return azs.loo(log_likelihood(population, by), pointwise=True, var_name=population.family.observed)


def pareto_k_table(population, by: str = "patient") -> pd.DataFrame:
    """One row per observation or patient: Pareto k̂ and the pointwise ELPD, worst k̂ first."""
    return khat_table(loo(population, by))


def khat_table(res) -> pd.DataFrame:
    """:func:`pareto_k_table` of a :func:`loo` result already at hand."""
    table = pd.DataFrame({"pareto_k": res.pareto_k.to_series(), "elpd_loo": res.elpd_i.to_series()})
    table["reliable"] = table["pareto_k"] <= res.good_k
    return table.sort_values("pareto_k", ascending=False)


def compare(populations: Mapping[str, object], by: str = "obs") -> pd.DataFrame:
    """Rank fitted variants (name -> Population, all fitted to the same data) by PSIS-LOO ELPD.

    ArviZ's ``compare`` table: elpd, p, elpd_diff (negative for the worse models), its SE
    (``dse``), weights and a warning column. The variants must share their observations.
    """
    sizes = {n: p.idata.log_likelihood.sizes["obs"] for n, p in populations.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"variants to compare must be fitted to the same observations; sizes {sizes}")
    return azs.compare({n: loo(p, by) for n, p in populations.items()})


def predictive_check(population, kind: str = "posterior", draws: int = 500, seed: int = 0) -> xr.DataTree:
    """Prior or posterior predictive draws of the observed data, with the observed data.

    ``kind="posterior"``: one replicate of the data set per posterior draw (thinned to at most
    ``draws``); ``kind="prior"``: ``draws`` replicates from the priors (are they plausible before
    the data?). The result has ``posterior_predictive`` (or ``prior_predictive``) and
    ``observed_data`` groups: ``arviz_plots.plot_ppc_dist(result)`` draws the check.
    """
    import pymc as pm

    if kind not in ("posterior", "prior"):
        raise ValueError(f"kind must be 'posterior' or 'prior', not {kind!r}")
    model = population.fitted_model()
    name = population.family.observed
    observed = population.idata.observed_data.to_dataset()
    if kind == "prior":
        with quiet_pymc():
            out = pm.sample_prior_predictive(draws=draws, model=model, var_names=[name], random_seed=seed)
        group = "prior_predictive"
        pred = out[group].to_dataset() if isinstance(out, xr.DataTree) else out[group]
    else:
        post = population.idata.posterior.to_dataset()
        n = post.sizes["chain"] * post.sizes["draw"]
        thin = post.isel(draw=slice(None, None, max(1, int(np.ceil(n / draws)))))
        with quiet_pymc():
            out = pm.sample_posterior_predictive(
                thin, model=model, var_names=[name], random_seed=seed, progressbar=False
            )
        group = "posterior_predictive"
        pred = out[group].to_dataset() if isinstance(out, xr.DataTree) else out[group]
    return xr.DataTree.from_dict({group: pred, "observed_data": observed})
