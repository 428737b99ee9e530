"""Twin programs kept on disk already traced and lowered (``jax.export``), so that a new process
skips both.

The compiled-program cache (:mod:`bayestwin.cache`) keeps what XLA compiles, but a new process
must still turn the family's PyMC graph into JAX, trace the vectorised sampler and lower it to
StableHLO before it can look the compiled program up. Measured on the shipped Theoph population
(importance path, 2 cores): of a first twin's 2.9 s with the compiled program on disk, tracing
took 1.0 s and lowering 0.45 s. ``jax.export`` serialises the lowered program (about 100 KB for
that twin); a later process deserialises it in milliseconds and calls it, and XLA's compiled
program still comes from the compiled-program cache. The exported program is the one that runs,
in the first process as in the later ones, so their draws are the same (tested bit for bit).

A stored program is found by a key of everything it is a function of: the source of this
package (every ``.py`` file), the versions of the libraries that build and lower it, the
family's configuration and the cohort's schema (what the family's graph is built from), the
padded shapes and the sampler's settings, the platform and JAX's precision. A family that names
code outside this package (a user's family class, a ``Model``'s build function, an ODE model
given by import path) cannot be keyed by its source here, so its programs are traced in every
process, as before; so are programs JAX cannot export (an ODE model's solver checks its steps
through host callbacks). Files live in the ``traced`` folder of the compiled-program cache
(``bayestwin cache --clear`` empties both), each with a checksum verified on reading: a damaged
or unreadable file is traced again and rewritten, never trusted. Nothing is unpickled (the
format is JAX's flatbuffer serialisation).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import jax
import numpy as np

from bayestwin.cache import TRACED as FOLDER  # the folder in the compiled-program cache
from bayestwin.cache import TRACED_SUFFIX as SUFFIX
from bayestwin.errors import warn

_MAGIC = b"bayestwin-traced-program 1\n"
#: Largest total size of the stored programs before the least recently used are removed.
MAX_BYTES = 256 * 1024**2
#: Libraries whose version changes what a twin program is (the graph, its JAX form, its lowering).
LIBRARIES = ("jax", "jaxlib", "numpy", "pymc", "pytensor", "numpyro", "diffrax", "equinox", "formulae")


@functools.cache
def package_digest() -> str:
    """sha256 of every ``.py`` file of the installed package (paths and contents)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def library_versions() -> tuple[tuple[str, str], ...]:
    out = []
    for name in LIBRARIES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "-"))
    return tuple(out)


def _names_outside_code(value) -> bool:
    """Does a family configuration name code outside this package (``"module:name"``)?"""
    if isinstance(value, dict):
        return any(_names_outside_code(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_names_outside_code(v) for v in value)
    if isinstance(value, str) and ":" in value:
        module = value.partition(":")[0]
        return module.replace(".", "").replace("_", "").isalnum() and not module.startswith("bayestwin")
    return False


def _plain(value):
    """numpy scalars and arrays as plain data; anything else is refused (TypeError)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"not plain data: {type(value).__name__}")


def program_identity(family, schema, n_obs: int, slots: dict) -> str | None:
    """What a one-patient program is built from, as a digest; ``None`` when that cannot be told
    from this package's source alone (the family names code outside it)."""
    if not type(family).__module__.startswith("bayestwin."):
        return None
    try:
        config = family.config()
        schema_dict = schema.to_dict()
        text = json.dumps(
            {
                "family": [type(family).__module__, type(family).__qualname__, config],
                "schema": [type(schema).__qualname__, schema_dict],
                "shape": [int(n_obs), {k: int(v) for k, v in sorted(slots.items())}],
            },
            sort_keys=True,
            default=_plain,
        )
    except (AttributeError, TypeError, ValueError):  # a configuration that is not plain data: its
        return None  # repr might not show everything the graph depends on
    if _names_outside_code(config):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def folder() -> Path | None:
    """Where stored programs are kept: ``traced/`` in the compiled-program cache, or ``None``
    when that cache is off."""
    from bayestwin import cache

    where = cache.in_use()
    return None if where is None else where / FOLDER


def _signature(args) -> str:
    leaves, tree = jax.tree_util.tree_flatten(args)
    dtype = lambda a: str(a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype)  # noqa: E731 - no copy of arrays
    return json.dumps([str(tree), [[list(np.shape(a)), dtype(a)] for a in leaves]])


class Stored:
    """``go`` (a jitted function) called through its exported form, found on disk or stored there.

    ``identity`` (:func:`program_identity`) and ``label`` (the sampler's settings) name what
    ``go`` computes; with ``identity`` ``None`` (or the cache off), ``go`` is called as it is.
    One exported program per argument signature, looked up once per process.
    """

    def __init__(self, go: Callable, identity: str | None, label: str):
        register_types()
        self.go, self.identity, self.label = go, identity, label
        self._calls: dict[str, Callable] = {}
        self._lock = threading.Lock()

    def __call__(self, *args):
        if self.identity is None:
            return self.go(*args)
        sig = _signature(args)
        call = self._calls.get(sig)
        if call is None:
            with self._lock:
                call = self._calls.get(sig)
                if call is None:  # looked up once per signature: the folder, then the file
                    where = folder()
                    exported = None if where is None else self._exported(where, sig, args)
                    call = self.go if exported is None else jax.jit(exported.call)
                    self._calls[sig] = call
        return call(*args)

    def key(self, sig: str) -> str:
        text = json.dumps(
            {
                "package": package_digest(),
                "program": self.identity,
                "label": self.label,
                "signature": sig,
                "libraries": library_versions(),
                "platform": jax.default_backend(),
                "x64": bool(jax.config.jax_enable_x64),
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def _exported(self, where: Path, sig: str, args):
        path = where / f"{self.key(sig)}{SUFFIX}"
        found = read(path)
        if found is not None:
            return found
        try:
            exported = jax.export.export(self.go)(*args)
        except Exception:  # noqa: BLE001 - not exportable (host callbacks: diffrax's step checks); a
            return None  # genuine error in ``go`` is raised again when it is called as it is
        write(path, exported)
        return exported


def read(path: Path):
    """The exported program stored at ``path``, or ``None`` (absent, damaged, or unreadable)."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    head, _, payload = blob.partition(b"\n\n")
    if not head.startswith(_MAGIC) or head[len(_MAGIC) :].decode("ascii", "replace") != _digest(payload):
        return None  # not ours, cut short or changed: traced again and rewritten
    try:
        exported = jax.export.deserialize(bytearray(payload))
    except Exception:  # noqa: BLE001 - a payload JAX cannot read (another version's): trace again
        return None
    try:
        os.utime(path)  # recently used: kept when the folder is trimmed
    except OSError:
        pass
    return exported


def write(path: Path, exported) -> None:
    """Store ``exported`` at ``path`` (atomically, with its checksum), then trim the folder to
    :data:`MAX_BYTES`. A folder that cannot be written costs a warning, never the twin."""
    from bayestwin._atomic import write_file

    try:
        payload = bytes(exported.serialize())
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, _MAGIC + _digest(payload).encode("ascii") + b"\n\n" + payload)
        trim(path.parent)
    except OSError as err:
        _warn_once(f"traced twin programs cannot be stored in {path.parent} ({err}): they are traced in each process")
    except Exception as err:  # noqa: BLE001 - a program JAX cannot serialise: traced in each process
        _warn_once(f"a twin program could not be stored ({type(err).__name__}: {err}): it is traced in each process")


def trim(where: Path, limit: int = MAX_BYTES) -> int:
    """Remove the least recently used stored programs above ``limit`` bytes; return how many."""
    files = []
    for p in where.glob(f"*{SUFFIX}"):
        try:
            st = p.stat()
        except OSError:  # removed meanwhile by another process
            continue
        files.append((st.st_mtime, st.st_size, p))
    files.sort()
    total = sum(size for _, size, _ in files)
    removed = 0
    for _, size, p in files:
        if total <= limit:
            break
        total -= size
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@functools.cache
def _warn_once(message: str) -> None:
    warn(message, RuntimeWarning)


@functools.cache
def register_types() -> None:
    """Name the NamedTuples that cross an exported program's boundary, so JAX can serialise them."""
    from bayestwin.engine.condition import GaussianApprox
    from bayestwin.engine.importance import ImportanceDraws
    from bayestwin.engine.nuts import Draws

    for cls in (GaussianApprox, ImportanceDraws, Draws):
        try:
            jax.export.register_namedtuple_serialization(cls, serialized_name=f"bayestwin.{cls.__name__}")
        except ValueError:  # registered already (a reloaded module)
            pass
