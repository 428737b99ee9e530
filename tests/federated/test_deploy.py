"""A federated fit deployed on Flower on localhost: a SuperLink, one SuperNode per site (each
site's ClientApp in processes of its own, reading its own table from its own ``site.toml``), and
``flwr run`` of the App that :func:`bayestwin.federated.deploy.write_app` writes. The run's
ledger and population must be the local path's, byte for byte."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bayestwin as bt
from bayestwin.errors import SpecError
from bayestwin.federated import Ledger, federated_fit
from bayestwin.io import ArtifactError

deploy = pytest.importorskip("bayestwin.federated.deploy", reason="Flower is in the test extra (bayestwin[federated])")
RUN_CONFIG, read_site, run_settings, write_app = (deploy.RUN_CONFIG, deploy.read_site, deploy.run_settings,
                                                  deploy.write_app)  # fmt: skip

DATA = Path(__file__).resolve().parents[2] / "models" / "sleepstudy" / "data.csv"
KEY = "a-site-key-of-at-least-16-bytes"
#: each site's NUTS run, kept small: the test is about the exchange (the local path's accuracy
#: is tested in test_fit.py)
FIT = {"draws": 150, "tune": 150, "chains": 2, "iterations": 1, "seed": 3}

SITE_TOML = """name = "{name}"
[data]
source = "data.csv"
format = "longitudinal"
patient = "Subject"
time = "Days"
outcome = "Reaction"
key_env = "SITE_KEY"
"""


def _site_folders(root: Path) -> dict[str, Path]:
    """Sleepstudy's 18 subjects in two hospitals, each a folder with its table and site.toml."""
    df = pd.read_csv(DATA)
    ids = sorted(df.Subject.unique())
    out = {}
    for name, part in (("north", ids[:9]), ("south", ids[9:])):
        folder = root / name
        folder.mkdir(parents=True)
        df[df.Subject.isin(part)].to_csv(folder / "data.csv", index=False)
        (folder / "site.toml").write_text(SITE_TOML.format(name=name))
        out[name] = folder / "site.toml"
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """A SuperLink and SuperNodes on localhost, each in its own process group (stopped whole)."""

    def __init__(self, root: Path):
        self.root, self.procs = root, []
        self.env = dict(os.environ, FLWR_HOME=str(root / "flwr-home"), SITE_KEY=KEY)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.port = _port()
        (root / "flwr-home").mkdir()
        (root / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "localhost"\n\n[superlink.localhost]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )

    def start(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((proc, log))

    def superlink(self) -> None:
        self.start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                   "--port", str(self.port))  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the SuperLink did not listen on {self.port} within 60 s")

    def supernode(self, name: str, site: Path) -> None:
        self.start(name, "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                   "--port", str(_port()), "--node-config", f'site="{site}"')  # fmt: skip

    def run(self, app: Path, timeout: float = 900, **config) -> subprocess.CompletedProcess:
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        return subprocess.run(
            ["flwr", "run", str(app), "localhost", "--run-config", overrides, "--stream"],
            cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def stop(self) -> None:
        for proc, _ in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc, log in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Two sites deployed on localhost: the run's saved population and ledger; then a third node
    whose site cannot be read joins, and a second run over three sites fails naming it."""
    root = tmp_path_factory.mktemp("deployment")
    sites = _site_folders(root / "hospitals")
    app = root / "app"
    write_app(app, sites=2, **FIT)
    dep = Deployment(root)
    try:
        dep.superlink()
        for name, site in sites.items():
            dep.supernode(name, site)
        done = dep.run(app, out=str(root / "population"), ledger=str(root / "ledger.json"))
        dep.supernode("nowhere", root / "hospitals" / "nowhere" / "site.toml")
        failed = dep.run(app, sites=3, out=str(root / "population-3"), ledger=str(root / "ledger-3.json"))
    finally:
        dep.stop()
    return root, sites, done, failed


def test_a_deployed_fit_is_the_local_fit_byte_for_byte(deployed):
    """Every message of the deployed run (each site's ClientApp in a process that read its table
    from its own site.toml) is the local path's on the same tables, in the same settings, and
    the saved population's draws are the local population's; no pseudonym, original id or
    outcome value is in any message."""
    root, sites, done, _ = deployed
    assert done.returncode == 0, done.stdout + done.stderr
    deployed_pop = bt.load(root / "population")
    messages = json.loads((root / "ledger.json").read_text())

    os.environ["SITE_KEY"] = KEY
    try:
        cohorts = dict(read_site(path) for path in sites.values())
    finally:
        del os.environ["SITE_KEY"]
    ledger = Ledger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = federated_fit(cohorts, ledger=ledger, **FIT)

    def key(m):
        return (m["round"], m["site"], m["direction"], m["kind"])

    got, want = {key(m): m["body"] for m in messages}, {key(m): m["body"] for m in ledger.messages}
    assert len(messages) == len(ledger.messages) == 10 and got == want
    assert deployed_pop.sampler["sites"] == ["north", "south"] and deployed_pop.sampler["messages"] == 10
    for name, values in local.idata.posterior.items():
        np.testing.assert_array_equal(deployed_pop.idata.posterior[name].values, values.values)

    text = "\n".join(got.values())
    for cohort in cohorts.values():
        for pseudonym in cohort.patients:
            assert pseudonym not in text
        for y in cohort.frame["outcome"].to_numpy():
            assert json.dumps(float(y)) not in text
    for subject in pd.read_csv(DATA).Subject.unique():
        assert f'"{subject}"' not in text and f": {subject}," not in text


def test_a_site_that_cannot_read_its_table_fails_the_deployed_run_by_name(deployed):
    root, _, _, failed = deployed
    log = failed.stdout + failed.stderr
    assert "failed to load its site: SpecError:" in log and "nowhere/site.toml: cannot read it" in log, log
    assert not (root / "population-3").exists()
    assert json.loads((root / "ledger-3.json").read_text()) == []  # it failed before any message to a site


# ------------------------------------------------------------------ what a deployment reads
def test_a_site_toml_is_checked_by_key_and_type(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(SITE_TOML.format(name="north").replace("outcome =", "outcom ="))
    with pytest.raises(SpecError, match=r"site.toml \[data\]: unknown key 'outcom'; valid keys: \["):
        read_site(path)
    path.write_text('name = "north"\n[data]\nsource = "data.csv"\nformat = "fhir"\n')
    with pytest.raises(
        SpecError,
        match=r"format must be one of \('longitudinal', 'nonmem', 'survival'\), not 'fhir'",
    ):
        read_site(path)
    path.write_text('[data]\nsource = "data.csv"\nformat = "longitudinal"\n')
    with pytest.raises(SpecError, match=r"site.toml needs 'name'$"):
        read_site(path)


def test_a_survival_site_reads_its_at_risk_intervals(tmp_path, monkeypatch):
    """A site.toml of format "survival" gives the site's time-to-event table (a Cohort of at-risk
    intervals), which a federated fit takes (tests/federated/test_fit.py)."""
    from bayestwin.families.survival import simulate

    df, _ = simulate(12, seed=1)
    df.to_csv(tmp_path / "events.csv", index=False)
    (tmp_path / "site.toml").write_text(
        'name = "south"\n[data]\nsource = "events.csv"\nformat = "survival"\npatient = "patient"\n'
        'time = "time"\nevent = "event"\nstart = "start"\ncovariates = ["age"]\nkey_env = "SOUTH_KEY"\n'
    )
    monkeypatch.setenv("SOUTH_KEY", "south-site-key-0001")
    name, cohort = read_site(tmp_path / "site.toml")
    assert name == "south" and cohort.n_patients == 12 and cohort.columns.start == "start"
    assert cohort.frame["outcome"].sum() == df.event.sum()


def test_a_nonmem_site_reads_its_events(tmp_path, monkeypatch):
    """A site.toml of format "nonmem" gives the site's NONMEM events (the PK family), which a
    federated fit takes (tests/federated/test_fit.py)."""
    from bayestwin.data.nonmem import Events
    from bayestwin.families.pk import simulate

    table, _ = simulate(4, seed=1, weight=True)
    table.to_csv(tmp_path / "pk.csv", index=False)
    (tmp_path / "site.toml").write_text(
        'name = "east"\n[data]\nsource = "pk.csv"\nformat = "nonmem"\ncovariates = ["WT"]\nkey_env = "EAST_KEY"\n'
    )
    monkeypatch.setenv("EAST_KEY", "east-site-key-00001")
    name, events = read_site(tmp_path / "site.toml")
    assert name == "east" and isinstance(events, Events) and len(events.patients) == 4
    assert events.covariates == ["WT"] and not any(str(i) in events.patients for i in table.ID.unique())


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"draw": 100}, r"the run config: unknown key 'draw'; valid keys: \["),
        ({"draws": "100"}, r"the run config: 'draws' must be int, not str '100'"),
        ({"draws": 0}, r"the run config: 'draws' must be >= 1, not 0"),
        ({}, r"the run config: 'out' must name the folder to save the population into \(an absolute path\)"),
        ({"out": "population"}, r"the run config: 'out' must be an absolute path .*, not 'population'"),
    ],
)
def test_a_run_config_is_checked_before_the_fit(config, error):
    with pytest.raises(SpecError, match=error):
        run_settings(config)


def test_a_run_config_refuses_to_overwrite(tmp_path):
    (tmp_path / "ledger.json").write_text("{}")
    with pytest.raises(SpecError, match=r"the ledger file .*ledger.json exists already; name a new one"):
        run_settings({"out": str(tmp_path / "pop"), "ledger": str(tmp_path / "ledger.json")})
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("not ours")
    with pytest.raises(ArtifactError, match=r"theirs is a non-empty folder without card.json: not overwriting"):
        run_settings({"out": str(tmp_path / "theirs")})
    settings = run_settings({"out": str(tmp_path / "pop"), "therapies": "standard, drug_a", "tol": 0})
    assert settings["therapies"] == ["standard", "drug_a"] and settings["tol"] == 0
    assert set(settings) == set(RUN_CONFIG)


def test_write_app_writes_a_flower_app_and_never_replaces_one(tmp_path):
    from flwr.common.config import validate_config

    path = write_app(tmp_path / "app", sites=3, draws=500)
    import tomllib

    config = tomllib.loads(path.read_text())
    ok, errors, _ = validate_config(config)
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["config"]["sites"] == 3
    assert config["tool"]["flwr"]["app"]["config"]["draws"] == 500
    with pytest.raises(SpecError, match=r"pyproject.toml exists already: write the Flower App into a new folder"):
        write_app(tmp_path / "app")
    with pytest.raises(SpecError, match=r"write_app's run config: unknown key 'site'"):
        write_app(tmp_path / "other", site=3)
