"""Expectation propagation over sites (bayestwin.federated.ep) against the exact pooled posterior
of a conjugate model, where the answer is known in closed form."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bayestwin.federated.ep import (
    Gaussian,
    SiteError,
    cavity,
    check_factor,
    expectation_propagation,
    site_update,
    tilted_precision,
)

D, SIGMA, TAU = 3, 0.7, 2.0


def _sites(seed=0, sizes=(12, 30, 7, 20)):
    """Linear-Gaussian sites y_k = X_k phi + e (known sigma): the likelihood of each site is a
    Gaussian in phi, so EP is exact and the pooled posterior is closed form."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=D)
    out = []
    for n in sizes:
        X = rng.normal(size=(n, D)) * rng.uniform(0.5, 2.0, size=D)  # different case mixes
        out.append((X, X @ phi + SIGMA * rng.normal(size=n)))
    return out


def _likelihood(X, y) -> Gaussian:
    return Gaussian(X.T @ X / SIGMA**2, X.T @ y / SIGMA**2)


PRIOR = Gaussian(np.eye(D) / TAU**2, np.zeros(D))


def _pooled(sites):
    g = PRIOR
    for X, y in sites:
        g = g.times(_likelihood(X, y))
    return g.moments()


def _exact_tilted(sites):
    def tilted(k, cav):
        return (*cav.times(_likelihood(*sites[k])).moments(), None)

    return tilted


def test_one_undamped_sweep_gives_the_pooled_posterior_exactly():
    sites = _sites()
    mean, cov = _pooled(sites)
    res = expectation_propagation(PRIOR, _exact_tilted(sites), len(sites), iterations=1, damping=1.0)
    m, c = res.approx.moments()
    np.testing.assert_allclose(m, mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c, cov, rtol=1e-10, atol=1e-14)
    for (X, y), g in zip(sites, res.sites, strict=True):  # each factor is that site's likelihood
        np.testing.assert_allclose(g.precision, X.T @ X / SIGMA**2, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(g.shift, X.T @ y / SIGMA**2, rtol=1e-9, atol=1e-9)


def test_damped_sweeps_converge_to_the_pooled_posterior():
    sites = _sites(seed=1)
    mean, cov = _pooled(sites)
    res = expectation_propagation(PRIOR, _exact_tilted(sites), len(sites), iterations=40, damping=0.5)
    errors = [np.abs(m - mean).max() for m, _ in res.history]
    assert errors[0] > 1e-4 and errors[-1] < 1e-9  # geometric: each sweep halves the gap
    assert all(b <= a * 0.51 + 1e-14 for a, b in zip(errors, errors[1:], strict=False))
    np.testing.assert_allclose(res.history[-1][1], cov, rtol=1e-8)


def test_sampled_tilted_moments_agree_within_monte_carlo_error():
    """Sites return moments of 4,000 draws of their tilted distribution (as NUTS would): the
    global mean is within 4 Monte-Carlo SEs of the pooled one in every coordinate."""
    sites = _sites(seed=2)
    mean, cov = _pooled(sites)
    rng = np.random.default_rng(5)
    n = 4000

    def tilted(k, cav):
        m, c = cav.times(_likelihood(*sites[k])).moments()
        x = rng.multivariate_normal(m, c, size=n)
        return x.mean(0), np.cov(x, rowvar=False), n

    res = expectation_propagation(PRIOR, tilted, len(sites), iterations=8, damping=0.5)
    m, c = res.approx.moments()
    # MC error of the mean: each site's mean estimate has SE sqrt(diag(c_tilted) / n); summed
    # through the precisions, the global mean's SE is at most about sqrt(K diag(cov) / n) here
    se = np.sqrt(len(sites) * np.diag(cov) / n)
    assert np.all(np.abs(m - mean) < 4 * se), (m - mean) / se
    np.testing.assert_allclose(np.diag(c), np.diag(cov), rtol=0.15)


def test_the_tilted_precision_is_unbiased_from_draws():
    rng = np.random.default_rng(11)
    cov = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 0.5]])
    n, reps = 50, 4000
    est = np.mean(
        [
            tilted_precision(np.cov(rng.multivariate_normal(np.zeros(3), cov, size=n), rowvar=False), n)
            for _ in range(reps)
        ],
        axis=0,
    )
    naive = np.mean(
        [np.linalg.inv(np.cov(rng.multivariate_normal(np.zeros(3), cov, size=n), rowvar=False)) for _ in range(reps)],
        axis=0,
    )
    truth = np.linalg.inv(cov)
    # the naive inverse is (n - 1) / (n - d - 2) = 49 / 45 too large; the corrected one is not
    # (each entry's MC SE over 4,000 replicates is under 1% of the diagonal)
    np.testing.assert_allclose(np.diag(est), np.diag(truth), rtol=0.02)
    np.testing.assert_allclose(np.diag(naive) / np.diag(truth), 49 / 45, rtol=0.02)
    with pytest.raises(ValueError, match="5 draws cannot estimate a 3-dimensional precision"):
        tilted_precision(cov, 5)


def test_a_malformed_summary_or_an_improper_cavity_is_refused_by_site():
    good = Gaussian(np.eye(D), np.zeros(D))
    with pytest.raises(SiteError, match=r"site 'north' sent a factor of shapes \(2, 2\) and \(3,\), not \(3, 3\)"):
        check_factor(Gaussian(np.eye(2), np.zeros(D)), D, "north")
    with pytest.raises(SiteError, match="site 'north' sent a factor with values that are not finite"):
        check_factor(Gaussian(np.eye(D), np.array([0.0, np.nan, 0.0])), D, "north")
    asym = np.eye(D)
    asym[0, 1] = 0.5
    with pytest.raises(SiteError, match="site 'north' sent a precision matrix that is not symmetric"):
        check_factor(Gaussian(asym, np.zeros(D)), D, "north")
    with pytest.raises(SiteError, match="site 'north' sent a summary that is not a Gaussian factor"):
        check_factor("rows", D, "north")
    with pytest.raises(SiteError, match="the cavity of site 'south' is not a proper Gaussian"):
        cavity(good, Gaussian(2.0 * np.eye(D), np.zeros(D)), "south")
    with pytest.raises(ValueError, match=r"damping must be in \(0, 1\], not 0"):
        site_update(good, good, np.zeros(D), np.eye(D), damping=0)
    exact = _exact_tilted(_sites())
    for kw, message in (
        ({"n_sites": 0}, "n_sites must be a whole number >= 1, not 0"),
        ({"n_sites": "4"}, "n_sites must be a whole number >= 1, not '4'"),
        ({"n_sites": 4, "iterations": 0}, "iterations must be a whole number >= 1, not 0"),
        ({"n_sites": 4, "damping": 1.5}, r"damping must be in \(0, 1\], not 1.5"),
        ({"n_sites": 4, "damping": "0.5"}, r"damping must be in \(0, 1\], not '0.5'"),
    ):
        with pytest.raises(ValueError, match=message):
            expectation_propagation(PRIOR, exact, **kw)


def test_a_sweep_that_would_leave_an_improper_cavity_is_damped_until_it_does_not():
    """Noisy moments from small sites: one site's tilted distribution much narrower than its
    cavity, two much wider. Undamped, the next cavity of the first site would be improper (the
    prior's precision 1 minus 0.9 twice); the sweep halves the damping (0.5 suffices here), and
    applies the same answers again rather than asking the sites anew."""
    from bayestwin.federated.ep import sweep

    prior = Gaussian(np.eye(D), np.zeros(D))
    flat = Gaussian(np.zeros((D, D)), np.zeros(D))
    asked = []

    def tilted(k, cav):
        asked.append(k)
        return np.zeros(D), (0.01 if k == 0 else 10.0) * np.eye(D), None

    sites, approx, used = sweep(prior, [flat, flat, flat], tilted, damping=1.0)
    assert used == 0.5 and asked == [0, 1, 2]
    for site in sites:
        assert np.linalg.eigvalsh(approx.over(site).precision).min() > 0
    np.testing.assert_allclose(sites[0].precision, 0.5 * 99 * np.eye(D))
    # a well-behaved sweep keeps the damping asked for
    _, _, used = sweep(prior, [flat, flat, flat], lambda k, cav: (np.zeros(D), 0.5 * np.eye(D), None), damping=1.0)
    assert used == 1.0


def test_the_verdict_says_ep_has_not_settled_and_why():
    """The federated verdict: the sites' NUTS runs gated as a fit, and EP's own convergence: one
    sweep cannot show it (a second is needed), a last sweep that moved by tol or more failed it."""
    from bayestwin.federated.fit import _verdict
    from bayestwin.review.convergence import Thresholds

    good = {"rhat": 1.002, "ess_bulk": 900.0, "ess_tail": 800.0}
    reports = {s: {"table": {"slope": good}, "divergences": 0, "bfmi_min": 0.9} for s in ("a", "b")}
    assert _verdict(reports, 0.05, 0.1, Thresholds()).converged
    one = _verdict(reports, float("inf"), 0.1, Thresholds())
    assert not one.converged
    assert one.failing == ["EP ran a single sweep: whether it settled shows only in a second one (iterations >= 2)"]
    moved = _verdict(reports, 0.25, 0.1, Thresholds())
    assert moved.failing == ["EP did not settle: the last sweep moved the population posterior by 0.25 SD (tol 0.1)"]
    reports["b"]["divergences"] = 3  # a site's run that fails the gate fails the population
    assert not _verdict(reports, 0.05, 0.1, Thresholds()).converged


# ------------------------------------------------------------------- local parameters (site effects)
def _with_site_effects(seed=3, sizes=(12, 30, 7, 20), tau_u=1.5):
    """The linear-Gaussian sites above, plus each site's own effect u_k on its rows
    (y_k = X_k phi + u_k + e): the parameters are (phi, u_1..u_K), and site k's likelihood
    touches phi and u_k only. Prior: N(0, TAU^2) on phi, N(0, tau_u^2) on each u_k."""
    rng = np.random.default_rng(seed)
    phi, u = rng.normal(size=D), rng.normal(0.0, tau_u, size=len(sizes))
    K, out = len(sizes), []
    for k, n in enumerate(sizes):
        X = rng.normal(size=(n, D)) * rng.uniform(0.5, 2.0, size=D)
        A = np.zeros((n, D + K))
        A[:, :D], A[:, D + k] = X, 1.0  # the rows' design over all parameters
        out.append((A, X @ phi + u[k] + SIGMA * rng.normal(size=n)))
    prior = Gaussian(np.diag([1 / TAU**2] * D + [1 / tau_u**2] * K), np.zeros(D + K))
    subsets = [np.r_[np.arange(D), D + k] for k in range(K)]
    return out, prior, subsets


def test_local_parameters_give_the_pooled_posterior_and_factors_zero_outside_their_subsets():
    """Each site is given the cavity's marginal over (phi, its own u_k) and returns exact tilted
    moments there: one undamped sweep gives the pooled posterior over every parameter, each
    site's factor is zero outside its subset (no information on the other sites' effects), and
    damped sweeps converge to the same fixed point."""
    from bayestwin.federated.ep import marginal

    sites, prior, subsets = _with_site_effects()
    pooled = prior
    for A, y in sites:
        pooled = pooled.times(_likelihood(A, y))
    mean, cov = pooled.moments()
    given = []

    def tilted(k, cav):
        A, y = sites[k]
        idx = subsets[k]
        given.append(len(cav.shift))
        lik = _likelihood(A[:, idx], y)
        return (*cav.times(lik).moments(), None)

    res = expectation_propagation(prior, tilted, len(sites), iterations=1, damping=1.0, subsets=subsets)
    assert set(given) == {D + 1}  # the marginal over the site's subset, not all D + K coordinates
    m, c = res.approx.moments()
    np.testing.assert_allclose(m, mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c, cov, rtol=1e-9, atol=1e-13)
    for k, g in enumerate(res.sites):
        outside = np.setdiff1d(np.arange(D + len(sites)), subsets[k])
        assert not g.precision[outside].any() and not g.shift[outside].any()
    damped = expectation_propagation(prior, tilted, len(sites), iterations=40, damping=0.5, subsets=subsets)
    np.testing.assert_allclose(damped.approx.moments()[0], mean, rtol=1e-8, atol=1e-10)
    # the marginal of a Gaussian over some coordinates is the sub-block of its covariance
    sub = marginal(pooled, subsets[2])
    np.testing.assert_allclose(np.linalg.inv(sub.precision), cov[np.ix_(subsets[2], subsets[2])], rtol=1e-10)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_every_level_has_one_owner_that_holds_it_and_subsets_keep_the_shared_coordinates(data):
    """Property (any levels, widths and sites' holdings): each level's prior goes to exactly one
    site, one whose rows hold it, the first such; a site's subset is every shared coordinate
    plus the effects of the levels it holds, and nothing else."""
    from bayestwin.federated.site import Effects, Share, owners

    n_levels = data.draw(st.integers(1, 5))
    width = data.draw(st.integers(1, 3))
    before, after = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4))  # shared coordinates
    levels = tuple(f"h{j}" for j in range(n_levels))
    effects = (Effects("site", "site_effects", before, levels, width),)
    d = before + n_levels * width + after
    n_sites = data.draw(st.integers(1, 4))
    held = [set(data.draw(st.lists(st.sampled_from(levels), min_size=1, unique=True))) for _ in range(n_sites)]
    for lv in levels:  # every level is held somewhere (the schema's levels are the sites' union)
        if not any(lv in h for h in held):
            held[data.draw(st.integers(0, n_sites - 1))].add(lv)
    seen = {f"s{k}": {"site": h} for k, h in enumerate(held)}
    own = owners(effects, seen)
    for lv in levels:
        holders = [k for k in seen if lv in seen[k]["site"]]
        assert [k for k in own if lv in own[k]["site"]] == holders[:1]
    shared = set(range(before)) | set(range(before + n_levels * width, d))
    for k in seen:
        share = Share.of(effects, d, seen[k], own[k])
        mine = {before + levels.index(lv) * width + i for lv in seen[k]["site"] for i in range(width)}
        assert list(share.subset) == sorted(shared | mine)
        assert set(share.shared(d)) == shared
        assert set(share.owned()) == {
            before + levels.index(lv) * width + i for lv in own[k]["site"] for i in range(width)
        }
