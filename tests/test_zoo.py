"""The model zoo: shipped artifacts load verified and match the published fits; specs refit reproducibly."""

import shutil

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.cli import main
from bayestwin.families import pk_ode
from bayestwin.io import ArtifactError, draws_digest, read_card
from bayestwin.zoo import fit_spec, list_models, model_path, read_spec


def test_zoo_lists_the_shipped_models():
    assert {"sleepstudy", "theoph", "epilepsy", "docetaxel_friberg"} <= set(list_models())
    with pytest.raises(ArtifactError, match="no model 'nope' in the model zoo"):
        bt.load("nope")


def test_sleepstudy_from_the_zoo_matches_lme4_and_conditions_new_patients():
    """lme4 (Bates et al. 2015): intercept 251.4 (SE 6.82), slope 10.47 (SE 1.55); within 1 SE here."""
    pop = bt.load("sleepstudy")
    assert pop.verdict.converged, str(pop.verdict)
    post = pop.posterior
    assert abs(float(post["intercept"].mean()) - 251.4) < 6.82
    assert abs(float(post["slope"].mean()) - 10.47) < 1.55
    # a new subject with 3 days of data, conditioned without refitting
    rows = pd.DataFrame({"Subject": "new", "Days": [0, 1, 2], "Reaction": [250.0, 262.0, 281.0]})
    twin = pop.condition(rows, key=b"zoo-test-key-0123", method="importance")
    assert twin.verdict.converged
    slope = float(twin.posterior["patient_slope"].mean())
    assert 10.0 < slope < 30.0  # pulled from the data's ~15.5/day towards the population's 10.4


def test_theoph_from_the_zoo_matches_nlme():
    """Pinheiro & Bates (2000) section 8.2: lKe -2.433, lKa 0.451, lCl -3.214 (within 10%)."""
    pop = bt.load("theoph")
    assert pop.verdict.converged, str(pop.verdict)
    post = pop.posterior
    ka = np.log(np.exp(post["log_ke"]) + np.exp(post["log_ka"]))
    got = {"lKe": float(post["log_ke"].mean()), "lKa": float(ka.mean()), "lCl": float(post["log_cl"].mean())}
    for name, ref in {"lKe": -2.433, "lKa": 0.451, "lCl": -3.214}.items():
        assert abs(got[name] - ref) <= 0.1 * abs(ref), (name, got[name], ref)


def test_docetaxel_friberg_is_its_simulated_study_and_recovers_the_truth():
    """The zoo's Friberg PK/PD population: ``data.csv`` is the study its spec names (simulated:
    no public individual-level data exist), and the fit recovers every typical value it was
    simulated from (the published docetaxel system parameters) within 3 posterior SDs."""
    table, truth = pk_ode.simulate_friberg(24, levels=(0.5, 1.0, 1.5, 2.0), seed=2002)
    shipped = pd.read_csv(model_path("docetaxel_friberg") / "data.csv")
    pd.testing.assert_frame_equal(shipped, table, check_exact=False, rtol=1e-9)
    pop = bt.load("docetaxel_friberg")
    assert pop.verdict.converged, str(pop.verdict)
    assert pop.family.centred_parameters == ("cl", "v", "circ0")
    post = pop.posterior
    for name, value in truth["typical"].items():
        x = post[f"log_{name}"]
        assert abs(float(x.mean()) - np.log(value)) < 3 * float(x.std()), (name, float(x.mean()), np.log(value))


def test_bayestwin_fit_is_reproducible(tmp_path):
    """`bayestwin fit spec.toml` twice with the same spec and seed: identical draws (here with
    fewer draws than the shipped fit, to keep the test short; the shipped draws were regenerated
    bit for bit on the machine that made them: see the README)."""
    spec = tmp_path / "sleepstudy"
    shutil.copytree(model_path("sleepstudy"), spec, ignore=shutil.ignore_patterns("population", "MODEL_CARD.md"))
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(
            ["fit", str(spec / "spec.toml"), "--draws", "100", "--tune", "100", "--out", str(out), "--quiet"]
        ) in (0, 2)
        card = read_card(out)
        assert card["population"]["sampler"]["draws"] == 100 and card["population"]["sampler"]["seed"] == 20261127
        digests.append(card["population"]["draws_sha256"])
        assert draws_digest(bt.load(out).idata) == digests[-1]
    assert digests[0] == digests[1]
    assert not (spec / "MODEL_CARD.md").exists()  # a quick run with other settings writes no model card


def test_spec_errors_are_clear(tmp_path, monkeypatch):
    spec = tmp_path / "m" / "spec.toml"
    spec.parent.mkdir()
    spec.write_text('[data]\nsource = "d.csv"\nformat = "excel"\n[family]\nname = "progression"\n[sampler]\nseed = 1\n')
    with pytest.raises(ValueError, match=r"format must be one of \('longitudinal', 'nonmem', 'survival'\), not 'exc"):
        read_spec(spec)
    spec.write_text('[data]\nsource = "d.csv"\nformat = "nonmem"\n[family]\nname = "pk"\n[sampler]\nsteps = 1\n')
    with pytest.raises(ValueError, match=r"\[sampler\]: unknown key 'steps'"):
        read_spec(spec)
    spec.write_text('[data]\nsource = "d.csv"\nformat = "nonmem"\n[family]\nname = "pk"\n[sampler]\ndraws = 1\n')
    with pytest.raises(ValueError, match=r"\[sampler\] needs 'seed'"):
        read_spec(spec)
    spec.write_text(
        '[data]\nsource = "d.csv"\nformat = "nonmem"\nkey_env = "BT_TEST_KEY"\n[family]\nname = "pk"\n'
        "[sampler]\nseed = 1\n"
    )
    pd.DataFrame({"ID": [1, 1], "TIME": [0.0, 1.0], "AMT": [100.0, 0], "DV": [None, 2.0], "EVID": [1, 0]}).to_csv(
        spec.parent / "d.csv", index=False
    )
    monkeypatch.delenv("BT_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match=r"reads its pseudonymisation key from \$BT_TEST_KEY, which is not set"):
        fit_spec(spec)


def test_bayestwin_fit_takes_a_survival_spec(tmp_path, capsys):
    """`bayestwin fit` on a time-to-event table (format "survival", delayed entry), saved and
    reloaded; the loaded population makes event forecasts."""
    from bayestwin.families.survival import simulate

    folder = tmp_path / "events"
    folder.mkdir()
    df, _ = simulate(150, entry=1.0, seed=4)
    df.to_csv(folder / "data.csv", index=False)
    (folder / "spec.toml").write_text(
        '[data]\nsource = "data.csv"\nformat = "survival"\ntime = "time"\nevent = "event"\nstart = "start"\n'
        'therapy = "therapy"\ncovariates = ["age"]\nkey = "a-public-test-key-0001"\n'
        '[family]\nname = "survival"\nbaseline = "weibull"\n[sampler]\nseed = 3\n'
    )
    out = tmp_path / "pop"
    assert main(["fit", str(folder / "spec.toml"), "--draws", "300", "--tune", "300", "--out", str(out)]) == 0
    pop = bt.load(out)
    assert pop.family.name == "survival" and pop.family.baseline == "weibull"
    assert pop.columns.start == "start"
    twin = pop.condition(df[df.patient == "sv-0001"], key="a-public-test-key-0001")
    risk = twin.predict(times=[6.0, 8.0], start=6.0).risk(8.0)
    assert ((risk["mean"] > 0) & (risk["mean"] < 1)).all()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.txt", "hi", "is a non-empty folder without card.json: not overwriting something else"),
        ("card.json", '{"x": 1}', "card.json is not a bayestwin model card"),
    ],
)
def test_bayestwin_fit_refuses_a_foreign_output_folder_before_fitting(
    tmp_path, capsys, monkeypatch, name, content, message
):
    """An --out folder holding someone else's files (or a card.json that is not a bayestwin model
    card) is refused before any sampling (a zoo fit can take half an hour), and nothing in it changes."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / name).write_text(content)

    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before checking the output folder")

    monkeypatch.setattr("bayestwin.population.fit", no_fit)
    assert main(["fit", str(model_path("theoph") / "spec.toml"), "--out", str(out), "--quiet"]) != 0
    assert message in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == content
