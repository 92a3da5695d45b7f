"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (names, paths, shapes, values): reported without a traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for wrapping library errors into a one-line UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
