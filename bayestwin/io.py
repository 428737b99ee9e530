"""Artifacts: a Population or a Twin saved to a folder, and loaded back, verified, without refitting.

An artifact folder holds

- ``card.json``: the model card (format and schema version, kind, family and priors, data
  schema, sampler settings, convergence verdict, data fingerprint, package versions) and the
  SHA-256 and size of every other file; the card carries its own checksum too;
- the DataTree(s) as netCDF (``population-<hash>.nc``; a twin adds ``twin-<hash>.nc``);
- tables as Parquet (verdict tables; a twin's validated, pseudonymised rows) and a twin's raw
  sampler positions as ``.npy`` (read with ``allow_pickle=False``).

Saving is atomic: every file is written under a temporary name, flushed and renamed to its
content-addressed name, and ``card.json`` is replaced last (write, fsync, rename) - the commit
point. A process killed at any moment leaves either the previous artifact or the new one, never
a mixture; files no longer referenced are removed after the commit. Loading checks the card's
format, schema version and own checksum, then each file's size and SHA-256, then that the
fitted data's fingerprint matches the card, and refuses anything else with
:class:`ArtifactError`. Nothing is pickled or unpickled.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import uuid
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from bayestwin._atomic import folder_lock, write_file
from bayestwin.errors import BayestwinError

FORMAT = "bayestwin-artifact"
SCHEMA_VERSION = 1
CARD = "card.json"
PACKAGES = ("bayestwin", "pymc", "pytensor", "arviz", "arviz-stats", "numpyro", "jax", "numpy", "pandas", "xarray")


class ArtifactError(BayestwinError, ValueError):
    """An artifact folder that cannot be trusted: missing, truncated, tampered or of another version."""


# ----------------------------------------------------------------------------- helpers
def data_fingerprint(dt: xr.DataTree) -> str:
    """SHA-256 over the fitted data (observed and constant data groups, variables sorted by name)."""
    h = hashlib.sha256()
    for group in ("observed_data", "constant_data"):
        if group in dt.children:
            ds = dt[group].to_dataset()
            for name in sorted(ds.data_vars):
                h.update(name.encode())
                h.update(np.ascontiguousarray(ds[name].to_numpy()).tobytes())
    return h.hexdigest()


def package_versions() -> dict:
    """Python and the versions of the stack, for model cards."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _canonical(card: dict) -> bytes:
    body = {k: v for k, v in card.items() if k != "card_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


class _Writer:
    """Files of one save: each written to a temporary name in the folder, then renamed to
    ``<stem>-<sha256[:16]><suffix>`` (content-addressed, so the previous artifact's files stay)."""

    def __init__(self, folder: Path):
        self.folder, self.files = folder, {}

    def _commit(self, tmp: Path, role: str, stem: str, suffix: str) -> None:
        _fsync(tmp)
        digest = _sha256(tmp)
        name = f"{stem}-{digest[:16]}{suffix}"
        os.replace(tmp, self.folder / name)
        self.files[role] = {"path": name, "sha256": digest, "bytes": (self.folder / name).stat().st_size}

    def _tmp(self, suffix: str) -> Path:
        return self.folder / f".tmp-{uuid.uuid4().hex}{suffix}"

    def datatree(self, role: str, dt: xr.DataTree, stem: str) -> None:
        tmp = self._tmp(".nc")
        gzip = {"compression": "gzip", "compression_opts": 4, "shuffle": True}  # lossless
        encoding = {
            node.path: {k: gzip for k, v in node.dataset.data_vars.items() if v.dtype.kind == "f" and v.ndim}
            for node in dt.subtree
            if node.has_data
        }
        dt.to_netcdf(tmp, engine="h5netcdf", encoding=encoding)
        self._commit(tmp, role, stem, ".nc")

    def table(self, role: str, df: pd.DataFrame, stem: str) -> None:
        tmp = self._tmp(".parquet")
        df.to_parquet(tmp, engine="pyarrow")
        self._commit(tmp, role, stem, ".parquet")

    def array(self, role: str, a: np.ndarray, stem: str) -> None:
        tmp = self._tmp(".npy")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(a), allow_pickle=False)
        self._commit(tmp, role, stem, ".npy")


class _Reader:
    """Files of a loaded card, each verified (size, SHA-256) before it is parsed."""

    def __init__(self, folder: Path, files: dict):
        self.folder, self.files = folder, files

    def path(self, role: str) -> Path:
        try:
            entry = self.files[role]
        except KeyError:
            raise ArtifactError(f"artifact {self.folder}: the card lists no {role!r} file") from None
        name = entry["path"]
        if Path(name).name != name:  # the card names files inside the folder only
            raise ArtifactError(f"artifact {self.folder}: file name {name!r} in the card is not a plain file name")
        path = self.folder / name
        if not path.is_file():
            raise ArtifactError(f"artifact {self.folder}: {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(
                f"artifact {self.folder}: {name} has {size} bytes, the card says {entry['bytes']} "
                "(truncated or changed after saving)"
            )
        if _sha256(path) != entry["sha256"]:
            raise ArtifactError(
                f"artifact {self.folder}: {name} fails its SHA-256 checksum (changed after saving); refusing to load it"
            )
        return path

    def datatree(self, role: str) -> xr.DataTree:
        with xr.open_datatree(self.path(role), engine="h5netcdf") as dt:
            return dt.load()

    def table(self, role: str) -> pd.DataFrame:
        return pd.read_parquet(self.path(role), engine="pyarrow")

    def array(self, role: str) -> np.ndarray:
        with open(self.path(role), "rb") as f:
            return np.load(f, allow_pickle=False)


# ----------------------------------------------------------------------------- parts
def _schema_dict(schema) -> dict:
    return {
        "therapies": list(schema.therapies),
        "numeric": {k: [float(m), float(s)] for k, (m, s) in schema.numeric.items()},
        "categorical": {k: [str(v) for v in levels] for k, levels in schema.categorical.items()},
        "time_scale": float(schema.time_scale),
        "outcome_mean": float(schema.outcome_mean),
        "outcome_sd": float(schema.outcome_sd),
    }


def _schema_from(d: dict):
    from bayestwin.data.cohort import Schema

    return Schema(
        therapies=tuple(d["therapies"]),
        numeric={k: (float(m), float(s)) for k, (m, s) in d["numeric"].items()},
        categorical={k: tuple(v) for k, v in d["categorical"].items()},
        time_scale=float(d["time_scale"]),
        outcome_mean=float(d["outcome_mean"]),
        outcome_sd=float(d["outcome_sd"]),
    )


def family_from_config(config: dict):
    """Rebuild a family from its ``config()`` as a model card stores it (see
    :func:`bayestwin.families.from_config`); an unknown family is an :class:`ArtifactError`."""
    from bayestwin.families.base import from_config

    try:
        return from_config(config)
    except LookupError as err:
        raise ArtifactError(f"the model card's family: {err}") from None


def _verdict_dict(verdict) -> dict:
    return {
        "converged": bool(verdict.converged),
        "summary": str(verdict),
        "failing": list(verdict.failing),
        "thresholds": dataclasses.asdict(verdict.thresholds),
        "advice": list(getattr(verdict, "advice", [])),
    }


def _verdict_from(d: dict, table: pd.DataFrame):
    from bayestwin.review.convergence import Thresholds, Verdict

    thresholds = Thresholds(**d["thresholds"])
    return Verdict(
        converged=bool(d["converged"]),
        table=table,
        failing=list(d["failing"]),
        thresholds=thresholds,
        advice=list(d.get("advice", [])),
    )


def draws_digest(dt: xr.DataTree) -> str:
    """SHA-256 over the posterior draws (variables sorted by name): equal digests, identical draws."""
    post = compact(dt)["posterior"].to_dataset()
    h = hashlib.sha256()
    for name in sorted(post.data_vars):
        h.update(name.encode())
        h.update(np.ascontiguousarray(post[name].to_numpy()).tobytes())
    return h.hexdigest()


def compact(dt: xr.DataTree) -> xr.DataTree:
    """The DataTree without per-observation deterministics in the posterior (e.g. ``mu``): the
    family's model recomputes them from the other draws, and they would double the artifact."""
    post = dt["posterior"].to_dataset()
    drop = [n for n, v in post.data_vars.items() if "obs" in v.dims]
    if not drop:
        return dt
    out = dt.copy()
    out["posterior"] = xr.DataTree(post.drop_vars(drop))
    return out


def _population_part(pop, w: _Writer, prefix: str = "population") -> dict:
    w.datatree(prefix, compact(pop.idata), prefix)
    w.table(f"{prefix}_verdict", pop.verdict.table, f"{prefix}-verdict")
    return {
        "family": pop.family.config(),
        "schema": _schema_dict(pop.schema),
        "columns": dataclasses.asdict(pop.columns) if pop.columns is not None else None,
        "sampler": pop.sampler,
        "verdict": _verdict_dict(pop.verdict),
        "data_fingerprint": data_fingerprint(pop.idata),
        "draws_sha256": draws_digest(pop.idata),
        "patients_in_fit": pop.n_patients,
        "observations_in_fit": pop.n_observations,
    }


def _population_from(part: dict, r: _Reader, prefix: str = "population"):
    from bayestwin.data.cohort import Columns
    from bayestwin.population import Population

    idata = r.datatree(prefix)
    found = data_fingerprint(idata)
    if found != part["data_fingerprint"]:
        raise ArtifactError(
            f"artifact {r.folder}: the fitted data's fingerprint {found[:16]}... differs from the card's "
            f"{part['data_fingerprint'][:16]}..."
        )
    if draws_digest(idata) != part["draws_sha256"]:
        raise ArtifactError(f"artifact {r.folder}: the posterior draws differ from those the card was written for")
    columns = None  # a family's own table (NONMEM events) has fixed column names
    if part["columns"] is not None:
        columns = Columns(**(part["columns"] | {"covariates": tuple(part["columns"].get("covariates", ()))}))
    return Population(
        family=family_from_config(part["family"]),
        schema=_schema_from(part["schema"]),
        columns=columns,
        idata=idata,
        verdict=_verdict_from(part["verdict"], r.table(f"{prefix}_verdict")),
        sampler=dict(part["sampler"]),
    )


def _cohort_part(cohort, w: _Writer) -> dict:
    from bayestwin.data.nonmem import Events

    w.table("cohort_frame", cohort.frame, "cohort-frame")
    if isinstance(cohort, Events):
        return {"type": "events", "covariates": list(cohort.covariates)}
    w.table("cohort_baseline", cohort.baseline, "cohort-baseline")
    return {"type": "cohort", "columns": dataclasses.asdict(cohort.columns), "schema": _schema_dict(cohort.schema)}


def _cohort_from(part: dict, r: _Reader):
    from bayestwin.data.cohort import Cohort, Columns
    from bayestwin.data.nonmem import Events

    frame = r.table("cohort_frame")
    if part["type"] == "events":
        return Events(frame=frame, covariates=list(part["covariates"]))
    cols = dict(part["columns"])
    cols["covariates"] = tuple(cols.get("covariates", ()))
    out = object.__new__(Cohort)  # rows validated when the twin was made; verified by checksum now
    out.columns, out.frame, out.baseline = Columns(**cols), frame, r.table("cohort_baseline")
    out.schema = _schema_from(part["schema"])
    return out


# ----------------------------------------------------------------------------- save / load
def check_target(path) -> Path:
    """``path`` as a folder an artifact may be written to (absent, empty, or an earlier artifact
    whose card reads); an :class:`ArtifactError` otherwise. Called by :func:`save`, and before a
    long fit."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"{folder} exists and is not a folder")
    if folder.is_dir() and _foreign_files(folder) and not (folder / CARD).is_file():
        raise ArtifactError(f"{folder} is a non-empty folder without {CARD}: not overwriting something else")
    if folder.is_dir() and (folder / CARD).is_file():
        read_card(folder)  # replace only a readable bayestwin artifact, never another card.json
    return folder


def save(obj, path) -> Path:
    """Save a :class:`~bayestwin.Population` or :class:`~bayestwin.Twin` to the folder ``path``, atomically.

    An existing artifact at ``path`` is replaced only when the new one is complete: until
    ``card.json`` is swapped, loading still gives the previous one. Returns the folder.

    Examples
    --------
    >>> bt.save(population, "artifacts/sleepstudy")  # doctest: +SKIP
    >>> population = bt.load("artifacts/sleepstudy")  # doctest: +SKIP
    """
    from bayestwin.population import Population
    from bayestwin.twin import Twin

    if not isinstance(obj, (Population, Twin)):
        raise TypeError(f"save() takes a Population or a Twin, not {type(obj).__name__}")
    family = (obj if isinstance(obj, Population) else obj.population).family
    try:  # the card must rebuild the family in another process: refuse before writing a byte
        rebuilt = family_from_config(family.config())
    except (ArtifactError, TypeError) as err:
        raise ArtifactError(f"cannot save: {err}") from None
    if rebuilt.config() != family.config():
        raise ArtifactError(f"cannot save: family {family.name!r} does not rebuild from its config()")
    folder = check_target(path)
    folder.mkdir(parents=True, exist_ok=True)
    _check_space(folder, obj)
    with folder_lock(folder, "artifact"):
        before = {p.name for p in folder.iterdir()}
        w = _Writer(folder)
        try:
            card = _card(obj, w)
            write_file(
                folder / CARD, json.dumps(card, indent=2, sort_keys=True, default=str) + "\n"
            )  # the commit point
        except BaseException as err:  # a full disk, a kill signal turned exception: leave the old artifact whole
            for p in folder.iterdir():
                if p.name not in before and p.name != CARD and (_debris(p.name) or _is_artifact_file(p.name)):
                    p.unlink(missing_ok=True)
            if isinstance(err, OSError) and not isinstance(err, ArtifactError):
                raise ArtifactError(
                    f"could not save to {folder}: {err}; the previous artifact (if any) is unchanged"
                ) from None
            raise
        try:
            dfd = os.open(folder, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        except OSError:  # directories cannot be fsynced on some platforms
            pass
        keep = {CARD, *(f["path"] for f in w.files.values())}
        for p in folder.iterdir():  # the previous artifact's files and debris of killed saves
            if p.is_file() and p.name not in keep and (_debris(p.name) or _is_artifact_file(p.name)):
                p.unlink()
    return folder


def _card(obj, w: _Writer) -> dict:
    """Write ``obj``'s files through ``w`` and return its model card (with its own checksum)."""
    from bayestwin.twin import Twin

    card = {"format": FORMAT, "schema_version": SCHEMA_VERSION}
    if isinstance(obj, Twin):
        card["kind"] = "twin"
        card["population"] = _population_part(obj.population, w)
        w.datatree("twin", obj.idata, "twin")
        w.table("twin_verdict", obj.verdict.table, "twin-verdict")
        w.array("positions", obj._positions, "twin-positions")
        card["twin"] = {
            "patients": len(obj.cohort.patients),
            "nuts": obj.config._asdict(),
            "importance": obj.importance._asdict() if obj.importance is not None else None,
            "seed": int(obj.seed),
            "verdict": _verdict_dict(obj.verdict),
            "cohort": _cohort_part(obj.cohort, w),
        }
    else:
        card["kind"] = "population"
        card["population"] = _population_part(obj, w)
    card |= {
        "saved": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "files": w.files,
    }
    card["card_sha256"] = hashlib.sha256(_canonical(card)).hexdigest()
    return card


def _debris(name: str) -> bool:
    """A temporary file of a save that did not finish (this module's or :mod:`bayestwin._atomic`'s)."""
    return name.startswith(".tmp-") or (name.startswith(".") and name.endswith(".tmp"))


def _foreign_files(folder: Path) -> list[str]:
    """Files in ``folder`` other than a lock or the debris of a killed save."""
    return [p.name for p in folder.iterdir() if p.name != ".bayestwin.lock" and not _debris(p.name)]


def _check_space(folder: Path, obj) -> None:
    """Refuse before writing when the disk cannot hold the artifact (its arrays' size, a bound:
    the files are compressed): a full disk mid-write is what must not happen."""
    import shutil

    from bayestwin.twin import Twin

    trees = [obj.population.idata, obj.idata] if isinstance(obj, Twin) else [obj.idata]
    need = sum(int(ds.nbytes) for dt in trees for ds in (node.dataset for node in dt.subtree)) + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ArtifactError(
            f"not enough free disk space in {folder}: up to {need / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free; "
            "nothing was written"
        )


def _is_artifact_file(name: str) -> bool:
    stem, _, rest = name.rpartition("-")
    return bool(stem) and rest.split(".")[0].isalnum() and len(rest.split(".")[0]) == 16 and "." in rest


def read_card(path) -> dict:
    """The verified model card of the artifact at ``path`` (format, version and own checksum)."""
    folder = Path(path)
    f = folder / CARD
    if not f.is_file():
        raise ArtifactError(f"{folder} is not a bayestwin artifact: {CARD} is missing")
    try:
        card = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"artifact {folder}: {CARD} is not valid JSON (truncated or edited)") from err
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ArtifactError(f"artifact {folder}: {CARD} is not a bayestwin model card")
    if card.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"artifact {folder}: schema version {card.get('schema_version')!r}; this bayestwin reads version "
            f"{SCHEMA_VERSION}"
        )
    if hashlib.sha256(_canonical(card)).hexdigest() != card.get("card_sha256"):
        raise ArtifactError(f"artifact {folder}: {CARD} fails its own checksum (edited after saving)")
    return card


def load(path):
    """Load and verify an artifact folder: a :class:`~bayestwin.Population` or a :class:`~bayestwin.Twin`.

    ``path`` is a folder written by :func:`save` (``bt.load`` also takes the name of a model in the
    model zoo: :func:`bayestwin.zoo.load`). Refuses (``ArtifactError``) a missing,
    truncated, tampered or newer-version artifact, and a card that passes its checksum but
    lacks or mistypes a field (edited and re-checksummed). The loaded Population conditions new patients
    without refitting.
    """
    try:
        return _load(path)
    except ArtifactError:
        raise
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ArtifactError(f"artifact {path}: {CARD} is malformed ({type(err).__name__}: {err})") from None
    except ValueError as err:
        raise ArtifactError(f"artifact {path}: {CARD} holds an invalid value ({err})") from None


def _load(path):
    """:func:`load` without the translation of a malformed card's errors."""
    folder = Path(path)
    card = read_card(folder)
    r = _Reader(folder, card["files"])
    pop = _population_from(card["population"], r)
    if card["kind"] == "population":
        return pop
    if card["kind"] != "twin":
        raise ArtifactError(f"artifact {folder}: unknown kind {card['kind']!r}")
    from bayestwin.engine.importance import ImportanceConfig
    from bayestwin.engine.nuts import NutsConfig
    from bayestwin.twin import Twin

    t = card["twin"]
    return Twin(
        population=pop,
        cohort=_cohort_from(t["cohort"], r),
        idata=r.datatree("twin"),
        verdict=_verdict_from(t["verdict"], r.table("twin_verdict")),
        config=NutsConfig(**t["nuts"]),
        seed=int(t["seed"]),
        _positions=r.array("positions"),
        importance=ImportanceConfig(**t["importance"]) if t["importance"] is not None else None,
    )
