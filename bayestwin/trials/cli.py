"""``bayestwin trial design.toml``: a trial file in, the operating-characteristics table out."""

from __future__ import annotations

import time
import warnings

import pandas as pd

from bayestwin._atomic import check_target, file_head, write_file

#: The trial file ``bayestwin trial`` runs when none is given (``bayestwin trial --example`` prints it).
EXAMPLE = """\
# bayestwin trial file: population model, trial design, simulation settings.

[population]
family = "progression"      # "progression" or "pk"
data = "simulated"          # "simulated" (a cohort simulated here) or a CSV file (long table; NONMEM-style for pk)
patients = 60               # simulated cohort size
covariates = ["age", "sex"]
therapies = ["standard", "drug_a", "drug_b"]   # progression: reference (control) first
draws = 1000                # NUTS draws (and tuning steps) per chain for the population fit
seed = 0

[design]
control = "standard"        # pk: a regimen table, e.g. { amount = 100, interval = 12, doses = 3 }
treatment = "drug_a"
n_per_arm = 25
allocation = 1.0            # treatment patients per control patient
visits = [0, 3, 6, 12]      # first = baseline (unless randomisation is set), last = endpoint visit
endpoint = "change"         # "change", "responder" or "exposure" (pk)
direction = "lower"         # a lower outcome is better
analysis = "ancova"         # "ancova" (on baseline) or "ttest"
dropout = 0.15              # probability of leaving before the last visit
alpha = 0.025               # one-sided
decision = "frequentist"    # or "bayesian": P(benefit > delta) > threshold
delta = 0.0
threshold = 0.975

[simulation]
trials = 2000
seed = 1
assumed = { therapy_slope = { drug_a = -0.5 } }   # optional: power at an assumed effect
sample_size = true          # also search the n per arm for the target power
target = 0.8
"""


def _arm(value, family: str):
    from bayestwin.dosing import Regimen

    if family == "pk":
        if not isinstance(value, dict):
            raise ValueError(f"a pk trial arm is a regimen table like {{ amount = 100, interval = 12 }}, not {value!r}")
        known = {"amount", "interval", "doses", "duration"}
        if set(value) - known:
            raise ValueError(f"unknown regimen key(s) {sorted(set(value) - known)}; valid: {sorted(known)}")
        return Regimen(**value)
    if not isinstance(value, str):
        raise ValueError(f"a progression trial arm is a therapy label, not {value!r}")
    return value


def population_from_spec(spec: dict, say=print):
    """Fit the population a trial file describes."""
    import bayestwin as bt

    fam = spec.get("family", "progression")
    data = spec.get("data", "simulated")
    seed = int(spec.get("seed", 0))
    draws = int(spec.get("draws", 500))
    key = bt.new_key()  # this run's pseudonyms only: the trial reports no patient
    if fam == "progression":
        from bayestwin.families.progression import simulate

        therapies = list(spec.get("therapies", ["standard", "drug_a", "drug_b"]))
        if data == "simulated":
            table, _ = simulate(
                n_patients=int(spec.get("patients", 60)),
                therapies=therapies,
                seed=seed,
                therapy_slope=(-0.8, -1.4)[: len(therapies) - 1],
            )
        else:
            table = pd.read_csv(data)
        cohort = bt.Cohort(table, covariates=list(spec.get("covariates", [])), therapies=therapies, key=key)
    elif fam == "pk":
        from bayestwin.families.pk import simulate

        table = (
            simulate(int(spec.get("patients", 40)), seed=seed)[0]
            if data == "simulated"
            else pd.read_csv(data, na_values=["."])
        )
        cohort = bt.read_nonmem(table, covariates=list(spec.get("covariates", [])), key=key)
    else:
        raise ValueError(f"[population] family must be 'progression' or 'pk', not {fam!r}")
    say(f"Fitting the {fam} population model on {cohort} ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pop = bt.fit(cohort, fam, draws=draws, tune=draws, seed=seed, progressbar=False)
    say(f"  {pop.verdict}")
    return pop


def _is_oc_table(path) -> bool:
    """An earlier operating-characteristics table (its header), the only file --out replaces."""
    return file_head(path).startswith(b"measure,scenario,")


def run(args) -> int:
    from bayestwin.trials import TrialDesign, operating_characteristics, read_design, sample_size

    say = print if not args.quiet else (lambda *a, **k: None)
    if args.example:
        print(EXAMPLE, end="")
        return 0
    if args.design is None:
        spec = read_design(text=EXAMPLE)
        say("No trial file given: running the embedded example (bayestwin trial --example prints it).")
    else:
        spec = read_design(args.design)
    t0 = time.perf_counter()
    pop_spec, d, sim = spec.get("population", {}), dict(spec["design"]), spec.get("simulation", {})
    fam = pop_spec.get("family", "progression")
    if fam not in ("progression", "pk"):
        raise ValueError(f"[population] family must be 'progression' or 'pk', not {fam!r}")
    if args.out:  # refused now, not after minutes of simulation
        check_target(
            args.out, is_ours=_is_oc_table, force=getattr(args, "force", False), what="operating-characteristics table"
        )
    d["control"], d["treatment"] = _arm(d["control"], fam), _arm(d["treatment"], fam)
    d["visits"] = tuple(d.get("visits", (0.0, 12.0)))
    design = TrialDesign(**d)  # every value checked before the population is fitted
    if fam == "progression":
        therapies = list(pop_spec.get("therapies", ["standard", "drug_a", "drug_b"]))
        for arm in (design.control, design.treatment):
            if arm not in therapies:
                raise ValueError(f"[design] arm {arm!r} is not one of the [population] therapies {therapies}")
    if pop_spec.get("data", "simulated") != "simulated":
        from pathlib import Path

        if not Path(pop_spec["data"]).is_file():
            raise ValueError(f"[population] data: no such file {pop_spec['data']!r}")
    pop = population_from_spec(pop_spec, say)
    trials, seed = int(sim.get("trials", 2000)), int(sim.get("seed", 1))
    assumed = sim.get("assumed") or None
    say(
        f"\nSimulating {trials} trials per scenario: "
        f"{design.n_per_arm} control + {design.n_treatment} treatment patients ..."
    )
    oc = operating_characteristics(pop, design, trials, seed=seed, parameters=assumed)
    cols = ["measure", "scenario", "P(success)", "MC SE", "mean estimate", "mean SE", "mean analysed"]
    say(oc[cols].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if sim.get("sample_size", False):
        target = float(sim.get("target", 0.8))
        n, table = sample_size(pop, design, target=target, trials=min(trials, 2000), seed=seed, parameters=assumed)
        say(f"\nSample size for power >= {target:g}: n_per_arm = {n} ({design.with_n(n).n_total} patients)")
        say(table.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    say(f"\nTotal time {time.perf_counter() - t0:.1f} s")
    if not pop.verdict.converged:
        say(f"The population fit did not converge ({pop.verdict}): the table above is not to be trusted.")
    if args.out:
        write_file(args.out, oc.to_csv(index=False))
        say(f"Wrote {args.out}")
    return 0 if pop.verdict.converged else 2


__all__ = ["EXAMPLE", "run"]
