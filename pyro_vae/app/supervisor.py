"""The ``pyro-vae`` program watched from a second process, so that a fatal signal is one line.

A crash in native code (``os.abort()``, a segmentation fault in a C extension the user's model
calls, the kernel's out-of-memory killer) ends a Python process without running any of its
handlers: nothing could print the command line's one line. So on POSIX the program runs its
command in a child process (the same interpreter, ``python -m pyro_vae`` with the same
arguments, the same standard streams) with :mod:`faulthandler` writing the Python stack of a
crash to a temporary file, and this parent process, which imports neither torch nor Pyro,
waits for it:

- the child's own exit status is the program's (every error the child can handle it reports
  itself, in its one line), once the child has said that its command finished
  (:mod:`pyro_vae.util.child_report`); a child that ends with status 0 without saying so
  (``os._exit(0)`` in the user's code) becomes one line and exit status 2, and after any end
  without it the child's run folder lock is removed, and a run folder it created, if no epoch
  was saved in it;
- a child killed by a signal becomes one line: the user's file and line where it happened when
  the innermost frame of the user's own code on the crashing thread is known (exit status 2, as
  for any other failure of the user's code), else the frame where it happened and exit status
  128 + the signal; SIGKILL (nothing can be dumped) names the likely cause, the memory;
- SIGTERM, SIGHUP and SIGINT sent to the parent by another process (``kill``, ``timeout``, a
  test) are passed on to the child, which handles them as the program always has (143, 130).
  A terminal's Ctrl-C already reaches the child (the whole foreground process group gets it)
  and is not sent a second time: :func:`signal.sigtimedwait` tells the two apart by the
  sender's pid, which is 0 for a signal the kernel raised.

Under torchrun (which watches and reports its ranks itself), off POSIX, and inside the child,
the command runs in the process itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile

from pyro_vae.util import child_report
from pyro_vae.util.usercode import is_user_file

#: names the child's crash file; set by the parent, read (and removed) by the child
FAULT_FILE_ENV = "PYRO_VAE_FAULT_FILE"
EXIT_USER_ERROR = 2
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
_FRAME = re.compile(r'^\s+File "(?P<file>.+)", line (?P<line>\d+) in (?P<function>.+)$')
_TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "GROUP_RANK")


def supervised() -> bool:
    """Whether the command should run in a watched child process (see the module docstring);
    in the child itself, turn :mod:`faulthandler` on into the parent's file."""
    fault_file = os.environ.pop(FAULT_FILE_ENV, None)
    if fault_file is not None:
        import faulthandler

        child_report.adopt(os.environ)
        faulthandler.enable(open(fault_file, "w"), all_threads=True)
        return False
    return (
        os.name == "posix"
        and hasattr(signal, "sigtimedwait")
        and not any(name in os.environ for name in _TORCHRUN_ENV)
    )


def run_child(argv: list[str]) -> int:
    """Run ``python -m pyro_vae ARGV`` as a watched child; return the program's exit status."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    handle, fault_file = tempfile.mkstemp(prefix="pyro-vae-fault-", suffix=".txt")
    os.close(handle)
    handle, report_file = tempfile.mkstemp(prefix="pyro-vae-report-", suffix=".txt")
    os.close(handle)
    early: list[int] = []
    watched = [s for s in FORWARDED if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, lambda signum, frame: early.append(signum)) for s in watched}
    try:
        child = subprocess.Popen(
            [sys.executable, *interpreter_options(argv), "-m", "pyro_vae", *argv],
            env={
                **os.environ,
                FAULT_FILE_ENV: fault_file,
                child_report.REPORT_FILE_ENV: report_file,
            },
        )
        status = _wait(child, watched, early)
        finished, records = child_report.read_report(report_file)
        if not finished:  # its own clean-up did not run
            child_report.remove_leftovers(records)
        return _exit_status(status, command, fault_file, finished)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for path in (fault_file, report_file):
            with contextlib.suppress(OSError):
                os.unlink(path)


def interpreter_options(argv: list[str]) -> list[str]:
    """The interpreter's own options this process was started with (``-X importtime``, ``-W``,
    ...; read from :data:`sys.orig_argv`), which the child gets too: what precedes the program
    (``-m pyro_vae``, or the script's path) and its arguments ``argv``."""
    given = list(getattr(sys, "orig_argv", []))
    if len(given) < len(argv) + 2 or given[len(given) - len(argv) :] != argv:
        return []
    before = given[1 : len(given) - len(argv)]
    if len(before) >= 2 and before[-2] == "-m":
        return before[:-2]
    return before[:-1]


def _wait(child: subprocess.Popen, watched: list[int], early: list[int]) -> int:
    waited = {*watched, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    forwarded = 0
    try:
        while (status := child.poll()) is None:
            # arrived before they were blocked (their handler may run only now): passed on,
            # whoever sent them
            for signum in early[forwarded:]:
                child.send_signal(signum)
            forwarded = len(early)
            info = signal.sigtimedwait(waited, 0.5)
            if info is not None and info.si_signo != signal.SIGCHLD and info.si_pid != 0:
                child.send_signal(info.si_signo)
        return status
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, waited)


def _exit_status(status: int, command: str | None, fault_file: str, finished: bool) -> int:
    prefix = f"pyro-vae {command}" if command else "pyro-vae"
    if status == 0 and not finished:
        print(
            f"{prefix}: error: the process ended with status 0 before the command finished, "
            "without a word (os._exit in a model, guide, factory or data function?)",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    if status >= 0:
        return status
    signum = -status
    if signum in (signal.SIGTERM, signal.SIGHUP):
        print(f"{prefix}: terminated", file=sys.stderr)
        return 128 + signum
    if signum == signal.SIGINT:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 128 + signum
    line, at_fault = describe_crash(signum, read_crash(fault_file))
    print(f"{prefix}: error: {line}", file=sys.stderr)
    return EXIT_USER_ERROR if at_fault else 128 + signum


def read_crash(fault_file: str, limit: int = 1 << 20) -> str:
    """What :mod:`faulthandler` wrote (at most ``limit`` bytes; empty when nothing was)."""
    try:
        with open(fault_file, "rb") as stream:
            return stream.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def describe_crash(signum: int, dump: str) -> tuple[str, bool]:
    """One line for a process killed by ``signum``, from its :mod:`faulthandler` ``dump``,
    and whether the user's own code was running (its innermost frame on the crashing thread)."""
    try:
        name = f"{signal.Signals(signum).name} ({signal.strsignal(signum)})"
    except ValueError:
        name = f"signal {signum}"
    if signum == signal.SIGKILL:
        return (
            f"the process was killed by {name}: nothing could report where; the system "
            "may have run out of memory (ask for less, or see --max-memory)",
            False,
        )
    frames = _crashing_frames(dump)
    for file, line, function in frames:
        if is_user_file(file):
            return (
                f"{file}:{line}: the process died of {name} in {function}, in the user's "
                "code (a model, guide, factory or data function)",
                True,
            )
    if frames:
        file, line, function = frames[0]
        return (
            f"the process died of {name} in {function} ({file}:{line}), outside the user's code",
            False,
        )
    return f"the process died of {name}", False


def _crashing_frames(dump: str) -> list[tuple[str, int, str]]:
    """The frames (innermost first) of the thread that crashed, from a faulthandler dump."""
    frames: list[tuple[str, int, str]] = []
    inside = False
    for text in dump.splitlines():
        if text.startswith(("Current thread", "Stack (most recent call first)")):
            inside, frames = True, []
        elif inside and (match := _FRAME.match(text)):
            frames.append((match["file"], int(match["line"]), match["function"].strip()))
        elif inside and text.strip() and not text.startswith(" "):
            inside = False
    return frames
