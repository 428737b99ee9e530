"""A federated population fit on real data against the pooled fit of the same rows (issue 22).

lme4's ``sleepstudy`` (18 subjects, 10 days each; shipped in ``models/sleepstudy/data.csv``) is
split by subject into three "hospitals" by each subject's day-0 reaction time (thirds: the sites
differ in case mix, the hard case for combining them). :func:`bayestwin.federated.federated_fit`
(expectation propagation over sites, each site's tilted distribution sampled by NUTS, 4 x
(1000 + 1000) per site and sweep) is compared with ``bt.fit`` on the pooled rows (4 x (1000 +
1000)), the peer. Printed: each population parameter's posterior mean and SD from both, the
difference of the means in pooled posterior SDs (goal <= 0.1), the ratio of the SDs (goal within
10%), EP's sweeps, messages and bytes sent, the wall times; then one held-out-style twin (a subject's
first 5 days) from each population, compared in the twin's posterior SDs.

    .venv/bin/python benchmarks/federated.py            # about 3.5 minutes on 2 cores (fits 3.3-3.6 min, measured)
    .venv/bin/python benchmarks/federated.py --flower   # + the same fit on Flower's simulation engine
    .venv/bin/python benchmarks/federated.py --site-effects   # site effects across sites, below

``--site-effects``: a formula with a site random effect, ``(1 | site)``, across four simulated
hospitals (40 patients, the progression simulation with site offsets -10, -3, 3 and 10 on a
patient SD of 6), each hospital a site holding one level: the federated fit (each level's
effects local to its site, bayestwin.federated.site) against the pooled fit of the same rows,
as above, and a new patient's twin at hospital h3 from each. About 7 minutes on 2 cores.
``--levels 8``: eight hospitals of ten patients (offsets evenly from -10 to 10).

``--pk``: NONMEM event tables (the PK family) across sites: the shipped Theoph study
(``models/theoph/data.csv``, 12 subjects, the zoo spec's model: one compartment, first-order
absorption, additive error, independent BSV) split by subject into three sites of four, the
federated fit against the pooled one as above, then a twin of the first subject from its first
three levels (after its dose) from each population. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import bayestwin as bt
from bayestwin.federated import federated_fit

ROOT = Path(__file__).resolve().parents[1]
KEY = b"benchmark-federated-sleepstudy"


def sleepstudy() -> pd.DataFrame:
    return pd.read_csv(ROOT / "models" / "sleepstudy" / "data.csv")


def cohort(df: pd.DataFrame) -> bt.Cohort:
    return bt.Cohort(df, patient="Subject", time="Days", outcome="Reaction", therapy=None, key=KEY)


def split(df: pd.DataFrame, sites: int) -> dict[str, bt.Cohort]:
    """Subjects in ``sites`` groups by their day-0 reaction time (different case mixes)."""
    day0 = df[df.Days == 0].set_index("Subject")["Reaction"].sort_values(kind="stable")
    groups = np.array_split(day0.index.to_numpy(), sites)
    return {f"hospital_{j}": cohort(df[df.Subject.isin(g)]) for j, g in enumerate(groups)}


def compare(pooled, fed) -> pd.DataFrame:
    rows = []
    for name in pooled.population_vars:
        if name not in fed.posterior:
            continue
        a, b = pooled.posterior[name], fed.posterior[name]
        extra = [d for d in a.dims if d not in ("chain", "draw")]
        a = a.stack(element=extra) if extra else a.expand_dims(element=[""])
        b = b.stack(element=extra) if extra else b.expand_dims(element=[""])
        for j in range(a.sizes["element"]):
            x, y = a.isel(element=j), b.isel(element=j)
            if float(x.std()) < 1e-12:  # structurally fixed (a correlation matrix's diagonal)
                continue
            label = name if not extra else f"{name}[{a['element'].values[j]}]"
            rows.append(
                {
                    "parameter": label,
                    "pooled mean": float(x.mean()),
                    "pooled sd": float(x.std()),
                    "federated mean": float(y.mean()),
                    "federated sd": float(y.std()),
                    "|diff| / pooled sd": abs(float(y.mean()) - float(x.mean())) / float(x.std()),
                    "sd ratio": float(y.std()) / float(x.std()),
                }
            )
    return pd.DataFrame(rows)


def unconstrained(pooled, fed) -> pd.DataFrame:
    """Every coordinate of the population posterior in the sampler's unconstrained space (where
    EP works and twins condition: the random effects' Cholesky factor too), as the tests compare."""
    labels = [b.name if b.size == 1 else f"{b.name}[{j}]" for b in fed.program(8).phi for j in range(b.size)]
    (ma, ca), (mb, cb) = [(np.asarray(p.approx.mean), np.asarray(p.approx.chol)) for p in (pooled, fed)]
    sa, sb = np.sqrt(np.diag(ca @ ca.T)), np.sqrt(np.diag(cb @ cb.T))
    return pd.DataFrame(
        {
            "coordinate": labels,
            "pooled mean": ma,
            "pooled sd": sa,
            "federated mean": mb,
            "federated sd": sb,
            "|diff| / pooled sd": np.abs(mb - ma) / sa,
            "sd ratio": sb / sa,
        }
    )


def report(what: str, draws: int, pooled, fed, t_pooled: float, t_fed: float) -> None:
    """Print the two fits' times and EP's exchange, and every population parameter (constrained
    and unconstrained) from both, against the goals (means within 0.1 pooled SD, SDs within 10%)."""
    out = pd.concat([compare(pooled, fed), unconstrained(pooled, fed).rename(columns={"coordinate": "parameter"})])
    s = fed.sampler
    print(f"{what}, {draws} + {draws} draws x 4 chains")
    print(f"pooled fit (peer): {t_pooled:.1f} s, verdict: {pooled.verdict}")
    print(
        f"federated fit: {t_fed:.1f} s, {s['sweeps']} EP sweeps (moved "
        f"{', '.join(f'{h["moved"]:.3f}' for h in s['history'][1:])} SD), {s['messages']} messages, "
        f"{s['bytes_sent']:,} bytes; verdict: {fed.verdict}"
    )
    print(out.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(
        f"largest |diff| / pooled sd: {out['|diff| / pooled sd'].max():.3f} (goal <= 0.1); "
        f"sd ratios {out['sd ratio'].min():.3f}-{out['sd ratio'].max():.3f} (goal 0.9-1.1)"
    )


def pk(draws: int, sites: int = 3) -> None:
    from bayestwin.zoo import read_spec, spec_family

    family = spec_family(read_spec(ROOT / "models" / "theoph"))  # the zoo's model of this study
    df = pd.read_csv(ROOT / "models" / "theoph" / "data.csv", na_values=".").drop(columns=["WT"])
    ids = np.array_split(np.array(sorted(df.ID.unique())), sites)

    def table(rows):
        return bt.read_nonmem(rows, key=KEY)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        t = time.perf_counter()
        parts = {f"site_{j}": table(df[df.ID.isin(g)]) for j, g in enumerate(ids)}
        fed = federated_fit(parts, family, draws=draws, tune=draws, seed=2)
        t_fed = time.perf_counter() - t
        # the same model on the pooled rows: the priors the coordinator centred from the sites'
        # aggregates (geometric mean dose; the zoo's own fit centres on the median dose)
        t = time.perf_counter()
        pooled = bt.fit(table(df), fed.family, draws=draws, tune=draws, seed=1)
        t_pooled = time.perf_counter() - t
    shifted = {k: v.to_dict()["mu"] for k, v in fed.family.priors.items() if k.startswith("log_")}
    default = family.default_priors(pooled.schema, family.design(table(df).frame, table(df).baseline, pooled.schema))
    print(
        "prior means fixed from the sites' aggregates (the pooled table's own defaults): "
        + ", ".join(f"{k} {m:.3f} ({default[k].to_dict()['mu']:.3f})" for k, m in shifted.items())
    )
    report(f"Theoph (12 subjects) in {sites} sites by subject, {family!r}", draws, pooled, fed, t_pooled, t_fed)
    first = df[df.ID == df.ID.iloc[0]]
    one = pd.concat([first[first.EVID == 1], first[first.EVID == 0].iloc[1:4]]).assign(ID=101)
    a, b = pooled.condition(one, key=KEY, seed=4), fed.condition(one, key=KEY, seed=4)
    for name in [v for v in a.posterior.data_vars if v.startswith("patient_")]:  # this parameterisation's
        x, y = a.posterior[name], b.posterior[name]
        print(
            f"twin of subject {df.ID.iloc[0]} (3 levels), {name}: pooled {float(x.mean()):.3f} "
            f"(SD {float(x.std()):.3f}), federated {float(y.mean()):.3f} (SD {float(y.std()):.3f}): "
            f"{abs(float(y.mean()) - float(x.mean())) / float(x.std()):.3f} twin SDs apart"
        )


SITE_FORMULA = "y ~ time + time:therapy + (1 + time | patient) + (1 | site)"
THERAPIES = ["standard", "drug_a", "drug_b"]


def hospitals(n: int = 40, offsets=(-10.0, -3.0, 3.0, 10.0), seed: int = 5) -> pd.DataFrame:
    """The progression simulation with a ``site`` column (patients spread over the hospitals in
    turn) and each hospital's offset added to its patients' outcomes."""
    from bayestwin.families.progression import simulate

    df, _ = simulate(n_patients=n, seed=seed)
    site = {p: f"h{j % len(offsets)}" for j, p in enumerate(df.patient.unique())}
    df["site"] = df.patient.map(site)
    df["outcome"] += df.site.map({f"h{k}": o for k, o in enumerate(offsets)})
    return df


def site_effects(draws: int, levels: int = 4) -> None:
    offsets = (-10.0, -3.0, 3.0, 10.0) if levels == 4 else tuple(np.linspace(-10.0, 10.0, levels))
    df = hospitals(10 * levels, offsets)
    new = df[df.patient == df.patient.unique()[-1]].iloc[:3]  # the last hospital, three visits
    df = df.drop(new.index)
    family = bt.Formula(SITE_FORMULA)

    def table(rows):
        return bt.Cohort(rows, covariates=["site"], therapies=THERAPIES, key=KEY)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        t = time.perf_counter()
        pooled = bt.fit(table(df), family, draws=draws, tune=draws, seed=1)
        t_pooled = time.perf_counter() - t
        t = time.perf_counter()
        sites = {h: table(df[df.site == h]) for h in sorted(df.site.unique())}
        fed = federated_fit(sites, family, therapies=THERAPIES, draws=draws, tune=draws, seed=2)
        t_fed = time.perf_counter() - t
    report(f"{levels} simulated hospitals of 10 patients, {SITE_FORMULA}", draws, pooled, fed, t_pooled, t_fed)
    a, b = pooled.condition(new, key=KEY, seed=4), fed.condition(new, key=KEY, seed=4)
    x, y = a.posterior["patient_effects"], b.posterior["patient_effects"]
    fa, fb = (t.predict(times=[12.0]).draws["mean"] for t in (a, b))
    for e in x["patient_effect"].values:
        xe, ye = x.sel(patient_effect=e), y.sel(patient_effect=e)
        print(
            f"twin at {new.site.iloc[0]}, patient effect {e}: pooled {float(xe.mean()):.2f} "
            f"(SD {float(xe.std()):.2f}), "
            f"federated {float(ye.mean()):.2f} (SD {float(ye.std()):.2f}): "
            f"{abs(float(ye.mean()) - float(xe.mean())) / float(xe.std()):.3f} twin SDs apart"
        )
    print(
        f"its forecast at month 12 (standard therapy): pooled {float(fa.isel(therapy=0).mean()):.2f} "
        f"(SD {float(fa.isel(therapy=0).std()):.2f}), federated {float(fb.isel(therapy=0).mean()):.2f} "
        f"(SD {float(fb.isel(therapy=0).std()):.2f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--flower", action="store_true", help="the same fit again on Flower's simulation engine (Ray)")
    ap.add_argument("--site-effects", action="store_true", help="a (1 | site) formula across four simulated hospitals")
    ap.add_argument("--pk", action="store_true", help="NONMEM events (Theoph, the PK family) across sites")
    ap.add_argument("--levels", type=int, default=4, help="with --site-effects: the number of hospitals")
    args = ap.parse_args()
    if args.site_effects:
        site_effects(args.draws, args.levels)
        return
    if args.pk:
        pk(args.draws, args.sites)
        return
    df = sleepstudy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        t = time.perf_counter()
        pooled = bt.fit(cohort(df), draws=args.draws, tune=args.draws, seed=3)
        t_pooled = time.perf_counter() - t
        t = time.perf_counter()
        fed = federated_fit(split(df, args.sites), draws=args.draws, tune=args.draws, seed=3)
        t_fed = time.perf_counter() - t
    table = compare(pooled, fed)
    coords = unconstrained(pooled, fed)
    coords = coords[~coords["coordinate"].isin(table["parameter"])].rename(columns={"coordinate": "parameter"})
    table = pd.concat([table, coords])
    s = fed.sampler
    print(f"sleepstudy, {args.sites} sites split by day-0 reaction time, {args.draws} + {args.draws} draws x 4 chains")
    print(f"pooled fit (peer): {t_pooled:.1f} s, verdict: {pooled.verdict}")
    print(
        f"federated fit: {t_fed:.1f} s ({t_fed / t_pooled:.1f}x the pooled fit), {s['sweeps']} EP sweeps, "
        f"{s['messages']} messages, {s['bytes_sent']:,} bytes; verdict: {fed.verdict}"
    )
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(
        f"largest |diff| / pooled sd: {table['|diff| / pooled sd'].max():.3f} (goal <= 0.1); "
        f"sd ratios {table['sd ratio'].min():.3f}-{table['sd ratio'].max():.3f} (goal 0.9-1.1); "
        "both over the constrained parameters above and every unconstrained coordinate"
    )
    if args.flower:
        from bayestwin.federated.flower import flower_fit

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            fl = flower_fit(split(df, args.sites), draws=args.draws, tune=args.draws, seed=3)
            t_fl = time.perf_counter() - t
        tf = pd.concat([compare(pooled, fl), unconstrained(pooled, fl)])
        f = fl.sampler
        print(
            f"on Flower (simulation engine, each site's ClientApp in a Ray worker): {t_fl:.1f} s "
            f"({t_fl / t_fed:.2f}x the local path), {f['sweeps']} EP sweeps, {f['messages']} messages, "
            f"{f['bytes_sent']:,} bytes; verdict: {fl.verdict}; against the pooled fit: largest |diff| / pooled sd "
            f"{tf['|diff| / pooled sd'].max():.3f}, sd ratios {tf['sd ratio'].min():.3f}-{tf['sd ratio'].max():.3f}"
        )
    one = df[(df.Subject == df.Subject.iloc[0]) & (df.Days <= 4)]
    a, b = pooled.condition(one, key=KEY, seed=4), fed.condition(one, key=KEY, seed=4)
    for name in ("patient_intercept", "patient_slope"):
        x, y = a.posterior[name], b.posterior[name]
        print(
            f"twin of subject {df.Subject.iloc[0]} (days 0-4), {name}: pooled {float(x.mean()):.2f} "
            f"(SD {float(x.std()):.2f}), federated {float(y.mean()):.2f} (SD {float(y.std()):.2f}): "
            f"{abs(float(y.mean()) - float(x.mean())) / float(x.std()):.3f} twin SDs apart"
        )


if __name__ == "__main__":
    main()
