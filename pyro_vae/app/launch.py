"""The ``pyro-vae`` program: the command line's imports (torch, Pyro, ...) happen inside, so
Ctrl-C during start-up ends it with one line and status 130 like Ctrl-C later on; on POSIX the
command runs in a child process watched by :mod:`pyro_vae.app.supervisor`, so that a crash in
native code is one line too."""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130
EXIT_USER_ERROR = 2


def _out_of_memory(when: str = "while loading torch and Pyro") -> None:
    """End a start-up that ran out of memory with one line and status 2, at once: the
    interpreter's own clean-up would meet the same limit and print its traceback."""
    print(
        f"pyro-vae: error: out of memory {when}: the memory this process may use "
        "(ulimit -v) is below what torch and Pyro need",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_USER_ERROR)


def _short_of_memory(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it arose from, is the memory running out: a
    ``MemoryError``, or a shared library (torch's, NumPy's) that could not be mapped."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, MemoryError) or any(
            words in text for words in ("failed to map segment", "Cannot allocate memory")
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def run() -> None:
    """Import the command line and run it; exit with its status.

    While the imports run, SIGINT is recorded as well as raised: an import that swallows the
    ``KeyboardInterrupt`` (a bare ``except:`` in a dependency) cannot make the program go on as
    if Ctrl-C had not been pressed."""
    try:
        from pyro_vae.app.supervisor import run_child, supervised

        if supervised():
            sys.exit(run_child(sys.argv[1:]))
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except MemoryError:
        _out_of_memory()
    interrupted = []
    unraisable_hook = sys.unraisablehook

    def on_interrupt(signum: int, frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    def quiet_interrupts(unraisable: object) -> None:
        # Ctrl-C inside a callback Python cannot raise from (an import lock's) is printed as
        # "Exception ignored in ...": it is recorded above, so say nothing of it here
        if not isinstance(getattr(unraisable, "exc_value", None), KeyboardInterrupt):
            unraisable_hook(unraisable)

    signal.signal(signal.SIGINT, on_interrupt)
    sys.unraisablehook = quiet_interrupts
    try:
        from pyro_vae.app.cli import main
    except KeyboardInterrupt:
        interrupted.append(signal.SIGINT)
    except (MemoryError, ImportError, OSError) as exc:
        if not _short_of_memory(exc):
            raise
        _out_of_memory()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = unraisable_hook
    if interrupted:
        print("pyro-vae: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    try:
        sys.exit(main())
    except MemoryError:  # before the command's own handler runs: building the parser
        _out_of_memory("while reading the command line")
    finally:  # however it ended, in Python: a watched parent learns the command finished
        from pyro_vae.util import child_report

        child_report.finished()
