"""Package-wide options: today, whether long steps show a progress bar.

Fits, batched twins, ``condition_many``, simulated trials and SBC show a progress bar (``tqdm.auto``:
a widget in Jupyter, a text bar in a terminal) when it helps and stay silent where it would only
clutter a log. Who decides, first match wins:

1. the step's own argument (``bt.fit(..., progressbar=False)``);
2. :func:`options` (``bt.options(progress=False)``, for the session or in a ``with`` block);
3. the environment variable ``BAYESTWIN_PROGRESS`` (``1``/``true``/``on`` or ``0``/``false``/``off``);
4. off when the variable ``CI`` is set (continuous integration), on in a Jupyter kernel or when
   standard error is a terminal, off otherwise (a redirected log, a batch job).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from contextlib import contextmanager

__all__ = ["options", "progress_enabled", "progress_bar", "quiet_pymc"]

_OPTIONS: dict = {"progress": None}
_TRUE = {"1", "true", "on", "yes"}
_FALSE = {"0", "false", "off", "no"}


class options:  # noqa: N801 - used like a function, as xarray.set_options and numpy.printoptions are
    """Set package options for the session, or within a ``with`` block only.

    Parameters
    ----------
    progress
        ``True`` or ``False`` to show or hide progress bars; ``None`` to decide from the
        environment again (see the module's documentation).

    Examples
    --------
    >>> import bayestwin as bt
    >>> with bt.options(progress=False):
    ...     pass  # no progress bars in here
    >>> _ = bt.options(progress=None)  # the default again
    """

    def __init__(self, *, progress: bool | None = None):
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"options(progress=...) takes True, False or None, not {progress!r}")
        self._old = dict(_OPTIONS)
        _OPTIONS["progress"] = progress

    def __enter__(self) -> options:
        return self

    def __exit__(self, *exc) -> None:
        _OPTIONS.update(self._old)

    def __repr__(self) -> str:
        return f"bayestwin.options(progress={_OPTIONS['progress']!r})"


def _from_environment() -> bool | None:
    value = os.environ.get("BAYESTWIN_PROGRESS")
    if value is None or not value.strip():
        return None
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"BAYESTWIN_PROGRESS must be one of 1, true, on, 0, false, off; not {value!r}")


def _in_jupyter() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    ip = shell.get_ipython()
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def progress_enabled(explicit: bool | None = None) -> bool:
    """Whether a step shows its progress bar (``explicit``: the step's own argument, if given)."""
    if explicit is not None:
        return bool(explicit)
    if _OPTIONS["progress"] is not None:
        return _OPTIONS["progress"]
    env = _from_environment()
    if env is not None:
        return env
    if os.environ.get("CI"):
        return False
    return _in_jupyter() or sys.stderr.isatty()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", show=None):
    """A ``tqdm.auto`` bar over ``iterable`` (or a manual one of ``total`` steps), or a silent
    stand-in with the same ``update``/``close`` methods when bars are off (:func:`progress_enabled`)."""
    if progress_enabled(show):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return _Silent(iterable)


class _Silent:
    def __init__(self, iterable):
        self._it = iterable

    def __iter__(self):
        return iter(self._it if self._it is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


@contextmanager
def quiet_pymc():
    """PyMC's forward sampling says ``Sampling: [...]`` at INFO level each call; bayestwin draws
    from the prior for its own checks (fit advice, predictive checks, SBC), where that line only
    confuses. Within the block it is not said; warnings still are."""
    log = logging.getLogger("pymc.sampling.forward")
    old = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(old)
