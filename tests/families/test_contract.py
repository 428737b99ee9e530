"""The family contract, checked over every registered family (bayestwin.families.base).

Static checks (no fit): data names, scenario coverage, dims, patient variables, config round
trip. Then, per family, one small fit shared by the module: save and load, a twin of a new
patient from the loaded population, a forecast, a virtual cohort. A family registered later
(yours) is added by giving it a case in ``CASES``.
"""

import warnings

import numpy as np
import pytest

import bayestwin as bt
from bayestwin.dosing import Regimen
from bayestwin.engine.compile import standardised
from bayestwin.families import FAMILIES, Family, FamilyBase, FamilyError, from_config
from bayestwin.families.base import Axis, register_family
from bayestwin.families.glmm import poisson_glmm, simulate_counts
from bayestwin.trials import virtual_cohort
from tests.conftest import KEY


def _progression():
    from bayestwin.families.progression import simulate

    df, _ = simulate(n_patients=13, seed=3)
    new = df[df.patient == df.patient.iloc[-1]]
    cohort = bt.Cohort(
        df.drop(new.index), covariates=["age", "sex"], therapies=["standard", "drug_a", "drug_b"], key=KEY
    )
    return cohort, bt.Progression(), new.iloc[:2], None


def _pk():
    from bayestwin.families.pk import simulate

    df, _ = simulate(n_subjects=9, seed=3)
    last = df.ID.max()
    events = bt.read_nonmem(df[df.ID != last], key=KEY)
    new = df[(df.ID == last) & ((df.EVID == 1) | (df.TIME <= df.TIME.min() + 4))]
    return events, bt.Pk(), new, [Regimen(100, 12, doses=2), Regimen(200, 12, doses=2)]


def _ode():
    from bayestwin.families.pk import simulate

    df, _ = simulate(n_subjects=9, seed=3)
    df["OCC"] = np.where(df.TIME < 6, 1, 2)  # parameter periods in every program: occasions with IOV on CL
    last = df.ID.max()
    events = bt.read_nonmem(df[df.ID != last], key=KEY)
    new = df[(df.ID == last) & ((df.EVID == 1) | (df.TIME <= df.TIME.min() + 4))]
    family = bt.Ode("one_compartment", iov=["CL"], max_occasions=3)
    return events, family, new, [Regimen(100, 12, doses=2), Regimen(200, 12, doses=2)]


def _survival():
    from bayestwin.families.survival import simulate

    df, _ = simulate(61, seed=3)
    new = df[df.patient == df.patient.iloc[-1]]
    table = bt.read_survival(df.drop(new.index), covariates=["age"], key=KEY)
    return table, bt.Survival(baseline="weibull"), new, None


def _joint():
    from bayestwin.families.joint import simulate

    df, _ = simulate(41, seed=3)
    new = df[df.patient == df.patient.iloc[-1]]
    table = bt.read_joint(df.drop(new.index), covariates=["age"], key=KEY)
    return table, bt.Joint(pieces=2), new, None


def _model():
    df, _ = simulate_counts(25, seed=3)
    new = df[df.patient == df.patient.iloc[-1]]
    cohort = bt.Cohort(df.drop(new.index), covariates=["age"], therapies=["placebo", "drug"], key=KEY)
    return cohort, bt.Model(poisson_glmm), new.iloc[:2], None


def _formula():
    df, _ = simulate_counts(25, seed=4)
    new = df[df.patient == df.patient.iloc[-1]]
    cohort = bt.Cohort(df.drop(new.index), covariates=["age"], therapies=["placebo", "drug"], key=KEY)
    return cohort, bt.Formula("y ~ time + therapy + age + (1 | patient)", likelihood="poisson"), new.iloc[:2], None


CASES = {
    "progression": _progression,
    "pk": _pk,
    "ode": _ode,
    "survival": _survival,
    "joint": _joint,
    "model": _model,
    "formula": _formula,
}


def test_every_registered_family_has_a_case():
    shipped = {n for n, c in FAMILIES.items() if c.__module__.startswith("bayestwin.")}
    assert shipped <= set(CASES), f"add a contract case for {sorted(shipped - set(CASES))}"


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table, family, new, scenarios = CASES[request.param]()
    return request.param, table, family, new, scenarios


def test_static_contract(case):
    name, table, family, _, scenarios = case
    assert isinstance(family, Family) and isinstance(family, FamilyBase) and family.name == name
    schema = table.schema
    design = family.design(table.frame, table.baseline, schema)
    assert set(design.data) == set(family.inputs), "design() must return exactly the declared inputs"
    template = family.template_design(schema, 3)
    assert set(template.data) == set(family.inputs)
    for n, axis in family.inputs.items():
        rows = design.data[n].shape[0]
        assert rows == (len(design.patients) if axis.kind == "patient" else len(design.data["y_obs"])), n
        assert template.data[n].shape[1:] == design.data[n].shape[1:] or axis.slot, n
    model = family.build_model(design, schema)
    assert {"patient", "obs"} <= set(model.coords)
    assert {v.name for v in model.data_vars} == set(family.inputs)
    assert model.rvs_to_values[model[family.observed]] is not None
    dims = model.named_vars_to_dims
    for v in family.patient_vars:
        assert dims[v][0] == "patient"
        standardised(model, v)  # Normal or MvNormal given the population: no error
    for v in family.patient_outputs:
        assert dims[v][0] == "patient", v
    # every variable a user sees has labelled dims (none of PyMC's unnamed "re_chol_stds_dim_0")
    shown = [*model.free_RVs, *model.deterministics, *model.observed_RVs]
    unnamed = [v.name for v in shown if v.ndim and (v.name not in dims or None in dims[v.name])]
    assert not unnamed, f"variables without named dims: {unnamed}"
    for var, labels in dims.items():
        for d in labels:
            assert len(model.coords[d]) == model[var].shape.eval()[labels.index(d)] or d == "obs", (var, d)
    # scenarios cover every input the prediction needs, with or without a history
    need = {n for n in family.inputs if n not in ("patient_idx", "y_obs")}
    _, _, data = family.forecast_inputs(table, schema, scenarios, None, None)
    assert need <= set(data), f"forecast_inputs lacks {need - set(data)}"
    times = np.linspace(0.0, schema.time_scale, 4)
    _, scen = family.scenario_arrays(scenarios, times, schema, 0.0, None)
    own = family.covariate_arrays(table.baseline, schema)
    assert need <= set(scen) | set(own), f"scenario_arrays + covariate_arrays lack {need - set(scen) - set(own)}"
    # config round trip: the family rebuilt from its card is the same family
    cfg = family.config()
    assert cfg["family"] == name
    assert from_config(cfg).config() == cfg


@pytest.fixture(scope="module")
def fitted(case, tmp_path_factory):
    name, table, family, new, scenarios = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = 100 if name == "ode" else 300  # an ODE fit costs ~10x per step; the contract is plumbing
        pop = bt.fit(table, family, draws=n, tune=n, chains=2, extend=0, seed=2, progressbar=False)
    folder = tmp_path_factory.mktemp(f"contract-{name}") / "pop"
    pop.save(folder)
    return case, pop, bt.load(folder)


def test_save_load_twin_forecast_virtual_cohort(fitted):
    (name, table, family, new, scenarios), pop, loaded = fitted
    assert loaded.family.config() == pop.family.config()
    assert type(loaded.family) is type(pop.family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the importance path's Hessian through an ODE solve is slow to compile (163 s against 54 s);
        # the ODE twin's NUTS warmup is short (the family's 1,000 steps at target 0.99 took 64 s)
        ode = {"method": "nuts", "tune": 150, "draws": 100} if name == "ode" else {"method": "importance", "draws": 200}
        twin = loaded.condition(new, key=KEY, seed=1, **ode)
    assert len(twin.patients) == 1
    for v in loaded.family.patient_outputs:
        x = twin.posterior[v]
        assert np.isfinite(x.to_numpy()).all() and x.dims[:3] == ("chain", "draw", "patient"), v
    fc = twin.predict(scenarios)
    draws = fc.draws
    assert np.isfinite(draws[list(draws.data_vars)[0]].to_numpy()).all()
    vc = virtual_cohort(loaded, 4, therapies=scenarios, times=np.linspace(0.0, table.schema.time_scale, 3), seed=0)
    assert vc.sizes["patient"] == 4 and np.isfinite(vc["mean"].to_numpy()).all()


# ------------------------------------------------------------------- refusals
def test_a_family_missing_a_piece_is_refused_when_defined():
    with pytest.raises(FamilyError, match=r"family class Half lacks \['inputs'"):

        class Half(FamilyBase):
            name = "half"
            patient_vars, patient_outputs, residual_params = ("z",), (), ()

    with pytest.raises(FamilyError, match=r"inputs lacks \['y_obs'\]"):

        class NoObs(bt.Progression):
            inputs = {"patient_idx": Axis("obs")}


def test_registry_refuses_a_second_family_of_the_same_name():
    with pytest.raises(FamilyError, match="a family named 'progression' is already registered"):

        @register_family
        class Other(bt.Progression):
            name = "progression"


def test_unknown_family_in_a_card_or_spec_names_the_known_ones():
    with pytest.raises(LookupError, match=r"unknown family 'nope'; known: \["):
        from_config({"family": "nope"})
    with pytest.raises(LookupError, match="lives in module 'no_such_pkg.fams', which cannot be imported"):
        from_config({"family": "mine", "module": "no_such_pkg.fams:Mine"})


# ------------------------------------------------- a family of your own, end to end
def test_a_users_family_registers_saves_loads_in_another_process_and_is_named_in_a_spec(tmp_path):
    """The docstring example of bayestwin/families/base.py, in its own module: registered by its
    decorator, fitted, saved; another Python process loads it by the import path in the card
    (nothing pickled) and conditions a twin; a spec names it with ``module``."""
    import subprocess
    import sys
    from pathlib import Path

    from bayestwin.errors import SpecError
    from bayestwin.families.progression import simulate
    from bayestwin.zoo import read_spec, spec_family
    from tests.families.level_family import Level

    assert FAMILIES["level"] is Level
    df, _ = simulate(n_patients=12, seed=4)
    cohort = bt.Cohort(df, therapies=["standard", "drug_a", "drug_b"], key=KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pop = bt.fit(cohort, Level(), draws=300, tune=300, chains=2, extend=0, seed=1, progressbar=False)
    assert pop.family.config() == {"family": "level", "module": "tests.families.level_family:Level"}
    pop.save(tmp_path / "level")
    root = Path(__file__).resolve().parents[2]
    script = (
        "import warnings; warnings.simplefilter('ignore'); import bayestwin as bt, pandas as pd\n"
        f"pop = bt.load({str(tmp_path / 'level')!r})\n"
        "rows = pd.DataFrame({'patient': ['x', 'x'], 'time': [0.0, 1.0], 'outcome': [50.0, 52.0], "
        "'therapy': ['standard', 'standard']})\n"
        "twin = pop.condition(rows, key=b'k' * 16, draws=200, method='importance')\n"
        "print(type(pop.family).__module__, twin.posterior['patient_level'].shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["tests.families.level_family", "(4,", "200,", "1)"]
    spec = tmp_path / "spec.toml"
    spec.write_text(
        '[data]\nsource = "data.csv"\nformat = "longitudinal"\n'
        '[family]\nname = "level"\nmodule = "tests.families.level_family:Level"\n[sampler]\nseed = 1\n'
    )
    assert isinstance(spec_family(read_spec(spec)), Level)
    spec.write_text(spec.read_text().replace('name = "level"', 'name = "level2"'))
    with pytest.raises(SpecError, match="unknown family 'level2'; known:"):
        read_spec(spec)
