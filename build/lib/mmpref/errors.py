"""Errors a user can fix, and how the ``mmpref`` command reports any error in one line.

Every error the package raises for bad input derives from :class:`MmprefError`; its message names the file, line
or config key and says what to do. The command prints ``mmpref <command>: <message>`` and exits 1; the traceback is
shown only with ``--debug`` or ``MMPREF_DEBUG=1``. Errors that come from the operating system (a full disk, a
read-only folder) are translated by :func:`describe` the same way, naming the path.

This module imports nothing from mmpref: every layer may raise these.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

DEBUG_ENV = "MMPREF_DEBUG"


class MmprefError(Exception):
    """Bad input or a state the user can fix; the message is complete on its own (one line)."""


class ConfigError(MmprefError, ValueError):
    """A bad configuration; the message names the file and the dotted key."""


class DataError(MmprefError, ValueError):
    """Unreadable or invalid data; the message names the file and the line (or row)."""


class SourceError(MmprefError, FileNotFoundError):
    """A model, tokenizer or dataset that cannot be loaded from where the config points; names the key."""


class RunFolderError(MmprefError):
    """An output folder that holds something else, or another run's state (never mixed, never wiped)."""


class CheckpointError(MmprefError):
    """No intact checkpoint to resume from, or one that holds something unsafe to load."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def writing_to(path: str | os.PathLike) -> Iterator[None]:
    """Run a command's work that writes into ``path``: an OS error that carries no file name (ENOSPC from a
    write) gets ``path`` as its file name, so that :func:`describe` says where the disk is full."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None and not isinstance(e, MmprefError):
            e.filename = str(path)
        raise


def mount_point(path: str | os.PathLike) -> str:
    """The mount point holding ``path`` (the "device" a full disk is reported as)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def describe(err: BaseException) -> str:
    """One line for any exception: package errors as they are, OS errors with their path, the rest by type."""
    if isinstance(err, MmprefError):
        return " ".join(str(err).split("\n"))
    if isinstance(err, OSError) and err.errno is not None:
        return _describe_os_error(err)
    if isinstance(err, (ValueError, FileNotFoundError)) and str(err):
        return " ".join(str(err).split("\n"))
    return (f"unexpected {type(err).__name__}: {' '.join(str(err).split())} (rerun with --debug or "
            f"{DEBUG_ENV}=1 for the traceback, and please report it)")


def _describe_os_error(err: OSError) -> str:
    path = err.filename
    where = f" {path}" if path else ""
    if err.errno == errno.ENOSPC:
        device = mount_point(path) if path else "the output device"
        return f"no space left on {device} (writing{where}); free some space or choose an output folder elsewhere"
    if err.errno == errno.EROFS:
        return f"cannot write{where}: read-only file system; choose a folder you can write to"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where}; check its permissions or choose another folder"
    if err.errno == errno.ENOENT:
        return f"no such file or folder:{where}"
    return f"{err.strerror or err}:{where}"
