"""A federated population fit (EP over sites, each site sampling its tilted distribution by NUTS)
against the pooled fit of the same rows, and what crosses the wire."""

import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.federated import ep
from bayestwin.federated.fit import Coordinator, Ledger, federated_fit
from bayestwin.federated.site import Site, schema_summary, shared_schema
from tests.agreement import assert_twin_matches_refit
from tests.conftest import KEY, THERAPIES

COVARIATES = ["age", "sex"]


def _sites(train):
    """The pooled fit's 40 patients in three hospitals by age (different case mixes)."""
    age = train.groupby("patient")["age"].first().sort_values(kind="stable")
    groups = np.array_split(age.index.to_numpy(), 3)
    return {
        f"hospital_{j}": bt.Cohort(train[train.patient.isin(g)], covariates=COVARIATES, therapies=THERAPIES, key=KEY)
        for j, g in enumerate(groups)
    }


#: The federated fit of these tests (on the local path, and its first two sweeps on Flower)
FIT = {"therapies": THERAPIES, "draws": 1000, "tune": 1000, "seed": 2}


@pytest.fixture(scope="module")
def federated(simulated):
    train, _, _ = simulated
    sites, ledger = _sites(train), Ledger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pop = federated_fit(sites, **FIT, ledger=ledger)
    return pop, sites, ledger


def _moments(pop):
    a = pop.approx
    chol = np.asarray(a.chol)
    return np.asarray(a.mean), np.sqrt(np.diag(chol @ chol.T))


def test_the_shared_schema_is_the_pooled_tables(simulated, population):
    train, _, _ = simulated
    sites = _sites(train)
    schema = shared_schema({k: schema_summary(c) for k, c in sites.items()}, THERAPIES)
    pooled = population.schema
    assert schema.therapies == pooled.therapies and schema.categorical == pooled.categorical
    for c, (mean, sd) in pooled.numeric.items():
        assert schema.numeric[c] == pytest.approx((mean, sd), rel=1e-12)
    assert schema.time_scale == pooled.time_scale
    assert (schema.outcome_mean, schema.outcome_sd) == pytest.approx(
        (pooled.outcome_mean, pooled.outcome_sd), rel=1e-12
    )


def test_federated_population_matches_the_pooled_fit(federated, population):
    """Means within 0.1 pooled posterior SD and SDs within 10%, every population coordinate (the
    issue's tolerance; the pooled fit's own Monte-Carlo SE is about 0.016 SD)."""
    fed, _, _ = federated
    m_fed, s_fed = _moments(fed)
    m_pool, s_pool = _moments(population)
    print("sweeps", fed.sampler["sweeps"], "bytes", fed.sampler["bytes_sent"])
    print("mean diff / SD", np.round((m_fed - m_pool) / s_pool, 3))
    print("SD ratio", np.round(s_fed / s_pool, 3))
    assert np.all(np.abs(m_fed - m_pool) / s_pool <= 0.1)
    assert np.all(np.abs(s_fed / s_pool - 1) <= 0.1)
    assert fed.verdict.converged, str(fed.verdict)
    assert fed.sampler["method"] == "ep" and fed.sampler["history"][-1]["moved"] < fed.sampler["tol"]


def test_a_twin_from_the_federated_population_matches_the_pooled_twin(federated, population, simulated):
    fed, _, _ = federated
    _, held, _ = simulated
    one = held[held.patient == held.patient.unique()[0]]
    pooled_twin = population.condition(one, key=KEY, seed=4)
    fed_twin = fed.condition(one, key=KEY, seed=5)
    patient = fed_twin.patients[0]
    assert fed_twin.verdict.converged
    assert_twin_matches_refit(pooled_twin, fed_twin, patient, ["patient_intercept", "patient_slope"])


def test_no_row_or_pseudonym_leaves_a_site(federated):
    """Every message is searched for every patient's pseudonym and original id and for every
    outcome value (as JSON writes a float: its shortest repr, 13-17 significant digits here)."""
    fed, sites, ledger = federated
    bodies = [m["body"] for m in ledger.messages]
    assert {m["kind"] for m in ledger.messages} == {
        "schema summary",
        "shared schema",
        "ready",
        "cavity",
        "tilted moments",
    }
    text = "\n".join(bodies)
    for cohort in sites.values():
        for pseudonym in cohort.patients:
            assert pseudonym not in text
        outcomes = cohort.frame["outcome"].to_numpy()
        assert min(len(repr(float(y))) for y in outcomes) >= 12  # long enough not to occur by chance
        for y in outcomes:
            assert json.dumps(float(y)) not in text
    assert "sim-00" not in text  # the original ids
    assert fed.sampler["bytes_sent"] == sum(len(b.encode()) for b in bodies)


def test_a_federated_population_saves_loads_and_holds_no_row(federated, simulated, tmp_path):
    """Saved and loaded like a pooled one (checksums verified), with its sites' counts in the card;
    its twins are the in-memory population's; the artifact holds no pseudonym, no outcome value
    and no data group; what needs the rows says so, and what does not still works."""
    from bayestwin.review import loo, review
    from bayestwin.trials import virtual_cohort

    fed, sites, _ = federated
    bt.save(fed, tmp_path / "fed")
    back = bt.load(tmp_path / "fed")
    n_patients = sum(c.n_patients for c in sites.values())
    n_rows = sum(len(c.frame) for c in sites.values())
    card = json.loads((tmp_path / "fed" / "card.json").read_text())["population"]
    assert (card["patients_in_fit"], card["observations_in_fit"]) == (n_patients, n_rows) == (40, 200)
    assert back.federated and (back.n_patients, back.n_observations) == (40, 200)
    assert back.sampler["patients"] == {k: c.n_patients for k, c in sites.items()}
    assert set(back.idata.children) == {"posterior"}
    assert "fitted across 3 sites (holds no row)" in repr(back) and "fitted across 3 sites" in back._repr_html_()

    _, held, _ = simulated
    one = held[held.patient == held.patient.unique()[1]]
    a, b = fed.condition(one, key=KEY, seed=6), back.condition(one, key=KEY, seed=6)
    for name in ("patient_intercept", "patient_slope"):
        np.testing.assert_array_equal(a.posterior[name].to_numpy(), b.posterior[name].to_numpy())

    stored = b"".join(f.read_bytes() for f in (tmp_path / "fed").rglob("*") if f.is_file())
    for cohort in sites.values():
        for pseudonym in cohort.patients:
            assert pseudonym.encode() not in stored
        for y in cohort.frame["outcome"].to_numpy():
            assert json.dumps(float(y)).encode() not in stored

    rows_stayed = "this population holds none: it was fitted across the sites hospital_0, hospital_1, hospital_2"
    model = r"^the fitted model \(predictive checks, PSIS-LOO by patient\) needs"
    with pytest.raises(ValueError, match=rf"{model} .*{rows_stayed}"):
        back.fitted_model()
    with pytest.raises(ValueError, match=rf"^the pointwise log-likelihood \(PSIS-LOO\) needs .*{rows_stayed}"):
        loo(back, by="patient")
    with pytest.raises(ValueError, match=r"^resampling the fitting cohort's covariates \(give covariates= instead\)"):
        virtual_cohort(back, 4)
    cohort = virtual_cohort(back, 4, covariates={"age": [45.0, 60.0], "sex": ["F", "M"]}, seed=1)
    assert cohort["mean"].shape == (1, 4, 3, 11) and np.isfinite(cohort["mean"]).all()
    page = review(back, tmp_path / "fed.html").read_text()
    assert "Expectation propagation over sites" in page and "hospital_2" in page
    assert "Posterior predictive check" not in page


class _GaussianSite:
    """A site whose tilted moments are exact (its factor a fixed Gaussian, no NUTS): the
    coordinator's own logic, quickly, through the same messages as a real :class:`Site` (which
    answers everything else). ``next`` (shared by the sites) replaces a site's next answer to a
    cavity: a message, or an exception it raises."""

    def __init__(self, name, cohort, next_answers):
        self.site, self.next = Site(name, cohort), next_answers

    def answer(self, kind, body):
        if kind != "cavity":
            return self.site.answer(kind, body)
        if self.site.name in self.next:
            answer = self.next.pop(self.site.name)
            if isinstance(answer, Exception):
                raise answer
            return answer
        cavity = ep.Gaussian(np.asarray(body["precision"]), np.asarray(body["shift"]))
        d = len(cavity.shift)
        mean, cov = cavity.times(ep.Gaussian(np.eye(d), np.full(d, 0.1))).moments()
        return {"mean": mean.tolist(), "cov": cov.tolist(), "draws": 4000, "diagnostics": {}}


@pytest.fixture(scope="module")
def coordinator(simulated):
    train, _, _ = simulated
    answers = {}
    sites = {k: _GaussianSite(k, c, answers) for k, c in _sites(train).items()}
    coord = Coordinator(sites, therapies=THERAPIES, seed=3)
    coord.answers = answers
    return coord


def test_a_site_that_drops_out_leaves_the_last_good_state(coordinator):
    coord = coordinator
    coord.run(1)
    coord.answers["hospital_1"] = ConnectionError("connection reset by peer")  # in sweep 2
    approx, factors, history = coord.approx, coord.sites, list(coord.history)
    with pytest.raises(
        ep.SiteError, match=r"site 'hospital_1' did not answer sweep 2 \(ConnectionError: connection reset"
    ):
        coord.run(3)
    assert coord.approx is approx and coord.sites is factors and coord.history == history
    coord.run(1)  # the site is back: the fit goes on from sweep 2
    assert [h["sweep"] for h in coord.history] == [1, 2]


@pytest.mark.parametrize(
    "message, error",
    [
        ({"mean": [0.0], "cov": [[1.0]], "draws": 400, "diagnostics": {}}, r"sent moments of shapes \(1,\)"),
        ("garbage", "sent a message without mean, cov, draws and diagnostics"),
        (None, "sent a message without mean, cov, draws and diagnostics"),
        ({"mean": [0.0] * 12, "cov": "x", "draws": 400, "diagnostics": {}}, "not arrays of numbers|shapes"),
    ],
)
def test_a_malformed_site_message_is_refused_by_name(coordinator, message, error):
    coord = coordinator
    before = list(coord.history)
    coord.answers["hospital_2"] = message
    with pytest.raises(ep.SiteError, match=f"site 'hospital_2' .*({error})"):
        coord.run(1)
    assert coord.history == before


@pytest.mark.parametrize("tol", ["0.1", -1.0, float("nan"), True])
def test_a_stopping_rule_that_is_not_a_number_is_refused_before_any_sweep(coordinator, tol):
    before = list(coordinator.history)
    with pytest.raises(ValueError, match=r"tol must be a number >= 0 \(posterior SDs\), not"):
        coordinator.run(1, tol=tol)
    assert coordinator.history == before


def test_moments_out_of_range_are_refused():
    d = 3
    good = (np.zeros(d), np.eye(d), 400)
    ep.check_moments(*good, d, "a")
    cases = [
        ((np.full(d, np.nan), np.eye(d), 400), "not finite"),
        ((np.zeros(d), -np.eye(d), 400), "not positive definite"),
        ((np.zeros(d), np.triu(np.ones((d, d))), 400), "not symmetric"),
        (
            (np.zeros(d), np.eye(d), 4),
            r"draws=4 \(the effective draws behind its moments\): a whole number above 5 is needed for 3",
        ),
        ((np.zeros(d), np.eye(d), 400.0), r"draws=400.0"),
    ]
    for args, error in cases:
        with pytest.raises(ep.SiteError, match=f"site 'a' .*{error}"):
            ep.check_moments(*args, d, "a")


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda s: s.pop("outcome"), "sent a schema summary with fields"),
        (lambda s: s["outcome"].update(n=-1), "sent an outcome summary that is not a count"),
        (lambda s: s["numeric"]["age"].update(mean=float("nan")), "sent a summary of 'age' that is not"),
        (lambda s: s.update(time_max=-3.0), "sent a largest time -3.0"),
        (lambda s: s["categorical"].update(sex=[1, 2]), "sent levels of 'sex' that are not a list of labels"),
        (lambda s: s["numeric"].pop("age"), r"site 'h1' has numeric covariates \[\], site 'h0' has \['age'\]"),
    ],
)
def test_a_malformed_schema_summary_is_refused_by_name(simulated, change, error):
    train, _, _ = simulated
    sites = _sites(train)
    summaries = {f"h{j}": schema_summary(c) for j, c in enumerate(sites.values())}
    change(summaries["h1"])
    with pytest.raises(ep.SiteError, match=error):
        shared_schema(summaries, THERAPIES)


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda s: s["scales"].pop("dv_max"), "site 's1' sent scales that are not log dose moments"),
        (lambda s: s["scales"].update(dv_max=float("inf")), "site 's1' sent scales that are not"),
        (lambda s: s["scales"]["log_amt"].update(m2=-1.0), "sent a summary of the log doses that is not"),
        (lambda s: s["scales"]["log_covariates"].pop("WT"), "site 's1' sent scales that are not"),
        (lambda s: s.pop("scales"), "some sites sent NONMEM events and others a Cohort"),
    ],
)
def test_malformed_pk_scales_are_refused_by_name(change, error):
    from bayestwin.federated.site import shared_scales

    _, sites = _pk_sites()
    summaries = {k: schema_summary(e, k) for k, e in sites.items()}
    change(summaries["s1"])
    with pytest.raises(ep.SiteError, match=error):
        shared_schema(summaries)
        shared_scales(summaries)


def test_the_ode_family_is_refused_across_sites_by_name():
    _, sites = _pk_sites()
    with pytest.raises(ValueError, match=r"does not fit NONMEM events across sites: its default priors are centred"):
        Coordinator(sites, bt.Ode("one_compartment"), seed=0)


def test_a_family_for_another_kind_of_table_is_refused_before_any_sweep(simulated):
    _, sites = _pk_sites()
    with pytest.raises(ValueError, match=r"^Progression\(.*\) does not fit the sites' tables: they hold NONMEM events"):
        Coordinator(sites, bt.Progression(), seed=0)
    cohorts = _sites(simulated[0])
    with pytest.raises(ValueError, match=r"^Pk\(.*\) does not fit the sites' tables: they hold Cohort tables$"):
        Coordinator(cohorts, bt.Pk(), therapies=THERAPIES, seed=0)


def test_a_site_table_of_another_kind_is_refused(simulated):
    train, _, _ = simulated
    with pytest.raises(
        TypeError,
        match="site 'h0': a federated fit takes a bt.Cohort or bt.read_nonmem events of the site's rows, not DataFrame",
    ):
        federated_fit({"h0": train})
    from bayestwin.families.joint import simulate

    df, _ = simulate(6, seed=1)
    joint = bt.read_joint(df, key=KEY)
    with pytest.raises(TypeError, match=r"not JointCohort \(joint tables are not yet supported across sites\)$"):
        federated_fit({"h0": joint}, bt.Joint())


def _site_parts():
    """24 simulated patients at four hospital levels h0-h3 (offsets -10, -3, 3, 10) in three
    sites: A holds h0 and half of h1's patients, B the other half of h1 and h2, C h3. So level
    h1 is held by two sites (its prior owned by A, the first), and every site lacks some level."""
    from tests.families.test_formula import _sites as site_table

    df, _, _ = site_table(24)
    h1 = sorted(df[df.site == "h1"].patient.unique())
    return {
        "A": df[(df.site == "h0") | df.patient.isin(h1[:3])],
        "B": df[(df.site == "h2") | df.patient.isin(h1[3:])],
        "C": df[df.site == "h3"],
    }


@pytest.mark.parametrize("term", ["(1 | site)", "(1 + time | site)"])
def test_site_effects_are_local_and_the_sites_factors_multiply_to_the_pooled_posterior(term):
    """Effects by a site factor are local parameters: each level's prior is owned by the first
    site holding it (sent in the shared schema), and each site's tilted model lives on the shared
    parameters and its own levels' effects. Exact check of the factorisation EP's fixed point
    rests on: at any point, the sum over sites of (tilted log density - log cavity), minus the
    N(0, 1) of the levels a site does not hold, plus log p0g, is the pooled model's log density
    up to one constant (three random points, 1e-8)."""
    from bayestwin.federated.site import tilted_model

    parts = _site_parts()
    family = bt.Formula(f"y ~ time + time:therapy + (1 + time | patient) + {term}")
    cohorts = {k: bt.Cohort(v, covariates=["site"], therapies=THERAPIES, key=KEY) for k, v in parts.items()}
    ledger = Ledger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        coord = Coordinator(cohorts, family, therapies=THERAPIES, ledger=ledger, seed=0)
    own = {m["site"]: json.loads(m["body"])["own"] for m in ledger.messages if m["kind"] == "shared schema"}
    assert own == {"A": {"site": ["h0", "h1"]}, "B": {"site": ["h2"]}, "C": {"site": ["h3"]}}
    pooled_cohort = bt.Cohort(pd.concat(parts.values()), covariates=["site"], therapies=THERAPIES, key=KEY)
    design = family.design(pooled_cohort.frame, pooled_cohort.baseline, coord.schema)
    pooled = family.fit_model(design, coord.schema)[0]
    width = 1 if term == "(1 | site)" else 2
    d = len(coord.prior.shift)
    rng = np.random.default_rng(0)
    sites = []
    for k, name in enumerate(coord.names):
        fam, cohort, blocks, prior, n_sites, _, share = coord._sites[name]._fit
        np.testing.assert_array_equal(share.subset, coord.subsets[k])
        assert len(share.subset) == d - width * (4 - len(share.seen["site"]))  # the levels it holds
        m = len(share.subset)
        a = rng.normal(size=(m, m))
        cav = ep.Gaussian(a @ a.T / m + np.eye(m), rng.normal(size=m))
        model = fam.fit_model(fam.design(cohort.frame, cohort.baseline, cohort.schema), cohort.schema)[0]
        population = [b.rv for b in blocks]
        model = tilted_model(model, population, blocks, cav, prior, n_sites, share)
        unseen = [j for j, lv in enumerate(coord.schema.categorical["site"]) if lv not in share.seen["site"]]
        sites.append((model, model.compile_logp(), cav, share, unseen))
    blocks = coord.program.phi
    pooled_logp = pooled.compile_logp()

    def total(point):
        phi = np.concatenate([np.ravel(point[b.name]) for b in blocks])
        out = -0.5 * phi @ coord.prior.precision @ phi + coord.prior.shift @ phi - pooled_logp(point)
        for model, logp, cav, share, unseen in sites:
            mine = [list(pooled.coords["patient"]).index(p) for p in model.coords["patient"]]
            at = {k: (v[mine] if k == "z" else v) for k, v in point.items()}
            x = phi[share.subset]
            out += logp(at) - (-0.5 * x @ cav.precision @ x + cav.shift @ x)
            out += 0.5 * float(np.sum(np.asarray(point["site_effects"])[unseen] ** 2))
        return out

    start = pooled.initial_point()
    values = [total({k: v + rng.normal(0.0, 0.5, np.shape(v)) for k, v in start.items()}) for _ in range(3)]
    assert np.ptp(values) < 1e-8 * max(1.0, abs(values[0])), values


def test_a_federated_fit_with_site_effects_runs_end_to_end_on_the_sites_subsets():
    """One short sweep through the real sites (NUTS on each tilted model): each site is sent the
    cavity's marginal over its subset and returns moments over it (the shared coordinates and
    the levels it holds), no row or pseudonym is in any message, and the population holds every
    level's effects. (Agreement with the pooled fit at full size is a benchmark:
    ``benchmarks/federated.py --site-effects``, figures in the across-sites guide.)"""
    parts = _site_parts()
    family = bt.Formula("y ~ time + time:therapy + (1 + time | patient) + (1 | site)")
    cohorts = {k: bt.Cohort(v, covariates=["site"], therapies=THERAPIES, key=KEY) for k, v in parts.items()}
    ledger = Ledger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pop = federated_fit(
            cohorts, family, therapies=THERAPIES, draws=150, tune=150, chains=2, iterations=1, seed=4, ledger=ledger
        )
    agreed = json.loads(next(m["body"] for m in ledger.messages if m["kind"] == "shared schema"))
    d = sum(int(np.prod(shape)) for _, _, shape in agreed["blocks"])
    held = {"A": 2, "B": 2, "C": 1}  # levels each site's rows hold, of 4
    for m in ledger.messages:
        body = json.loads(m["body"])
        if m["kind"] == "cavity":
            assert np.shape(body["precision"]) == (d - 4 + held[m["site"]],) * 2
        if m["kind"] == "tilted moments":
            assert len(body["mean"]) == d - 4 + held[m["site"]]
    text = "\n".join(m["body"] for m in ledger.messages)
    for cohort in cohorts.values():
        assert not any(p in text for p in cohort.patients)
    effects = pop.posterior["site_effects"]
    assert list(effects["site"].values) == ["h0", "h1", "h2", "h3"] and np.isfinite(effects.to_numpy()).all()
    # the data's ordering of the sites (offsets -10, -3, 3, 10) shows already after one short sweep
    assert np.all(np.diff(effects.mean(["chain", "draw"]).sel(site_effect="Intercept").to_numpy()) > 0)


def test_a_site_given_levels_its_rows_do_not_hold_refuses_them():
    parts = _site_parts()
    family = bt.Formula("y ~ time + (1 | patient) + (1 | site)")
    cohorts = {k: bt.Cohort(v, covariates=["site"], therapies=THERAPIES, key=KEY) for k, v in parts.items()}
    site = Site("C", cohorts["C"], family=family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        coord = Coordinator(cohorts, family, therapies=THERAPIES, seed=0)
    agreed = json.loads(
        [m for m in coord.ledger.messages if m["kind"] == "shared schema" and m["site"] == "C"][0]["body"]
    )
    with pytest.raises(
        ep.SiteError, match=r"^site 'C' was given levels \['h0'\] of 'site' to own; its rows hold \['h3'\]$"
    ):
        site.answer("shared schema", agreed | {"own": {"site": ["h0"]}})
    with pytest.raises(ep.SiteError, match=r"^site 'C' got own=None, not the levels it owns of each of \['site'\]$"):
        site.answer("shared schema", {k: v for k, v in agreed.items() if k != "own"})
    site.answer("shared schema", agreed)
    with pytest.raises(ep.SiteError, match=r"^site 'C' got a cavity of shapes \(3, 3\) and \(3,\)"):
        site.answer("cavity", {"precision": np.eye(3).tolist(), "shift": [0.0] * 3, "seed": 1})


def test_a_survival_population_fits_across_sites_as_on_the_pooled_table():
    """A time-to-event table (bt.read_survival: a Cohort of at-risk intervals) across three
    sites: the shared schema fixes the same baseline pieces and priors as the pooled table, and
    EP over the sites gives the pooled posterior (Weibull baseline, a therapy and an age
    effect; 150 simulated patients): every mean within 0.1 pooled SD, every SD within 10%
    (measured in the test run: 0.041 and 0.944-1.013); a new patient's risk at diagnosis within
    0.1 of its posterior SD of the pooled population's."""
    from bayestwin.families.survival import simulate

    df, _ = simulate(150, seed=3)
    family = bt.Survival(baseline="weibull")
    ids = np.array_split(np.array(sorted(df.patient.unique())), 3)
    sites = {f"s{j}": bt.read_survival(df[df.patient.isin(g)], covariates=["age"], key=KEY) for j, g in enumerate(ids)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pooled = bt.fit(bt.read_survival(df, covariates=["age"], key=KEY), family, draws=1000, tune=1000, seed=1)
        fed = federated_fit(sites, family, draws=1000, tune=1000, seed=2)
    assert pooled.verdict.converged and fed.verdict.converged, (str(pooled.verdict), str(fed.verdict))
    for name in pooled.population_vars:
        a, b = pooled.posterior[name], fed.posterior[name]
        gap = np.abs(a.mean(["chain", "draw"]) - b.mean(["chain", "draw"])) / a.std(["chain", "draw"])
        ratio = b.std(["chain", "draw"]) / a.std(["chain", "draw"])
        print(name, gap.values, ratio.values)
        assert float(gap.max()) <= 0.1 and 0.9 <= float(ratio.min()) <= float(ratio.max()) <= 1.1, name
    new = pd.DataFrame({"patient": ["new"], "age": [70.0]})
    risks = [
        1.0 - pop.condition(df.iloc[:0], baseline=new, key=KEY).predict(times=[0.0, 1.0, 2.0]).survival.sel(time=2.0)
        for pop in (pooled, fed)
    ]
    sd = float(risks[0].std(["chain", "draw"]).max())
    assert float(np.abs(risks[0].mean(["chain", "draw"]) - risks[1].mean(["chain", "draw"])).max()) <= 0.1 * sd


def _pk_sites(n: int = 12):
    """A simulated PK study with body weight (12 subjects) in three sites by subject."""
    from bayestwin.families.pk import simulate

    table, _ = simulate(n, seed=5, weight=True, times=(0.5, 1, 2, 4, 8, 12, 24))
    ids = np.array_split(np.array(sorted(table.ID.unique())), 3)
    sites = {f"s{j}": bt.read_nonmem(table[table.ID.isin(g)], covariates=["WT"], key=KEY) for j, g in enumerate(ids)}
    return table, sites


def test_pk_events_share_the_pooled_schema_and_their_factors_multiply_to_the_pooled_posterior():
    """NONMEM events (the PK family) across sites: the shared schema is the pooled table's
    (weight's mean and SD, the time scale, the levels' mean and SD, which scale the PK priors),
    and the exact factorisation EP's fixed point rests on holds: at any point, the sum over sites
    of (tilted log density - log cavity) plus the EP prior is the pooled model's log density up
    to one constant (three random points, 1e-8). (Agreement of the fits at full size, on the
    Theoph study split by subject, is a benchmark: ``benchmarks/federated.py --pk``.)"""
    from bayestwin.federated.site import tilted_model

    table, sites = _pk_sites()
    family = bt.Pk()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        coord = Coordinator(sites, family, seed=0)
    pooled_events = bt.read_nonmem(table, covariates=["WT"], key=KEY)
    want = pooled_events.schema
    assert coord.schema.numeric["WT"] == pytest.approx(want.numeric["WT"], rel=1e-12)
    assert coord.schema.categorical == want.categorical and coord.schema.therapies == ()
    assert coord.schema.time_scale == want.time_scale
    assert (coord.schema.outcome_mean, coord.schema.outcome_sd) == pytest.approx(
        (want.outcome_mean, want.outcome_sd), rel=1e-12
    )
    # The PK priors are centred on the data's scales: the coordinator fixes them once from the
    # sites' aggregates (here one dose level, so the geometric mean dose is the pooled median and
    # the priors are the pooled table's own), and every site fits that model.
    design = family.design(pooled_events.frame, pooled_events.baseline, coord.schema)
    default = family.default_priors(coord.schema, design)
    for name in ("log_cl", "log_v", "log_ka"):
        got, want = coord.family.priors[name].to_dict(), default[name].to_dict()
        assert got.pop("dist") == want.pop("dist") == "Normal" and got == pytest.approx(want, rel=1e-12)
    pooled = coord.family.fit_model(design, coord.schema)[0]
    rng = np.random.default_rng(1)
    d = len(coord.prior.shift)
    parts = []
    for name in coord.names:
        fam, cohort, blocks, prior, n_sites, _, share = coord._sites[name]._fit
        assert share is None and cohort.schema == coord.schema  # read with the shared schema
        assert fam.config() == coord.family.config()  # and the priors fixed by the coordinator
        a = rng.normal(size=(d, d))
        cav = ep.Gaussian(a @ a.T / d + np.eye(d), rng.normal(size=d))
        model = fam.fit_model(fam.design(cohort.frame, cohort.baseline, cohort.schema), cohort.schema)[0]
        model = tilted_model(model, [b.rv for b in blocks], blocks, cav, prior, n_sites)
        mine = [list(pooled.coords["patient"]).index(p) for p in model.coords["patient"]]
        parts.append((model.compile_logp(), cav, mine))
    blocks, pooled_logp = coord.program.phi, pooled.compile_logp()

    def total(point):
        phi = np.concatenate([np.ravel(point[b.name]) for b in blocks])
        out = -0.5 * phi @ coord.prior.precision @ phi + coord.prior.shift @ phi - pooled_logp(point)
        for logp, cav, mine in parts:
            at = {k: (v[mine] if k == "z" else v) for k, v in point.items()}
            out += logp(at) - (-0.5 * phi @ cav.precision @ phi + cav.shift @ phi)
        return out

    start = pooled.initial_point()
    values = [total({k: v + rng.normal(0.0, 0.3, np.shape(v)) for k, v in start.items()}) for _ in range(3)]
    assert np.ptp(values) < 1e-8 * max(1.0, abs(values[0])), values


def test_a_federated_pk_fit_runs_end_to_end_and_its_population_conditions_twins():
    """One short sweep of a PK fit through the real sites: no subject's ID or pseudonym in any
    message, the population reads new subjects' NONMEM tables (fixed column names) and
    conditions a new subject's twin on its levels."""
    table, sites = _pk_sites()
    ledger = Ledger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pop = federated_fit(sites, bt.Pk(), draws=150, tune=150, chains=2, iterations=1, seed=4, ledger=ledger)
    text = "\n".join(m["body"] for m in ledger.messages)
    for events in sites.values():
        assert not any(str(p) in text for p in events.patients)
    for i in table.ID.unique():
        assert not re.search(rf"\"ID\": \[?{int(i)}\b", text)
    assert pop.columns is None and pop.schema.therapies == ()
    first = table[table.ID == table.ID.iloc[0]]
    new = pd.concat([first[first.EVID == 1], first[first.EVID == 0].iloc[:3]]).assign(ID=500)
    twin = pop.condition(new, key=KEY, seed=1, method="importance")
    cl = twin.posterior["patient_cl"]
    assert np.isfinite(cl.to_numpy()).all() and float(cl.std()) > 0


# ------------------------------------------------------------------- the same exchange on Flower
@pytest.fixture(scope="module")
def on_flower(simulated):
    """The first two sweeps of the federated fit above on Flower's simulation engine (each site's
    ClientApp in a Ray worker process, its table passed there by Ray's serialisation; the
    coordinator's ServerApp here). The local path's own sweeps are the ``federated`` fixture's:
    EP's sweeps do not depend on how many follow (each sweep's seeds are fixed by its number)."""
    pytest.importorskip("flwr", reason="Flower is in the test extra (bayestwin[federated])")
    from bayestwin.federated.flower import flower_fit

    train, _, _ = simulated
    ledger = Ledger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pop = flower_fit(_sites(train), ledger=ledger, iterations=2, **FIT)
    return pop, ledger


def test_flower_carries_the_local_paths_messages_byte_for_byte(on_flower, federated):
    """On Flower the coordinator and the sites send the local path's messages byte for byte
    (schema summaries, shared schema, column names, cavities, and each site's tilted moments,
    sampled by NUTS in another process with the same seed), so EP's approximation after each
    sweep is the local path's to the last bit (the population's draws are made from it by the
    same code on both paths). (Until bayestwin kept the XLA flags a process passes on to its
    children, the workers compiled at another optimisation level and their chains differed
    within Monte-Carlo error: see ``bayestwin/__init__.py``.)"""
    pop, ledger = on_flower
    here, _, local = federated
    assert here.sampler["sweeps"] >= 2
    sent = {(m["round"], m["site"], m["direction"], m["kind"]): m["body"] for m in ledger.messages}
    want = {(m["round"], m["site"], m["direction"], m["kind"]): m["body"] for m in local.messages if m["round"] <= 2}
    assert len(sent) == len(ledger.messages) == len(want) == 21
    assert sent == want
    # each sweep's cavities went to the three sites at once, before any answer came back
    order = [(m["round"], m["kind"]) for m in ledger.messages]
    assert order[-6:] == [(2, "cavity")] * 3 + [(2, "tilted moments")] * 3
    assert pop.sampler["method"] == "ep" and pop.sampler["sites"] == ["hospital_0", "hospital_1", "hospital_2"]
    assert pop.sampler["bytes_sent"] == ledger.nbytes
    assert pop.sampler["history"] == here.sampler["history"][:2]  # the approximation's moments, each sweep


def test_no_row_or_pseudonym_leaves_a_site_on_flower(on_flower, simulated):
    _, ledger = on_flower
    train, _, _ = simulated
    text = "\n".join(m["body"] for m in ledger.messages)
    for cohort in _sites(train).values():
        for pseudonym in cohort.patients:
            assert pseudonym not in text
        for y in cohort.frame["outcome"].to_numpy():
            assert json.dumps(float(y)) not in text
    assert "sim-00" not in text


def test_a_site_that_fails_on_flower_is_named_and_no_population_is_made(simulated):
    """A site whose ClientApp cannot load its table answers with its error; the coordinator
    raises it as a SiteError naming the node, and no population comes out."""
    pytest.importorskip("flwr", reason="Flower is in the test extra (bayestwin[federated])")
    from flwr.simulation import run_simulation

    from bayestwin.federated.flower import coordinator_app, site_app

    train, _, _ = simulated
    table = list(_sites(train).items())

    def load(context):
        k = int(context.node_config["partition-id"])
        if k == 1:
            raise FileNotFoundError("/data/hospital_1.csv")
        return table[k]

    made, failed = [], []
    server = coordinator_app(
        3, therapies=THERAPIES, draws=100, tune=100, done=lambda p, c: made.append(p), failed=failed.append
    )
    error = r"node \d+ failed to load its site: FileNotFoundError: /data/hospital_1.csv"
    with warnings.catch_warnings(), pytest.raises(ep.SiteError, match=f"^{error}$"):
        warnings.simplefilter("ignore")
        run_simulation(server_app=server, client_app=site_app(load), num_supernodes=3)
    assert not made and len(failed) == 1 and re.fullmatch(error, str(failed[0]))


def test_a_coordinator_error_on_flower_is_raised_by_flower_fit(simulated):
    pytest.importorskip("flwr", reason="Flower is in the test extra (bayestwin[federated])")
    from bayestwin.federated.flower import flower_fit

    train, _, _ = simulated
    sites = _sites(train)
    with warnings.catch_warnings(), pytest.raises(ep.SiteError, match=r"therapy 'drug_b' is given at a site but not"):
        warnings.simplefilter("ignore")
        flower_fit(sites, therapies=["standard", "drug_a"], draws=100, tune=100, iterations=1)
