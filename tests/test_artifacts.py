"""Artifacts: save/load round trips, refusal of tampered or truncated folders, and a real kill mid-save."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import bayestwin as bt
from bayestwin.io import ArtifactError, read_card

KEY = b"tests-pseudonym-key-01"


@pytest.fixture(scope="module")
def saved(population, tmp_path_factory):
    return bt.save(population, tmp_path_factory.mktemp("art") / "population")


def _shifted(population, by=1.0):
    """The same population with sigma shifted: a different artifact, without another fit."""
    idata = population.idata.copy()
    idata["posterior"]["sigma"] = idata["posterior"]["sigma"] + by
    return dataclasses.replace(population, idata=idata, _programs={}, _compiled={})


def test_population_round_trip_conditions_identically(population, simulated, saved):
    loaded = bt.load(saved)
    assert isinstance(loaded, bt.Population)
    assert loaded.family.config() == population.family.config()
    assert loaded.schema == population.schema and loaded.columns == population.columns
    assert loaded.verdict.converged == population.verdict.converged
    assert loaded.verdict.table.equals(population.verdict.table)
    assert loaded.sampler == population.sampler
    # per-observation deterministics are recomputed, not stored; everything else is. (The shared
    # population may itself come from an artifact, when the other xdist worker fitted it.)
    assert "mu" not in loaded.posterior
    assert set(loaded.posterior.data_vars) == set(population.posterior.data_vars) - {"mu"}
    for name in loaded.posterior.data_vars:
        np.testing.assert_array_equal(loaded.posterior[name].to_numpy(), population.posterior[name].to_numpy())
    card = read_card(saved)
    assert card["kind"] == "population" and card["schema_version"] == 1
    assert card["population"]["verdict"]["converged"] == population.verdict.converged
    assert {"pymc", "arviz", "jax", "numpyro", "python"} <= set(card["versions"])
    assert card["population"]["family"]["priors"] == population.family.config()["priors"]
    # ready to condition new patients without refitting: the same twins, draw for draw
    _, held, _ = simulated
    a = population.condition(held, key=KEY, method="importance", seed=3)
    b = loaded.condition(held, key=KEY, method="importance", seed=3)
    np.testing.assert_array_equal(a.posterior["patient_slope"].to_numpy(), b.posterior["patient_slope"].to_numpy())
    # and the twin itself round-trips: forecasts identical, update() works on the loaded one
    twin = bt.load(a.save(saved.parent / "twin"))
    assert isinstance(twin, bt.Twin) and twin.cohort.patients == a.cohort.patients
    f0, f1 = a.predict(times=[9.0, 12.0], seed=1), twin.predict(times=[9.0, 12.0], seed=1)
    np.testing.assert_array_equal(f0.draws["observation"].to_numpy(), f1.draws["observation"].to_numpy())
    assert twin.verdict.table.equals(a.verdict.table)


def test_tampered_truncated_or_foreign_artifacts_are_refused(population, saved, tmp_path):
    import shutil

    card = read_card(saved)
    nc = card["files"]["population"]["path"]

    def copy():
        dst = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(saved, dst)
        return dst

    flipped = copy()  # one byte changed inside the netCDF
    data = bytearray((flipped / nc).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / nc).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{nc} fails its SHA-256 checksum"):
        bt.load(flipped)

    truncated = copy()
    size = (truncated / nc).stat().st_size
    with open(truncated / nc, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ArtifactError, match=rf"{nc} has {size // 2} bytes, the card says {size} \(truncated"):
        bt.load(truncated)

    edited = copy()  # a prior changed by hand in the card
    c = json.loads((edited / "card.json").read_text())
    c["population"]["sampler"]["seed"] = 99
    (edited / "card.json").write_text(json.dumps(c))
    with pytest.raises(ArtifactError, match="card.json fails its own checksum"):
        bt.load(edited)

    newer = copy()
    c = json.loads((newer / "card.json").read_text())
    c["schema_version"] = 2
    (newer / "card.json").write_text(json.dumps(c))
    with pytest.raises(ArtifactError, match="schema version 2; this bayestwin reads version 1"):
        bt.load(newer)

    cut = copy()
    (cut / "card.json").write_text((cut / "card.json").read_text()[:100])
    with pytest.raises(ArtifactError, match="card.json is not valid JSON"):
        bt.load(cut)

    missing = copy()
    (missing / nc).unlink()
    with pytest.raises(ArtifactError, match=f"{nc} is missing"):
        bt.load(missing)

    with pytest.raises(ArtifactError, match="is not a bayestwin artifact: card.json is missing"):
        bt.load(tmp_path)
    (tmp_path / "notes.txt").write_text("not an artifact")
    with pytest.raises(ArtifactError, match="non-empty folder without card.json: not overwriting"):
        bt.save(population, tmp_path)


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import bayestwin as bt
    new = bt.load(sys.argv[2])
    calls, real = [0], os.replace
    def replace(src, dst):  # die (SIGKILL: no cleanup, no finally) at the k-th rename of the save
        calls[0] += 1
        if calls[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
    bt.save(new, sys.argv[1])
    print("saved")
    """
)


def test_a_save_killed_midway_leaves_the_previous_artifact(population, tmp_path):
    """Kill a real process with SIGKILL at the first rename of a data file and just before the card
    is swapped: both times the previous artifact loads, verified; a later save cleans the debris."""
    target, other = tmp_path / "target", tmp_path / "other"
    bt.save(population, target)
    bt.save(_shifted(population), other)
    before = read_card(target)["card_sha256"]
    n_files = len(read_card(other)["files"])  # one rename per file, then the card's
    for k in (1, n_files + 1):
        run = subprocess.run(
            [sys.executable, "-c", CHILD, str(target), str(other), str(k)], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == -9, run.stderr[-2000:]  # killed, not finished
        assert "saved" not in run.stdout
        assert read_card(target)["card_sha256"] == before
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old = bt.load(target)
        np.testing.assert_array_equal(old.posterior["sigma"].to_numpy(), population.posterior["sigma"].to_numpy())
    assert any(p.name.startswith(".tmp-") or p.name not in _listed(target) for p in target.iterdir())  # debris
    bt.save(_shifted(population, 2.0), target)  # a complete save commits and removes the debris
    assert sorted(p.name for p in target.iterdir() if p.name != ".bayestwin.lock") == sorted(_listed(target))
    np.testing.assert_allclose(
        bt.load(target).posterior["sigma"].to_numpy(), population.posterior["sigma"].to_numpy() + 2.0
    )


def _listed(folder):
    return ["card.json", *(f["path"] for f in read_card(folder)["files"].values())]


def test_save_refuses_other_objects(tmp_path):
    with pytest.raises(TypeError, match="save\\(\\) takes a Population or a Twin, not dict"):
        bt.save({}, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x" / "card.json")
