"""bt.options and progress bars: who decides whether a long step shows one, and that the steps
that take long (fits, batched twins, batch maps, SBC) ask."""

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin import settings as opts
from bayestwin.engine.batches import map_batches
from bayestwin.engine.devices import run_chunked


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("BAYESTWIN_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    with bt.options(progress=None):
        yield monkeypatch


def test_the_step_argument_wins_then_options_then_the_environment(clean_env):
    clean_env.setenv("BAYESTWIN_PROGRESS", "off")
    assert opts.progress_enabled() is False
    with bt.options(progress=True):
        assert opts.progress_enabled() is True
        assert opts.progress_enabled(False) is False
    assert opts.progress_enabled() is False  # the with block restored the previous setting
    clean_env.setenv("BAYESTWIN_PROGRESS", "1")
    assert opts.progress_enabled() is True
    clean_env.setenv("CI", "true")
    assert opts.progress_enabled() is True  # an explicit environment setting beats the CI default


def test_off_in_ci_and_in_a_redirected_log_by_default(clean_env):
    clean_env.setenv("CI", "1")
    assert opts.progress_enabled() is False
    clean_env.delenv("CI")
    # pytest captures standard error: not a terminal, not a Jupyter kernel
    assert opts.progress_enabled() is False


def test_bad_settings_are_refused_with_their_value(clean_env):
    clean_env.setenv("BAYESTWIN_PROGRESS", "maybe")
    with pytest.raises(ValueError) as err:
        opts.progress_enabled()
    assert str(err.value) == "BAYESTWIN_PROGRESS must be one of 1, true, on, 0, false, off; not 'maybe'"
    with pytest.raises(TypeError) as err:
        bt.options(progress="yes")
    assert str(err.value) == "options(progress=...) takes True, False or None, not 'yes'"


def test_batch_maps_show_a_bar_only_when_asked(clean_env, capsys):
    def job(lo, hi):
        return pd.DataFrame({"i": np.arange(lo, hi)})

    with bt.options(progress=True):
        out = map_batches(job, 7, 3, name="trials")
    assert out.i.tolist() == list(range(7))  # the bar changes nothing in the result
    assert "trials:" in capsys.readouterr().err
    with bt.options(progress=False):
        map_batches(job, 7, 3, name="trials")
    assert capsys.readouterr().err == ""


def test_chunked_twin_runs_count_patients(clean_env, capsys):
    def run(data, mask, seeds, device):
        return {"x": data["y"] * 2.0}

    data = {"y": np.arange(10.0)[:, None]}
    with bt.options(progress=True):
        out = run_chunked(run, data, np.ones((10, 1), bool), np.arange(10), chunk=4)
    np.testing.assert_array_equal(out["x"], 2.0 * data["y"])
    err = capsys.readouterr().err
    assert "twins" in err and "/10 " in err  # counted in patients
    with bt.options(progress=True):
        run_chunked(run, data, np.ones((10, 1), bool), np.arange(10), chunk=16)  # one chunk: no bar
    assert capsys.readouterr().err == ""


def test_fit_passes_the_decision_to_the_sampler(clean_env, monkeypatch, simulated):
    seen = []

    class Stop(Exception):
        pass

    def sampler(model, population, cfg, *, progressbar, **kw):
        seen.append(progressbar)
        raise Stop

    monkeypatch.setattr("bayestwin.population.sample_model", sampler)
    arms = ["standard", "drug_a", "drug_b"]
    cohort = bt.Cohort(simulated[0], covariates=["age", "sex"], therapies=arms, key=b"k" * 16)
    for setting in (True, False):
        with bt.options(progress=setting), pytest.raises(Stop):
            bt.fit(cohort)
    with bt.options(progress=True), pytest.raises(Stop):
        bt.fit(cohort, progressbar=False)
    assert seen == [True, False, False]


def test_pymc_forward_sampling_chatter_is_not_said_and_the_level_comes_back(caplog):
    import logging

    import pymc as pm

    from bayestwin.review.advice import prior_draws

    with pm.Model() as model:
        pm.Normal("mu")
    log = logging.getLogger("pymc.sampling.forward")
    with caplog.at_level(logging.INFO, logger="pymc"):
        before = log.level
        draws = prior_draws(model, ["mu"], draws=50)
        assert log.level == before
        with model:
            pm.sample_prior_predictive(draws=5)  # outside bayestwin: PyMC's own words, untouched
    assert draws["mu"].size == 50
    said = [r.getMessage() for r in caplog.records if r.name == "pymc.sampling.forward"]
    assert said == ["Sampling: [mu]"]
