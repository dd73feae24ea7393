"""The lock of a run folder: one writer at a time, and a ``.lock`` file that only its writer
removes."""

from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path
from typing import Any

from pyro_vae.runs.checkpoint import LOCK_FILE
from pyro_vae.util import child_report
from pyro_vae.util.errors import CheckpointError
from pyro_vae.util.io import reason
from pyro_vae.util.tempnames import Writer, this_process

_LOCK_LINE = re.compile(
    r"^pyro-vae-lock host=([0-9a-f]{6}) pid=(\d{1,10}) nonce=([0-9a-f]{8})"
    r"\n?$"
)
#: How long a ``.lock`` found empty is watched for the content its creator is about to write.
EMPTY_LOCK_WAIT_S = 1.0
_EMPTY_LOCK_POLL_S = 0.01


def lock_text(writer: Writer) -> str:
    """The content of the lock file that ``writer`` holds."""
    return f"pyro-vae-lock host={writer.host} pid={writer.pid} nonce={writer.nonce}\n"


def lock_holder(text: str) -> Writer | None:
    """The writer a lock file's ``text`` names, or ``None`` if it is not a pyro-vae lock."""
    match = _LOCK_LINE.match(text)
    return None if match is None else Writer(match[1], int(match[2]), match[3])


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode("ascii", "replace")
    except OSError:
        return ""


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_ino, mine.st_dev) == (there.st_ino, there.st_dev)


class RunFolderLock:
    """An exclusive :func:`fcntl.flock` lock on ``FOLDER/.lock``, a file that names its holder
    (``pyro-vae-lock host=... pid=... nonce=...``: the machine, the process and a number drawn
    once per process).

    The lock belongs to the open file, so the operating system releases it when the process
    ends however it ends: a ``.lock`` of this format left by a killed process is not a held
    lock, and the next writer takes it over. A ``.lock`` of any other content is not ours: it
    is refused and left as it is. :meth:`release` removes the file while still holding it, and
    only if it is the file this process locked; :meth:`acquire` checks that the file it locked
    is still the one at the path (and tries again if not), so a writer that opened the file
    just before it was removed cannot hold a lock that a third process also gets."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def _fail(self, exc: OSError, what: str) -> CheckpointError:
        return CheckpointError(
            f"cannot {what} the run folder {self.folder}: {reason(exc.errno, str(exc))}"
        )

    def _create(self) -> int | None:
        """A new lock file, locked and naming this process (``None``: one exists)."""
        import fcntl

        try:
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666
            )
        except FileExistsError:
            return None
        except OSError as exc:
            raise self._fail(exc, "write to") from None
        try:  # blocking: only a writer looking at the new file holds it, for a moment
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.pwrite(fd, lock_text(this_process()).encode("ascii"), 0)
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            os.close(fd)
            raise self._fail(
                exc,
                "lock"
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)
                else "write to",
            ) from None
        return fd

    def _take_over(self) -> int | None:
        """The existing lock file, locked and naming this process if its holder is gone
        (``None``: it went meanwhile, try again)."""
        import fcntl

        waited = 0.0
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise self._fail(exc, "write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(_read(fd))
                os.close(fd)
                pid = "unknown" if holder is None else holder.pid
                raise CheckpointError(
                    f"{self.folder} is being written by another process "
                    f"(pid {pid}): wait for it to finish, or choose "
                    "another run_dir=DIR"
                ) from None
            except OSError as exc:
                os.close(fd)
                raise self._fail(exc, "lock") from None
            if not _same_file(fd, self.path):
                os.close(fd)  # removed by its last holder meanwhile
                return None
            text = _read(fd)
            if lock_holder(text) is not None:
                break  # a lock of ours whose holder is gone (its flock went with it)
            os.close(fd)
            if text == "" and waited < EMPTY_LOCK_WAIT_S:  # its creator is writing it
                time.sleep(_EMPTY_LOCK_POLL_S)
                waited += _EMPTY_LOCK_POLL_S
                continue
            raise CheckpointError(
                f"{self.path} is not a pyro-vae lock file (it does not name a "
                "pyro-vae writer): it is left as it is; move it away if no "
                "other program uses it, or choose another run_dir=DIR"
            )
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, lock_text(this_process()).encode("ascii"), 0)
        except OSError as exc:
            os.close(fd)
            raise self._fail(exc, "write to") from None
        return fd

    def acquire(self) -> RunFolderLock:
        while self._fd is None:
            self._fd = self._create()
            if self._fd is None:
                self._fd = self._take_over()
        child_report.locked(self.path, lock_text(this_process()))  # for a watching parent
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):  # the file this process locked, and no other
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
