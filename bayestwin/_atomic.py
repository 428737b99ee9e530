"""Safe outputs: atomic writes with ordinary permissions, no surprise overwrites, one writer at a time.

Every file bayestwin writes goes through :func:`write_file`: the content is written to a
temporary file in the same folder, flushed to disk, given the permissions a new file gets under
the user's umask (``tempfile.mkstemp`` makes 0600 files), and renamed over the target. A failure
at any point (a full disk, a kill) leaves the previous file or none, and the temporary file is
removed. :func:`check_target` refuses, before anything is written, to replace something that is
not an earlier output of the same kind; :func:`folder_lock` lets one process at a time write a
folder (an artifact, a store) and refuses the second at once.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from bayestwin.errors import BayestwinError


class OutputError(BayestwinError, OSError):
    """An output that cannot be written safely: it would replace another file, another process
    is writing the same place, or the disk refused (full, read-only); nothing was changed."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_target(path, *, is_ours: Callable[[Path], bool] | None = None, force: bool = False, what: str = "file"):
    """Refuse (:class:`OutputError`) to write ``path`` where that would replace something that is
    not a regular file, or a file ``is_ours`` does not recognise as an earlier output of the same
    kind (unless ``force``). Call it before computing or writing anything."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        if not path.parent.exists():
            raise OutputError(f"cannot write {path}: the folder {path.parent} does not exist")
        return
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path} exists and is not a regular file: not replacing it with the {what}")
    if force:
        return
    if is_ours is None or not is_ours(path):
        raise OutputError(
            f"{path} exists and is not an earlier {what}: not overwriting it (choose another path, or pass "
            "overwrite=True / --force to replace it)"
        )


def file_head(path, size: int = 4096) -> bytes:
    """The first ``size`` bytes of ``path`` (empty when it cannot be read): what the ``is_ours``
    recognisers of :func:`check_target` look at (a header, a generator mark, a PNG title)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def write_file(path, content: bytes | str | Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``content`` as bytes/text, or a function that writes the given
    temporary path. Raises :class:`OutputError` (temporary file removed, target untouched) when
    the disk refuses."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp)
    try:
        if callable(content):
            os.close(fd)
            fd = None
            content(tmp)
        else:
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            with os.fdopen(fd, "wb") as f:
                fd = None
                f.write(data)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as err:
        _cleanup(fd, tmp)
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG):
            raise OutputError(f"could not write {path}: {os.strerror(err.errno)}; nothing was changed") from None
        raise
    except BaseException:
        _cleanup(fd, tmp)
        raise
    return path


def _cleanup(fd, tmp: Path) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    tmp.unlink(missing_ok=True)


@contextmanager
def folder_lock(folder, what: str = "folder"):
    """Hold ``folder/.bayestwin.lock`` (``filelock``: released even if the process dies) while
    writing the folder; a second writer gets :class:`OutputError` at once, never a mix."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    lock = FileLock(str(folder / ".bayestwin.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputError(f"another process is writing the {what} {folder}: try again when it has finished") from None
    try:
        yield
    finally:
        lock.release()
