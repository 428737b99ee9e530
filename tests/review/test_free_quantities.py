"""Structurally fixed quantities stay out of rank plots and tables; Pareto k̂ is worded as the PSIS
paper says (issue 21, item 5)."""

import warnings

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import bayestwin as bt
from bayestwin.review import free_quantities, loo
from bayestwin.review.report import loo_wording


def _tree():
    rng = np.random.default_rng(0)
    r = np.tanh(rng.normal(size=(2, 50)))
    corr = np.empty((2, 50, 2, 2))
    corr[..., 0, 0] = corr[..., 1, 1] = 1.0 + 1e-16 * rng.normal(size=(2, 50))  # 1 up to rounding
    corr[..., 0, 1] = corr[..., 1, 0] = r
    post = xr.Dataset(
        {
            "mu": (("chain", "draw"), rng.normal(size=(2, 50))),
            "fixed": (("chain", "draw"), np.full((2, 50), 3.0)),
            "corr": (("chain", "draw", "effect", "effect_bis"), corr),
            "scale": (("chain", "draw", "effect"), rng.gamma(2.0, size=(2, 50, 2))),
        },
        coords={"chain": [0, 1], "draw": np.arange(50), "effect": ["level", "slope"], "effect_bis": ["level", "slope"]},
    )
    return xr.DataTree.from_dict({"posterior": post}), r


def test_constant_and_repeated_elements_are_left_out_and_the_rest_labelled():
    tree, r = _tree()
    out = free_quantities(tree, ["mu", "fixed", "corr", "scale"])
    assert list(out.posterior.data_vars) == ["mu", "corr[level, slope]", "scale[level]", "scale[slope]"]
    np.testing.assert_array_equal(out.posterior["corr[level, slope]"].to_numpy(), r)
    assert out.posterior["mu"].dims == ("chain", "draw")


def test_a_non_finite_element_is_left_out():
    tree, _ = _tree()
    post = tree.posterior.to_dataset()
    post["mu"][0, 3] = np.nan
    out = free_quantities(xr.DataTree.from_dict({"posterior": post}), ["mu", "scale"])
    assert list(out.posterior.data_vars) == ["scale[level]", "scale[slope]"]


def test_population_summary_has_one_row_per_free_element():
    pop = bt.load("sleepstudy")
    rows = pop.summary().index.tolist()
    assert rows == [
        "intercept",
        "slope",
        "sigma",
        "re_chol_corr[intercept, slope]",
        "re_chol_stds[intercept]",
        "re_chol_stds[slope]",
    ]


def test_loo_keeps_the_pareto_warning_in_the_result_not_on_stderr():
    pop = bt.load("sleepstudy")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        res = loo(pop, by="patient")
    assert not [w for w in said if "Pareto" in str(w.message)]
    draws = pop.posterior.sizes["chain"] * pop.posterior.sizes["draw"]
    assert res.good_k == pytest.approx(min(1 - 1 / np.log10(draws), 0.7))
    assert bool(res.warning) == bool((res.pareto_k > res.good_k).any())


def test_pareto_wording_follows_the_psis_paper():
    text = loo_wording(0.7, 4000)
    assert "S = 4000 draws" in text and "above 0.70 = min(1 - 1/log10 S, 0.7)" in text
    assert "not that the unit is an outlier" in text and "influential" not in text


@settings(max_examples=40, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["vary", "constant", "nan", "repeat"]), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_only_distinct_varying_finite_elements_survive(kinds, seed):
    rng = np.random.default_rng(seed)
    values = np.empty((2, 20, len(kinds)))
    expected = []
    for i, kind in enumerate(kinds):
        if kind == "constant":
            values[..., i] = rng.normal()
        elif kind == "nan":
            values[..., i] = rng.normal(size=(2, 20))
            values[0, 0, i] = np.nan
        elif kind == "repeat" and any(k == "vary" for k in kinds[:i]):
            values[..., i] = values[..., kinds.index("vary")]
        else:
            values[..., i] = rng.normal(size=(2, 20))
            expected.append(f"x[e{i}]")
    post = xr.Dataset({"x": (("chain", "draw", "e"), values)}, coords={"e": [f"e{i}" for i in range(len(kinds))]})
    out = free_quantities(xr.DataTree.from_dict({"posterior": post}), ["x"])
    assert list(out.posterior.data_vars) == expected
