"""The exceptions that mean "the user's input is wrong" (shown without a traceback), and the failed writes that count
as such (no space, no permission: the output folder is the bad input)."""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(Exception):
    """Bad input: a params field, a data file, a model. The message names it and says what to do.

    The command line prints the message alone and exits with code 2.
    """


class GateFailed(Exception):
    """The quantized model missed the quality gate in `verify`; the report was still written."""


class NightlyFailed(Exception):
    """At least one model of the nightly failed or regressed; the message says which."""


# A write that fails with one of these is about the place written to (space, size limit, permissions), not a bug.
_WRITE_ERRORS = {
    errno.ENOSPC: "free disk space, or {elsewhere}",
    errno.EDQUOT: "free space within your quota, or {elsewhere}",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit, or {elsewhere}",
    errno.EACCES: "make it writable, or {elsewhere}",
    errno.EPERM: "make it writable, or {elsewhere}",
    errno.EROFS: "{elsewhere}, on a writable file system",
}


def is_write_error(exc: BaseException | None) -> bool:
    """An OSError from running out of space or permission while writing (see `write_error`)."""
    return isinstance(exc, OSError) and exc.errno in _WRITE_ERRORS


def write_error(exc: OSError, folder: str | Path, elsewhere: str) -> UserError:
    """A UserError naming the file (or, when the OS did not say, the folder being written) and what to do;
    `elsewhere` says how to write somewhere else, e.g. "set output_dir to another folder"."""
    target = repr(exc.filename) if exc.filename else f"under {str(folder)!r}"
    advice = _WRITE_ERRORS[exc.errno].format(elsewhere=elsewhere)
    return UserError(f"cannot write {target} ({exc.strerror or exc}): {advice[0].upper()}{advice[1:]}.")
