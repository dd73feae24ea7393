"""Command line: ``pyro-vae train | sample | evaluate | classify | transfer | bdmc``.

``main`` maps arguments onto :class:`~pyro_vae.runs.TrainConfig` and calls library
functions that are just as usable from Python. A user error prints one line and exits with status 2.
``python -m pyro_vae`` runs the same ``main``; under torchrun
(``torchrun --nproc-per-node=N -m pyro_vae train ...``) ``train`` and ``evaluate`` run on every
rank and only rank 0 prints the summary. Ctrl-C ends a command with one line and status 130,
SIGTERM with one line and status 143; either way a run folder is left resumable.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from pyro_vae.app.flags import as_flags
from pyro_vae.app.options import EXIT_USER_ERROR
from pyro_vae.app.parser import build_parser
from pyro_vae.util.errors import PyroVAEError

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by the handler :func:`main` installs (a
    ``BaseException``, like ``KeyboardInterrupt``, so no ``except Exception`` swallows it)."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def _writer_rank() -> bool:
    """Whether this process is the only one or rank 0 under torchrun. The other ranks keep
    SIGTERM's default, ending at once when torchrun stops them: they write nothing, and a
    Python handler would wait for a blocked collective or rendezvous to return first."""
    import os

    try:
        return int(os.environ.get("WORLD_SIZE") or 1) <= 1 or int(os.environ.get("RANK") or 0) == 0
    except ValueError:
        return True


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user error (:class:`~pyro_vae.util.errors.PyroVAEError`, or an
    :class:`OSError` such as a full disk, or a failure of the user's code: a factory, data
    function, model or guide, named by its file and line, :mod:`pyro_vae.util.usercode`) prints one
    line and returns :data:`EXIT_USER_ERROR`; Ctrl-C returns 130 and SIGTERM 143 (handled
    while ``main`` runs, in the main thread, by the only process or torchrun's rank 0). Under
    torchrun, a rank ends here with its status (:func:`pyro_vae.util.distributed.shutdown`)."""
    from pyro_vae.util.distributed import shutdown

    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread() and _writer_rank():
        previous = signal.signal(signal.SIGTERM, _terminate)
    status = None
    try:
        status = _run(args)
        return status
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutdown(status)


def _run(args: argparse.Namespace) -> int:
    from pyro_vae.app.commands import COMMANDS
    from pyro_vae.util.budget import time_limit
    from pyro_vae.util.io import describe_os_error
    from pyro_vae.util.memory import allocation_message, is_allocation_failure, limit
    from pyro_vae.util.usercode import describe_failure, user_frame

    try:
        with (
            limit(getattr(args, "max_memory", None), how="--max-memory"),
            time_limit(getattr(args, "max_seconds", None), how="give --max-seconds"),
        ):
            return COMMANDS[args.command](args)
    except PyroVAEError as exc:
        if _writer_rank() or exc.per_rank:  # an error every rank meets: rank 0 says it
            print(f"pyro-vae {args.command}: error: {as_flags(_one_line(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        print(
            f"pyro-vae {args.command}: error: {_one_line(describe_os_error(exc))}", file=sys.stderr
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        where = user_frame(exc.__traceback__)
        inside = f" in {where[0]}:{where[1]}" if where else ""
        print(f"pyro-vae {args.command}: interrupted{inside}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (Exception, SystemExit) as exc:  # the user's code: a factory, data function, model
        if is_allocation_failure(exc):
            print(f"pyro-vae {args.command}: error: {allocation_message(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        line = describe_failure(exc)
        if line is None and isinstance(exc, SystemExit):
            line = f"SystemExit({exc.code!r}) raised while the command ran"
        if line is None:
            raise
        print(f"pyro-vae {args.command}: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Terminated:
        print(f"pyro-vae {args.command}: terminated", file=sys.stderr)
        return EXIT_TERMINATED


if __name__ == "__main__":
    sys.exit(main())
