"""Virtual cohorts: labelled, reproducible per replicate, and distributed as the model says."""

import numpy as np
import pytest

from bayestwin.trials import population_draws, virtual_cohort

FIXED = {"age": 60.0, "sex": "F"}


def test_labels_covariates_and_parameter_uncertainty(population):
    vc = virtual_cohort(population, 50, times=[0, 6, 12], replicates=6, seed=3)
    assert vc["observation"].dims == ("replicate", "patient", "therapy", "time")
    assert vc["observation"].shape == (6, 50, 3, 3)
    assert list(vc.therapy.values) == ["standard", "drug_a", "drug_b"]
    assert set(np.unique(vc["sex"])) <= {"F", "M"} and vc["age"].dims == ("replicate", "patient")
    # a population draw per replicate: the intercept differs between replicates
    assert vc["pop_intercept"].std() > 0
    # baseline is before any therapy: the mean trajectory at t = 0 is the same for every therapy
    np.testing.assert_allclose(vc["mean"].isel(time=0, therapy=0), vc["mean"].isel(time=0, therapy=2))


def test_a_replicate_does_not_depend_on_how_many_are_drawn(population):
    small = virtual_cohort(population, 20, times=[0, 12], replicates=2, seed=5)
    large = virtual_cohort(population, 20, times=[0, 12], replicates=7, seed=5)
    np.testing.assert_array_equal(small["observation"].values, large["observation"].values[:2])
    again = virtual_cohort(population, 20, times=[0, 12], replicates=2, seed=5)
    np.testing.assert_array_equal(small["observation"].values, again["observation"].values)


def test_cohort_sizes_share_a_program_per_bucket_and_padding_changes_no_patient(population):
    from bayestwin.trials.virtual import _simulator_for, patient_bucket

    assert [patient_bucket(n) for n in (1, 2, 5, 8, 9, 120, 256, 257, 1000)] == [1, 2, 8, 8, 16, 128, 256, 512, 1024]
    sizes = np.arange(1, 5000)
    buckets = np.array([patient_bucket(n) for n in sizes])
    assert (buckets >= sizes).all() and (np.diff(buckets) >= 0).all()  # room for every patient, monotone
    assert (buckets <= np.maximum(2 * sizes - 1, sizes + 255)).all()  # at most 2x the work, 25% above 1,024
    times = [0, 6, 12]
    five = virtual_cohort(population, 5, times=times, seed=4)  # 8 slots
    nine = virtual_cohort(population, 9, times=times, seed=4)  # 16 slots
    # the first five patients are the same patients (covariates, effects, noise) in either bucket
    np.testing.assert_allclose(five["observation"].values, nine["observation"].values[:, :5], rtol=1e-12)
    np.testing.assert_array_equal(five["age"].values, nine["age"].values[:, :5])
    _, scen = population.family.scenario_arrays(None, np.asarray(times, float), population.schema)
    program = _simulator_for(population, scen)
    compiled = program._cache_size()
    for n in (10, 13, 16):  # the 16-slot bucket: no new compilation
        assert virtual_cohort(population, n, times=times, seed=4)["observation"].shape[1] == n
    assert program._cache_size() == compiled


def test_moments_match_the_model_at_the_posterior_mean(population):
    """At fixed population parameters and covariates, y(T) under standard care is normal with
    mean a + b T and variance Var(u0 + u1 T) + sigma^2 (tolerance: 4 Monte-Carlo SEs)."""
    n, T = 40_000, 12.0
    vc = virtual_cohort(
        population, n, therapies=["standard"], times=[0.0, T], covariates=FIXED, uncertainty="mean", seed=1
    )
    post = population.posterior.mean(("chain", "draw"))
    age_z = (60.0 - population.schema.numeric["age"][0]) / population.schema.numeric["age"][1]
    x = np.array([age_z, 0.0])  # sex[M] = 0
    a = float(post.intercept) + x @ post.beta_level.values
    b = float(post.slope) + x @ post.beta_slope.values
    L = post.re_chol.values  # packed lower triangle [L00, L10, L11]
    var = L[0] ** 2 + 2 * T * L[0] * L[1] + T**2 * (L[1] ** 2 + L[2] ** 2) + float(post.sigma) ** 2
    y = vc["observation"].sel(therapy="standard", time=T).values.ravel()
    sd = np.sqrt(var)
    assert abs(y.mean() - (a + b * T)) < 4 * sd / np.sqrt(n)
    assert abs(y.var() / var - 1) < 4 * np.sqrt(2 / n)


def test_parameters_fix_the_effect_and_bad_names_are_named(population):
    draws = population_draws(population, 3, uncertainty="posterior", parameters={"therapy_slope": {"drug_a": 0.0}})
    np.testing.assert_array_equal(draws.values["therapy_slope"].sel(therapy_effect="drug_a").values, 0.0)
    assert draws.values["therapy_slope"].sel(therapy_effect="drug_b").std() > 0
    with pytest.raises(ValueError, match=r"unknown population parameter 'effect'; known: \["):
        population_draws(population, 1, parameters={"effect": 0.0})
    with pytest.raises(ValueError, match=r"'therapy_slope' has no element 'drug_c'; its therapy_effect are"):
        population_draws(population, 1, parameters={"therapy_slope": {"drug_c": 0.0}})


def test_covariate_specs(population):
    from scipy import stats

    vc = virtual_cohort(
        population, 4000, times=[0, 1], covariates={"age": stats.norm(70, 5), "sex": {"F": 0.25, "M": 0.75}}, seed=2
    )
    assert abs(float(vc["age"].mean()) - 70) < 4 * 5 / np.sqrt(4000)
    assert abs(float((vc["sex"] == "F").mean()) - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)
    with pytest.raises(ValueError, match=r"no distribution given for covariate\(s\) \['sex'\]"):
        virtual_cohort(population, 5, covariates={"age": 60.0})
    uses = r"the population model uses \['age', 'sex'\]$"
    with pytest.raises(ValueError, match=rf"^unknown covariate\(s\) \['sexx'\]: {uses}"):
        virtual_cohort(population, 5, covariates={"age": 60.0, "sexx": "F"})
    with pytest.raises(ValueError, match=r"covariate 'sex': probabilities \[0.5, 0.6\] must be >= 0 and sum to 1"):
        virtual_cohort(population, 5, covariates={"age": 60.0, "sex": {"F": 0.5, "M": 0.6}})
    with pytest.raises(ValueError, match=r"therapy 'drug_z' not in the population's therapies"):
        virtual_cohort(population, 5, therapies=["drug_z"])
    # an array or Series of values is drawn from like a list (it was read as one constant and failed)
    vc = virtual_cohort(population, 3000, times=[0, 1], covariates={"age": np.array([50, 70]), "sex": "F"}, seed=2)
    assert set(np.unique(vc["age"].values)) == {50.0, 70.0}
    assert abs(float((vc["age"] == 50).mean()) - 0.5) < 4 * np.sqrt(0.25 / 3000)
    vc = virtual_cohort(population, 50, times=[0, 1], covariates={"age": range(40, 81), "sex": "F"}, seed=2)
    assert set(np.unique(vc["age"].values)) <= set(range(40, 81))
    with pytest.raises(
        ValueError, match=r"^covariate 'age': a list of values to draw from must be one-dimensional and not"
    ):
        virtual_cohort(population, 5, covariates={"age": [], "sex": "F"})
    with pytest.raises(ValueError, match=r"^covariate 'age': give a constant, a list of values, .* not set$"):
        virtual_cohort(population, 5, covariates={"age": {50, 70}, "sex": "F"})
