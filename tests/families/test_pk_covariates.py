"""Covariate models on any PK parameter, and between-subject variability per parameter.

Each covariate form is checked in the PyMC graph against its closed form (the subject's parameter
with every random effect at zero), to 1e-12 relative; then the structure options, the default
priors' reference scaling, and every refusal with its exact message.
"""

import numpy as np
import pandas as pd
import pymc as pm
import pytest

import bayestwin as bt
from bayestwin.data.nonmem import read_nonmem
from bayestwin.families import from_config

KEY = b"pk-covariates-key-0001"


def table(n=6, seed=0):
    """Subjects with weight, creatinine clearance, age and a genotype; one oral dose, 3 levels."""
    rng = np.random.default_rng(seed)
    rows = []
    geno = ["normal", "poor", "ultrarapid"]
    for i in range(n):
        cov = {
            "WT": round(float(rng.uniform(40, 110)), 1),
            "CRCL": round(float(rng.uniform(30, 140)), 1),
            "AGE": round(float(rng.uniform(20, 80)), 1),
            "CYP2D6": geno[i % 3],
        }
        rows.append({"ID": i + 1, "TIME": 0.0, "AMT": 100.0, "DV": np.nan, "EVID": 1, **cov})
        for t in (1.0, 4.0, 12.0):
            rows.append({"ID": i + 1, "TIME": t, "AMT": 0.0, "DV": 1.0 + 0.1 * i, "EVID": 0, **cov})
    df = pd.DataFrame(rows)
    df["CYP2D6"] = pd.Categorical(df["CYP2D6"], categories=geno)
    return df


def read(df, covariates=("WT", "CRCL", "AGE", "CYP2D6")):
    unused = [c for c in ("WT", "CRCL", "AGE", "CYP2D6") if c in df and c not in covariates]
    return read_nonmem(df, covariates=list(covariates), ignore=unused, key=KEY)


TYPICAL = {"cl": 2.0, "v": 30.0, "ka": 1.5, "tlag": 0.4}
COEF = {"cov_cl_CRCL": 0.006, "cov_ka_AGE": -0.01, "cov_v_WT": 0.9, "cov_cl_CYP2D6": np.array([-1.2, 0.6])}


def parameters(fam, ev, fixed):
    """The subjects' parameters (patient_*) with random effects at zero and ``fixed`` values."""
    model = fam.build_model(fam.design(ev.frame, ev.baseline, ev.schema), ev.schema)
    n_bsv = len(fam.bsv_parameters)
    values = {f"log_{p}": np.log(TYPICAL[p]) for p in fam.parameters} | {"z": np.zeros((len(ev.patients), n_bsv))}
    values |= fixed
    done = pm.do(model, values)
    return {p: pm.draw(done[f"patient_{p}"], random_seed=0) for p in fam.parameters}


def test_each_covariate_form_equals_its_closed_form():
    ev = read(table())
    fam = bt.Pk(
        lag=True,
        covariates={
            "CL": [bt.Power("WT", ref=70, exponent=0.75), bt.Linear("CRCL", ref=100), bt.Categorical("CYP2D6")],
            "V": [bt.Power("WT", ref=70)],  # exponent estimated
            "KA": [bt.Exponential("AGE", ref=40)],
            "TLAG": [],
        },
    )
    got = parameters(fam, ev, {k: v for k, v in COEF.items()})
    b = ev.baseline
    wt, crcl, age = (b[c].to_numpy(float) for c in ("WT", "CRCL", "AGE"))
    geno = {"normal": 0.0, "poor": -1.2, "ultrarapid": 0.6}
    cl = TYPICAL["cl"] * (wt / 70) ** 0.75 * (1 + 0.006 * (crcl - 100)) * np.exp(b["CYP2D6"].astype(str).map(geno))
    v = TYPICAL["v"] * (wt / 70) ** 0.9
    k = cl / v
    ka = k + TYPICAL["ka"] * np.exp(-0.01 * (age - 40))  # one compartment: log_ka is the excess over k
    np.testing.assert_allclose(got["cl"], cl, rtol=1e-12)
    np.testing.assert_allclose(got["v"], v, rtol=1e-12)
    np.testing.assert_allclose(got["ka"], ka, rtol=1e-12)
    np.testing.assert_allclose(got["tlag"], TYPICAL["tlag"], rtol=1e-12)


def test_a_linear_effect_keeps_the_parameter_positive():
    ev = read(table(), covariates=["CRCL"])
    fam = bt.Pk(covariates={"CL": [bt.Linear("CRCL", ref=100)]})
    got = parameters(fam, ev, {"cov_cl_CRCL": 0.05})  # 1 + 0.05 (CRCL - 100) < 0 below CRCL 80
    assert (got["cl"] > 0).all() and np.isfinite(got["cl"]).all()


def test_parameters_without_bsv_have_none_and_blocks_are_block_diagonal():
    ev = read(table(), covariates=[])
    fam = bt.Pk(compartments=2, covariates={}, bsv=["CL", "V1", "KA"], correlated=[["CL", "KA"]])
    model = fam.build_model(fam.design(ev.frame, ev.baseline, ev.schema), ev.schema)
    assert model.named_vars_to_dims["z"] == ("patient", "pk_param")
    assert list(model.coords["pk_param"]) == ["cl", "v1", "ka"]
    assert list(model.coords["diag_param"]) == ["v1"]
    assert "re_chol_0" in model.named_vars
    # a unit deviation of CL's offset moves CL and (through the block) KA, never V1, Q or V2
    n = len(ev.patients)
    base = {f"log_{p}": 0.0 for p in fam.parameters} | {"bsv_sd": np.array([0.3])}
    draws = {}
    for name, z in {"zero": np.zeros((n, 3)), "cl": np.tile([1.0, 0.0, 0.0], (n, 1))}.items():
        done = pm.do(model, base | {"z": z})
        draws[name] = {p: pm.draw(done[f"patient_{p}"], random_seed=3) for p in fam.parameters}
    for p in ("v1", "q", "v2"):
        np.testing.assert_allclose(draws["cl"][p], draws["zero"][p], rtol=1e-12)
    assert not np.allclose(draws["cl"]["cl"], draws["zero"]["cl"])


def test_default_priors_are_centred_for_the_reference_subject():
    """Neonates (median 1.5 kg) with V ~ (WT/70)^1: the prior of log V (the 70-kg subject's) sits
    log(70/1.5) above the data's own scale, not 3.8 prior SDs away from the posterior."""
    df = table()
    df["WT"] = np.where(df["ID"] % 2 == 0, 1.4, 1.6)
    ev = read(df, covariates=["WT"])
    plain = bt.Pk(covariates={"CL": [], "V": []}, bsv=["CL", "V", "KA"])
    ev0 = read(df.drop(columns="WT"), covariates=[])
    scaled = bt.Pk(covariates={"CL": [bt.Power("WT", ref=70, exponent=0.75)], "V": [bt.Power("WT", ref=70)]})
    d0, d1 = plain.design(ev0.frame, ev0.baseline, ev0.schema), scaled.design(ev.frame, ev.baseline, ev.schema)
    p0, p1 = plain.default_priors(ev0.schema, d0), scaled.default_priors(ev.schema, d1)
    assert p1["log_v"].params["mu"] - p0["log_v"].params["mu"] == pytest.approx(np.log(70 / 1.5))
    assert p1["log_cl"].params["mu"] - p0["log_cl"].params["mu"] == pytest.approx(0.75 * np.log(70 / 1.5))
    assert p1["cov_v_WT"].params == {"mu": 1.0, "sigma": 0.5}  # an estimated exponent: allometric theory


def test_the_legacy_weight_shortcut_is_centred_too():
    df = table()
    ev = read(df, covariates=["WT"])
    fam = bt.Pk(weight="WT")
    pri = fam.default_priors(ev.schema, fam.design(ev.frame, ev.baseline, ev.schema))
    plain = bt.Pk(covariates={})
    ev0 = read(df.drop(columns="WT"), covariates=[])
    pri0 = plain.default_priors(ev0.schema, plain.design(ev0.frame, ev0.baseline, ev0.schema))
    typical = np.median(np.log(ev.baseline["WT"].to_numpy(float) / 70))
    assert pri["log_v"].params["mu"] - pri0["log_v"].params["mu"] == pytest.approx(-typical)


def test_config_round_trips_and_virtual_patients_get_the_covariate_inputs():
    fam = bt.Pk(
        covariates={"cl": [bt.Power("wt", ref=70, exponent=0.75), bt.Categorical("CYP2D6")], "V": bt.Power("WT", 70)},
        bsv=["cl", "v"],
        correlated=[["CL", "V"]],
    )
    cfg = fam.config()
    assert cfg["covariates"]["CL"][0] == {"kind": "power", "column": "WT", "ref": 70, "exponent": 0.75}
    assert cfg["bsv"] == ["CL", "V"] and cfg["correlated"] == [["CL", "V"]]
    assert from_config(cfg).config() == cfg
    ev = read(table(), covariates=["WT", "CYP2D6"])
    arrays = fam.covariate_arrays(ev.baseline, ev.schema)
    assert arrays["cov"].shape == (6, 1, 3)  # WT, CYP2D6[poor], CYP2D6[ultrarapid]
    d = fam.design(ev.frame, ev.baseline, ev.schema)
    back = fam.reference_baseline({"cov": d.data["cov"], "X": d.data["X"]}, ev.schema)
    np.testing.assert_allclose(back["WT"], ev.baseline["WT"].to_numpy(float))
    assert back["CYP2D6"].astype(str).tolist() == ev.baseline["CYP2D6"].astype(str).tolist()


P = bt.pseudonymise(1, KEY)


@pytest.mark.parametrize(
    "covariates, read_with, message",
    [
        (
            {"CL": [bt.Power("WT", ref=70)]},
            ["WT", "AGE"],
            "covariate AGE is read but no parameter's covariate model uses it: add an effect for it to "
            "covariates=, or leave it out when reading (a covariate is modelled or refused) (column 'AGE')",
        ),
        (
            {"CL": [bt.Power("BSA", ref=1.8)]},
            ["WT"],
            "the covariate model uses BSA, which is not a covariate of these events (covariates: ['WT']); "
            "read it with covariates=[...] (column 'BSA')",
        ),
        (
            {"CL": [bt.Power("WT", ref=70), bt.Categorical("AGE")]},
            ["WT", "AGE"],
            "the categorical effect on CL needs AGE categorical (read it with categorical=[...]) (column 'AGE')",
        ),
        (
            {"V": [bt.Exponential("CYP2D6", ref=0)]},
            ["CYP2D6"],
            "the exponential effect on V needs CYP2D6 numeric (column 'CYP2D6')",
        ),
    ],
)
def test_a_covariate_model_that_does_not_fit_the_table_is_refused(covariates, read_with, message):
    ev = read(table(), covariates=read_with)
    with pytest.raises(bt.DataError) as err:
        bt.Pk(covariates=covariates).design(ev.frame, ev.baseline, ev.schema)
    assert str(err.value) == message


def test_a_power_effect_of_a_non_positive_covariate_names_the_subject():
    df = table()
    df.loc[df["ID"] == 1, "WT"] = 0.0
    ev = read(df, covariates=["WT"])
    with pytest.raises(bt.DataError) as err:
        bt.Pk(covariates={"CL": [bt.Power("WT", ref=70)]}).design(ev.frame, ev.baseline, ev.schema)
    assert str(err.value) == f"a power effect needs WT > 0 (it is (x / ref) ** exponent) (patient {P}, column 'WT')"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(weight="WT", covariates={}),
            ValueError,
            "give weight= (the fixed allometric shortcut) or covariates= (a covariate model per parameter, "
            "e.g. {'CL': [bt.Power('WT', ref=70, exponent=0.75)]}), not both",
        ),
        (dict(covariates={"Q": []}), ValueError, "covariates: 'Q' is not a parameter of this model (CL, V, KA)"),
        (dict(covariates={"CL": [3]}), TypeError, "a covariate effect is bt.Power, bt.Linear, bt.Exponential"),
        (dict(covariates={"CL": [bt.Power("WT", 70), bt.Linear("wt", 70)]}), ValueError, "covariates: WT acts twice"),
        (dict(bsv="CL"), TypeError, "bsv must be a list of parameter names, not 'CL'"),
        (dict(bsv=["CL", "cl"]), ValueError, "a parameter is listed twice in bsv="),
        (dict(correlated=[["CL"]]), ValueError, "correlated: a block needs two parameters or more"),
        (dict(bsv=["CL", "V"], correlated=[["CL", "KA"]]), ValueError, "correlated: KA has no between-subject"),
        (dict(correlated=[["CL", "V"], ["V", "KA"]]), ValueError, "correlated: a parameter is in two blocks"),
        (dict(priors={"cov_cl_AGE": bt.Prior("Normal", sigma=1.0)}), ValueError, "unknown prior name(s)"),
    ],
)
def test_structure_options_are_checked_when_the_family_is_made(kwargs, error, message):
    with pytest.raises(error) as err:
        bt.Pk(**kwargs)
    assert str(err.value).startswith(message)


def test_effects_need_sound_arguments():
    with pytest.raises(ValueError, match=r"Power\('WT'\) needs ref > 0, not 0"):
        bt.Power("WT", ref=0)
    with pytest.raises(ValueError, match="exponent must be a finite number or None"):
        bt.Power("WT", ref=70, exponent=float("nan"))
    with pytest.raises(TypeError, match="a covariate effect needs a column name"):
        bt.Categorical(3)
