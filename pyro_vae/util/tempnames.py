"""Names of the files a process writes for a moment, recognisable as its own.

A temporary file (the new content of ``NAME`` before it is renamed onto ``NAME``) is called
``.NAME.pv-HOST-PID-NONCE-N.tmp``: ``HOST`` six hex digits of the machine's name, ``PID`` the
writer's process id, ``NONCE`` eight hex digits drawn once per process and ``N`` a counter.
:func:`sweep` removes only such files, and only those of a writer that is gone: one of this
machine whose process no longer exists, or whose pid is this process's but whose nonce is not
(its pid was reused). A file of another name, however much it looks like a temporary file, is
never removed, nor one written by a process on another machine of a shared file system.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".tmp"
_PATTERN = re.compile(
    r"^\.(?P<name>.+)\.pv-(?P<host>[0-9a-f]{6})-(?P<pid>\d{1,10})-"
    r"(?P<nonce>[0-9a-f]{8})-(?P<count>\d+)\.tmp$"
)
_counter = itertools.count()
_token: Writer | None = None


@dataclass(frozen=True)
class Writer:
    """A writing process: its machine's tag, its pid and its nonce."""

    host: str
    pid: int
    nonce: str

    def gone(self) -> bool:
        """Whether this writer's process has ended (only decidable on this machine)."""
        me = this_process()
        if self.host != me.host:
            return False
        if self.pid == me.pid:
            return self.nonce != me.nonce
        return not pid_alive(self.pid)


def host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def this_process() -> Writer:
    """This process as a :class:`Writer` (a forked child draws a nonce of its own)."""
    global _token
    if _token is None or _token.pid != os.getpid():
        _token = Writer(host_tag(), os.getpid(), secrets.token_hex(4))
    return _token


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's), or we cannot tell: keep its files
    return True


def temporary_name(target_name: str, name_max: int = 255) -> str:
    """The name of a new temporary file for ``target_name`` (shortened to fit ``name_max``)."""
    me = this_process()
    middle = f".pv-{me.host}-{me.pid}-{me.nonce}-{next(_counter)}"
    room = max(name_max - len("." + middle + SUFFIX), 1)
    return f".{target_name[:room]}{middle}{SUFFIX}"


def writer_of(entry: str) -> Writer | None:
    """The writer of a temporary file named ``entry``, or ``None`` if it is not one of ours."""
    match = _PATTERN.match(entry)
    if match is None:
        return None
    return Writer(match["host"], int(match["pid"]), match["nonce"])


def sweep(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files in ``folder`` that a writer which is gone left behind;
    return their names. Files of live writers and files of any other name stay."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        writer = writer_of(entry)
        if writer is None or not writer.gone():
            continue
        try:
            (Path(folder) / entry).unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed
