"""Memory estimates before allocation: a request that cannot fit is refused with its numbers.

A dose search over 2,000 regimens, ``ADDL = 10**9`` or ``virtual_cohort(n=10**9)`` would ask for
gigabytes and be killed by the kernel (or take the notebook down with it). Functions that
allocate in proportion to their arguments estimate the bytes first: work that can be split is
chunked to fit :func:`budget`; a *result* that cannot fit is refused with :class:`ResourceError`.
"""

from __future__ import annotations

import os

from bayestwin.errors import BayestwinError

ENV = "BAYESTWIN_MEMORY_LIMIT"  # bytes, or with a unit: "2GB", "512MB"


class ResourceError(BayestwinError, MemoryError):
    """A request that would need more memory than allowed: the message gives the estimate and the limit."""


def _parse(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    if t and t[-1] in scale:
        return int(float(t[:-1]) * scale[t[-1]])
    return int(float(t))


def budget() -> int:
    """Bytes one request may use: ``$BAYESTWIN_MEMORY_LIMIT``, else half the machine's memory."""
    if os.environ.get(ENV):
        try:
            return _parse(os.environ[ENV])
        except ValueError:
            raise ValueError(f"${ENV} must be a number of bytes (e.g. 2e9 or 2GB), not {os.environ[ENV]!r}") from None
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):  # not POSIX: a conservative 4 GB
        return 4 * 10**9


def check(nbytes: float, what: str, hint: str = "") -> None:
    """Refuse ``what`` if its estimated ``nbytes`` exceed :func:`budget`."""
    limit = budget()
    if nbytes > limit:
        raise ResourceError(
            f"{what} would need about {nbytes / 1e9:.3g} GB of memory, more than the {limit / 1e9:.3g} GB allowed "
            f"(${ENV} sets the limit){'; ' + hint if hint else ''}"
        )
