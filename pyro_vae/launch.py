"""The ``pyro-vae`` program: the command line's imports (torch, Pyro, ...) happen inside, so
Ctrl-C during start-up ends it with one line and status 130 like Ctrl-C later on."""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130


def run() -> None:
    """Import the command line and run it; exit with its status."""
    try:
        from .cli import main

        status = main()
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    sys.exit(status)
