"""Centred subjects in the PK families' population fit (``centred=``): the same posterior as the
non-centred model twins condition on, exactly (the change of variables and its Jacobian), the
option's checks, and a fit whose posterior keeps ``z`` and feeds a twin."""

import warnings

import numpy as np
import pytest

import bayestwin as bt
from bayestwin.families import from_config
from bayestwin.families.pk import simulate

KEY = b"centred-pk-test-key-0001"


@pytest.fixture(scope="module")
def table():
    return simulate(6, times=(0.5, 1.0, 2.0, 4.0, 8.0, 12.0), seed=3)[0]


@pytest.fixture(scope="module")
def events(table):
    return bt.read_nonmem(table, key=KEY)


def _models(fam, events):
    design = fam.design(events.frame, events.baseline, events.schema)
    centred, hidden = fam.fit_model(design, events.schema)
    return centred, hidden, fam.build_model(design, events.schema)


def _log_det(point: dict, fam) -> float:
    """log |det L_cc| of one subject: half the log determinant of the centred parameters' covariance."""
    bsv = list(fam.bsv_parameters)
    c = [bsv.index(p) for p in fam.centred_parameters]
    if "re_chol_stds" in point:
        s, corr = point["re_chol_stds"], point["re_chol_corr"]
        cov = corr * np.outer(s, s)
    else:
        cov = np.diag(point["bsv_sd"] ** 2)
    return 0.5 * np.linalg.slogdet(cov[np.ix_(c, c)])[1]


@pytest.mark.parametrize(
    "options",
    [
        {"correlated": False, "centred": ["KA", "CL"]},  # diagonal, some centred
        {"correlated": True, "centred": True},  # one LKJ block, all centred (MvNormal)
        {"correlated": [["CL", "V"]], "centred": ["CL", "V"]},  # a block centred, KA not
    ],
    ids=["diagonal-subset", "lkj-all", "block"],
)
def test_centred_fit_model_is_the_same_posterior(events, options):
    """At random points: the centred model's subject parameters and levels equal the
    non-centred model's at the ``z`` it reports, and its log density differs by exactly the
    change of variables' Jacobian, n_subjects x log |det L_cc| (1e-8)."""
    fam = bt.Pk(error="combined", **options)
    centred, hidden, plain = _models(fam, events)
    assert set(hidden) <= {"log_theta_centred", "z_noncentred"} and "log_theta_centred" in hidden
    assert "z" in {d.name for d in centred.deterministics}
    outs = ["z", "patient_cl", "patient_v", "patient_ka", "conc"]
    extra = ["re_chol_stds", "re_chol_corr"] if options["correlated"] is True else []
    extra += ["bsv_sd"] if options["correlated"] is False else []
    f_c, f_p = (
        m.compile_fn(
            m.replace_rvs_by_values([m[n] for n in names]), inputs=m.value_vars, point_fn=True, on_unused_input="ignore"
        )
        for m, names in ((centred, outs + extra), (plain, outs[1:]))
    )
    logp_c, logp_p = centred.compile_logp(), plain.compile_logp()
    rng = np.random.default_rng(0)
    n = len(events.baseline)
    for _ in range(3):
        point = {k: v + rng.normal(0.0, 0.3, np.shape(v)) for k, v in centred.initial_point().items()}
        values = dict(zip(outs + extra, f_c(point), strict=True))
        other = {k: v for k, v in point.items() if k in {v.name for v in plain.value_vars}} | {"z": values["z"]}
        for name, got in zip(outs[1:], f_p(other), strict=True):
            np.testing.assert_allclose(got, values[name], rtol=1e-10, err_msg=name)
        if options["correlated"] is True or options["correlated"] is False:
            expected = logp_p(other) - n * _log_det(values, fam)
            assert logp_c(point) == pytest.approx(expected, rel=1e-10, abs=1e-8)


def test_options_are_checked_and_kept_in_the_card():
    fam = bt.Pk(correlated=False, centred=["cl", "KA"])
    assert fam.centred == ["CL", "KA"] and fam.centred_parameters == ("cl", "ka")
    assert from_config(fam.config()).config() == fam.config()
    assert bt.Pk(centred=True).centred_parameters == ("cl", "v", "ka")
    with pytest.raises(ValueError, match=r"centred: 'Q' is not a parameter of this model \(CL, V, KA\)"):
        bt.Pk(centred=["Q"])
    with pytest.raises(ValueError, match="centred: KA has no between-subject variability"):
        bt.Pk(bsv=["CL", "V"], centred=["KA"])
    with pytest.raises(ValueError, match=r"centred names \['CL'\] but not \['V', 'KA'\] of one correlated block"):
        bt.Pk(centred=["CL"])  # correlated=True: one block over CL, V, KA
    with pytest.raises(ValueError, match=r"a parameter is listed twice in centred=\['CL', 'cl'\]"):
        bt.Pk(correlated=False, centred=["CL", "cl"])
    with pytest.raises(TypeError, match="centred is True, False or a list of parameter names"):
        bt.Pk(centred="CL")
    ode = bt.Ode("friberg_sequential", correlated=False, centred=["CL", "V", "CIRC0"])
    assert ode.centred_parameters == ("cl", "v", "circ0")


def test_a_centred_fit_keeps_z_and_conditions_twins(events):
    """The posterior has the non-centred ``z`` (patient, pk_param) and none of the raw centred
    variables; its subject parameters are exp(typical + bsv_sd z) (ka above k); a twin
    conditions on it."""
    fam = bt.Pk(error="combined", correlated=False, centred=["CL", "KA"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pop = bt.fit(events, fam, draws=100, tune=200, chains=2, seed=2, extend=0, progressbar=False)
    post = pop.idata.posterior
    assert post["z"].dims == ("chain", "draw", "patient", "pk_param")
    assert not {"log_theta_centred", "z_noncentred"} & set(post.data_vars)
    assert not {"centred_param", "noncentred_param"} & set(post.dims)
    sd = post["bsv_sd"]
    own = {p: np.exp(post[f"log_{p}"] + sd.sel(pk_param=p) * post["z"].sel(pk_param=p)) for p in ("cl", "v", "ka")}
    np.testing.assert_allclose(post["patient_cl"], own["cl"], rtol=1e-9)
    np.testing.assert_allclose(post["patient_v"], own["v"], rtol=1e-9)
    # one compartment oral: ka = k + exp(.) (no flip-flop)
    np.testing.assert_allclose(post["patient_ka"], own["cl"] / own["v"] + own["ka"], rtol=1e-9)
    new, _ = simulate(1, times=(0.5, 2.0, 8.0), seed=4, id_start=100)
    twin = pop.condition(new, key=KEY, chains=2, draws=200, tune=200)
    assert np.isfinite(twin.posterior["patient_cl"]).all()


def test_a_failed_fit_says_which_way_to_centre():
    from bayestwin.review.convergence import Verdict

    slow = Verdict(converged=False, table=None, failing=["ESS < 400 for variables log_cl"])
    diverged = Verdict(converged=False, table=None, failing=["12 divergent transitions"])
    assert "e.g. centred=['CL', 'V']" in bt.Pk().fit_advice(None, slow)[0]
    assert bt.Pk().fit_advice(None, diverged) == []  # a non-centred fit's divergences: the generic advice
    advice = bt.Pk(correlated=False, centred=["CL", "KA"]).fit_advice(None, diverged)
    assert advice[0].startswith("divergences with centred subjects (['CL', 'KA']) point to a funnel")
    assert bt.Pk(correlated=False, centred=["CL"]).fit_advice(None, slow) == []
