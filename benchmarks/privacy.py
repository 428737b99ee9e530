"""Utility of a differentially private population against the non-private fit (issue 22).

A simulated cohort with known truth (``bayestwin.families.progression.simulate``: 1,200 patients,
visits at months 0-12, three therapies, drug_a slowing progression by 0.8 points a month) is
fitted once pooled (``bt.fit``, 2 x (1000 + 1000): the peer) and once per group for
:func:`bayestwin.privacy.private_fit`'s sample-and-aggregate (60 groups of about 20 patients,
2 x (500 + 500) each). The groups' fits do not depend on the budget, so they are done once and
released at epsilon 1, 3 and 10 (delta 1e-5), ``--releases`` times each with fresh noise (what
the data holder would publish differs only by the noise). Public bounds (the outcome scale's
range, plausible monthly changes) make the box; covariate distributions for the virtual
patients are public too.

Printed per budget: the released typical parameters (mean and SD over releases) beside the
pooled posterior mean and the truth; and a simulated trial on virtual patients from each
population (drug_a vs standard, 40 per arm, 3 months, ANCOVA, 400 trials): the mean estimated
treatment effect and the power, against the same from the pooled population. The noise-free
row (the groups' clipped mean, no noise) separates the aggregation's own bias from the noise.

    .venv/bin/python benchmarks/privacy.py            # about 25 minutes on 2 cores (fits 1,504 s, measured)
    .venv/bin/python benchmarks/privacy.py --patients 600 --groups 30 --releases 5   # shorter
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

import bayestwin as bt
from bayestwin.families import get_family
from bayestwin.families.progression import simulate
from bayestwin.federated.site import on_schema
from bayestwin.privacy import DP, aggregate, clipping_box, coordinates, group_estimates, release
from bayestwin.trials import TrialDesign, simulate_trials
from bayestwin.trials.virtual import population_draws

KEY = b"benchmark-privacy"
THERAPIES = ("standard", "drug_a", "drug_b")
# From public knowledge, not from the rows: the outcome scale's published norms, the visit plan.
PUBLIC = bt.Schema(
    therapies=THERAPIES,
    numeric={"age": (60.0, 10.0)},
    categorical={"sex": ("F", "M")},
    time_scale=12.0,
    outcome_mean=50.0,
    outcome_sd=10.0,
)
BOUNDS = {
    "intercept": (35.0, 65.0),  # the scale's population mean lies within its published range
    "slope": (-3.0, 3.0),  # points a month
    "therapy_slope": (-3.0, 1.0),  # a therapy's change of the monthly slope
    "sigma": (1.0, 10.0),
}
COVARIATES = {"age": np.arange(40, 81), "sex": {"F": 0.5, "M": 0.5}}  # public: the trial's eligibility
SHOWN = ["intercept", "slope", "therapy_slope[drug_a]", "therapy_slope[drug_b]", "sigma"]


def typical(pop) -> dict:
    """The point the trials use: the posterior mean (a private release: the released values)."""
    point = population_draws(pop, 1, uncertainty="mean").values.isel(replicate=0)
    return {
        "intercept": float(point["intercept"]),
        "slope": float(point["slope"]),
        "therapy_slope[drug_a]": float(point["therapy_slope"][0]),  # the non-reference therapies
        "therapy_slope[drug_b]": float(point["therapy_slope"][1]),
        "sigma": float(point["sigma"]),
    }


def trial(pop, seed: int) -> tuple[float, float]:
    design = TrialDesign(control="standard", treatment="drug_a", n_per_arm=40, visits=(0.0, 3.0))
    res = simulate_trials(pop, design, 400, seed=seed, uncertainty="mean", covariates=COVARIATES)
    return float(res["estimate"].mean()), float(res["reject"].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=1200)
    ap.add_argument("--groups", type=int, default=60)
    ap.add_argument("--releases", type=int, default=10, help="noise draws per budget")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    df, truth = simulate(n_patients=args.patients, seed=0)
    cohort = bt.Cohort(df, covariates=["age", "sex"], therapies=list(THERAPIES), key=KEY)

    t0 = time.perf_counter()
    pooled = bt.fit(cohort, draws=1000, tune=1000, chains=2, seed=1, progressbar=False)
    t_pooled = time.perf_counter() - t0
    fam = get_family("progression")
    t0 = time.perf_counter()
    box = clipping_box(fam, PUBLIC, bounds=BOUNDS, seed=0)
    estimates, failed = group_estimates(
        on_schema(cohort, PUBLIC, "the cohort"),
        fam,
        box,
        groups=args.groups,
        min_patients=3,
        seed=0,
        draws=500,
        tune=500,
        chains=2,
    )
    t_groups = time.perf_counter() - t0
    print(
        f"{args.patients} patients; pooled fit {t_pooled:.0f} s ({pooled.verdict}); {args.groups} group fits "
        f"{t_groups:.0f} s ({failed} failed the convergence gate)\n"
    )

    truth_row = {
        "intercept": truth["intercept"],
        "slope": truth["slope"] - 0.3 / 2,  # the simulated females' slope is 0.3 lower; half are female
        "therapy_slope[drug_a]": truth["therapy_slope"]["drug_a"],
        "therapy_slope[drug_b]": truth["therapy_slope"]["drug_b"],
        "sigma": truth["sigma"],
    }
    rows = [{"population": "truth", **truth_row}]
    effect, power = trial(pooled, seed=0)
    rows.append({"population": "pooled fit (peer)", **typical(pooled), "trial effect": effect, "power": power})
    mean, sens = aggregate(estimates, box.lower, box.upper)

    at = {name: i for i, name in enumerate(coordinates(box.program.phi))}
    clipped = {
        "intercept": mean[at["intercept"]],
        "slope": mean[at["slope"]],
        "therapy_slope[drug_a]": mean[at["therapy_slope[0]"]],
        "therapy_slope[drug_b]": mean[at["therapy_slope[1]"]],
        "sigma": float(np.exp(mean[at["sigma_log__"]])),
    }
    rows.append({"population": "clipped mean of the groups, no noise", **clipped})
    for epsilon in (10.0, 3.0, 1.0):
        privacy = DP(epsilon, 1e-5)
        got = []
        for r in range(args.releases):
            pop = release(
                estimates,
                box,
                privacy,
                np.random.default_rng([round(epsilon * 1000), r]),  # fresh noise per budget and release
                family=fam,
                schema=PUBLIC,
                columns=cohort.columns,
            )
            effect, power = trial(pop, seed=r)
            got.append({**typical(pop), "trial effect": effect, "power": power})
        got = pd.DataFrame(got)
        label = f"DP epsilon {epsilon:g}"
        rows.append({"population": f"{label}: mean", **got.mean().to_dict()})
        rows.append({"population": f"{label}: SD over releases", **got.std().to_dict()})
        rows[-1]["noise SD (box widths)"] = privacy.noise_multiplier * sens
    table = pd.DataFrame(rows).set_index("population")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(table)
    print(f"\nsensitivity {sens:.4f} box widths (sqrt(d) / groups, d = {len(mean)}); fits {t_pooled + t_groups:.0f} s")


if __name__ == "__main__":
    main()
