"""Differentially private populations (sample-and-aggregate + the Gaussian mechanism): the budget's
calibration, the mechanism's privacy loss measured on its own outputs, a membership-inference
attack against the bound, and a release from real group fits that virtual cohorts draw from."""

import math
import re
import warnings
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

import bayestwin as bt
from bayestwin.privacy import (
    DP,
    aggregate,
    gaussian_release,
    membership_advantage_bound,
    partition,
    spent,
)
from tests.conftest import KEY, THERAPIES

# A schema from public knowledge (the outcome scale's published norms, the visit schedule, the
# covariates' usual centring), not from the cohort's rows.
PUBLIC = bt.Schema(
    therapies=tuple(THERAPIES),
    numeric={"age": (60.0, 10.0)},
    categorical={"sex": ("F", "M")},
    time_scale=12.0,
    outcome_mean=50.0,
    outcome_sd=10.0,
)

# Public bounds of the typical trajectory (the outcome scale's range, plausible yearly changes).
BOUNDS = {"intercept": (35.0, 65.0), "slope": (-3.0, 3.0), "sigma": (1.0, 10.0)}


@pytest.mark.parametrize(
    ("epsilon", "delta", "message"),
    [
        (0, 1e-5, "DP epsilon must lie in (0, 100], not 0"),
        (1, 0, "DP delta must lie in (0, 1), not 0"),
        (1, 1.0, "DP delta must lie in (0, 1), not 1.0"),
        (float("nan"), 1e-5, "DP epsilon must be a finite number, not nan"),
        ("1", 1e-5, "DP epsilon must be a finite number, not '1'"),
        (True, 1e-5, "DP epsilon must be a finite number, not True"),
    ],
)
def test_a_budget_out_of_range_is_refused(epsilon, delta, message):
    with pytest.raises(ValueError) as err:
        DP(epsilon, delta)
    assert str(err.value) == message


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 10.0])
def test_the_noise_spends_the_budget_and_no_more(epsilon):
    privacy = DP(epsilon, 1e-5)
    z = privacy.noise_multiplier
    assert spent(z, 1e-5) == pytest.approx(epsilon, rel=1e-3)
    assert spent(0.95 * z, 1e-5) > epsilon  # less noise would overspend: the calibration is tight


def test_the_partition_depends_on_each_patient_alone():
    ids = [f"p{i}" for i in range(300)]
    groups = partition(ids, 10, b"k")
    assert partition(ids[:120] + ["newcomer"] + ids[120:], 10, b"k").tolist() == [
        *groups[:120],
        partition(["newcomer"], 10, b"k")[0],
        *groups[120:],
    ]
    assert np.bincount(groups, minlength=10).min() >= 15  # a hash spreads 300 patients over 10 groups
    assert (partition(ids, 10, b"other key") != groups).mean() > 0.8


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 30),
    st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3),
    st.integers(0, 29),
    st.integers(0, 2**32 - 1),
)
def test_one_group_moves_the_clipped_mean_by_at_most_the_sensitivity(m, new, which, seed):
    rng = np.random.default_rng(seed)
    lower, upper = np.array([-1.0, 0.0, 2.0]), np.array([1.0, 0.5, 5.0])
    est = rng.normal(0, 3, (m, 3))
    mean, sens = aggregate(est, lower, upper)
    changed = est.copy()
    changed[which % m] = new
    mean2, _ = aggregate(changed, lower, upper)
    assert sens == pytest.approx(math.sqrt(3) / m)
    assert np.linalg.norm((mean2 - mean) / (upper - lower)) <= sens * (1 + 1e-12)  # in box widths
    assert (mean >= lower).all() and (mean <= upper).all()


def test_aggregate_refuses_what_it_cannot_bound():
    lower, upper = np.zeros(2), np.ones(2)
    with pytest.raises(ValueError, match="^a group estimate is NaN: clipping cannot bound it$"):
        aggregate([[0.5, np.nan]], lower, upper)
    with pytest.raises(ValueError, match="^the clipping box needs finite bounds"):
        aggregate([[0.5, 0.5]], lower, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"^estimates must be \(groups, 2\), not \(1, 3\)$"):
        aggregate([[0.5, 0.5, 0.5]], lower, upper)


def _worst_case_pair(m=8):
    """Two data sets' group estimates that differ in one group, from one corner of the box to the
    other: the clipped means differ by exactly the sensitivity (in box widths)."""
    lower, upper = np.array([-1.0, 0.0, 2.0]), np.array([1.0, 0.5, 5.0])
    est = np.tile((lower + upper) / 2, (m, 1))
    a, b = est.copy(), est.copy()
    a[3], b[3] = lower, upper
    (mu_a, sens), (mu_b, _) = aggregate(a, lower, upper), aggregate(b, lower, upper)
    assert np.linalg.norm((mu_a - mu_b) / (upper - lower)) == pytest.approx(sens)
    return mu_a, mu_b, sens, upper - lower


def test_the_release_is_as_private_as_its_budget_measured_on_its_outputs():
    """delta(epsilon) = E_P[(1 - e^(epsilon - L))+], L the privacy loss log p(x)/p'(x), estimated
    from 10^6 releases of the worst-case pair: at the budget's delta (1e-3, to be measurable),
    and far above it when the noise is halved (the estimate detects under-calibration)."""
    mu_a, mu_b, sens, widths = _worst_case_pair()
    rng = np.random.default_rng(0)
    for privacy, halve in ((DP(1.0, 1e-3), False), (DP(1.0, 1e-3), True)):
        sigma = privacy.noise_multiplier * sens * (0.5 if halve else 1.0) * widths
        x = gaussian_release(mu_a, sens * (0.5 if halve else 1.0), privacy, rng, widths=widths, size=1_000_000)
        loss = (((x - mu_b) ** 2 - (x - mu_a) ** 2) / (2 * sigma**2)).sum(1)
        terms = np.clip(1 - np.exp(privacy.epsilon - loss), 0, None)
        delta_hat, se = terms.mean(), terms.std() / math.sqrt(len(terms))
        if halve:
            assert delta_hat > 20 * privacy.delta
        else:
            assert delta_hat <= privacy.delta + 4 * se
            assert delta_hat >= 0.5 * privacy.delta  # tight, not wasteful


@pytest.mark.parametrize("epsilon", [1.0, 3.0])
def test_a_membership_attack_stays_within_the_bound(epsilon):
    """The likelihood-ratio test (the most powerful one) between the worst-case pair: its
    advantage matches the Gaussian mechanism's 2 Phi(sens / 2 sigma) - 1 and stays under the
    (epsilon, delta) bound."""
    privacy = DP(epsilon, 1e-5)
    mu_a, mu_b, sens, widths = _worst_case_pair()
    rng = np.random.default_rng(1)
    n = 200_000
    xa = gaussian_release(mu_a, sens, privacy, rng, widths=widths, size=n)
    xb = gaussian_release(mu_b, sens, privacy, rng, widths=widths, size=n)
    w = (mu_a - mu_b) / widths**2  # the likelihood ratio's direction under noise SD proportional to widths

    def says_in(x):
        return (x - (mu_a + mu_b) / 2) @ w > 0

    tpr, fpr = says_in(xa).mean(), says_in(xb).mean()
    advantage = tpr - fpr
    theory = 2 * norm.cdf(1 / (2 * privacy.noise_multiplier)) - 1
    assert abs(advantage - theory) <= 4 * math.sqrt(2 * 0.25 / n)
    assert advantage < membership_advantage_bound(privacy)


# ------------------------------------------------------------------ a release from real group fits
@pytest.fixture(scope="module")
def released(simulated):
    """The cohort's group estimates with and without its first patient (real NUTS fits of three
    groups), and the release ``bt.private_fit`` makes from the first (its own group fits replaced
    by those, which are the same computation)."""
    from bayestwin import privacy as dp
    from bayestwin.data.cohort import PATIENT
    from bayestwin.families import get_family
    from bayestwin.federated.site import on_schema

    train, _, _ = simulated
    cohort = bt.Cohort(train, covariates=["age", "sex"], therapies=THERAPIES, key=KEY)
    settings = {"groups": 3, "min_patients": 3, "seed": 2, "draws": 300, "tune": 300, "chains": 2}
    box = dp.clipping_box("progression", PUBLIC, bounds=BOUNDS, seed=2)
    fam, on = get_family("progression"), on_schema(cohort, PUBLIC, "the cohort")
    left_out = cohort.patients[0]
    est_in, _ = dp.group_estimates(on, fam, box, **settings)
    est_out, _ = dp.group_estimates(on.restrict(on.frame[on.frame[PATIENT] != left_out]), fam, box, **settings)
    asked = []

    def reuse(c, *args, **kwargs):
        asked.append((sorted(c.patients), c.schema, kwargs))
        return est_in, 0

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(dp, "group_estimates", reuse)
        pop = bt.private_fit(cohort, schema=PUBLIC, privacy=DP(50.0, 1e-5), bounds=BOUNDS, noise_seed=0, **settings)
    assert asked == [
        (
            sorted(cohort.patients),
            PUBLIC,
            {k: v for k, v in settings.items() if k != "groups"} | {"groups": 3, "progressbar": False},
        )
    ]
    return SimpleNamespace(cohort=cohort, pop=pop, box=box, est_in=est_in, est_out=est_out)


@pytest.mark.slow
def test_the_release_is_the_clipped_mean_plus_calibrated_noise(released):
    r = released
    s = r.pop.sampler
    mean, sens = aggregate(r.est_in, r.box.lower, r.box.upper)
    z = DP(50.0, 1e-5).noise_multiplier
    noise = z * sens * r.box.widths * np.random.default_rng(0).standard_normal(len(mean))
    np.testing.assert_allclose(s["released_phi"], mean + noise, rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [1.0, 3.0])
def test_one_patient_in_or_out_moves_one_group_and_an_attack_stays_within_the_bound(released, epsilon):
    """Membership inference end to end: the group estimates of the cohort with and without one
    patient (real fits) differ in exactly one group; the likelihood-ratio attack on 2 x 10^5
    releases of each has the advantage the Gaussian mechanism predicts, 2 Phi(D / 2) - 1 (D the
    two releases' distance in noise SDs, at most 1 / noise multiplier), within the DP bound."""
    r = released
    changed = np.flatnonzero(np.any(r.est_in != r.est_out, axis=1))
    assert len(changed) == 1  # the other groups' fits are bit-for-bit the same
    privacy = DP(epsilon, 1e-5)
    (mu_in, sens), (mu_out, _) = (aggregate(e, r.box.lower, r.box.upper) for e in (r.est_in, r.est_out))
    sigma = privacy.noise_multiplier * sens * r.box.widths
    distance = float(np.linalg.norm((mu_in - mu_out) / sigma))
    assert 0 < distance <= (1 + 1e-9) / privacy.noise_multiplier
    rng = np.random.default_rng(3)
    n = 200_000
    x_in = gaussian_release(mu_in, sens, privacy, rng, widths=r.box.widths, size=n)
    x_out = gaussian_release(mu_out, sens, privacy, rng, widths=r.box.widths, size=n)
    w = (mu_in - mu_out) / sigma**2

    def says_in(x):
        return (x - (mu_in + mu_out) / 2) @ w > 0

    advantage = says_in(x_in).mean() - says_in(x_out).mean()
    assert abs(advantage - (2 * norm.cdf(distance / 2) - 1)) <= 4 * math.sqrt(2 * 0.25 / n)
    assert advantage < membership_advantage_bound(privacy)


@pytest.mark.slow
def test_a_release_holds_the_noised_parameters_and_nothing_of_the_rows(released, population, tmp_path):
    from bayestwin.engine.compile import unconstrained_draws
    from bayestwin.review import review
    from bayestwin.trials.virtual import _slots, population_draws

    cohort, pop = released.cohort, released.pop
    s = pop.sampler
    assert s["method"] == "dp-sample-and-aggregate" and pop.private and not pop.federated
    assert (s["epsilon"], s["delta"], s["groups"]) == (50.0, 1e-5, 3)
    assert s["epsilon_accountant"] == pytest.approx(50.0, rel=1e-3)
    d = len(s["released_phi"])
    assert s["sensitivity_in_box_widths"] == pytest.approx(math.sqrt(d) / 3)
    widths = np.subtract(s["upper"], s["lower"])
    np.testing.assert_allclose(s["noise_sd"], s["noise_multiplier"] * s["sensitivity_in_box_widths"] * widths)
    at = s["parameters"].index("intercept")
    assert (s["lower"][at], s["upper"][at]) == (35.0, 65.0)
    at = s["parameters"].index("sigma_log__")
    np.testing.assert_allclose([s["lower"][at], s["upper"][at]], np.log([1.0, 10.0]))
    prog = pop.program(4, **_slots(pop))
    flat = unconstrained_draws(prog.model, pop.posterior, prog.phi)
    np.testing.assert_allclose(flat.mean(0), s["released_phi"], atol=1e-9)  # whitened noise draws
    np.testing.assert_allclose(flat.std(0), s["noise_sd"], rtol=1e-3)
    text = repr(pop.sampler) + repr(pop) + pop.idata.to_dict().__repr__()
    assert not any(p in text for p in cohort.patients)
    assert pop.n_patients is None and pop.n_observations is None
    assert "released under (50, 1e-05)-differential privacy" in repr(pop)
    with pytest.raises(
        ValueError, match="it is a differentially private release .epsilon 50, delta 1e-05. and keeps no row"
    ):
        pop.cohort_covariates()

    # utility at a loose budget: the released typical intercept and slope (sampled on their own
    # scale) against the pooled fit's posterior. Each third of the cohort has ~sqrt(3) times the
    # pooled posterior SD; their average differs from the pooled mean by at most about that
    # (hierarchical shrinkage aside), and the noise adds its own SD.
    pooled = population.posterior
    for name in ("intercept", "slope"):
        got, at = float(pop.posterior[name].mean()), s["parameters"].index(name)
        want, sd = float(pooled[name].mean()), float(pooled[name].std())
        assert abs(got - want) <= 4 * math.hypot(math.sqrt(3) * sd, s["noise_sd"][at])

    # trials and cohorts at uncertainty="mean" use the release itself (not the noise draws' mean,
    # which for a log-scale parameter is inflated by the noise)
    point = population_draws(pop, 2, uncertainty="mean").values
    at = s["parameters"].index("sigma_log__")
    np.testing.assert_allclose(point["sigma"], math.exp(s["released_phi"][at]), rtol=1e-9)
    at = s["parameters"].index("intercept")
    np.testing.assert_allclose(point["intercept"], s["released_phi"][at], rtol=1e-9)

    # the reviewer's report says what the release is and shows no fit diagnostics it does not have
    page = review(pop, tmp_path / "dp.html").read_text()
    assert (
        "Released under (50, 1e-05)-differential privacy" in page
        and "public bounds for intercept, sigma, slope" in page
    )
    assert "Rank plots" not in page and not any(p in page for p in cohort.patients)

    # a saved release keeps its budget in the card and loads back to the same draws
    bt.save(pop, tmp_path / "dp")
    card = (tmp_path / "dp" / "card.json").read_text()
    assert '"epsilon": 50.0' in card and '"patients_in_fit": null' in card
    back = bt.load(tmp_path / "dp")
    assert back.private and back.sampler["released_phi"] == s["released_phi"]


@pytest.mark.slow
def test_virtual_cohorts_from_a_release_need_its_budget_and_public_covariates(released, population):
    from bayestwin.trials.virtual import virtual_cohort

    pop = released.pop
    public = {"age": [50, 60, 70], "sex": {"F": 0.5, "M": 0.5}}
    vc = virtual_cohort(pop, 20, times=[0, 6, 12], covariates=public, privacy=DP(50.0, 1e-5), uncertainty="mean")
    assert (vc.attrs["dp_epsilon"], vc.attrs["dp_delta"]) == (50.0, 1e-5)
    assert np.isfinite(vc.observation).all() and vc.observation.shape == (1, 20, 3, 3)
    with pytest.raises(ValueError, match="^a differentially private virtual cohort needs covariates="):
        virtual_cohort(pop, 20, privacy=DP(50.0, 1e-5))
    with pytest.raises(ValueError, match="^this population was released under epsilon 50, delta 1e-05, not the"):
        virtual_cohort(pop, 20, covariates=public, privacy=DP(1.0, 1e-5))
    with pytest.raises(ValueError, match=r"^virtual_cohort\(privacy=...\) needs a population released under"):
        virtual_cohort(population, 20, covariates=public, privacy=DP(1.0, 1e-5))
    with pytest.raises(ValueError, match="resampling the fitting cohort's covariates"):
        virtual_cohort(pop, 20)


def test_private_fit_refuses_a_schema_derived_from_nothing_public(simulated):
    train, _, _ = simulated
    cohort = bt.Cohort(train, covariates=["age", "sex"], therapies=THERAPIES, key=KEY)
    with pytest.raises(TypeError, match="^private_fit needs schema=, a bt.Schema from public knowledge"):
        bt.private_fit(cohort, schema=None, privacy=DP(1.0, 1e-5))
    with pytest.raises(TypeError, match=r"^privacy must be a bt.DP\(epsilon, delta\), not tuple$"):
        bt.private_fit(cohort, schema=PUBLIC, privacy=(1.0, 1e-5))
    with pytest.raises(ValueError, match="^the cohort has therapy 'drug_b', not in the public schema$"):
        bt.private_fit(cohort, schema=replace(PUBLIC, therapies=THERAPIES[:2]), privacy=DP(1.0, 1e-5))
    with pytest.raises(ValueError, match="^the cohort has level 'M' of 'sex', not in the public schema$"):
        bt.private_fit(cohort, schema=replace(PUBLIC, categorical={"sex": ("F",)}), privacy=DP(1.0, 1e-5))
    differ = re.escape(
        "the cohort's covariates {'age': 'numeric', 'sex': 'categorical'} differ from the public schema's"
    )
    with pytest.raises(ValueError, match=f"^{differ} {{'sex': 'categorical'}}: every covariate"):
        bt.private_fit(cohort, schema=replace(PUBLIC, numeric={}), privacy=DP(1.0, 1e-5))
    with pytest.raises(ValueError, match=f"^{differ} {{'age': 'categorical', 'sex': 'categorical'}}"):
        bt.private_fit(
            cohort,
            schema=replace(PUBLIC, numeric={}, categorical={"age": ("60",), "sex": ("F", "M")}),
            privacy=DP(1.0, 1e-5),
        )
    with pytest.raises(ValueError, match="^groups must be"):
        bt.private_fit(cohort, schema=PUBLIC, privacy=DP(1.0, 1e-5), groups=1)


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ({"intercep": (40, 60)}, "bounds: unknown parameter 'intercep'; the population's parameters are ["),
        ({"re_chol": (0, 1)}, "bounds: 're_chol' is sampled as 're_chol_cholesky-cov-packed__'; bounds can be given"),
        ({"sigma": (0, 5)}, "bounds['sigma']: sigma is positive, so its lower bound must be > 0, not (0, 5)"),
        ({"slope": (3, -3)}, "bounds['slope'] needs finite lower < upper, not (3, -3)"),
        ({"slope": (-3, float("inf"))}, "bounds['slope'] needs finite lower < upper, not (-3, inf)"),
        ({"slope": (-3, 0, 3)}, "bounds['slope'] must be a pair (lower, upper) of numbers or arrays of shape ()"),
        ({"beta_level": ([0, 1, 2], [3, 4, 5])}, "bounds['beta_level'] must be a pair (lower, upper) of numbers"),
    ],
)
def test_public_bounds_that_cannot_make_a_box_are_refused(bounds, message):
    from bayestwin.privacy import clipping_box

    with pytest.raises(ValueError) as err:
        clipping_box("progression", PUBLIC, bounds=bounds)
    assert str(err.value).startswith(message)


def test_the_box_takes_public_bounds_on_the_parameters_own_scale():
    from bayestwin.privacy import clipping_box, coordinates

    default = clipping_box("progression", PUBLIC)
    box = clipping_box("progression", PUBLIC, bounds={"sigma": (1.0, 10.0), "beta_level": ([-5, -4], [5, 4])})
    names = coordinates(box.program.phi)
    at = {n: i for i, n in enumerate(names)}
    np.testing.assert_allclose(box.lower[[at["sigma_log__"], at["beta_level[0]"], at["beta_level[1]"]]], [0, -5, -4])
    np.testing.assert_allclose(box.upper[at["sigma_log__"]], math.log(10.0))
    untouched = [i for n, i in at.items() if not n.startswith(("sigma", "beta_level"))]
    np.testing.assert_allclose(box.lower[untouched], default.lower[untouched])
    # the default: prior mean +- 2 prior SDs (the intercept's prior is N(outcome mean, 2.5 outcome SDs))
    i = at["intercept"]
    assert default.centre[i] == pytest.approx(50.0, abs=1.5)
    assert default.widths[i] / 4 == pytest.approx(25.0, rel=0.05)


def test_bounds_that_are_not_a_mapping_are_refused():
    from bayestwin.privacy import clipping_box

    with pytest.raises(TypeError, match=r"^bounds must be a mapping \{parameter: \(lower, upper\)\}, not list$"):
        clipping_box("progression", PUBLIC, bounds=["slope"])
