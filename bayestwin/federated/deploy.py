"""A federated fit deployed on Flower: one SuperLink, one SuperNode per hospital, ``flwr run``.

The local path (:func:`~bayestwin.federated.fit.federated_fit`) and the simulation engine
(:func:`~bayestwin.federated.flower.flower_fit`) run every site in one machine. A deployment
runs each site's ``ClientApp`` next to its hospital's rows, in its own process, and the
coordinator's ``ServerApp`` where the SuperLink is; this module is that Flower App:

- :data:`client`: the site. Each SuperNode is started with ``--node-config 'site="PATH"'``,
  the path of the hospital's ``site.toml`` (:func:`read_site`): its name and how to read its
  table, the ``[data]`` table of a model spec (:mod:`bayestwin.zoo`); the pseudonymisation key
  from ``key_env``, the node's own environment. The rows are read in the site's process and
  never leave it.
- :data:`server`: the coordinator. Its settings come with each run, as Flower's run config
  (:data:`RUN_CONFIG`: the number of sites, the family, the NUTS and EP settings, ``out``, the
  folder the population is saved into, and ``ledger``, a JSON file of every message that
  crossed the wire, written also when the run fails; both absolute paths), checked before
  anything runs.
- :func:`write_app` writes the App's ``pyproject.toml`` (Flower builds a FAB from its folder;
  the code is this installed package).

The steps, on one machine or many (see the across-sites guide)::

    flower-superlink --insecure --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink HOST:PORT --port 9094 --node-config 'site="north/site.toml"'
    ...                                                  (one SuperNode per site, each its own --port)
    flwr run APP_FOLDER CONNECTION --run-config 'out="population" ledger="ledger.json"' --stream
"""

from __future__ import annotations

import json
from pathlib import Path

from bayestwin.data.cohort import Cohort
from bayestwin.errors import SpecError
from bayestwin.federated.ep import SiteError
from bayestwin.federated.flower import COORDINATOR, SWEEPS, coordinate, site_app

RUN_CONFIG = {
    "sites": int,
    "family": str,
    "out": str,
    "ledger": str,
    "timeout": float,
    "therapies": str,
    "draws": int,
    "tune": int,
    "chains": int,
    "target_accept": float,
    "seed": int,
    "iterations": int,
    "damping": float,
    "tol": float,
}
"""The run config the coordinator takes (``[tool.flwr.app.config]``, ``flwr run --run-config``),
with each key's type; ``""`` leaves ``therapies`` (comma-separated, reference first) and
``ledger`` unset."""

DEFAULTS = {
    "sites": 2,
    "family": "progression",
    "out": "",
    "ledger": "",
    "timeout": 3600.0,
    "therapies": "",
    "draws": 1000,
    "tune": 1000,
    "chains": 4,
    "target_accept": 0.9,
    "seed": 0,
    "iterations": 6,
    "damping": 1.0,
    "tol": 0.1,
}
"""The run config :func:`write_app` writes unless told otherwise."""

SITE_KEYS = ("name", "description", "data")
"""The keys of a ``site.toml``: the site's name and its table's ``[data]``, as in a model spec."""


def read_site(path) -> tuple[str, Cohort]:
    """The site's name and its table (a :class:`Cohort`, or NONMEM events), from its
    ``site.toml`` (``name`` and a ``[data]`` table as in a model spec: ``source`` relative to the
    file's folder, ``format = "longitudinal"``, ``"survival"`` or ``"nonmem"``, the column roles,
    ``key_env``). Unknown keys and wrong types are a
    :class:`SpecError` naming the file."""
    from bayestwin.tomlspec import check, read_toml, require
    from bayestwin.zoo import FORMATS, SPEC_SCHEMA, spec_data

    path = Path(path)
    spec = read_toml(path)
    check(spec, {k: SPEC_SCHEMA[k] if k in SPEC_SCHEMA else str for k in SITE_KEYS}, str(path))
    require(spec, ("name", "data"), str(path))
    require(spec["data"], ("source", "format"), f"{path} [data]")
    if spec["data"]["format"] not in FORMATS:
        raise SpecError(f"{path} [data]: format must be one of {FORMATS}, not {spec['data']['format']!r}")
    if "key" in spec["data"] and "key_env" in spec["data"]:
        raise SpecError(f"{path} [data]: give key or key_env, not both")
    if not spec["name"].strip():
        raise SpecError(f"{path}: name must name the site, not be empty")
    spec["folder"] = path.parent
    return spec["name"], spec_data(spec)


def _load(context) -> tuple[str, Cohort]:
    path = context.node_config.get("site")
    if not isinstance(path, str) or not path:
        raise SiteError(
            "this SuperNode has no site: start it with --node-config 'site=\"PATH\"', the path of its site.toml"
        )
    return read_site(path)


def run_settings(config) -> dict:
    """The coordinator's settings from a run config (:data:`DEFAULTS` for what it lacks): every
    key known and of its type, ``out`` a folder it may write and ``ledger`` a file that does not
    exist yet; else a :class:`SpecError` naming the key."""
    from bayestwin.io import check_target
    from bayestwin.tomlspec import check

    config = dict(config)
    check(config, RUN_CONFIG, "the run config")
    settings = {**DEFAULTS, **config}
    for key in ("sites", "draws", "tune", "chains", "iterations"):
        if settings[key] < 1:
            raise SpecError(f"the run config: {key!r} must be >= 1, not {settings[key]}")
    for key in ("out", "ledger"):
        if settings[key] and not Path(settings[key]).is_absolute():
            raise SpecError(
                f"the run config: {key!r} must be an absolute path (the ServerApp runs in the SuperLink's "
                f"folder), not {settings[key]!r}"
            )
    if not settings["out"]:
        raise SpecError("the run config: 'out' must name the folder to save the population into (an absolute path)")
    check_target(settings["out"])  # refused now, not after the fit
    if settings["ledger"] and Path(settings["ledger"]).exists():
        raise SpecError(f"the run config: the ledger file {settings['ledger']} exists already; name a new one")
    therapies = [t.strip() for t in settings.pop("therapies").split(",") if t.strip()]
    settings["therapies"] = therapies or None
    return settings


def _serve(grid, context) -> None:
    from bayestwin._atomic import write_file
    from bayestwin.federated.fit import Ledger
    from bayestwin.io import save

    settings = run_settings(context.run_config)
    ledger = Ledger()
    fit = {k: settings[k] for k in (*COORDINATOR, *SWEEPS)}
    try:
        population, _ = coordinate(
            grid, settings["sites"], settings["family"], timeout=settings["timeout"], ledger=ledger, **fit
        )
        save(population, settings["out"])
    finally:  # what crossed the wire is kept, also when a site failed the run
        if settings["ledger"]:
            write_file(settings["ledger"], json.dumps(ledger.messages, indent=1))


def _server_app():
    from flwr.serverapp import ServerApp

    app = ServerApp()
    app.main()(_serve)
    return app


server = _server_app()
"""The coordinator's ``ServerApp``: its settings from the run config (:func:`run_settings`); it
saves the population to ``out`` and the ledger to ``ledger``."""
client = site_app(_load)
"""Each site's ``ClientApp``: its ``site.toml`` from the node config's ``site`` (:func:`read_site`)."""


def write_app(folder, **config) -> Path:
    """Write the Flower App's ``pyproject.toml`` into ``folder`` (made if missing; an existing
    ``pyproject.toml`` is not replaced) with the run config :data:`DEFAULTS` updated by
    ``config`` (checked against :data:`RUN_CONFIG`); return the file. ``flwr run folder ...``
    then builds the App from it; its components are this module's :data:`server` and
    :data:`client`."""
    from bayestwin._atomic import write_file
    from bayestwin.tomlspec import check

    check(config, RUN_CONFIG, "write_app's run config")
    folder = Path(folder)
    target = folder / "pyproject.toml"
    if target.exists():
        raise SpecError(f"{target} exists already: write the Flower App into a new folder")
    values = {**DEFAULTS, **config}

    def toml(v):
        return json.dumps(v) if isinstance(v, str) else repr(v)

    lines = [
        "# A federated bayestwin fit as a Flower App (bayestwin.federated.deploy.write_app).",
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "bayestwin-federated"',
        'version = "1.0.0"',
        'description = "A population fitted across sites by expectation propagation (bayestwin)"',
        'license = "MIT"',
        'dependencies = ["bayestwin[federated]"]',
        "",
        "[tool.flwr.app]",
        'publisher = "bayestwin"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "bayestwin.federated.deploy:server"',
        'clientapp = "bayestwin.federated.deploy:client"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {toml(values[k])}" for k in RUN_CONFIG),
        "",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    return write_file(target, "\n".join(lines))
