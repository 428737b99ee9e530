"""Parameters that change within a subject (ODE family): inter-occasion variability (IOV) and
time-varying covariates, against the piecewise closed form of a one-compartment IV model, and
what is refused.

Reference: with CL constant on [t_j, t_j+1), the amount decays as exp(-CL_j / V (t - t_j)) and a
bolus adds its dose, so the level at any time is a product of exponentials (exact). The family
solves at rtol 1e-10 here and must agree to 1e-6 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.data.nonmem import occasions, read_nonmem
from bayestwin.families import from_config
from bayestwin.families.pk_ode import ODE_MODELS, predict_outputs

KEY = b"pk-ode-periods-key-01"
TIMES = [1.0, 4.0, 25.0, 30.0]


def table(crcl_after=(30.0, 90.0, 100.0), occ_after=2):
    """Three subjects (CRCL 60, 90, 50 at first): 100 mg at 0 h and 24 h, levels at ``TIMES``;
    CRCL changes at 6 h (an EVID 2 record) and the second dose starts occasion ``occ_after``."""
    rows = []
    for i, (first, after) in enumerate(zip((60.0, 90.0, 50.0), crcl_after, strict=True)):
        rec = [(0.0, 100.0, ".", 1, first, 1)]
        rec += [(t, 0.0, 5.0, 0, first, 1) for t in TIMES[:2]]
        rec += [(6.0, 0.0, ".", 2, after, 1), (24.0, 100.0, ".", 1, after, occ_after)]
        rec += [(t, 0.0, 5.0, 0, after, occ_after) for t in TIMES[2:]]
        rows += [dict(ID=i, TIME=t, AMT=a, DV=dv, EVID=e, CRCL=c, OCC=o) for t, a, dv, e, c, o in rec]
    return pd.DataFrame(rows)


def exact(crcl, cl=2.0, v=30.0, exponent=0.8, kappa=0.0):
    """Levels at TIMES: CL = cl (CRCL/60)^exponent, CRCL crcl[0] before 6 h and crcl[1] after;
    from the second occasion (24 h) CL is also multiplied by exp(kappa)."""
    k = [cl * (c / 60.0) ** exponent / v for c in crcl]
    out = []
    for t in TIMES:
        if t < 6:
            amount = 100.0 * np.exp(-k[0] * t)
        else:
            at24 = 100.0 * np.exp(-k[0] * 6.0 - k[1] * 18.0) + 100.0
            amount = at24 * np.exp(-k[1] * np.exp(kappa) * (t - 24.0))
        out.append(amount / v)
    return np.array(out)


FAMILY = dict(
    model="one_compartment_iv",
    error="proportional",
    covariates={"CL": [bt.Power("CRCL", ref=60)]},
    time_varying=["CRCL"],
    iov=["CL"],
    max_occasions=3,
    rtol=1e-10,
)


def test_the_solver_switches_parameters_at_each_period_start():
    model = ODE_MODELS["one_compartment_iv"]()
    theta = jnp.array([[[2.0, 30.0], [4.0, 30.0], [4.0, 30.0]]])  # CL 2 until 5 h, then 4
    t_period = jnp.array([[-jnp.inf, 5.0, jnp.inf]])  # the last period is padding

    def levels(th):
        return predict_outputs(
            model,
            th,
            jnp.array([[0.0, 8.0]]),
            jnp.array([[100.0, 100.0]]),
            jnp.zeros((1, 2), int),
            jnp.zeros((1, 2)),
            jnp.array([[1.0, 5.0, 7.0, 8.0, 12.0]]),
            jnp.zeros(5, int),
            jnp.arange(5),
            jnp.zeros(5, int),
            t_period=t_period,
            rtol=1e-10,
            atol=1e-13,
        )

    a5 = 100.0 * np.exp(-2.0 / 30.0 * 5.0)
    want = [
        100.0 * np.exp(-2.0 / 30.0) / 30.0,
        a5 / 30.0,
        a5 * np.exp(-4.0 / 30.0 * 2.0) / 30.0,
        (a5 * np.exp(-4.0 / 30.0 * 3.0) + 100.0) / 30.0,
        (a5 * np.exp(-4.0 / 30.0 * 7.0) + 100.0 * np.exp(-4.0 / 30.0 * 4.0)) / 30.0,
    ]
    np.testing.assert_allclose(np.asarray(levels(theta)), want, rtol=1e-6)
    grad = jax.grad(lambda th: levels(th).sum())(theta)
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad[0, 2]).max()) == 0.0  # padding unused


def test_occasions_and_time_varying_covariates_equal_the_piecewise_closed_form():
    from pymc.sampling.jax import get_jaxified_graph

    ev = read_nonmem(table(), covariates=["CRCL"], key=KEY)
    fam = bt.Ode(**FAMILY)
    design = fam.design(ev.frame, ev.baseline, ev.schema)
    order = [ev.baseline.loc[p, "CRCL"] for p in design.patients]
    assert order == [60.0, 90.0, 50.0]
    # periods: a new one where CRCL changes (6 h) or the occasion does (24 h); subject 2's CRCL
    # does not change, so it has two periods and a padded third
    np.testing.assert_array_equal(design.data["t_period"][0], [-np.inf, 6.0, 24.0])
    np.testing.assert_array_equal(design.data["t_period"][1], [-np.inf, 24.0, np.inf])
    np.testing.assert_array_equal(design.data["occ_period"], [[0, 0, 1], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(design.data["cov_period"][2, :, 0], [50.0, 100.0, 100.0])
    model = fam.build_model(design, ev.schema)
    assert fam.patient_vars == ("z", "z_occ") and model["z_occ"].eval().shape == (3, 3, 1)
    point = model.initial_point()
    point["cov_cl_CRCL"] = 0.8
    point["z_occ"] = np.zeros((3, 3, 1))
    point["z_occ"][:, 1, 0] = 1.0  # every subject's second occasion: kappa = iov_sd * 1
    point["iov_sd_log__"] = np.log([0.2])
    levels = model.compile_fn(
        model.replace_rvs_by_values([model["conc"]])[0], inputs=model.value_vars, on_unused_input="ignore"
    )(point)
    cl, v = np.exp(point["log_cl"]), np.exp(point["log_v"])
    for i, crcl in enumerate([(60.0, 30.0), (90.0, 90.0), (50.0, 100.0)]):
        want = exact(crcl, cl, v, 0.8, 0.2)
        np.testing.assert_allclose(levels[4 * i : 4 * i + 4], want, rtol=1e-6)
    # the sampler's JAX gradient is finite (padded periods included)
    values = list(model.value_vars)
    logp = get_jaxified_graph(inputs=values, outputs=[model.logp()])
    x = [jnp.asarray(point[v.name]) for v in values]
    grads = jax.grad(lambda *a: logp(*a)[0], argnums=tuple(range(len(x))))(*x)
    assert {v.name for v, g in zip(values, grads, strict=True) if not np.isfinite(np.asarray(g)).all()} == set()
    assert from_config(fam.config()).config() == fam.config()


def test_forecasts_hold_the_current_occasion_and_the_latest_covariates():
    ev = read_nonmem(table(), covariates=["CRCL"], key=KEY)
    fam = bt.Ode(**FAMILY)
    _, _, data = fam.forecast_inputs(ev, ev.schema, [bt.Regimen(100.0, 24.0, doses=2)], [50.0, 60.0], 48.0)
    assert data["t_period"].shape == (3, 1, 1, 3) and data["cov_period"].shape == (3, 1, 1, 3, 1)
    np.testing.assert_array_equal(data["occ_period"][0, 0, 0], [0, 0, 1])  # the last period runs on


def test_occasions_come_from_occ_or_from_doses():
    frame = pd.DataFrame({"ID": ["a"] * 4 + ["b"] * 3, "OCC": [1, 1, 3, 3, 2, 2, 5], "EVID": [0, 1, 0, 1, 1, 0, 1]})
    np.testing.assert_array_equal(occasions(frame), [0, 0, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(occasions(frame, "dose"), [0, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(occasions(frame.drop(columns="OCC")), np.zeros(7))


P0 = bt.pseudonymise(0, KEY)


@pytest.mark.parametrize(
    "family, data, message",
    [
        (
            dict(model="one_compartment_iv"),
            dict(),
            "OCC changes within the ID, but this population has no inter-occasion variability from OCC "
            f"(iov=[...], occasions='OCC') (patient {P0}, row 4, column 'OCC')",
        ),
        (
            dict(model="one_compartment_iv", iov=["CL"], occasions="dose"),
            dict(),
            "OCC changes within the ID, but occasions='dose' ignores OCC (leave the column out, or use "
            f"occasions='OCC') (patient {P0}, row 4, column 'OCC')",
        ),
        (
            dict(model="one_compartment_iv", iov=["CL"], max_occasions=1),
            dict(),
            "this ID has more occasions than max_occasions=1 (raise it when building the family) "
            f"(patient {P0}, row 4, column 'OCC')",
        ),
        (
            dict(model="one_compartment_iv", covariates={"CL": [bt.Power("CRCL", ref=60)]}, iov=["CL"]),
            dict(covariates=["CRCL"]),
            "covariate CRCL changes within the ID: time-varying covariates are modelled by the ODE family "
            f"when declared (time_varying=['CRCL']) (patient {P0}, row 3, column 'CRCL')",
        ),
        (
            FAMILY,
            dict(covariates=["CRCL"], crcl_after=(0.0, 90.0, 100.0)),
            f"a power effect needs CRCL > 0 (it is (x / ref) ** exponent) (patient {P0}, row 3, column 'CRCL')",
        ),
    ],
)
def test_what_cannot_be_modelled_is_refused_with_the_record(family, data, message):
    covariates = data.pop("covariates", [])
    df = table(**data)
    df = df if covariates else df.drop(columns="CRCL")
    ev = read_nonmem(df, covariates=covariates, key=KEY)
    with pytest.raises(bt.DataError) as err:
        bt.Ode(**family).design(ev.frame, ev.baseline, ev.schema)
    assert str(err.value) == message


def test_the_closed_form_pk_family_refuses_occasions():
    ev = read_nonmem(table().drop(columns="CRCL"), key=KEY)
    with pytest.raises(bt.DataError) as err:
        bt.Pk(route="iv").design(ev.frame, ev.baseline, ev.schema)
    assert str(err.value) == (
        "OCC changes within the ID, but this family has no inter-occasion variability (the ODE family has: "
        f"bt.Ode(..., iov=['CL'])) (patient {P0}, row 4, column 'OCC')"
    )


def test_options_are_checked_when_the_family_is_made():
    with pytest.raises(ValueError, match=r"time_varying: WT is not in the covariate model \(covariates= uses \[\]\)"):
        bt.Ode("one_compartment", time_varying=["WT"])
    with pytest.raises(ValueError, match=r"iov: 'Q' is not a parameter of this model \(CL, V, KA\)"):
        bt.Ode("one_compartment", iov=["Q"])
    with pytest.raises(ValueError, match="occasions must be 'OCC'"):
        bt.Ode("one_compartment", iov=["CL"], occasions="visit")
    with pytest.raises(ValueError, match="friberg_sequential has its PK in closed form with constant parameters"):
        bt.Ode("friberg_sequential", iov=["CL"])
