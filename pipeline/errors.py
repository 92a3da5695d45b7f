"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # only a write meets these
ACCESS_FAULTS = (errno.EACCES, errno.EPERM)  # a read can meet these too


class UserError(Exception):
    """Bad input from the user (names, paths, shapes, values): reported without a traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (a DataLoader worker's own, `user_message`), for wrapping library
    errors into a one-line UserError."""
    text = user_message(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def user_message(err: BaseException) -> str:
    """The message for the user. An error raised in a DataLoader worker reaches the main process re-raised by torch
    with the worker's traceback as its message ("Caught UserError in DataLoader worker process 0. Original
    Traceback ... pipeline.errors.UserError: MESSAGE"): that is MESSAGE again."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """A write inside the block that the filesystem refuses (full, over quota, read-only, not permitted) becomes a
    one-line UserError naming `path`; other OSErrors pass, not being the user's to fix."""
    try:
        yield
    except OSError as err:
        if err.errno not in WRITE_FAULTS + ACCESS_FAULTS:
            raise
        raise UserError(f"cannot write {path}: {err.strerror}") from err


def filesystem_fault(err: OSError) -> UserError | None:
    """A filesystem refusal met outside kdpipe's own write helpers (inside zarr, a mkdir), named by the path the
    OSError carries: "cannot write" where only a write fails so, "cannot access" for a refused permission."""
    path = err.filename or "a file"
    if err.errno in WRITE_FAULTS:
        return UserError(f"cannot write {path}: {err.strerror}")
    if err.errno in ACCESS_FAULTS:
        return UserError(f"cannot access {path}: {err.strerror}")
    return None
