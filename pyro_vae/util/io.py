"""Atomic writes: a reader never sees a half-written file, and a failed write is one clear line.

:func:`atomic_path` writes one file through a temporary file beside it
(``.NAME.pv-HOST-PID-NONCE-N.tmp``, :mod:`pyro_vae.util.tempnames`), renamed onto the file when the
block succeeds; :func:`atomic_files` writes several that way and renames them together at the
end, so a failure while writing any of them (a full disk, say) leaves every earlier version in
place: the folder keeps its last complete set. The temporary files are removed on every exit,
those a killed writer left are removed by the next write into the folder, and SIGINT/SIGTERM
are held back while the set is written: a signal that arrives meanwhile discards the new set
(the previous files stay whole) and is delivered once the temporary files are gone.

A write that fails for a reason of the file system (full disk, quota, permission, read-only
file system, ...) raises :class:`WriteError`, whose message names the file and the reason in
words; libraries that report such failures as their own exceptions (``torch.save``'s
``RuntimeError``, safetensors' ``SafetensorError``, a netCDF writer's error) are recognized by
the :class:`OSError` they chain, the ``(os error N)`` they quote, or, failing both, by a file
system left with less than :data:`LOW_SPACE_BYTES` free.
"""

from __future__ import annotations

import errno
import faulthandler
import json
import os
import re
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from pyro_vae.util import tempnames
from pyro_vae.util.errors import PyroVAEError

DEFAULT_NAME_MAX = 255

DEFAULT_FILE_MODE = 0o666
#: Free space below which a library's unexplained write failure is read as a full disk.
LOW_SPACE_BYTES = 1 << 20
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")
_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "no such file or folder",
    errno.EISDIR: "it is a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large",
    errno.EIO: "input/output error",
}


class WriteError(PyroVAEError, OSError):
    """A file could not be written; its previous version, if any, is unchanged. ``errno`` is
    the operating system's code (``errno.ENOSPC`` for a full disk)."""

    def __init__(self, message: str, code: int | None = None, why: str | None = None) -> None:
        super().__init__(message)
        self.errno = code
        self.why = why  # the reason in words, when it is more than the errno's

    def __str__(self) -> str:
        return self.args[0]


def reason(code: int | None, fallback: str = "") -> str:
    """The errno ``code`` in lower-case words (``"no space left on device"``)."""
    if code in _REASONS:
        return _REASONS[code]
    if code is not None:
        return os.strerror(code).lower()
    return fallback or "unknown error"


def describe_os_error(exc: OSError) -> str:
    """An :class:`OSError` as one line without Python's ``[Errno N]`` prefix:
    ``"PATH: reason"``."""
    words = reason(exc.errno, exc.strerror or str(exc))
    return f"{exc.filename}: {words}" if exc.filename else words


def _chained_os_error(exc: BaseException) -> OSError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = current.__cause__ or current.__context__
    return None


def _free_bytes(folder: Path) -> int | None:
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def failure_code(exc: BaseException, folder: Path) -> int | None:
    """The errno behind a failed write, or ``None`` when it was no failure of the file system
    (a bug or an error of the data, re-raised as it is)."""
    if isinstance(exc, WriteError):
        return exc.errno
    found = _chained_os_error(exc)
    if found is not None:
        return found.errno
    quoted = _OS_ERROR_IN_TEXT.search(str(exc))
    if quoted:
        return int(quoted.group(1))
    free = _free_bytes(folder)
    if free is not None and free < LOW_SPACE_BYTES:
        return errno.ENOSPC
    return None


def write_failure(path: Path, exc: BaseException) -> WriteError | None:
    """``exc``, raised while writing ``path``, as a one-line :class:`WriteError` (``None``: not
    a failure of the file system)."""
    code = failure_code(exc, path.parent)
    if code is None:
        return None
    why = getattr(exc, "why", None) or reason(code)
    return WriteError(f"cannot write {path}: {why}", code, why)


@contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM back for the block, and deliver them after; yield the list of
    the signals caught so far (the block may look at it).

    Python runs a signal's handler between two of its instructions, whenever the signal
    arrived, even inside a library's callback into Python (``torch.save`` writing to a Python
    file), where an exception would leave the library's writer in a broken state; so the
    handlers themselves are replaced by a recorder for the block, and a signal recorded is
    raised again once they are back. A second SIGTERM meanwhile ends the process at once."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {}

    def record(num: int, frame: Any) -> None:
        if num == signal.SIGTERM and num in caught:
            signal.signal(num, signal.SIG_DFL)
            signal.raise_signal(num)
        caught.append(num)

    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: a handler Python did not install, left alone
            previous[signum] = signal.signal(signum, record)
    try:
        yield caught
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicFiles:
    """Files written to temporary paths and renamed onto their targets together by
    :meth:`commit`; made by :func:`atomic_files`."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self._swept: set[Path] = set()

    @contextmanager
    def path(self, target: str | os.PathLike) -> Iterator[Path]:
        """A temporary path to write ``target``'s new content to; a failure of the file system
        inside the block becomes a :class:`WriteError` naming ``target``."""
        target = Path(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.parent not in self._swept:  # what a killed writer left here
                self._swept.add(target.parent)
                tempnames.sweep(target.parent)
            tmp = target.parent / tempnames.temporary_name(target.name, _name_max(target.parent))
            self._pending.append((tmp, target))  # before it exists: discard() removes it
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            raise WriteError(
                f"cannot write {target}: {reason(exc.errno, str(exc))}", exc.errno
            ) from None
        try:
            yield tmp
        except Exception as exc:
            interruption = _interruption(exc)
            if interruption is not None:  # a library's error about a signal's exception
                raise interruption from None
            failure = write_failure(target, exc)  # a nested writer's names its temporary file
            if failure is None:
                raise
            raise failure from exc

    def write_text(self, target: str | os.PathLike, text: str) -> None:
        with self.path(target) as tmp:
            tmp.write_text(text, encoding="utf-8")

    def write_json(self, target: str | os.PathLike, obj: Any) -> None:
        self.write_text(target, json.dumps(obj, indent=2) + "\n")

    def commit(self) -> None:
        """Rename every temporary file onto its target, in the order they were opened."""
        mode = DEFAULT_FILE_MODE & ~_umask()
        with _signals_held():  # nested in atomic_files' hold, or on its own
            while self._pending:
                tmp, target = self._pending[0]
                try:
                    os.chmod(tmp, mode)
                    os.replace(tmp, target)
                except OSError as exc:
                    raise WriteError(
                        f"cannot write {target}: {reason(exc.errno, str(exc))}", exc.errno
                    ) from None
                self._pending.pop(0)

    def discard(self) -> None:
        """Remove the temporary files not renamed yet."""
        for tmp, _ in self._pending:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        self._pending.clear()


def _interruption(exc: BaseException) -> BaseException | None:
    """The interruption (``KeyboardInterrupt``, SIGTERM's exception: anything not an
    ``Exception``) that ``exc`` was raised while handling: a library whose callback into
    Python was interrupted (``torch.save`` writing to a Python file) reports its broken
    writer instead ("unexpected pos")."""
    seen: set[int] = set()
    current: BaseException | None = exc.__cause__ or exc.__context__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if not isinstance(current, Exception):
            return current
        current = current.__cause__ or current.__context__
    return None


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return DEFAULT_NAME_MAX


@contextmanager
def atomic_files(hold_signals: bool = True) -> Iterator[AtomicFiles]:
    """Write several files as one set: each through :meth:`AtomicFiles.path` (or
    ``write_json`` / ``write_text``), all renamed onto their targets when the block succeeds,
    none when it fails; the temporary files never outlive the block. SIGINT and SIGTERM are
    held back while the set is written: one that arrives meanwhile discards the set (the
    previous files stay as they were) and is delivered when the block ends. With
    ``hold_signals=False`` (a long download, say) they interrupt the block at once, and are
    held only while the set is renamed."""
    files = AtomicFiles()
    with _signals_held() if hold_signals else nullcontext([]) as caught:
        try:
            yield files
            if not caught:
                files.commit()
        finally:
            files.discard()


@contextmanager
def atomic_path(path: str | os.PathLike, hold_signals: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The file ends with the permissions a plain ``open(path, "w")`` would give it (0666 less the
    umask), not the owner-only 0600 it is created with. A failure of the file system
    (see :func:`write_failure`) raises :class:`WriteError`; other exceptions pass unchanged.
    ``hold_signals`` is :func:`atomic_files`'.
    """
    with atomic_files(hold_signals) as files, files.path(path) as tmp:
        yield tmp


def write_in_child(write: Callable[[], None], path: str | os.PathLike) -> None:
    """Run ``write()``, which writes ``path``, in a forked child process, so that a writer
    that crashes the process (h5py, writing a netCDF file onto a full disk, can die of a
    segmentation fault) ends in a :class:`WriteError` here instead. The child inherits every
    object, so nothing is copied; where ``fork`` does not exist ``write()`` runs here.

    :raises WriteError: if the child fails for a reason of the file system, or dies.
    """
    path = Path(path)
    if not hasattr(os, "fork"):
        write()
        return
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
        pid = os.fork()
    if pid == 0:  # the child: report and leave without running the parent's clean-up
        os.close(read_end)
        status = 0
        try:  # the library's own complaints (h5py prints from destructors) stay out of sight
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            faulthandler.disable()  # a crash is reported by the parent, not dumped here
            write()
        except BaseException as exc:
            code = failure_code(exc, path.parent)
            report = f"{'' if code is None else code}\n{type(exc).__name__}: {exc}"
            os.write(write_end, report.encode("utf-8", "replace")[:4096])
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as reader:
            report = reader.read().decode("utf-8", "replace")
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if status == 0:
        return
    code_text, _, message = report.partition("\n")
    if code_text:
        raise WriteError(f"cannot write {path}: {reason(int(code_text))}", int(code_text))
    if os.WIFSIGNALED(status):
        free = _free_bytes(path.parent)
        code = errno.ENOSPC if free is not None and free < LOW_SPACE_BYTES else errno.EIO
        why = (
            reason(code)
            if code == errno.ENOSPC
            else (f"the writer died of signal {os.WTERMSIG(status)}")
        )
        raise WriteError(f"cannot write {path}: {why}", code, why)
    raise RuntimeError(f"writing {path} failed: {message or 'no message'}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_files() as files:
        files.write_json(path, obj)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_files() as files:
        files.write_text(path, text)
