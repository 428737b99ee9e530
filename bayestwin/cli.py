"""Command line: ``bayestwin demo`` and friends. ``bayestwin --help`` lists every command."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args) -> int:
    import warnings

    import numpy as np
    import pandas as pd

    import bayestwin as bt
    from bayestwin.families.progression import simulate

    warnings.simplefilter("ignore", FutureWarning)
    say = print if not args.quiet else (lambda *a, **k: None)
    key = bt.new_key()
    therapies = ["standard", "drug_a", "drug_b"]
    t_start = time.perf_counter()
    df, _ = simulate(n_patients=args.patients, therapies=therapies, seed=args.seed)
    cohort = bt.Cohort(df, covariates=["age", "sex"], therapies=therapies, key=key)
    say(f"1. Simulated cohort: {cohort}")
    say("2. Fitting the population model (PyMC model, JAX NUTS via numpyro) ...")
    pop = bt.fit(cohort, draws=args.draws, tune=args.draws, seed=args.seed)
    say(f"   population fit: {pop.verdict}")
    say(pop.summary()[["mean", "sd", "eti89_lb", "eti89_ub", "r_hat", "ess_bulk"]].to_string())

    new, truth = simulate(n_patients=1, therapies=therapies, seed=args.seed + 1000)
    new = new[new.time <= 6.0]  # three visits so far, on standard care
    new["therapy"] = "standard"
    say(f"\n3. New patient with {len(new)} visits (times {list(new.time)}), conditioning its twin ...")
    twin = pop.condition(new, key=key, seed=args.seed)
    say(f"   twin: {twin.verdict}")
    horizon = 18.0
    fc = twin.predict(therapies=therapies, times=np.linspace(6.0, horizon, 5))
    table = fc.summary("observation")
    table = table[table.time == horizon][["therapy", "mean", "q05", "median", "q95"]]
    best = fc.prob_best(time=horizon, direction="lower").iloc[0]
    table["P(best)"] = table.therapy.map(best)
    cross = fc.prob_cross(threshold=float(new.outcome.iloc[0]) + 10, by=horizon).iloc[0]
    table["P(+10 by T)"] = table.therapy.map(cross)
    say(f"\n4. Forecast at t = {horizon:g} if each therapy starts now (lower outcome is better):")
    say(table.to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    verdict_ok = pop.verdict.converged and twin.verdict.converged
    say(f"\nConvergence verdict: {'PASS' if verdict_ok else 'FAIL'} (population: {pop.verdict}; twin: {twin.verdict})")
    say(f"Total time {time.perf_counter() - t_start:.1f} s")
    pd.set_option("display.width", 120)
    return 0 if verdict_ok else 2


def _dose(args) -> int:
    import warnings

    import numpy as np
    import pandas as pd

    import bayestwin as bt
    from bayestwin.data.nonmem import read_nonmem
    from bayestwin.dosing import Regimen, dose_search
    from bayestwin.families.pk import Pk

    warnings.simplefilter("ignore", FutureWarning)
    say = print if not args.quiet else (lambda *a, **k: None)
    t_start = time.perf_counter()
    # Every argument and the table are checked before the minutes-long fit.
    regimens = [Regimen(a, args.interval, doses=args.doses, duration=args.duration) for a in _amounts(args.amounts)]
    lo, hi = args.target
    if not (np.isfinite([lo, hi]).all() and lo < hi):
        raise ValueError(f"--target needs LOW < HIGH, both finite, not {lo:g} {hi:g}")
    if not 0 <= args.max_toxic <= 1:
        raise ValueError(f"--max-toxic is a probability in [0, 1], not {args.max_toxic:g}")
    if not 0 <= args.min_target <= 1:
        raise ValueError(f"--min-target is a probability in [0, 1], not {args.min_target:g}")
    if args.limit is not None and not (np.isfinite(args.limit) and args.limit > 0):
        raise ValueError(f"--limit must be a positive concentration, not {args.limit:g}")
    if args.start is not None and not np.isfinite(args.start):
        raise ValueError(f"--start must be a finite time, not {args.start:g}")
    fit_options = {"--covariates": args.covariates, "--weight": args.weight, "--compartments": args.compartments}
    fit_options |= {"--route": args.route, "--error": args.error, "--draws": args.draws}
    if args.population is not None and (given := [k for k, v in fit_options.items() if v not in (None, "")]):
        raise ValueError(
            f"{', '.join(given)} describe(s) a new population fit: with --population the saved population's own "
            "model is used"
        )
    if args.draws is not None and args.draws < 1:
        raise ValueError(f"--draws must be >= 1, not {args.draws}")
    pop = None
    if args.population is not None:  # before the table: a wrong name fails first, and fast
        pop = bt.load(args.population)
        if not hasattr(pop.family, "concentration"):
            raise ValueError(
                f"--population {args.population} is a {pop.family.name!r} population: dose needs a "
                "pharmacokinetic one (pk or ode)"
            )
    table = _read_table(args.data)
    table.columns = [str(c).upper() for c in table.columns]
    if "ID" not in table.columns:
        raise ValueError(f"{args.data} has no ID column")
    mine = table["ID"].astype(str) == str(args.patient)
    if not mine.any():
        raise ValueError(f"patient {args.patient!r} not found in the ID column of {args.data}")
    if mine.all() and pop is None:
        raise ValueError(
            f"{args.data} holds only patient {args.patient!r}: the population needs other IDs "
            "(or a saved population: --population)"
        )
    covariates = [c.strip().upper() for c in args.covariates.split(",") if c.strip()] if args.covariates else []
    ignore = [c.strip().upper() for c in args.ignore.split(",") if c.strip()] if args.ignore else []
    weight = args.weight.upper() if args.weight else None
    if weight and weight not in covariates:
        covariates.append(weight)  # the weight column is read as a covariate of the PK model
    key = bt.new_key()  # this run only: nothing is stored, the table shows the ID you gave
    try:  # this run's key is random: errors name the table's own ID, not a pseudonym
        if pop is None:
            options = {"compartments": args.compartments or 1, "route": args.route or "oral"}
            family = Pk(**options, error=args.error or "combined", weight=weight)
            others = read_nonmem(table[~mine], covariates=covariates, key=key, ignore=ignore)
            patient = read_nonmem(
                table[mine], covariates=covariates, key=key, allow_no_observations=True, ignore=ignore
            )
            family.check(others.frame, covariates)
            family.check(patient.frame, covariates)
        else:  # the patient's rows only, read against the population's own columns
            missing = [c for c in ignore if c not in table.columns]
            if missing:
                raise ValueError(f"--ignore names {missing[0]}, which is not a column of {args.data}")
            patient = pop.cohort(table[mine].drop(columns=ignore), key=key)
    except bt.DataError as err:
        ids = bt.reidentify(table["ID"].dropna().unique(), key)
        who = f"ID {ids.get(err.patient, err.patient)}" if err.patient is not None else None
        raise bt.DataError(err.problem, patient=who, row=err.row, column=err.column) from None
    if pop is None:
        say(
            f"1. Population: {others}; fitting {family.compartments}-compartment {family.route} PK "
            f"({family.error} error) ..."
        )
        draws = args.draws or 1000
        pop = bt.fit(others, family, draws=draws, tune=draws, seed=args.seed)
        say(f"   population fit: {pop.verdict}")
    else:
        say(f"1. Population: {args.population} (saved, checksums verified; not refitted): {pop.verdict}")
    n_levels = int((patient.frame["EVID"] == 0).sum())
    say(f"2. Patient {args.patient}: {n_levels} level(s); conditioning the twin ({args.method}) ...")
    twin = pop.condition(patient, method=args.method, seed=args.seed)
    say(f"   twin: {twin.verdict}")
    result = dose_search(
        twin,
        regimens,
        target=tuple(args.target),
        metric=args.metric,
        limit=args.limit,
        max_toxic=args.max_toxic,
        min_target=args.min_target,
        start=args.start,
    )
    result = result.drop(columns=["patient", "amount", "interval", "duration"])
    result["recommended"] = np.where(result["recommended"], "<==", "")
    say(
        f"\n3. Regimens for patient {args.patient}: {args.metric} over the last interval, target [{lo:g}, {hi:g}]"
        + (f", toxic if peak > {args.limit:g}" if args.limit is not None else "")
    )
    pd.set_option("display.width", 160)
    say(result.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    for note in result.attrs.get("notes", []):
        say(note)
    ok = pop.verdict.converged and twin.verdict.converged
    say(f"\nConvergence verdict: {'PASS' if ok else 'FAIL'} (population: {pop.verdict}; twin: {twin.verdict})")
    say(f"Total time {time.perf_counter() - t_start:.1f} s")
    return 0 if ok else 2


def _fit(args) -> int:
    from bayestwin.zoo import fit_spec, read_spec

    say = (lambda *a: None) if args.quiet else print
    t0 = time.perf_counter()
    spec = read_spec(args.spec)
    out = args.out or spec["folder"] / "population"
    for name in ("draws", "tune"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name} must be >= 1, not {v}")
    say(f"Fitting {spec['name']} ({spec['family']['name']}) from {args.spec} ...")
    quick = {k: v for k, v in (("draws", args.draws), ("tune", args.tune)) if v is not None}
    pop = fit_spec(args.spec, out=args.out, progressbar=None if not args.quiet else False, **quick)
    say(pop.summary().to_string(float_format=lambda x: f"{x:.4g}"))
    say(f"\nVerdict: {pop.verdict}\nSaved to {out} in {time.perf_counter() - t0:.1f} s")
    return 0 if pop.verdict.converged else 2


def _condition(args) -> int:
    import os

    from bayestwin.engine.many import condition_many, refresh
    from bayestwin.zoo import load_any as load

    say = (lambda *a: None) if args.quiet else print
    key = os.environ.get(args.key_env)
    if not key:
        raise ValueError(
            f"set ${args.key_env} to your pseudonymisation key (it is read from the environment, never from the "
            "command line)"
        )
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, not {args.batch}")
    population = load(args.population)
    rows = _read_table(args.data)
    client = None
    if args.scheduler:
        from distributed import Client

        client = Client(args.scheduler)
    t0 = time.perf_counter()
    settings = {"key": key, "client": client, "batch": args.batch, "method": args.method, "seed": args.seed, "say": say}
    try:
        if args.refresh:
            table = refresh(population, args.refresh, rows, out=args.out, **settings)
        else:
            table = condition_many(population, rows, out=args.out, **settings)
    finally:
        if client is not None:
            client.close()
    wall = time.perf_counter() - t0
    ok = int(table["converged"].sum())
    say(
        f"{len(table)} twins in {wall:.1f} s ({len(table) / wall:.1f} twins/s); {ok} converged, "
        f"{int(table['out_of_population'].sum())} out of population; store: {args.out}"
    )
    return 0 if ok == len(table) else 2


def _review(args) -> int:
    import os
    from pathlib import Path

    import xarray as xr

    from bayestwin._atomic import check_target
    from bayestwin.review.report import _is_report, review

    src = Path(args.path)
    if src.is_dir() or (not src.exists() and os.sep not in args.path):  # an artifact folder or a zoo model
        from bayestwin.zoo import load_any as load

        out = Path(args.output or f"{src.name}.html")
        check_target(out, is_ours=_is_report, force=args.force, what="reviewer report")  # before loading
        obj = load(args.path)
        out = review(obj, out, overwrite=args.force)
        if not args.quiet:
            print(f"wrote {out} ({obj.verdict})")
        return 0
    if not src.is_file():
        raise ValueError(f"no such file: {src}")
    out = Path(args.output or src.with_suffix(".html"))
    if out.resolve() == src.resolve():
        raise ValueError(f"the report would replace its own input {src}: give -o")
    check_target(out, is_ours=_is_report, force=args.force, what="reviewer report")
    try:
        tree = xr.open_datatree(src)
    except (OSError, ValueError) as err:
        raise ValueError(f"{src} is not an ArviZ DataTree in netCDF: {err}") from None
    missing = {"posterior", "sample_stats"} - set(tree.children)
    if missing:
        raise ValueError(f"{src} lacks the group(s) {sorted(missing)}")
    out = review(tree.load(), out, overwrite=args.force)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _validate(args) -> int:
    from bayestwin.review.sbc import run_sbc

    say = print if not args.quiet else (lambda *a, **k: None)
    if args.reps < 1 or args.twins < 1 or not 0 < args.alpha < 1:
        raise ValueError(
            f"--reps and --twins must be >= 1 and --alpha in (0, 1): {args.reps}, {args.twins}, {args.alpha}"
        )
    res = run_sbc(
        args.family, reps=args.reps, twins=args.twins, out=args.out, seed=args.seed, say=say, overwrite=args.force
    )
    worst = min(float(r.table["p_value"].min()) for r in res.values())
    verdict = "PASS" if worst > args.alpha else "FAIL"
    say(f"Rank uniformity: {verdict} (smallest χ² p-value {worst:.4f}, alpha {args.alpha})")
    return 0 if worst > args.alpha else 2


def _amounts(text: str) -> list[float]:
    try:
        amounts = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--amounts takes numbers separated by commas (e.g. 100,200,300), not {text!r}") from None
    if not amounts:
        raise ValueError("--amounts is empty")
    return amounts


def _read_table(path):
    """A CSV table ('.' = missing, as NONMEM writes it), or a clear error."""
    import pandas as pd

    try:
        return pd.read_csv(path, na_values=["."], keep_default_na=True)
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, IsADirectoryError) as err:
        raise ValueError(f"{path} is not a readable CSV table ({type(err).__name__})") from None


class _Parser(argparse.ArgumentParser):
    """argparse with exit status 1 for usage errors: 2 means "did not converge" here."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bayestwin",
        description="Patient digital twins: population fit -> posterior twin -> per-therapy forecast. "
        "Exit status: 0 done, 1 an error (one line on stderr; --debug for the traceback), 2 a fit or "
        "twin that did not converge.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="simulate a 3-therapy cohort, fit it, condition a new patient, print the forecast table",
        description="Simulate a cohort with 3 therapies, fit the progression model, condition a new patient "
        "with 3 visits, and print a per-therapy forecast with uncertainty, P(best) and the convergence verdict. "
        "Exits 2 if a convergence check fails.",
    )
    demo.add_argument("--patients", type=int, default=60, help="cohort size (default 60)")
    demo.add_argument("--draws", type=int, default=1000, help="draws (and tuning steps) per chain (default 1000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--quiet", action="store_true", help="print nothing; exit status only")
    demo.set_defaults(func=_demo)

    dose = sub.add_parser(
        "dose",
        help="fit population PK on a NONMEM-style table, condition one patient, print a regimen table",
        description="Precision dosing from a NONMEM-style event table (CSV; '.' = missing): fit the population "
        "PK model on every other ID (or load a saved one: --population), condition the patient's twin on its "
        "own doses and levels, and print for "
        "each candidate regimen the posterior of the target metric over its last dosing interval, P(target), "
        "P(toxic) and the recommendation (highest P(target) with P(toxic) <= --max-toxic). "
        "Exits 2 if a convergence check fails.",
    )
    dose.add_argument("--data", required=True, help="event table (CSV): ID, TIME, AMT, DV, EVID, ...")
    dose.add_argument("--patient", required=True, help="the patient's ID as written in the table")
    dose.add_argument("--amounts", required=True, help="candidate dose amounts, comma-separated (e.g. 100,200,300)")
    dose.add_argument("--interval", type=float, required=True, help="dosing interval (time units of the table)")
    dose.add_argument("--doses", type=int, default=6, help="doses per regimen (default 6)")
    dose.add_argument("--duration", type=float, default=0.0, help="infusion duration (default 0: bolus/oral)")
    dose.add_argument("--start", type=float, default=None, help="time of the first new dose (default: last event)")
    dose.add_argument("--target", type=float, nargs=2, required=True, metavar=("LOW", "HIGH"), help="target window")
    dose.add_argument("--metric", choices=["trough", "peak", "auc"], default="trough", help="target metric")
    dose.add_argument("--limit", type=float, default=None, help="toxicity limit on the peak")
    dose.add_argument("--max-toxic", type=float, default=0.1, help="largest acceptable P(toxic) (default 0.1)")
    dose.add_argument(
        "--min-target", type=float, default=0.5, help="smallest P(target) a recommended regimen needs (default 0.5)"
    )
    dose.add_argument("--ignore", default="", help="columns of the table to leave out, comma-separated (e.g. DATE,C)")
    dose.add_argument(
        "--population",
        default=None,
        help="a saved PK population (a zoo name such as theoph, or a folder written by bt.save) to condition on "
        "instead of fitting one; the table then needs only the patient's rows, and the model options below "
        "(--covariates to --draws) are refused",
    )
    dose.add_argument("--covariates", default="", help="covariate columns, comma-separated (e.g. WT,CYP2D6)")
    dose.add_argument("--weight", default=None, help="weight column for allometric scaling (e.g. WT)")
    dose.add_argument("--compartments", type=int, choices=[1, 2], default=None, help="1 or 2 (default 1)")
    dose.add_argument("--route", choices=["oral", "iv"], default=None, help="default oral")
    errors = ["additive", "proportional", "combined"]
    dose.add_argument("--error", choices=errors, default=None, help="default combined")
    dose.add_argument("--method", choices=["importance", "nuts"], default="importance", help="twin sampler")
    dose.add_argument(
        "--draws", type=int, default=None, help="population fit: draws (and tuning steps) per chain (default 1000)"
    )
    dose.add_argument("--seed", type=int, default=0)
    dose.add_argument("--quiet", action="store_true", help="print nothing; exit status only")
    dose.set_defaults(func=_dose)

    rev = sub.add_parser(
        "review",
        help="write the reviewer report (one self-contained HTML file) of a saved fit",
        description="Write the reviewer report of a fit saved as an ArviZ DataTree in netCDF "
        "(e.g. population.idata.to_netcdf('fit.nc')): verdict, model card, diagnostics, rank and energy "
        "plots and PSIS-LOO, every image embedded. From Python, bayestwin.review(population) adds the "
        "sections that need the model (predictive checks, patient effects, calibration).",
    )
    rev.add_argument("path", help="an artifact folder (bt.save), a model zoo name, or a netCDF file of a DataTree")
    rev.add_argument("-o", "--output", default=None, help="HTML file to write (default: PATH with .html)")
    rev.add_argument("--force", action="store_true", help="replace OUTPUT even if it is not an earlier report")
    rev.add_argument("--quiet", action="store_true", help="print nothing")
    rev.set_defaults(func=_review)

    fitp = sub.add_parser(
        "fit",
        help="fit a population model from its spec.toml and save the artifact and model card",
        description="Fit the model a spec.toml describes (data source, family and priors, sampler settings and "
        "seed) and save the artifact (netCDF + JSON card with checksums; default: the spec's population/ folder) "
        "and MODEL_CARD.md. Same spec and seed: identical draws on the same machine and stack. Exit 2 if the fit "
        "did not converge.",
    )
    fitp.add_argument("spec", help="spec.toml (e.g. models/sleepstudy/spec.toml)")
    fitp.add_argument("--out", default=None, help="artifact folder (default: next to the spec, population/)")
    fitp.add_argument("--draws", type=int, default=None, help="override the spec's draws (a quick check)")
    fitp.add_argument("--tune", type=int, default=None, help="override the spec's tuning steps")
    fitp.add_argument("--quiet", action="store_true", help="print nothing; exit status only")
    fitp.set_defaults(func=_fit)

    cond = sub.add_parser(
        "condition",
        help="condition a saved population on many patients' rows: a store of twins (resumable, Dask)",
        description="Condition a population artifact (folder or zoo name) on every patient of a CSV table, in "
        "batches (one vectorised JAX program each), and write the twins' summaries and thinned draws to a store "
        "folder (Parquet per batch, atomic). Rerun after a crash: finished batches are kept. --refresh STORE: "
        "only patients with rows in DATA are conditioned again (on all their rows), the others carried over. "
        "The pseudonymisation key is read from $BAYESTWIN_KEY (or --key-env). Exit 2 if a twin did not converge.",
    )
    cond.add_argument("--population", required=True, help="artifact folder or model zoo name")
    cond.add_argument("--data", required=True, help="CSV with the population's columns (NONMEM table for PK)")
    cond.add_argument("--out", required=True, help="store folder to write (or resume)")
    cond.add_argument("--refresh", default=None, help="yesterday's store: condition only patients with new rows")
    cond.add_argument("--scheduler", default=None, help="Dask scheduler address (default: run here)")
    cond.add_argument("--batch", type=int, default=256, help="patients per batch (default 256)")
    cond.add_argument("--method", default="importance", choices=["importance", "nuts"])
    cond.add_argument("--seed", type=int, default=0)
    cond.add_argument("--key-env", default="BAYESTWIN_KEY", help="environment variable holding the key")
    cond.add_argument("--quiet", action="store_true", help="print nothing; exit status only")
    cond.set_defaults(func=_condition)

    val = sub.add_parser("validate", help="validation runs: simulation-based calibration (sbc)")
    vsub = val.add_subparsers(dest="what", metavar="WHAT", required=True)
    sbc = vsub.add_parser(
        "sbc",
        help="simulation-based calibration of the population fit and of the twin conditioning step",
        description="Simulation-based calibration (Talts et al. 2018): data simulated from the prior, refitted, "
        "and the ranks of the true values among the posterior draws tested for uniformity (chi-square), for the "
        "population fit (--reps replicates, one fit each) and for the twin conditioning step (--twins virtual "
        "patients, conditioned at once). Exits 2 if a p-value is below --alpha.",
    )
    sbc.add_argument(
        "--family",
        default="progression",
        help="progression or pk (PK: the fit under priors frozen on the design); default progression",
    )
    sbc.add_argument("--reps", type=int, default=20, help="population-fit replicates (default 20; 200 for a full run)")
    sbc.add_argument("--twins", type=int, default=200, help="virtual patients for the twin step (default 200)")
    sbc.add_argument("--out", default=None, help="folder for the rank plots and the table (CSV)")
    sbc.add_argument(
        "--force", action="store_true", help="replace files of the outputs' names in --out that no SBC run wrote"
    )
    sbc.add_argument("--alpha", type=float, default=0.001, help="smallest acceptable p-value (default 0.001)")
    sbc.add_argument("--seed", type=int, default=0)
    sbc.add_argument("--quiet", action="store_true", help="print nothing; exit status only")
    sbc.set_defaults(func=_validate)

    trial = sub.add_parser(
        "trial",
        help="simulate a two-arm trial from a population model: power, type-I error, assurance, sample size",
        description="Read a trial file (TOML: [population], [design], [simulation]), fit the population model, "
        "simulate the trial under the fitted (or an assumed) effect, with the effect removed, and over the "
        "population posterior, and print the operating characteristics with Monte-Carlo SEs (and the sample "
        "size for a target power). With no file, runs the embedded example; --example prints it.",
    )
    trial.add_argument("design", nargs="?", default=None, help="trial file (TOML)")
    trial.add_argument("--example", action="store_true", help="print the example trial file and exit")
    trial.add_argument("--out", default=None, help="write the operating-characteristics table here (CSV)")
    trial.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier table")
    trial.add_argument("--quiet", action="store_true", help="print nothing; exit status only")
    trial.set_defaults(func=_trial)

    cache = sub.add_parser(
        "cache",
        help="show or clear the compiled-program cache (JAX's persistent compilation cache)",
        description="bayestwin keeps compiled twin and forecast programs on disk so that a new session "
        "loads them instead of compiling again (see bayestwin.cache). Shows the folder, the number of "
        "programs and their size; --clear deletes them. BAYESTWIN_CACHE_DIR sets the folder ('off' turns "
        "the cache off).",
    )
    cache.add_argument("--clear", action="store_true", help="delete every cached program")
    cache.set_defaults(func=_cache_command)
    return parser


def _cache_command(args) -> int:
    from bayestwin import cache

    where = cache.in_use()
    if where is None:
        print(f"compiled-program cache: off ({cache.ENV}=off)")
        return 0
    if args.clear:
        n = cache.clear(where)
        print(f"compiled-program cache: {where}: removed {n} programs")
        return 0
    n, size = cache.size(where)
    print(f"compiled-program cache: {where}: {n} programs, {size / 1e6:.1f} MB")
    return 0


def _trial(args) -> int:
    from bayestwin.trials.cli import run

    return run(args)


def main(argv=None) -> int:
    """Run one command. Every error ends the same way: ``bayestwin COMMAND: error: ...`` on stderr
    and exit status 1 (the traceback only with ``--debug`` or ``BAYESTWIN_DEBUG=1``); 2 is kept for
    a fit or twin that did not pass the convergence gate."""
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    debug = args.debug or os.environ.get("BAYESTWIN_DEBUG") == "1"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"bayestwin {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one error path of the command line
        if debug:
            raise
        known = isinstance(err, (ValueError, OSError, TypeError))
        text = str(err) if known else f"{type(err).__name__}: {err} (a bug? run with --debug and report it)"
        print(f"bayestwin {args.command}: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
