"""The model zoo: population models described by a ``spec.toml``, fitted reproducibly, shipped as artifacts.

A model folder ``models/NAME/`` holds

- ``spec.toml``: data source and column roles, family and priors, sampler settings and seed;
- ``data.csv``: the fitting data (public data sets only; a spec may point elsewhere);
- ``population/``: the fitted artifact (:mod:`bayestwin.io`), loaded by ``bt.load("NAME")``;
- ``MODEL_CARD.md``: what the model is, what it was fitted to, its verdict and summary.

``bayestwin fit models/NAME/spec.toml`` (:func:`fit_spec`) regenerates the artifact and the card:
same spec, same seed, same pseudonymisation key -> identical draws on the same machine and
stack (a different CPU or library version may change the last bits and so the draws).

A spec::

    name = "sleepstudy"
    description = "..."
    [data]
    source = "data.csv"          # relative to the spec's folder
    format = "longitudinal"      # or "nonmem" (NONMEM-style event table), "survival" (time, event[, start])
    patient = "Subject"
    time = "Days"
    outcome = "Reaction"
    therapy = ""                 # "" = single therapy
    covariates = []
    key = "..."                  # pseudonymisation key; or key_env = "VAR" to read it from the environment
    [family]
    name = "progression"         # further keys: the family's options
    [family.priors]
    sigma = { dist = "HalfNormal", sigma = 50.0 }
    [sampler]
    draws = 1000
    tune = 1000
    chains = 4
    target_accept = 0.9
    seed = 1
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd

from bayestwin._atomic import write_file
from bayestwin.errors import SpecError
from bayestwin.io import ArtifactError, check_target, load, read_card, save
from bayestwin.tomlspec import ANY_TABLE, check, check_options, read_toml, require

ENV = "BAYESTWIN_MODELS"


FORMATS = ("longitudinal", "nonmem", "survival")


def model_dirs() -> list[Path]:
    """Where models are looked up: ``$BAYESTWIN_MODELS`` (``os.pathsep``-separated), then the
    ``models/`` folder of the bayestwin checkout this package was installed from."""
    dirs = [Path(p) for p in os.environ.get(ENV, "").split(os.pathsep) if p]
    repo = Path(__file__).resolve().parents[1] / "models"
    return [*dirs, repo] if repo.is_dir() else dirs


def list_models() -> list[str]:
    """Names of the models with a ``spec.toml`` in :func:`model_dirs`."""
    return sorted({p.parent.name for d in model_dirs() for p in d.glob("*/spec.toml")})


def model_path(name: str) -> Path:
    """The folder of model ``name``."""
    for d in model_dirs():
        if (d / name / "spec.toml").is_file():
            return d / name
    where = ", ".join(map(str, model_dirs()))
    raise ArtifactError(f"no model {name!r} in the model zoo ({where}); known: {list_models()}")


#: The keys a spec may have, with their types (:mod:`bayestwin.tomlspec`); family options are
#: checked against the family's constructor and priors by :class:`~bayestwin.families.base.Prior`.
SPEC_SCHEMA = {
    "name": str,
    "description": str,
    "data": {
        "source": str,
        "format": str,
        "citation": str,
        "patient": str,
        "time": str,
        "outcome": str,
        "therapy": str,
        "therapies": list,
        "covariates": list,
        "categorical": list,
        "ignore": list,
        "event": str,
        "start": str,
        "at_risk": str,
        "key": str,
        "key_env": str,
    },
    "family": ANY_TABLE,
    "sampler": {
        "draws": int,
        "tune": int,
        "chains": int,
        "target_accept": float,
        "mass": str,
        "seed": int,
        "max_tree_depth": int,
        "extend": int,
        "prewarm": int,
        "jitter": float,
    },
}


def read_spec(path) -> dict:
    """Read and check a ``spec.toml`` (unknown keys and wrong types are a :class:`SpecError`);
    the result has ``folder`` (the spec's folder) added."""
    from bayestwin.families.base import family_class

    path = Path(path)
    if path.is_dir():
        path = path / "spec.toml"
    spec = read_toml(path)
    check(spec, SPEC_SCHEMA, str(path))
    for section, keys in {"data": ("source", "format"), "family": ("name",), "sampler": ("seed",)}.items():
        require(spec.get(section, {}), keys, f"{path} [{section}]")
    if spec["data"]["format"] not in FORMATS:
        raise SpecError(f"{path} [data]: format must be one of {FORMATS}, not {spec['data']['format']!r}")
    if "key" in spec["data"] and "key_env" in spec["data"]:
        raise SpecError(f"{path} [data]: give key or key_env, not both")
    module = spec["family"].get("module")
    if module is not None and not isinstance(module, str):
        raise SpecError(f"{path} [family]: module must be a string 'package.module:Class', not {module!r}")
    try:  # a family of your own: `module = "package.module:Class"` imports it (installed) first
        cls = family_class(spec["family"]["name"], module)
    except LookupError as err:
        raise SpecError(f"{path} [family]: {err}") from None
    options = {k: v for k, v in spec["family"].items() if k not in ("name", "module")}
    check_options(options, cls, f"{path} [family]")
    spec["folder"] = path.parent
    spec.setdefault("name", path.parent.name)
    return spec


def _key(data: dict):
    if "key_env" in data:
        try:
            return os.environ[data["key_env"]]
        except KeyError:
            var = data["key_env"]
            raise ValueError(f"the spec reads its pseudonymisation key from ${var}, which is not set") from None
    return data.get("key")


def spec_data(spec: dict):
    """The spec's fitting data, validated: a Cohort, or NONMEM Events."""
    from bayestwin.data.cohort import Cohort
    from bayestwin.data.nonmem import read_nonmem

    d = spec["data"]
    src = Path(d["source"])
    src = src if src.is_absolute() else spec["folder"] / src
    table = pd.read_csv(src, na_values=["."])
    covariates = list(d.get("covariates", []))
    if d["format"] == "nonmem":
        return read_nonmem(table, covariates=covariates, key=_key(d), ignore=list(d.get("ignore", [])))
    if d["format"] == "survival":  # time-to-event: at-risk intervals (time, event[, start])
        from bayestwin.data.survival import read_survival

        return read_survival(
            table,
            patient=d.get("patient", "patient"),
            time=d.get("time", "time"),
            event=d.get("event", "event"),
            start=d.get("start") or None,
            therapy=d.get("therapy") or None,
            therapies=d.get("therapies") or None,
            covariates=covariates,
            key=_key(d),
        )
    return Cohort(
        table,
        patient=d.get("patient", "patient"),
        time=d.get("time", "time"),
        outcome=d.get("outcome", "outcome"),
        therapy=d.get("therapy") or None,
        therapies=d.get("therapies") or None,
        covariates=covariates,
        categorical=list(d.get("categorical", [])),
        at_risk=d.get("at_risk") or None,
        key=_key(d),
    )


def spec_family(spec: dict):
    """The spec's family with its options and priors."""
    from bayestwin.families.base import from_config

    fam = dict(spec["family"])
    return from_config({"family": fam.pop("name"), **fam})


def fit_spec(path, *, out=None, progressbar: bool | None = None, **overrides):
    """Fit the model of a ``spec.toml`` and save its artifact (``out``, default the spec's
    ``population/`` folder) and ``MODEL_CARD.md``. ``overrides`` replace sampler settings (e.g.
    ``draws=200`` for a quick check; the card then differs from the shipped one). Returns the
    Population."""
    from bayestwin.population import fit

    spec = read_spec(path)
    settings = {**spec["sampler"], **overrides}
    target = check_target(Path(out) if out is not None else spec["folder"] / "population")  # before the fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pop = fit(spec_data(spec), spec_family(spec), progressbar=progressbar, **settings)
    save(pop, target)
    if out is None and not overrides:  # a quick run with other settings leaves the model card alone
        write_model_card(spec, pop, target)
    return pop


def load_model(name: str):
    """The fitted Population of zoo model ``name`` (verified on load; no refit)."""
    return load(model_path(name) / "population")


def load_any(name_or_path):
    """``bt.load``: an artifact folder (:func:`bayestwin.io.load`), or the name of a zoo model
    (a bare name that is not a folder here) whose fitted population is loaded."""
    folder = Path(name_or_path)
    if not folder.exists() and isinstance(name_or_path, str) and os.sep not in name_or_path and "/" not in name_or_path:
        try:
            folder = model_path(name_or_path) / "population"
        except ArtifactError as err:
            raise ArtifactError(f"no folder {name_or_path!r}, and {err}") from None
    return load(folder)


def write_model_card(spec: dict, pop, artifact: Path) -> Path:
    """``MODEL_CARD.md`` next to the spec: description, data, family, sampler, verdict, summary."""
    card = read_card(artifact)
    part = card["population"]
    summary = pop.summary()[["mean", "sd", "eti89_lb", "eti89_ub", "ess_bulk", "r_hat"]]
    lines = [
        f"# {spec['name']}",
        "",
        spec.get("description", "").strip(),
        "",
        "## Data",
        "",
        f"- source: `{spec['data']['source']}` ({spec['data']['format']}); {spec['data'].get('citation', '')}".rstrip(
            "; "
        ),
        f"- {part['patients_in_fit']} patients, {part['observations_in_fit']} observations; data fingerprint "
        f"(SHA-256) `{part['data_fingerprint']}`",
        f"- draws (SHA-256 over the posterior draws): `{part['draws_sha256']}`",
        "",
        "## Model",
        "",
        f"- family: `{part['family']}`",
        f"- sampler: `{part['sampler']}`",
        f"- convergence verdict: **{part['verdict']['summary']}**",
        f"- stack: {', '.join(f'{k} {v}' for k, v in card['versions'].items())}",
        "",
        "## Posterior summary (population parameters)",
        "",
        summary.to_markdown(floatfmt=".4g") if _has_tabulate() else "```\n" + summary.to_string() + "\n```",
        "",
        "## Use",
        "",
        "```python",
        "import bayestwin as bt",
        f'population = bt.load("{spec["name"]}")   # verified against card.json; no refit',
        "twin = population.condition(new_rows, key=YOUR_KEY)",
        "```",
        "",
        f"Regenerate: `bayestwin fit models/{spec['name']}/spec.toml`.",
        "",
    ]
    path = spec["folder"] / "MODEL_CARD.md"
    return write_file(path, "\n".join(lines))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
