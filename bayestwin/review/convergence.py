"""Convergence gate: R-hat, bulk/tail ESS, divergences and E-BFMI (ArviZ's estimators).

A verdict travels with every Population and Twin, so a fit that failed cannot pass for one that
did; failing also raises one :class:`~bayestwin.errors.ConvergenceWarning`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import xarray as xr

from bayestwin.errors import ConvergenceWarning, warn
from bayestwin.review import batched


@dataclass(frozen=True)
class Thresholds:
    """Limits of the gate (Vehtari et al. 2021 for R-hat and ESS; Betancourt 2016 for E-BFMI)."""

    rhat: float = 1.01
    ess_bulk: float = 400.0
    ess_tail: float = 400.0
    divergences: int = 0
    bfmi: float = 0.3
    khat: float = 0.7  # Pareto k of importance weights (Vehtari et al. 2024), importance twins only


@dataclass
class Verdict:
    """Outcome of the gate. ``table`` has one row per variable (fits) or per patient (twins)."""

    converged: bool
    table: pd.DataFrame
    failing: list[str] = field(default_factory=list)
    thresholds: Thresholds = Thresholds()
    #: What to try when it failed, in words (the likely cause and the setting most likely to help).
    advice: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.converged:
            return "converged (R-hat, ESS, divergences and E-BFMI within limits)"
        return "NOT CONVERGED: " + "; ".join(self.failing) + "".join(f". Advice: {a}" for a in self.advice)

    def to_attrs(self) -> dict:
        """The verdict as DataTree attributes (strings and numbers: they survive netCDF)."""
        return {
            "bayestwin_converged": int(self.converged),
            "bayestwin_verdict": str(self),
            "bayestwin_failing": json.dumps(self.failing),
            "bayestwin_thresholds": json.dumps(self.thresholds.__dict__),
        }

    def warn(self, what: str) -> None:
        """Raise one :class:`~bayestwin.errors.ConvergenceWarning` naming ``what`` and the failing checks (with advice),
        if the gate failed."""
        if not self.converged:
            advice = "".join(f". Advice: {a}" for a in self.advice)
            warn(f"{what} did not converge: {'; '.join(self.failing)}{advice}", ConvergenceWarning)


def diagnostics(posterior: xr.Dataset, sample_stats: xr.Dataset) -> pd.DataFrame:
    """Worst R-hat, bulk and tail ESS per variable, with divergences and E-BFMI, for a fit.

    ArviZ's estimators (rank-normalised split R-hat, bulk and tail ESS), computed for every
    entry of every variable at once by :mod:`bayestwin.review.batched` (tested equal to
    ``arviz_stats``; ArviZ loops over entries in Python, ~1.5 s for a 60-patient fit). Twins are
    diagnosed per patient by the same functions.

    Constant entries (e.g. the unit diagonal of a correlation matrix) have undefined R-hat and
    are skipped.
    """
    names = list(posterior.data_vars)
    series = [posterior[n].transpose("chain", "draw", ...).to_numpy() for n in names]
    flat = [x.reshape(*x.shape[:2], -1) for x in series]
    x = np.moveaxis(np.concatenate(flat, axis=-1), -1, 0)  # (entries, chain, draw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rhat, bulk, tail = batched.diagnose(x)
    constant = x.std(axis=(-2, -1)) < 1e-12
    rhat, bulk, tail = (np.where(constant, np.nan, a) for a in (rhat, bulk, tail))
    owner = np.repeat(np.arange(len(names)), [f.shape[-1] for f in flat])
    rows = {}
    for i, name in enumerate(names):
        sel = owner == i
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rows[name] = {
                "rhat": float(np.nanmax(rhat[sel])) if sel.any() else np.nan,
                "ess_bulk": float(np.nanmin(bulk[sel])) if sel.any() else np.nan,
                "ess_tail": float(np.nanmin(tail[sel])) if sel.any() else np.nan,
            }
    div = sample_stats["diverging"].sum(["chain", "draw"])
    energy = sample_stats["energy"]
    # E-BFMI per chain: mean squared energy change over the energy variance.
    bfmi = (energy.diff("draw") ** 2).mean("draw") / energy.var("draw")
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.attrs.update(divergences=int(div), bfmi_min=float(bfmi.min()))
    return table


def gate(table: pd.DataFrame, limits: Thresholds = Thresholds(), by: str | None = None) -> Verdict:
    """Apply ``limits`` to a :func:`diagnostics` table and say what failed.

    With ``by`` (one row per patient), the verdict's table gains a boolean ``converged`` column.
    """
    failing = []
    bad_rhat = table.index[~(table["rhat"] <= limits.rhat)]
    bad_bulk = table.index[~(table["ess_bulk"] >= limits.ess_bulk)]
    bad_tail = table.index[~(table["ess_tail"] >= limits.ess_tail)]
    bad_k = table.index[table["khat"] > limits.khat] if "khat" in table else table.index[:0]
    what = "patients" if by else "variables"
    for label, bad in (
        (f"R-hat > {limits.rhat}", bad_rhat),
        (f"bulk ESS < {limits.ess_bulk:g}", bad_bulk),
        (f"tail ESS < {limits.ess_tail:g}", bad_tail),
        (f"Pareto k > {limits.khat}", bad_k),
    ):
        if len(bad):
            failing.append(f"{label} for {what} {_names(bad)}")
    if by is None:
        divs, bfmi = table.attrs["divergences"], table.attrs["bfmi_min"]
    else:
        divs, bfmi = int(table["divergences"].sum()), float(table["bfmi_min"].min())
        bad_div = table.index[table["divergences"] > limits.divergences]
        if len(bad_div):
            failing.append(f"{divs} divergent transitions in patients {_names(bad_div)}")
        table = table.copy()
        table["converged"] = ~table.index.isin(bad_rhat.union(bad_bulk).union(bad_tail).union(bad_div).union(bad_k))
    if by is None and divs > limits.divergences:
        failing.append(f"{divs} divergent transitions")
    if not np.isnan(bfmi) and bfmi < limits.bfmi:
        failing.append(f"E-BFMI {bfmi:.2f} < {limits.bfmi}")
    return Verdict(converged=not failing, table=table, failing=failing, thresholds=limits)


def _names(index, limit: int = 5) -> str:
    names = [str(i) for i in index]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def free_quantities(idata: xr.DataTree, var_names, group: str = "posterior") -> xr.DataTree:
    """The draws of ``var_names`` as one scalar variable per element that actually varies.

    Structurally fixed elements (a correlation matrix's unit diagonal, a Cholesky factor's zeros)
    are constant across draws (up to rounding: 1e-12 relative): their rank plots are empty and
    their R-hat undefined, so they are left out, and so is an element that repeats an earlier one
    (a correlation matrix's upper triangle). Elements are named as ArviZ labels them,
    ``name[i, j]`` with the dims' labels.
    The result (a DataTree with ``group`` and, when present, ``sample_stats``) goes straight to
    ``arviz_plots.plot_rank`` or ``arviz_stats.summary``.
    """
    from itertools import product

    post = idata[group].to_dataset() if isinstance(idata, xr.DataTree) else idata[group]
    out = {}
    for name in var_names:
        da = post[name]
        other = [d for d in da.dims if d not in ("chain", "draw")]
        values = da.transpose("chain", "draw", *other).to_numpy()
        flat = values.reshape(*values.shape[:2], -1)
        labels = list(product(*[[str(c) for c in da[d].to_numpy()] for d in other]))
        seen = []
        for k, element in enumerate(labels):
            x = flat[..., k]
            tol = 1e-12 * max(1.0, float(np.abs(x).max())) if np.isfinite(x).all() else np.nan
            if not tol > 0 or np.ptp(x) <= tol or any(np.abs(x - s).max() <= tol for s in seen):
                continue  # not finite, constant up to rounding, or a repeat
            seen.append(x)
            key = f"{name}[{', '.join(element)}]" if other else name
            out[key] = xr.DataArray(x, dims=("chain", "draw"), coords={"chain": da.chain, "draw": da.draw})
    tree = {group: xr.Dataset(out)}
    if isinstance(idata, xr.DataTree) and "sample_stats" in idata.children:
        tree["sample_stats"] = idata["sample_stats"].to_dataset()
    return xr.DataTree.from_dict(tree)
