"""The batched R-hat / ESS are ArviZ's estimators: agreement to rounding error on hard cases."""

import numpy as np
import pytest
from arviz_base import rcParams
from arviz_stats.base import array_stats

from bayestwin.review import batched


def _ar1(rng, phi, shape, n):
    x = np.zeros((*shape, n))
    e = rng.normal(size=(*shape, n))
    for t in range(1, n):
        x[..., t] = phi * x[..., t - 1] + e[..., t]
    return x


def _cases():
    rng = np.random.default_rng(0)
    return {
        "iid": rng.normal(size=(6, 4, 1000)),
        "autocorrelated": _ar1(rng, 0.9, (6, 4), 1000),
        "stuck chains": _ar1(rng, 0.99, (6, 4), 500) + np.arange(4)[:, None] * 0.5,
        "ties": np.round(rng.normal(size=(6, 4, 1000)), 1),
        "heavy tails": rng.standard_cauchy(size=(6, 4, 1000)),
        "antithetic": _ar1(rng, -0.5, (6, 4), 1000),
        "odd draws": _ar1(rng, 0.5, (6, 3), 101),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_matches_arviz(case):
    x = _cases()[case]
    prob = rcParams["stats.ci_prob"]
    r, bulk, tail = batched.diagnose(x, threads=2)
    np.testing.assert_allclose(r, array_stats.rhat(x, chain_axis=-2, draw_axis=-1), rtol=1e-10)
    np.testing.assert_allclose(batched.rhat(x), r, rtol=1e-12)
    np.testing.assert_allclose(bulk, array_stats.ess(x, chain_axis=-2, draw_axis=-1, method="bulk"), rtol=1e-10)
    ref_tail = array_stats.ess(x, chain_axis=-2, draw_axis=-1, method="tail", prob=prob)
    np.testing.assert_allclose(tail, ref_tail, rtol=1e-10)


def test_average_ranks_match_scipy_with_ties():
    from scipy import stats

    y = np.round(np.random.default_rng(1).normal(size=(5, 3000)), 1)
    np.testing.assert_array_equal(batched._average_ranks(y), stats.rankdata(y, axis=-1))


def test_constant_series_has_full_ess():
    x = np.ones((2, 4, 100))
    assert (batched._ess_basic(x) == 400).all()
