"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""

from __future__ import annotations

import contextlib
import errno
import re
import reprlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

WRITE_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # only a write meets these
ACCESS_FAULTS = (errno.EACCES, errno.EPERM)  # a read can meet these too


class UserError(Exception):
    """Bad input from the user (names, paths, shapes, values): reported without a traceback.

    Messages name options as command-line flags (`--student-layers`, `--views=K`, `--no-augment`); raised under the
    Python API they read as the keywords a caller passes (`student_layers=`, `views=K`, `augment=False`), under the
    command line (`flag_style`) as written.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(styled(message))


def styled(message: str) -> str:
    """The message with its options named as the caller passes them: flags under `flag_style`, else keywords."""
    return _OPTION_STYLE.get()(message)


def flags(message: str) -> str:
    """Options named as the command line's flags: as written, a value after a space (`--views 2`)."""
    return _FLAG.sub(lambda match: match[0].replace("=", " ", 1), message)


def keywords(message: str) -> str:
    """Options named as the Python API's keywords: each `--flag` of a config field becomes `field=`, `field=True`
    (a boolean; `--no-field`: `field=False`) or `field=VALUE` (`--field=VALUE`); a command line quoted in the
    message (`kdpipe extract --overwrite` in backticks or parentheses) stays one."""
    pieces = _COMMAND_LINE.split(message)  # odd pieces are quoted command lines
    return "".join(piece if i % 2 else _FLAG.sub(_keyword, piece) for i, piece in enumerate(pieces))


_OPTION_STYLE: ContextVar[Callable[[str], str]] = ContextVar("option_style", default=keywords)
_COMMAND_LINE = re.compile(r"(`kdpipe [^`]*`|\(kdpipe [^)]*\))")
_FLAG = re.compile(r"(?<![\w-])--(?P<no>no-)?(?P<name>[a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?:=(?P<value>[^\s`'\"]+))?")
_VALUE_END = ".,:;)"  # punctuation that ends a sentence or clause after a flag's value, not part of it


@contextlib.contextmanager
def flag_style() -> Iterator[None]:
    """User errors raised inside the block name options as flags: the command line's own."""
    token = _OPTION_STYLE.set(flags)
    try:
        yield
    finally:
        _OPTION_STYLE.reset(token)


def _keyword(match: re.Match) -> str:
    from .config import option_kinds  # config imports this module

    name, value = match["name"].replace("-", "_"), match["value"]
    kind = option_kinds().get(name)
    if kind is None:  # not an option of the API (`--config`, torchrun's `--nproc-per-node`)
        return match[0]
    if match["no"] and value is None:
        return f"{name}={False if kind is bool else None}"
    if kind is bool and value is None:
        return f"{name}=True"
    if value is None:  # `--methods: ...` names the option the message is about
        return name if match.string[match.end() : match.end() + 1] == ":" else f"{name}="
    stripped = value.rstrip(_VALUE_END)
    shown = stripped if kind in (int, float) or stripped.isupper() else repr(stripped)
    return f"{name}={shown}{value[len(stripped) :]}"


# How an error message shows a value it was given: a repr bounded in length and depth, so that a crafted value (a
# YAML of nested aliases expands to megabytes) cannot make the one `Error:` line huge.
_SHOWN = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxtuple, _SHOWN.maxset = 2, 4, 4, 4, 4
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 80, 80, 40


def shown(value: object) -> str:
    """`value` as an error message shows it: its repr, shortened (`...`) past a few items, levels or characters."""
    return _SHOWN.repr(value)


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
