"""The command line: help documents every command; the demo runs end to end and converges."""

import pandas as pd
import pytest

from bayestwin.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "simulate a 3-therapy cohort" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 1
    assert "usage: bayestwin" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_prints_forecast_table_and_passes(capsys):
    assert main(["demo", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    for therapy in ("standard", "drug_a", "drug_b"):
        assert therapy in out
    assert "P(best)" in out and "q05" in out and "q95" in out
    assert "Convergence verdict: PASS" in out


def test_help_documents_the_dose_command(capsys):
    with pytest.raises(SystemExit):
        main(["dose", "--help"])
    out = capsys.readouterr().out
    for option in ("--data", "--patient", "--amounts", "--interval", "--target", "--limit", "--max-toxic"):
        assert option in out


@pytest.mark.slow
def test_dose_prints_regimen_table_for_one_patient(tmp_path, capsys):
    import pandas as pd

    from bayestwin.families.pk import simulate

    cohort, _ = simulate(24, seed=5, times=(0.5, 1, 2, 4, 8, 12, 24))
    patient, _ = simulate(1, seed=6, id_start=99, times=(2.0, 8.0))
    path = tmp_path / "events.csv"
    pd.concat([cohort, patient]).to_csv(path, index=False, na_rep=".")
    args = ["dose", "--data", str(path), "--patient", "99", "--amounts", "50,100,200", "--interval", "12"]
    code = main([*args, "--target", "2", "4", "--limit", "8", "--draws", "400"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Regimens for patient 99: trough over the last interval, target [2, 4], toxic if peak > 8" in out
    for label in ("50 every 12 h x6", "100 every 12 h x6", "200 every 12 h x6"):
        assert label in out
    assert "P(target)" in out and "P(toxic)" in out and out.count("<==") == 1
    assert "Convergence verdict: PASS" in out
    assert main([*args[:3], "--patient", "777", *args[5:], "--target", "2", "4"]) == 1
    assert "bayestwin dose: error: patient '777' not found in the ID column" in capsys.readouterr().err


def test_dose_conditions_on_a_saved_population_without_refitting(tmp_path, capsys):
    """`bayestwin dose --population theoph`: the shipped Theoph population (mg/kg doses), one new
    subject's rows only; no fit, the regimen table, one recommendation."""
    path = tmp_path / "patient.csv"
    path.write_text("ID,TIME,AMT,DV,EVID\n7,0,4.0,.,1\n7,2,0,8.0,0\n7,8,0,6.0,0\n")
    args = ["dose", "--population", "theoph", "--data", str(path), "--patient", "7", "--amounts", "2,4,6"]
    code = main([*args, "--interval", "12", "--target", "5", "15", "--limit", "20"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "1. Population: theoph (saved, checksums verified; not refitted)" in out
    assert "2. Patient 7: 2 level(s)" in out and out.count("<==") == 1
    assert "Convergence verdict: PASS" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--population", "theoph", "--compartments", "2", "--draws", "5"],
            "--compartments, --draws describe(s) a new population fit: with --population the saved population's "
            "own model is used",
        ),
        (
            ["--population", "sleepstudy"],
            "--population sleepstudy is a 'progression' population: dose needs a pharmacokinetic one (pk or ode)",
        ),
        (["--population", "theoph", "--ignore", "DATE"], "--ignore names DATE, which is not a column of"),
        ([], "holds only patient '7': the population needs other IDs (or a saved population: --population)"),
    ],
)
def test_dose_with_a_saved_population_refuses_what_does_not_apply(tmp_path, capsys, extra, message):
    path = tmp_path / "patient.csv"
    path.write_text("ID,TIME,AMT,DV,EVID\n7,0,4.0,.,1\n7,2,0,8.0,0\n")
    args = ["dose", "--data", str(path), "--patient", "7", "--amounts", "2", "--interval", "12", "--target", "5", "15"]
    assert main([*args, *extra]) == 1
    assert message in capsys.readouterr().err


def test_validate_sbc_wiring(tmp_path, capsys, monkeypatch):
    """The command passes its options on and turns p-values into the exit status (the SBC itself
    is tested in tests/review/test_sbc.py; a real run takes minutes)."""
    import numpy as np
    import pandas as pd

    from bayestwin.review import sbc

    calls = {}

    def fake(family, *, reps, twins, out, seed, say, overwrite):
        calls.update(family=family, reps=reps, twins=twins, out=out, seed=seed, overwrite=overwrite)
        ranks = np.tile(np.arange(0, 100, 10), 10) if calls["reps"] == 3 else np.zeros(100, int)
        return {"fit": sbc.SBC(pd.DataFrame({"slope": ranks}), L=99)}

    monkeypatch.setattr(sbc, "run_sbc", fake)
    assert main(["validate", "sbc", "--reps", "3", "--twins", "60", "--out", str(tmp_path), "--seed", "4"]) == 0
    assert calls == {
        "family": "progression",
        "reps": 3,
        "twins": 60,
        "out": str(tmp_path),
        "seed": 4,
        "overwrite": False,
    }
    assert "Rank uniformity: PASS (smallest χ² p-value 1.0000, alpha 0.001)" in capsys.readouterr().out
    assert main(["validate", "sbc", "--reps", "5", "--force"]) == 2  # every rank 0: a miscalibrated sampler
    assert calls["overwrite"] is True
    assert "Rank uniformity: FAIL" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["validate", "sbc", "--family", "emax", "--quiet"]) == 1
    assert "SBC is implemented for the families 'progression' and 'pk', not 'emax'" in capsys.readouterr().err


def test_trial_command_prints_the_operating_characteristics(population, tmp_path, monkeypatch, capsys):
    """`bayestwin trial FILE`: the TOML is read, the design built, the table printed (the population
    fit is the session's, so the test checks the wiring, not a fit)."""
    import bayestwin.trials.cli as tcli
    from bayestwin.cli import main

    monkeypatch.setattr(tcli, "population_from_spec", lambda spec, say=print: population)
    spec = tmp_path / "trial.toml"
    spec.write_text(
        '[design]\ncontrol = "standard"\ntreatment = "drug_b"\nn_per_arm = 10\nvisits = [0, 12]\n'
        "[simulation]\ntrials = 200\nsample_size = true\ntarget = 0.9\n"
    )
    out = tmp_path / "oc.csv"
    assert main(["trial", str(spec), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "type-I error" in text and "assurance" in text and "Sample size for power >= 0.9" in text
    table = pd.read_csv(out)
    assert list(table["measure"]) == ["power", "type-I error", "assurance"]
    assert table.loc[0, "P(success)"] > 0.5  # drug_b's fitted effect is large

    spec.write_text('[design]\ncontrol = "standard"\ntreatment = "drug_b"\nn_per_arm = 10\narms = 3\n')
    assert main(["trial", str(spec)]) == 1
    assert "[design]: unknown key 'arms'; valid keys:" in capsys.readouterr().err
    assert main(["trial", "--example"]) == 0
    assert "[simulation]" in capsys.readouterr().out


def test_review_refuses_a_broken_artifact(tmp_path, capsys):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "card.json").write_text("{}")
    assert main(["review", str(tmp_path / "art")]) == 1
    assert "card.json is not a bayestwin model card" in capsys.readouterr().err
    assert main(["review", "no-such-model"]) == 1
    assert "no model 'no-such-model' in the model zoo" in capsys.readouterr().err
