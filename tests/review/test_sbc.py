"""Simulation-based calibration: the rank machinery, the twin conditioning step and the fit."""

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.families.progression import simulate
from bayestwin.review.sbc import SBC, _resume, ranks_of, sbc_fit, sbc_twins, scalar_quantities
from tests.conftest import KEY, THERAPIES


def test_ranks_detect_a_miscalibrated_posterior():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=500)
    data = truth + rng.normal(size=500)  # one observation, N(0, 1) prior: posterior N(y/2, 1/2)
    right = data[:, None] / 2 + np.sqrt(0.5) * rng.normal(size=(500, 400))
    biased = right + 0.5
    narrow = data[:, None] / 2 + 0.3 * rng.normal(size=(500, 400))
    sbc = SBC(
        pd.DataFrame(
            {q: ranks_of(truth, d, 99, rng) for q, d in (("right", right), ("biased", biased), ("narrow", narrow))}
        ),
        L=99,
    )
    table = sbc.table
    assert table.loc["right", "p_value"] > 0.01
    assert table.loc["biased", "p_value"] < 1e-6 and table.loc["biased", "mean_rank"] < 0.4
    assert table.loc["narrow", "p_value"] < 1e-6  # U-shaped ranks
    assert sbc.counts("right").sum() == 500
    assert repr(sbc).startswith("SBC(500 replicates, 3 quantities")


@pytest.mark.slow
def test_twin_conditioning_is_calibrated(population):
    """200 virtual patients, 3 visits each; every twin one SBC replicate (importance path)."""
    rows, _ = simulate(n_patients=200, therapies=THERAPIES, seed=77)
    rows = rows[rows.time <= 6.0]
    sbc, twin = sbc_twins(population, rows, key=KEY, seed=3)
    table = sbc.table
    print(table.to_string())
    assert twin.verdict.converged
    assert set(table.index) == {"patient_intercept", "patient_slope", "sigma"}
    assert (table["reps"] == 200).all()
    assert (table["p_value"] > 0.001).all()


@pytest.mark.slow
def test_population_fit_sbc_small_run(tmp_path):
    """A few replicates of the full fit (a smoke test: the benchmark runs 200): ranks valid, and an
    interrupted run resumes from its partial file to the ranks of an uninterrupted one."""
    rows, _ = simulate(
        n_patients=12, therapies=("standard", "drug_a"), therapy_slope=(-0.8,), times=(0, 3, 6, 9), seed=5
    )
    cohort = bt.Cohort(rows, covariates=["age", "sex"], key=KEY)
    part = tmp_path / "partial.csv"
    sbc = sbc_fit(cohort, reps=2, seed=1, draws=500, tune=500, extend=0, partial=part)  # resuming, not power
    pd.read_csv(part).iloc[:1].to_csv(part, index=False)  # as if killed during the second replicate
    said = []
    resumed = sbc_fit(cohort, reps=2, seed=1, draws=500, tune=500, extend=0, partial=part, say=said.append)
    assert said[0] == f"  resuming after 1 replicates from {part}"
    pd.testing.assert_frame_equal(resumed.ranks, sbc.ranks)
    assert resumed.ranks.attrs == sbc.ranks.attrs
    table = sbc.table
    print(table.to_string(), sbc.ranks.attrs)
    assert {"intercept", "slope", "sigma"} <= set(table.index)
    assert ((sbc.ranks >= 0) & (sbc.ranks <= 99)).all().all()
    assert (table["p_value"] > 1e-4).all()
    assert sbc.ranks.attrs["not_converged"] <= 1  # prior draws make some hard data sets; the gate says which


def test_fit_sbc_quantities_and_resume_do_not_depend_on_the_process(tmp_path):
    """PyMC orders a prior group's variables by set iteration (PYTHONHASHSEED): the default
    quantities are sorted, so a partial file written by one process resumes in another (an
    unsorted list once discarded a run's finished replicates)."""
    import xarray as xr

    draw = np.zeros((1, 3))
    prior = xr.Dataset(
        {
            "sigma": (("chain", "draw"), draw),
            "z": (("chain", "draw", "p"), draw[..., None]),
            "alpha": (("chain", "draw"), draw),
        }
    )
    assert scalar_quantities(prior) == ["alpha", "sigma"]
    part = tmp_path / "partial.csv"
    settings = {"reps": 3, "seed": 1, "L": 99, "quantities": ["alpha", "sigma"], "draws": 500}
    assert _resume(part, settings) == ([], 0)  # nothing yet: writes the settings beside it
    pd.DataFrame({"alpha": [3, 50], "sigma": [7, 99], "converged": [True, False]}).to_csv(part, index=False)
    assert _resume(part, dict(settings)) == (
        [{"alpha": 3, "sigma": 7, "converged": True}, {"alpha": 50, "sigma": 99, "converged": False}],
        1,
    )
    assert _resume(part, {**settings, "seed": 2}) == ([], 0)  # other settings: start again
    assert not part.exists()


def test_frozen_pk_priors_do_not_follow_the_data():
    """The PK fit SBC refits prior-predictive data sets: its priors must not be recentred on them."""
    from bayestwin.families.pk import simulate as simulate_pk
    from bayestwin.review.sbc import frozen_pk_family

    rows, _ = simulate_pk(6, seed=3, times=(0.5, 2, 8, 24))
    events = bt.read_nonmem(rows, key=KEY)
    fam = frozen_pk_family(events, sigma=0.5)
    scaled = events.with_outcome(events.observations()["DV"].to_numpy() * 40.0)  # V/40 by the data-centred rule

    def priors(ev):
        design = fam.design(ev.frame, ev.baseline, ev.schema)
        return fam.default_priors(ev.schema, design) | fam.priors

    assert priors(scaled) == priors(events)
    design = fam.design(events.frame, events.baseline, events.schema)
    default = bt.families.pk.Pk().default_priors(events.schema, design)
    assert default["log_v"].params["mu"] == fam.priors["log_v"].params["mu"]
    assert fam.priors["log_v"].params["sigma"] == 0.5 and default["log_v"].params["sigma"] == 2.0


def test_sbc_outputs_replace_only_earlier_sbc_outputs(tmp_path):
    """``run_sbc(out=...)`` refuses, before any fit, a folder holding a file of an output's name
    that no SBC run wrote (nothing there is changed); it accepts its own earlier outputs, and
    ``overwrite=True`` any; a second run cannot write a folder one is writing."""
    from bayestwin._atomic import OutputError, folder_lock
    from bayestwin.review.sbc import _write, check_outputs, run_sbc

    with pytest.raises(TypeError, match="out must be a folder path \\(str or Path\\), not int"):
        run_sbc(reps=1, twins=1, out=5)
    with pytest.raises(ValueError, match="reps must be a whole number >= 0, not '3'"):
        run_sbc(reps="3", twins=1)
    out = tmp_path / "sbc"
    out.mkdir()
    mine = out / "sbc.csv"
    mine.write_text("my,own,table\n1,2,3\n")
    with pytest.raises(
        OutputError, match=rf"{mine} exists and is not an earlier SBC output \(sbc.csv\): not overwriting"
    ):
        run_sbc(reps=1, twins=1, out=out)
    assert mine.read_text() == "my,own,table\n1,2,3\n" and sorted(p.name for p in out.iterdir()) == ["sbc.csv"]
    mine.unlink()
    plot = out / "sbc_twins.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # someone's figure of that name
    with pytest.raises(OutputError, match="is not an earlier SBC output \\(sbc_twins.png\\)"):
        check_outputs(out)
    assert check_outputs(out, overwrite=True) == out
    plot.unlink()
    (out / "sbc_fit.png").mkdir()
    with pytest.raises(OutputError, match="exists and is not a regular file"):
        check_outputs(out, overwrite=True)
    (out / "sbc_fit.png").rmdir()

    # an SBC run's own outputs are replaced by the next run's
    ranks = SBC(pd.DataFrame({"slope": np.tile(np.arange(0, 100, 10), 3)}), L=99)
    said = []
    _write({"fit": ranks, "twins": ranks}, out, said.append)
    part = out / "sbc_fit_partial.csv"
    settings = {"reps": 3, "seed": 1, "L": 99, "quantities": ["slope"]}
    _resume(part, settings)
    pd.DataFrame({"slope": [3], "converged": [True]}).to_csv(part, index=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "sbc.csv",
        "sbc_fit.png",
        "sbc_fit_partial.csv",
        "sbc_fit_partial.json",
        "sbc_twins.png",
    ]
    assert check_outputs(out) == out
    # a partial file of other settings is discarded, and said so
    assert _resume(part, {**settings, "seed": 2}, said.append) == ([], 0)
    assert said[-1].startswith(f"  discarding {part}: written with other settings than")
    # sbc_fit(partial=...) given someone else's file: refused, not read, replaced or deleted
    theirs = tmp_path / "results.csv"
    theirs.write_text("patient,value\n1,2\n")
    with pytest.raises(OutputError, match=rf"{theirs} exists and is not an earlier SBC partial file"):
        _resume(theirs, settings, said.append)
    assert theirs.read_text() == "patient,value\n1,2\n"
    with folder_lock(out, "SBC output folder"):
        with pytest.raises(OutputError, match="another process is writing the SBC output folder"):
            run_sbc(reps=1, twins=1, out=out)
