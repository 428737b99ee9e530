"""bt.Formula: a mixed-model formula (lme4 / brms / Bambi syntax) as a twin-ready family.

The progression model written as a formula is fitted to the shared simulated cohort: it recovers
the simulated therapy effects, and a held-out patient's twin matches a full refit
that includes the patient (tolerances as in tests/engine/test_refit_agreement.py). Then the
formulas it refuses, and a real ``bambi.Model`` read into it.
"""

import warnings

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.families import FamilyError
from bayestwin.families.glmm import simulate_counts
from tests.agreement import assert_twin_matches_refit
from tests.conftest import KEY, THERAPIES

#: The progression family's model: covariates on level and slope, therapy on the slope.
GROWTH = "y ~ time + age + sex + time:age + time:sex + time:therapy + (1 + time | patient)"


@pytest.fixture(scope="module")
def formula_fit(simulated):
    train, _, _ = simulated
    cohort = bt.Cohort(train, covariates=["age", "sex"], therapies=THERAPIES, key=KEY)
    return bt.fit(cohort, bt.Formula(GROWTH), draws=2000, tune=1000, seed=1, progressbar=False)


@pytest.mark.slow
def test_the_growth_formula_recovers_the_simulated_therapy_effects(formula_fit, simulated):
    """The formula's time:therapy terms are the progression family's therapy slopes (one therapy
    per patient from time 0, so exposure = time on it); the simulated truth is within 2.5
    posterior SDs. (The built-in family's default prior on them is 2.5x tighter, so the two
    posteriors differ by a prior effect of about half an SD here, not by a model difference;
    benchmarks/model_family.py compares the two models under the same priors.)"""
    _, _, truth = simulated
    assert formula_fit.verdict.converged
    f = formula_fit.posterior
    for therapy in THERAPIES[1:]:
        a = f["beta"].sel(term=f"time:therapy[{therapy}]")
        print(therapy, float(a.mean()), float(a.std()), truth["therapy_slope"][therapy])
        assert abs(float(a.mean()) - truth["therapy_slope"][therapy]) <= 2.5 * float(a.std())


@pytest.mark.slow
def test_a_formula_twin_matches_a_full_refit(formula_fit, simulated):
    train, held, _ = simulated
    pid = held.patient.unique()[0]
    rows = held[held.patient == pid]
    twin = formula_fit.condition(rows, key=KEY, draws=2000, seed=5)
    full = bt.Cohort(pd.concat([train, rows]), covariates=["age", "sex"], therapies=THERAPIES, key=KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = bt.fit(full, bt.Formula(GROWTH), draws=2000, tune=1000, seed=2, progressbar=False)
    assert ref.verdict.converged and twin.verdict.converged
    effects = [("patient_effects", {"patient_effect": e}) for e in ("Intercept", "time")]
    assert_twin_matches_refit(ref, twin, bt.pseudonymise(pid, KEY), effects)


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("y ~ time + log(age) + (1 | patient)", "function terms are not supported"),
        ("y ~ time + (1 | patient) + (0 + time | patient)", "write the patient effects as one group term"),
        ("y ~ time + (1 | site)", "the formula has no (... | patient) term"),
        ("y ~ time + (1 | patient) + (1 | site) + (0 + time | site)", "write the effects by 'site' as one group term"),
        ("y ~ time + site + (1 | patient) + (1 | site)", "'site' is both a grouping factor and a common term"),
        ("y ~ time + (1 | patient) + (1 | time)", "a group term is by patient or by one categorical covariate"),
        ("y ~ time + (1 + site | patient) + (1 | site)", "the group term by 'patient' has the variable 'site'"),
        ("y ~ time + therapy", "the formula has no (... | patient) term"),
        ("y time", "a formula reads 'outcome ~ terms'"),
    ],
)
def test_formulas_that_cannot_be_twins_are_refused(formula, message):
    with pytest.raises(FamilyError) as err:
        bt.Formula(formula)
    assert message in str(err.value)


def test_unknown_variables_and_likelihoods_are_refused_before_fitting():
    df, _ = simulate_counts(6, seed=1)
    cohort = bt.Cohort(df, covariates=["age"], therapies=["placebo", "drug"], key=KEY)
    with pytest.raises(
        FamilyError, match=r"the formula's variable 'weight' is not one of the cohort's: \['time', 'therapy', 'age'\]"
    ):
        bt.fit(cohort, bt.Formula("y ~ time + weight + (1 | patient)", likelihood="poisson"), draws=10, tune=10)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        bt.Formula("y ~ time + (1 | patient)", likelihood="gamma")


def _sites(n: int = 40, offsets=(-10.0, -3.0, 3.0, 10.0), seed: int = 5):
    """The progression simulation with a site (hospital) column, patients spread over the
    sites in turn, and each site's offset added to its patients' outcomes."""
    from bayestwin.families.progression import simulate

    df, truth = simulate(n_patients=n, seed=seed)
    sites = {p: f"h{j % len(offsets)}" for j, p in enumerate(df.patient.unique())}
    df["site"] = df.patient.map(sites)
    df["outcome"] += df.site.map({f"h{k}": o for k, o in enumerate(offsets)})
    return df, truth, sites


SITE_FORMULA = "y ~ time + time:therapy + (1 + time | patient) + (1 | site)"


def test_a_site_term_adds_each_patients_sites_effect_to_its_rows():
    """``(1 | site)``: population-level effects by level of a categorical covariate, read from the
    patient's one-hot columns (the reference level included), added to every row of the patient."""
    df, _, _ = _sites(8)
    cohort = bt.Cohort(df, covariates=["site"], therapies=THERAPIES, key=KEY)
    fam = bt.Formula("y ~ time + (1 | patient) + (1 | site)")
    design = fam.design(cohort.frame, cohort.baseline, cohort.schema)
    model = fam.build_model(design, cohort.schema)
    assert fam.patient_vars == ("z",)  # the site's effects are the population's, not the patient's
    assert model.named_vars_to_dims["site_effects"] == ("site", "site_effect")
    assert list(model.coords["site"]) == ["h0", "h1", "h2", "h3"]
    mu = model.replace_rvs_by_values([model["y"].owner.op.dist_params(model["y"].owner)[0]])[0]
    point = model.initial_point()
    point["beta"] = np.array([50.0, 0.5])
    point["z"] = np.zeros_like(point["z"])
    point["site_effects"] = np.array([[1.0], [2.0], [3.0], [4.0]])
    values = [v for v in model.value_vars if v.name in ("beta", "z", "patient_sd_log__", "site_effects")]
    got = model.compile_fn(mu, inputs=values)({v.name: point[v.name] for v in values})
    level = cohort.baseline["site"].str[1:].astype(int).reindex(cohort.frame["patient"]).to_numpy()
    want = 50.0 + 0.5 * cohort.frame["time"].to_numpy() + (level + 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-12)

    # (1 + time | site): each site's level and slope, LKJ-correlated, centred
    fam = bt.Formula("y ~ time + (1 | patient) + (1 + time | site)")
    model = fam.build_model(fam.design(cohort.frame, cohort.baseline, cohort.schema), cohort.schema)
    assert list(model.coords["site_effect"]) == ["Intercept", "time"] and "site_chol" in model.named_vars
    mu = model.replace_rvs_by_values([model["y"].owner.op.dist_params(model["y"].owner)[0]])[0]
    point = model.initial_point() | {"beta": np.array([50.0, 0.5]), "z": np.zeros_like(point["z"])}
    point["site_effects"] = np.array([[1.0, 0.1], [2.0, 0.2], [3.0, 0.3], [4.0, 0.4]])
    values = [v for v in model.value_vars if v.name in ("beta", "z", "patient_sd_log__", "site_effects")]
    got = model.compile_fn(mu, inputs=values)({v.name: point[v.name] for v in values})
    t = cohort.frame["time"].to_numpy()
    np.testing.assert_allclose(got, 50.0 + 0.5 * t + (level + 1.0) * (1.0 + 0.1 * t), rtol=1e-12)


def test_a_site_term_needs_a_categorical_covariate():
    df, _, _ = _sites(8)
    cohort = bt.Cohort(df, therapies=THERAPIES, key=KEY)  # no covariates: site is not read
    with pytest.raises(
        FamilyError, match=r"the group term \(\.\.\. \| site\) needs 'site' to be a categorical covariate"
    ):
        bt.fit(cohort, bt.Formula(SITE_FORMULA), draws=10, tune=10)


@pytest.mark.slow
def test_site_effects_are_recovered_and_a_new_patients_twin_takes_its_sites():
    """Four sites with offsets -10, -3, 3, 10 (the patients' own SD is 6): the fitted site
    effects, centred, recover the levels the data carry (each site's offset plus the mean of its
    patients' simulated own intercepts, centred), within 3 posterior SDs. A new patient's twin
    reads its site from its table; a site the population has not seen is refused by name."""
    df, truth, sites = _sites()
    train = df[df.patient.isin(list(sites)[:36])]
    cohort = bt.Cohort(train, covariates=["site"], therapies=THERAPIES, key=KEY)
    pop = bt.fit(cohort, bt.Formula(SITE_FORMULA), draws=1000, tune=1000, seed=1, progressbar=False)
    assert pop.verdict.converged, str(pop.verdict)
    effects = pop.posterior["site_effects"].sel(site_effect="Intercept")
    centred = effects - effects.mean("site")
    offsets = np.array([-10.0, -3.0, 3.0, 10.0])
    fitted = set(train.patient)
    own = [np.mean([truth["patient_intercept"][p] for p in fitted if sites[p] == f"h{k}"]) for k in range(4)]
    level = offsets + np.array(own)
    want = level - level.mean()
    got, sd = centred.mean(["chain", "draw"]).to_numpy(), centred.std(["chain", "draw"]).to_numpy()
    print("centred site effects", np.round(got, 2), "+-", np.round(sd, 2), "want", np.round(want, 2))
    assert np.all(np.abs(got - want) <= 3 * sd)

    # virtual patients at a site (the population's posterior mean; the same seed, so the same
    # patients' own effects): at time 0 their levels differ by exactly the sites' effects
    from bayestwin.trials import virtual_cohort

    at = {
        s: virtual_cohort(pop, 50, times=[0.0], covariates={"site": s}, uncertainty="mean", seed=3)["mean"]
        for s in ("h0", "h3")
    }
    gap = (at["h3"] - at["h0"]).to_numpy()
    mean = effects.mean(["chain", "draw"])
    np.testing.assert_allclose(gap, float(mean.sel(site="h3") - mean.sel(site="h0")), rtol=1e-9)

    new = df[df.patient == list(sites)[39]].iloc[:3]  # site h3, its first three visits
    twin = pop.condition(new, key=KEY, seed=2)
    assert twin.verdict.converged
    assert np.isfinite(twin.predict(times=[12.0]).draws["mean"].to_numpy()).all()
    with pytest.raises(ValueError, match=r"level 'h9' was not seen in fitting \(known: \['h0', 'h1', 'h2', 'h3'\]\)"):
        pop.condition(new.assign(site="h9"), key=KEY)


def test_a_bambi_model_becomes_the_same_formula():
    bambi = pytest.importorskip("bambi")
    df, _ = simulate_counts(8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = bambi.Model("outcome ~ time + therapy + age + (1|patient)", df, family="poisson")
    fam = bt.Formula.from_bambi(model)
    assert fam.config() == {
        "family": "formula",
        "formula": "outcome ~ time + therapy + age + (1|patient)",
        "likelihood": "poisson",
        "prediction": None,
    }
    cohort = bt.Cohort(df, covariates=["age"], therapies=["placebo", "drug"], key=KEY)
    design = fam.design(cohort.frame, cohort.baseline, cohort.schema)
    built = fam.build_model(design, cohort.schema)
    # the same design columns as Bambi's (age standardised here, as the cohort standardises it)
    assert list(built.coords["term"]) == ["Intercept", "time", "therapy[drug]", "age"]
    assert np.isfinite(built.compile_logp()(built.initial_point()))
    with pytest.raises(TypeError, match="expected a bambi.Model, not str"):
        bt.Formula.from_bambi("y ~ x")


def _simulate(kind: str, n: int = 50, visits: int = 6, seed: int = 0):
    """Binary or 4-level ordinal outcomes: logit-scale patient intercepts (SD 0.8), a drug
    effect of -1.0 (log odds) and a time trend of +0.3 per visit."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        drug, u = i % 2, rng.normal(0.0, 0.8)
        for t in range(visits):
            eta = u + 0.3 * t - 1.0 * drug
            if kind == "bernoulli":
                y = float(rng.random() < 1 / (1 + np.exp(-eta)))
            else:  # cumulative logit, cut points -1, 0.5, 2
                y = float(np.sum(rng.logistic() + eta > np.array([-1.0, 0.5, 2.0])))
            rows.append((f"b{i:03d}", float(t), y, ["placebo", "drug"][drug]))
    return pd.DataFrame(rows, columns=["patient", "time", "outcome", "therapy"])


@pytest.mark.slow
@pytest.mark.parametrize(("likelihood", "levels"), [("bernoulli", None), ("ordinal", 4)])
def test_binary_and_ordinal_outcomes_recover_the_drug_effect_and_forecast_categories(likelihood, levels):
    df = _simulate(likelihood)
    cohort = bt.Cohort(df, therapies=["placebo", "drug"], key=KEY)
    fam = bt.Formula("y ~ time + therapy + (1 | patient)", likelihood=likelihood, levels=levels)
    pop = bt.fit(cohort, fam, draws=1000, tune=1000, chains=2, seed=1, progressbar=False)
    assert pop.verdict.converged
    drug = pop.posterior["beta"].sel(term="therapy[drug]")
    print(likelihood, float(drug.mean()), float(drug.std()))
    assert abs(float(drug.mean()) - (-1.0)) <= 2.5 * float(drug.std())
    if levels:
        cut = pop.posterior["cutpoints"].mean(["chain", "draw"]).to_numpy()
        assert np.all(np.diff(cut) > 0)
    twin = pop.condition(df[df.patient == "b000"].iloc[:3], key=KEY, draws=500, method="importance")
    forecast = twin.predict(times=[6.0])
    fc = forecast.draws
    obs = fc["observation"].to_numpy()
    assert set(np.unique(obs)) <= set(range(levels or 2))
    # the expected outcome (P(y = 1), or the expected category) is what the draws average to
    gap = float(abs(fc["observation"].mean(["chain", "draw"]) - fc["mean"].mean(["chain", "draw"])).max())
    assert gap < 5 * float(fc["observation"].std()) / np.sqrt(fc.sizes["chain"] * fc.sizes["draw"])
    best = forecast.prob_best(time=6.0, direction="lower")
    assert (best["drug"] > 0.5).all()  # the drug lowers the outcome's odds
