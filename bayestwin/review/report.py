"""The reviewer report: one self-contained HTML file for a population fit or a set of twins.

Everything a reviewer needs to accept or reject the result, with every image embedded (PNG as
base64 data URIs, no scripts, no external resources: it opens offline and can be attached to a
submission). Plots come from ArviZ (``arviz_plots``, matplotlib backend) where ArviZ has them.

Sections for a population: verdict, model card (data fingerprint, family and priors, sampler
settings, package versions), posterior summary, per-variable diagnostics, rank and energy plots,
posterior predictive check, PSIS-LOO with Pareto k̂ per patient, forecast calibration (when a
:class:`~bayestwin.review.calibration.Calibration` is given) and a forest plot of the patient
effects against the population distribution (shrinkage). For twins: verdict and per-twin
diagnostics (with the out-of-population flag), each twin's prior (population predictive) against
its posterior, and forecast bands.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from bayestwin._atomic import check_target, file_head, write_file
from bayestwin.io import data_fingerprint, package_versions
from bayestwin.review.convergence import free_quantities

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}.ok{background:#e6f4ea;border-left:6px solid #1e8e3e;padding:.6em 1em}
.bad{background:#fce8e6;border-left:6px solid #d93025;padding:.6em 1em}img{max-width:100%}
.note{color:#555;font-size:.9em}.wide{overflow-x:auto}
"""


GENERATOR = "<meta name='generator' content='bayestwin review'>"


def _is_report(path: Path) -> bool:
    """An earlier reviewer report (the only file :func:`review` replaces without ``overwrite``)."""
    return GENERATOR.encode() in file_head(path)


def review(result, path=None, *, calibration=None, title: str | None = None, overwrite: bool = False) -> Path:
    """Write the reviewer report of a :class:`Population` or :class:`Twin` to ``path`` (HTML).

    ``path`` defaults to ``review.html`` in the working directory; the file is written atomically
    (a temporary file renamed into place, with ordinary permissions). An existing file is replaced
    only if it is an earlier report (``overwrite=True`` replaces any regular file); anything else
    is refused before any work is done. Returns the path.

    Examples
    --------
    >>> bt.review(population, "fit-review.html", calibration=cal)  # doctest: +SKIP
    """
    from bayestwin.population import Population
    from bayestwin.twin import Twin

    path = Path(path or "review.html")
    check_target(path, is_ours=_is_report, force=overwrite, what="reviewer report")
    if isinstance(result, Population):
        body = _population_sections(result, calibration)
        kind = "population fit"
    elif isinstance(result, Twin):
        body = _twin_sections(result)
        kind = f"{len(result.patients)} twin(s)"
    elif isinstance(result, xr.DataTree):
        body = _datatree_sections(result)
        kind = "fit (ArviZ DataTree)"
    else:
        raise TypeError(f"review() takes a Population, a Twin or an ArviZ DataTree, not {type(result).__name__}")
    title = title or f"bayestwin review: {kind}"
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{GENERATOR}"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{''.join(body)}</body></html>"
    )
    write_file(path, page)
    return path


# ----------------------------------------------------------------------------- sections
def _population_sections(pop, calibration) -> list[str]:
    from bayestwin.review import predictive

    if pop.private:  # no fit to diagnose: the release and its noise
        return [
            _h2("Differential privacy") + _note(_private_note(pop)),
            _model_card(pop),
            _h2("Released parameters (with the noise's spread)") + _table(pop.summary()),
        ]
    out = [_verdict(pop.verdict), _model_card(pop)]
    out.append(_h2("Posterior summary") + _table(pop.summary()))
    out.append(_h2("Convergence diagnostics per variable") + _table(pop.verdict.table))
    if pop.federated:
        return out + _federated_sections(pop)
    free = free_quantities(pop.idata, pop.population_vars)
    out.append(_h2("Rank plots") + _note(_RANK) + _figure(_arviz("plot_rank", free)))
    out.append(_h2("Energy") + _note(_ENERGY) + _figure(_arviz("plot_energy", pop.idata)))
    ppc = predictive.predictive_check(pop, draws=200)
    out.append(_h2("Posterior predictive check") + _note(_PPC) + _figure(_arviz("plot_ppc_dist", ppc)))
    loo_p = predictive.loo(pop, by="patient")
    loo_o = predictive.loo(pop, by="obs")
    totals = pd.DataFrame(
        {
            "elpd": [loo_o.elpd, loo_p.elpd],
            "se": [loo_o.se, loo_p.se],
            "p": [loo_o.p, loo_p.p],
            "max Pareto k̂": [float(loo_o.pareto_k.max()), float(loo_p.pareto_k.max())],
            "k̂ threshold": [float(loo_o.good_k), float(loo_p.good_k)],
            "units above it": [int((loo_o.pareto_k > loo_o.good_k).sum()), int((loo_p.pareto_k > loo_p.good_k).sum())],
        },
        index=pd.Index(["leave one observation out", "leave one patient out"], name="PSIS-LOO"),
    )
    khat = predictive.khat_table(loo_p)  # the leave-one-patient-out result above, not a second LOO
    out.append(
        _h2("PSIS-LOO and Pareto k̂")
        + _note(loo_wording(loo_p.good_k, int(pop.posterior.sizes["chain"] * pop.posterior.sizes["draw"])))
        + _table(totals)
        + _figure(_khat_plot(khat, float(loo_p.good_k)))
        + "<details><summary>Pareto k̂ per patient</summary>"
        + _table(khat)
        + "</details>"
    )
    if calibration is not None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")
        calibration.plot(axes)
        out.append(_h2("Forecast calibration") + _note(repr(calibration)) + _table(calibration.coverage) + _figure(fig))
    out.append(_h2("Patient effects") + _note(_FOREST) + _figure(_forest(pop)))
    return out


def _federated_sections(pop) -> list[str]:
    """A federated fit (EP over sites): how EP settled and what each site sent; the sections
    that need the rows (predictive check, PSIS-LOO, patient effects) are left out, and say why."""
    s = pop.sampler
    sweeps = pd.DataFrame(
        {"sweep": [h["sweep"] for h in s["history"]], "moved (posterior SDs)": [h["moved"] for h in s["history"]]}
    ).set_index("sweep")
    sites = pd.DataFrame({"patients": s.get("patients", {}), "observations": s.get("observations", {})}).rename_axis(
        "site"
    )
    note = (
        f"Fitted by expectation propagation over {len(s['sites'])} sites (tol {s['tol']} posterior SDs); "
        f"{s['messages']} messages, {s['bytes_sent']:,} bytes in all. The diagnostics above are the sites' "
        "last NUTS runs on their tilted distributions (worst over sites). The rows stayed at the sites, so "
        "this report has no predictive check, PSIS-LOO or patient effects: each site can review its own "
        "twins, and a pooled refit where rows may be pooled is the check of the federation itself."
    )
    return [_h2("Expectation propagation over sites") + _note(note) + _table(sweeps) + _table(sites)]


def _private_note(pop) -> str:
    """What a differentially private release (:func:`bayestwin.privacy.private_fit`) is and holds."""
    s = pop.sampler
    return (
        f"Released under ({s['epsilon']:g}, {s['delta']:g})-differential privacy (the accountant's epsilon "
        f"{s['epsilon_accountant']:.4g}) by sample-and-aggregate over {s['groups']} groups: each group's "
        "posterior mean clipped to a box fixed before the data"
        + (f" (public bounds for {', '.join(sorted(s['bounds']))}; " if s.get("bounds") else " (")
        + f"the prior's mean ± {s.get('clip_sds', 2.0):g} prior SDs"
        + (" otherwise" if s.get("bounds") else "")
        + "), averaged, and Gaussian noise of SD "
        f"{s['noise_multiplier'] * s['sensitivity_in_box_widths']:.3g} box widths added to each coordinate. "
        "The posterior above is that "
        "noise around the released parameters, not a fit's posterior: the groups' fits, their diagnostics, "
        "the rows and the number of patients are not released, so this report has no convergence diagnostics, "
        "predictive check or PSIS-LOO."
    )


def _twin_sections(twin) -> list[str]:
    out = [_verdict(twin.verdict), _model_card(twin.population, twin=twin)]
    out.append(_h2("Per-twin diagnostics") + _note(_TWIN_GATE) + _table(twin.verdict.table))
    out.append(_h2("Posterior summary") + _table(twin.summary()))
    out.append(_h2("Prior (population predictive) vs posterior") + _figure(_prior_posterior(twin)))
    forecast = twin.predict()
    figs = []
    for p in twin.patients[:6]:
        ax = forecast.plot(patient=p)
        figs.append(_figure(ax.figure))
    more = f"<p class='note'>First 6 of {len(twin.patients)} twins shown.</p>" if len(twin.patients) > 6 else ""
    out.append(_h2("Forecast bands (median, 50% and 90%)") + "".join(figs) + more)
    return out


def _datatree_sections(dt: xr.DataTree) -> list[str]:
    """A saved fit without its model: diagnostics, rank, energy and LOO only."""
    from bayestwin.population import _population_vars
    from bayestwin.review.convergence import diagnostics, gate

    post = dt.posterior.to_dataset()
    names = _population_vars(post)  # as the fit's own gate: no per-patient or per-observation entries
    table = diagnostics(post[names], dt.sample_stats.to_dataset())
    verdict = gate(table)
    card = {"variables": ", ".join(post.data_vars), "draws": f"{post.sizes['chain']} x {post.sizes['draw']}"}
    card |= {"data fingerprint": data_fingerprint(dt), **package_versions()}
    out = [_verdict(verdict)]
    if "bayestwin_verdict" in dt.attrs:  # what the gate said when the fit was made
        out.append(_note(f"Verdict stored with the fit: {dt.attrs['bayestwin_verdict']}"))
    out += [_h2("Model card") + _kv(card), _h2("Diagnostics") + _table(table)]
    out.append(_h2("Rank plots") + _figure(_arviz("plot_rank", free_quantities(dt, names))))
    out.append(_h2("Energy") + _figure(_arviz("plot_energy", dt)))
    if "log_likelihood" in dt.children:
        import arviz_stats as azs

        res = azs.loo(dt, pointwise=True)
        out.append(_h2("PSIS-LOO") + _note(f"elpd {res.elpd:.1f} (SE {res.se:.1f}), p {res.p:.1f}"))
    return out


# ----------------------------------------------------------------------------- pieces
def _verdict(verdict) -> str:
    cls = "ok" if verdict.converged else "bad"
    return f"<div class='{cls}'><b>Verdict:</b> {html.escape(str(verdict))}</div>"


def _model_card(pop, twin=None) -> str:
    card = {
        "family": pop.family.name,
        "family settings": json.dumps(pop.family.config(), default=str),
        "patients in the fit": pop.n_patients,
        "observations in the fit": pop.n_observations,
        "data fingerprint (SHA-256 of the fitted data)": data_fingerprint(pop.idata),
        "sampler": json.dumps(pop.sampler, default=str),
        "thresholds": json.dumps(pop.verdict.thresholds.__dict__),
    }
    if twin is not None:
        card |= {
            "twin sampler": json.dumps(twin.config._asdict()),
            "importance path": json.dumps(twin.importance._asdict()) if twin.importance else "not used",
        }
    card |= package_versions()
    return _h2("Model card") + _kv(card) + _priors(pop)


def _priors(pop) -> str:
    text = pop.model().str_repr()  # the PyMC model as printed: every prior, with its parameters
    return "<details><summary>The model and its priors</summary><pre>" + html.escape(text) + "</pre></details>"


def _kv(d: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _table(df: pd.DataFrame) -> str:
    return "<div class='wide'>" + df.to_html(float_format=lambda x: f"{x:.4g}", border=0) + "</div>"


def _h2(text: str) -> str:
    return f"<h2>{html.escape(text)}</h2>"


def _note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def _figure(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f"<img alt='figure' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _arviz(name: str, data, **kwargs):
    import arviz_plots as azp

    pc = getattr(azp, name)(data, backend="matplotlib", **kwargs)
    fig = pc.get_viz("figure")
    return fig.item() if hasattr(fig, "item") else fig


def _khat_plot(table: pd.DataFrame, good_k: float):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3), layout="constrained")
    k = table.sort_index()["pareto_k"].to_numpy()
    ax.plot(np.arange(len(k)), k, "o", ms=4, color="C0")
    ax.axhline(good_k, color="C3", ls="--", lw=1, label=f"threshold {good_k:.2f}")
    ax.axhline(1.0, color="C3", ls=":", lw=1, label="1 (no finite mean)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set(xlabel="patient", ylabel="Pareto k̂", title="Leave-one-patient-out Pareto k̂")
    return fig


def loo_wording(good_k: float, draws: int) -> str:
    """What a Pareto k̂ above the threshold means, in the words of the PSIS paper (Vehtari et al.
    2024): the threshold is min(1 - 1/log10(S), 0.7) for S posterior draws."""
    return (
        f"PSIS-LOO (Vehtari, Gelman & Gabry 2017). With S = {draws} draws a unit's Pareto k̂ above "
        f"{good_k:.2f} = min(1 - 1/log10 S, 0.7) means the importance-sampling estimate of its "
        "leave-one-out density is unreliable (Vehtari et al. 2024), not that the unit is an outlier. "
        "Leaving out a whole patient removes all of that patient's rows and the data behind that "
        "patient's own effects, so high k̂ are common by patient even in a well-specified model; "
        "for a reliable leave-one-patient-out ELPD refit without those patients (K-fold), and look "
        "at the patient's fit only if k̂ is also high by observation."
    )


def _forest(pop):
    """Posterior mean and 90% interval of each patient output, over the population's 90% band."""
    import matplotlib.pyplot as plt

    names = list(pop.family.patient_outputs)
    post = pop.posterior
    fig, axes = plt.subplots(
        1, len(names), figsize=(4 * len(names), 0.16 * post.sizes["patient"] + 1.5), layout="constrained"
    )
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names, strict=True):
        da = post[name]
        mean = da.mean(("chain", "draw")).to_numpy()
        lo, hi = da.quantile([0.05, 0.95], dim=("chain", "draw")).to_numpy()
        order = np.argsort(mean)
        y = np.arange(len(mean))
        ax.hlines(y, lo[order], hi[order], color="C0", lw=1)
        ax.plot(mean[order], y, "o", ms=3, color="C0")
        # the population distribution of this effect (all patients' draws pooled): 90% band
        pooled = da.to_numpy().ravel()
        ax.axvspan(*np.quantile(pooled, [0.05, 0.95]), color="C1", alpha=0.15)
        ax.axvline(np.median(pooled), color="C1", lw=1)
        ax.set(title=name, yticks=[], xlabel="posterior mean, 90% interval")
    return fig


def _prior_posterior(twin):
    """Each twin's posterior of each patient output against its population predictive (prior)."""
    import matplotlib.pyplot as plt

    pop = twin.population
    names = list(pop.family.patient_outputs)
    patients = twin.patients[:6]
    prior = [pop.draw_patients(twin.cohort, seed=s) for s in range(200)]
    fig, axes = plt.subplots(len(patients), len(names), figsize=(4 * len(names), 2.2 * len(patients)), squeeze=False)
    for i, p in enumerate(patients):
        for j, name in enumerate(names):
            ax = axes[i, j]
            pri = np.array([float(d[name].sel(patient=p)) for d in prior])
            postd = twin.posterior[name].sel(patient=p).to_numpy().ravel()
            bins = np.histogram_bin_edges(np.concatenate([pri, postd]), bins=40)
            ax.hist(pri, bins=bins, density=True, color="C7", alpha=0.5, label="population predictive")
            ax.hist(postd, bins=bins, density=True, color="C0", alpha=0.6, label="twin posterior")
            ax.set(title=f"{p}: {name}", yticks=[])
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


_RANK = (
    "Ranks of each chain's draws among all chains: near-uniform histograms mean the chains sample the "
    "same distribution (Vehtari et al. 2021)."
)
_ENERGY = (
    "Marginal energy vs energy transitions: similar widths mean the sampler explores the tails "
    "(E-BFMI >= 0.3; Betancourt 2016)."
)
_PPC = "Densities of replicated data sets (posterior predictive) against the observed data."
_FOREST = (
    "Each patient's posterior mean and 90% interval, ordered; shaded: the population's 90% band of the "
    "same effect. Patients with little data sit close to the population centre (shrinkage)."
)
_TWIN_GATE = (
    "One row per twin: R-hat, ESS, divergences, E-BFMI, the importance path's Pareto k̂, and "
    "out_of_population: the posterior median of the squared Mahalanobis distance of the twin's random "
    "effects (re_distance2) beyond the population's 99% region."
)
