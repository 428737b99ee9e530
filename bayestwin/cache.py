"""Compiled programs kept on disk between sessions (JAX's persistent compilation cache).

Nearly all of a first twin's time in a new process is XLA compilation of the family's program
at the patient's padded shapes (measured: 12-17 s of a first sleepstudy twin). JAX can keep the
compiled programs in a folder and load them in the next process instead of compiling again;
bayestwin turns that on when it is imported, in a per-user cache folder:

- where: ``$BAYESTWIN_CACHE_DIR`` if set, else the user cache folder of the platform
  (``platformdirs``: ``~/.cache/bayestwin/jax`` on Linux);
- off: ``BAYESTWIN_CACHE_DIR=off``;
- left alone when JAX's own cache is configured already (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.update("jax_compilation_cache_dir", ...)`` before importing bayestwin);
- bounded: least recently used programs are evicted above :data:`MAX_BYTES`; with that bound set,
  JAX reads and writes entries under a file lock, so processes sharing the folder never read a
  half-written program;
- cleared by ``bayestwin cache --clear`` (or :func:`clear`); ``bayestwin cache`` shows it.

What is stored: XLA programs, keyed by a hash of the program and of the JAX/XLA versions. Twin
programs take the population (its Gaussian approximation) and the patients' rows as arguments,
so they hold neither, and one program serves every population of the same family and shapes (a
refit, a cross-validation fold). A population fit's program holds the cohort's rows as constants,
so fits are never written to the cache (:func:`not_cached`). Twin programs are also kept
traced and lowered, in the folder's ``traced/`` (:mod:`bayestwin.engine.stored`): a new process
then skips tracing them too (a cached first Theoph twin 2.9 -> 0.9-1.0 s).
The folder is the user's, like the artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "BAYESTWIN_CACHE_DIR"
#: Largest size of the folder before the least recently used programs are evicted.
MAX_BYTES = 2 * 1024**3
#: Programs that compile faster than this are not worth a disk entry.
MIN_COMPILE_SECONDS = 0.5


def folder() -> Path | None:
    """The cache folder bayestwin uses (``None`` when turned off with ``BAYESTWIN_CACHE_DIR=off``)."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    if value:
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("bayestwin")) / "jax"


def enable() -> Path | None:
    """Point JAX's persistent compilation cache at :func:`folder` unless it is configured already
    or turned off; return the folder in use (JAX's own when it was configured)."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return in_use()
    where = folder()
    if where is None:
        return None
    try:
        where.mkdir(parents=True, exist_ok=True)
        if not os.access(where, os.W_OK):
            raise PermissionError("not writable")
    except OSError as err:  # a cache must never stop the package from importing
        import warnings

        warnings.warn(
            f"the compiled-program cache folder {where} cannot be used ({err.strerror or err}): compiled "
            f"programs are not kept on disk this session (set {ENV} to a writable folder, or to 'off')",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return where


def not_cached():
    """A context in which compiled programs are not written to the disk cache.

    JAX decides once per process whether the cache is used, but reads its minimum compile time
    for each entry it writes: that threshold is raised to infinity here (thread-local).
    """
    try:
        from jax._src.config import persistent_cache_min_compile_time_secs

        return persistent_cache_min_compile_time_secs(float("inf"))
    except (ImportError, AttributeError):  # a private switch: if it moves, the process-wide one
        import contextlib

        import jax

        @contextlib.contextmanager
        def off():
            before = jax.config.jax_persistent_cache_min_compile_time_secs
            jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
            try:
                yield
            finally:
                jax.config.update("jax_persistent_cache_min_compile_time_secs", before)

        return off()


def uncached(fn):
    """Decorator: ``fn`` compiles its programs under :func:`not_cached`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with not_cached():
            return fn(*args, **kwargs)

    return wrapper


def size(path: Path | None = None) -> tuple[int, int]:
    """(number of cached programs, bytes) in the cache folder: compiled programs and traced ones."""
    path = path or in_use()
    if path is None or not path.is_dir():
        return 0, 0
    files = [p for p in path.iterdir() if p.is_file() and p.name.endswith("-cache")]
    if (path / TRACED).is_dir():
        files += [p for p in (path / TRACED).iterdir() if p.is_file() and p.name.endswith(TRACED_SUFFIX)]
    return len(files), sum(p.stat().st_size for p in files)


def clear(path: Path | None = None) -> int:
    """Delete every cached program (the folder itself is kept); return how many were removed.

    Only the folder bayestwin manages, or the one given: it must hold nothing but JAX cache
    entries (``*-cache``, ``*-atime``, the lock file) and the traced programs' folder
    (:mod:`bayestwin.engine.stored`), so a mistyped path is refused rather than emptied.
    """
    path = path or in_use()
    if path is None or not path.is_dir():
        return 0
    entries = list(path.iterdir())
    traced = path / TRACED
    inner = list(traced.iterdir()) if traced.is_dir() else []
    foreign = [p.name for p in entries if not (_compiled(p) or p == traced)]
    foreign += [f"{TRACED}/{p.name}" for p in inner if not _traced(p)]
    if foreign:
        raise ValueError(
            f"{path} holds files that are not compiled programs ({', '.join(sorted(foreign)[:3])}): not cleared"
        )
    for p in [*inner, *(p for p in entries if p != traced)]:
        p.unlink(missing_ok=True)
    _forget()
    return sum(p.name.endswith("-cache") for p in entries) + sum(p.name.endswith(TRACED_SUFFIX) for p in inner)


#: The folder of traced programs (bayestwin.engine.stored) inside the cache folder, and their files' suffix.
TRACED = "traced"
TRACED_SUFFIX = ".jaxexport"


def _compiled(p: Path) -> bool:
    return p.is_file() and (p.name.endswith(("-cache", "-atime")) or p.name == ".lockfile")


def _traced(p: Path) -> bool:  # a stored program, or a write of one cut short
    return p.is_file() and (p.name.endswith(TRACED_SUFFIX) or (p.name.startswith(".") and p.name.endswith(".tmp")))


def in_use() -> Path | None:
    """The folder JAX's cache uses now: one configured before bayestwin, else :func:`folder`."""
    import jax

    configured = jax.config.jax_compilation_cache_dir
    return Path(configured) if configured else folder()


def _forget() -> None:
    """Drop JAX's handle on the cache so that the next compilation opens the folder afresh."""
    try:
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):  # a private helper: absent in some JAX versions
        pass
