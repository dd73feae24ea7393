"""Failures of the user's code (a model factory, a data function, a model or guide), told in one
line that names the user's file and line.

The command line runs the user's code inside one handler (:func:`pyro_vae.app.cli.main`): an
exception whose innermost frame of the user's own code is known (outside this package, Python's
standard library and installed packages) is that code's failure, reported as
``FILE:LINE: ExceptionType: first line of its message``. A ``SystemExit`` raised there ends
the command like any other failure, with status 2, not with the status it asked for.
"""

from __future__ import annotations

import sysconfig
import traceback
from pathlib import Path
from types import TracebackType

from pyro_vae.util.errors import shorten

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the pyro_vae package
MESSAGE_LIMIT = 300


def _library_dirs() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    dirs = {PACKAGE_DIR}
    dirs.update(
        Path(paths[key]) for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths
    )
    return tuple(d.resolve() for d in dirs)


_LIBRARY = _library_dirs()


def is_user_file(filename: str) -> bool:
    """Whether ``filename`` is the user's code: a real file outside this package, Python's
    standard library and the installed packages."""
    if not filename or filename.startswith("<"):
        return False
    path = Path(filename).resolve()
    return not any(path.is_relative_to(d) for d in _LIBRARY)


def user_frame(tb: TracebackType | None) -> tuple[str, int] | None:
    """``(file, line)`` of the innermost frame of a traceback in the user's code."""
    found = None
    for frame, lineno in traceback.walk_tb(tb):
        if is_user_file(frame.f_code.co_filename):
            found = (frame.f_code.co_filename, lineno)
    return found


def defined_at(function: object) -> str:
    """``"FILE:LINE: "`` where the user's ``function`` is defined, or ``""`` for one that is not
    the user's code (a built-in, a function of an installed package)."""
    code = getattr(function, "__code__", None)
    if code is None or not is_user_file(code.co_filename):
        return ""
    return f"{code.co_filename}:{code.co_firstlineno}: "


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (Pyro appends shape tables), cut to
    :data:`MESSAGE_LIMIT` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return shorten(lines[0], MESSAGE_LIMIT) if lines else ""


def describe_failure(exc: BaseException) -> str | None:
    """One line for a failure of the user's code, or ``None`` if ``exc`` did not arise there.

    A ``SyntaxError`` names the file and line it points at; any other exception the innermost
    frame of the user's code it passed through."""
    if isinstance(exc, SyntaxError) and exc.filename and is_user_file(exc.filename):
        where = (exc.filename, exc.lineno or 0)
        message = exc.msg
    else:
        where = user_frame(exc.__traceback__)
        message = first_line(exc)
    if where is None:
        return None
    name = type(exc).__name__
    if isinstance(exc, SystemExit):
        return (
            f"{where[0]}:{where[1]}: the user's code raised SystemExit({exc.code!r}): a "
            "model, guide, factory or data function must return, not exit"
        )
    return f"{where[0]}:{where[1]}: {name}" + (f": {message}" if message else "")
