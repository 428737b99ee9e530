"""What to try when a population fit fails its gate: the likely cause, read from the draws.

A failed gate says *what* failed (R-hat, ESS, divergences, E-BFMI); this module says *why it
probably failed* and the one or two settings most likely to help, from the fit's own DataTree,
for any family:

* a chain stuck away from the others (its log density far below theirs), and the population
  parameter where it differs most;
* divergences concentrated at small values of one parameter (a funnel), or somewhere else;
* draws at NUTS's maximum tree depth (a long narrow ridge);
* a low E-BFMI (tails the momentum resampling cannot reach);
* a posterior beyond the central 99% of its prior (a prior far from the data);
* chains that are healthy but still short of effective draws after being continued.

Families add their own, design-specific advice (``fit_advice``; e.g. the progression family's
parameterisation); both end up in ``Verdict.advice``: the result's repr, the HTML report, the
CLI and the saved model card.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from bayestwin.engine.fit import stalled_chains
from bayestwin.settings import quiet_pymc


def scalars(posterior: xr.Dataset, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Every entry of ``names`` as a (chain, draw) array, labelled ``name[label, ...]``
    (constant entries, such as the unit diagonal of a correlation matrix, left out)."""
    out = {}
    for name in names:
        da = posterior[name].transpose("chain", "draw", ...)
        extra = [d for d in da.dims if d not in ("chain", "draw")]
        if not extra:
            out[name] = da.to_numpy()
            continue
        flat = da.stack(entry=extra).transpose("chain", "draw", "entry")
        values = flat.to_numpy()
        for j, label in enumerate(flat["entry"].to_numpy()):
            x = values[:, :, j]
            if x.std() < 1e-12:
                continue
            label = label if isinstance(label, tuple) else (label,)
            out[f"{name}[{', '.join(str(v) for v in label)}]"] = x
    return out


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def stuck_chain(lp: np.ndarray, values: Mapping[str, np.ndarray]) -> str | None:
    """A chain whose log density sits far below the others' (:func:`stalled_chains`), and the
    parameter where it differs most from them (in the other chains' SDs)."""
    stuck = stalled_chains(lp, n_params=max(len(values), 1))
    if not stuck.any() or stuck.all():
        return None
    c = int(np.flatnonzero(stuck)[0])
    others = ~stuck
    best, score = None, 0.0
    for label, x in values.items():
        ref = x[others]
        sd = float(ref.std()) or 1e-12
        z = abs(float(x[c].mean()) - float(ref.mean())) / sd
        if z > score:
            best, score = label, z
    gap = float(lp[others].mean() - lp[c].mean())
    where = ""
    if best is not None:
        where = (
            f", with {best} at {_fmt(float(values[best][c].mean()))} against "
            f"{_fmt(float(values[best][others].mean()))} in the other chains"
        )
    return (
        f"chain {c} is stuck: its log density sits {gap:,.0f} below the other chains'{where}; "
        "it never joined them, so its draws are not from the same posterior. Fit again with another seed, "
        "or give that parameter a prior that keeps it from the stuck value (priors=...)"
    )


def divergence_site(diverging: np.ndarray, values: Mapping[str, np.ndarray]) -> str | None:
    """Where divergences concentrate: the parameter whose divergent draws sit furthest from its
    draws as a whole (positive parameters on the log scale); small values of a scale parameter
    mean a funnel."""
    div = diverging.astype(bool)
    n = int(div.sum())
    if n == 0 or n == div.size:
        return None
    best, score, low = None, 0.0, False
    for label, x in values.items():
        y = np.log(x) if np.all(x > 0) else x
        sd = float(y.std()) or 1e-12
        z = (float(y[div].mean()) - float(y.mean())) / sd
        if abs(z) > abs(score):
            best, score, low = label, z, bool(np.all(x > 0) and z < 0)
    if best is None or abs(score) < 0.5:
        return (
            f"{n} divergent transitions, spread over the parameters: raise target_accept (e.g. 0.99) for "
            "smaller steps; if they remain, the model has a region the sampler cannot follow"
        )
    x = values[best]
    at = f"{best} (median {_fmt(float(np.median(x[div])))} at the divergences, {_fmt(float(np.median(x)))} overall)"
    if low:
        return (
            f"{n} divergent transitions concentrate at small values of {at}: a funnel between this scale and "
            "the effects it scales. Non-centred effects for sparse units, a prior that keeps the scale away "
            "from 0, or target_accept=0.99 (smaller steps)"
        )
    return f"{n} divergent transitions concentrate at {at}: raise target_accept (e.g. 0.99), or reparameterise there"


def tree_depth(n_steps: np.ndarray, max_tree_depth: int) -> str | None:
    """Draws that hit NUTS's maximum tree depth (more than 5% of them)."""
    limit = 2**max_tree_depth - 1
    share = float(np.mean(n_steps >= limit))
    if share <= 0.05:
        return None
    return (
        f"{share:.0%} of the draws hit the maximum tree depth ({limit:,} leapfrog steps): a long, narrow ridge "
        f"(strongly correlated parameters). Reparameterise (see the family's advice), or max_tree_depth="
        f"{max_tree_depth + 2} to let NUTS follow it"
    )


def low_bfmi(bfmi: float, limit: float) -> str | None:
    if not bfmi < limit:
        return None
    return (
        f"E-BFMI {bfmi:.2f}: the momentum resampling cannot reach the posterior's tails (a funnel or heavy "
        "tails, usually in a scale parameter); a zero-avoiding prior on the scales or a non-centred "
        "parameterisation"
    )


def prior_conflict(values: Mapping[str, np.ndarray], prior: Mapping[str, np.ndarray]) -> list[str]:
    """Posterior medians beyond the central 99% of their prior draws (at most three named)."""
    out = []
    for label, x in values.items():
        if label not in prior:
            continue
        lo, hi = np.quantile(prior[label], [0.005, 0.995])
        med = float(np.median(x))
        if med < lo or med > hi:
            out.append(f"{label} (median {_fmt(med)}, prior 99% {_fmt(lo)} to {_fmt(hi)})")
    if not out:
        return []
    names = "; ".join(out[:3]) + (f" and {len(out) - 3} more" if len(out) > 3 else "")
    return [
        f"the posterior lies beyond 99% of the prior for {names}: the default prior is far from these data; "
        "rescale the outcome or time, or widen that prior (priors=...)"
    ]


def short_of_draws(table, extensions: int, drawn: int, limits) -> str | None:
    """Healthy chains (no divergence, E-BFMI fine, R-hat < 1.05) that failed the gate on the
    effective draws, or on an R-hat between its limit and 1.05: how many draws per chain would
    pass. ESS grows with the draws, and R-hat - 1 shrinks about as 1 / draws for mixing chains."""
    if table.attrs.get("divergences", 0) > limits.divergences or table.attrs.get("bfmi_min", 1.0) < limits.bfmi:
        return None
    rhat = table["rhat"].fillna(1.0)
    if not (rhat < 1.05).all():
        return None
    cont = f" (continued {extensions} times, to {drawn:,} draws per chain)" if extensions else ""
    ess = table[["ess_bulk", "ess_tail"]].min(axis=1)
    need_ess = min(limits.ess_bulk, limits.ess_tail)
    if float(ess.min()) < need_ess:
        worst = ess.idxmin()
        need = _hundreds(drawn * need_ess / max(float(ess.min()), 1.0))
        return (
            f"the chains are healthy but slow on {worst} (ESS {float(ess.min()):.0f}){cont}: about draws={need:,} "
            "would pass; a slow parameter usually means a ridge the family's advice can remove"
        )
    if (rhat > limits.rhat).any():
        worst = rhat.idxmax()
        need = _hundreds(drawn * (float(rhat.max()) - 1.0) / (limits.rhat - 1.0))
        return (
            f"the chains are healthy but do not yet agree on {worst} (R-hat {float(rhat.max()):.3f}, limit "
            f"{limits.rhat}){cont}: about draws={need:,} would pass; chains that agree this slowly usually "
            "follow a ridge the family's advice can remove"
        )
    return None


def _hundreds(x: float) -> int:
    return int(np.ceil(x / 100) * 100)


def fit_advice(
    idata: xr.DataTree,
    table,
    limits,
    names: Sequence[str],
    *,
    max_tree_depth: int = 10,
    prior: Mapping[str, np.ndarray] | None = None,
) -> list[str]:
    """Everything above that applies to a failed population fit, most specific first."""
    post = idata.posterior.to_dataset()
    stats = idata.sample_stats.to_dataset()
    values = scalars(post, names)
    out = []
    if msg := stuck_chain(stats["lp"].transpose("chain", "draw").to_numpy(), values):
        out.append(msg)
    if msg := divergence_site(stats["diverging"].transpose("chain", "draw").to_numpy(), values):
        out.append(msg)
    if msg := tree_depth(stats["n_steps"].to_numpy(), max_tree_depth):
        out.append(msg)
    if msg := low_bfmi(float(table.attrs.get("bfmi_min", np.nan)), limits.bfmi):
        out.append(msg)
    if prior:
        out += prior_conflict(values, prior)
    if not out:
        extensions = int(idata.posterior.attrs.get("extensions", 0))
        if msg := short_of_draws(table, extensions, int(post.sizes["draw"]), limits):
            out.append(msg)
    return out


def prior_draws(model, names: Sequence[str], draws: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Prior draws of the population parameters, labelled like :func:`scalars`."""
    import pymc as pm

    with model, quiet_pymc():
        prior = pm.sample_prior_predictive(draws=draws, var_names=list(names), random_seed=seed)
    return scalars(prior.prior.to_dataset(), names)
