"""Time a request needs, estimated from its first pieces, against a bound.

A long computation (an evaluation of many particles, AIS of many steps) is split into pieces
of the same size (a particle chunk of a batch, an annealing step); :func:`work` announces how
many, :func:`piece_done` marks each. Under :func:`time_limit`, the time of the first pieces
is extrapolated to all of them, and a request whose estimate exceeds the bound is refused
with one line giving the estimate and how to go ahead, before it has run for long. The first
piece is timed apart from the others (it carries one-time costs: checks, probes, warm-up);
the estimate is the first piece plus the mean of the next ones times the rest. Outside
:func:`time_limit` nothing is measured or refused.

The clock is :data:`clock` (``time.perf_counter``), replaceable for tests.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyro_vae.util.errors import PyroVAEError

#: pieces after the first whose mean time gives the estimate
MEASURED_PIECES = 2
clock: Callable[[], float] = time.perf_counter


class TimeLimitError(PyroVAEError):
    """A request whose estimated time exceeds the bound of :func:`time_limit`."""


@dataclass(frozen=True)
class _Limit:
    seconds: float
    how: str


@dataclass
class _Work:
    total: int
    what: str
    limit: _Limit
    start: float
    unit: str = "pieces"
    done: int = 0
    first: float | None = None

    def piece(self) -> None:
        self.done += 1
        if self.done > 1 + MEASURED_PIECES or self.total <= self.done:
            return
        elapsed = clock() - self.start
        if self.done == 1:
            self.first = elapsed
            return
        rate = (elapsed - self.first) / (self.done - 1)
        estimate = self.first + rate * (self.total - 1)
        if estimate > self.limit.seconds:
            raise TimeLimitError(
                f"{self.what} would take about {format_seconds(estimate)} ({self.total:,} "
                f"{self.unit} of about {format_seconds(rate)}), more than the "
                f"{format_seconds(self.limit.seconds)} allowed: to go ahead, "
                f"{self.limit.how} {math.ceil(estimate * 1.25)}, or ask for less"
            )


_LIMIT: contextvars.ContextVar[_Limit | None] = contextvars.ContextVar(
    "pyro_vae_time_limit", default=None
)
_WORK: contextvars.ContextVar[_Work | None] = contextvars.ContextVar("pyro_vae_work", default=None)


def format_seconds(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps it at least 1 (``"2.5 h"``)."""
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


@contextmanager
def time_limit(
    seconds: float | None, how: str = "give time_limit(seconds) a bound of"
) -> Iterator[None]:
    """Refuse the requests of the block whose estimated time exceeds ``seconds`` (``None``:
    no bound); ``how`` completes the refusal's advice (the command line names its option)."""
    token = _LIMIT.set(None if seconds is None else _Limit(float(seconds), how))
    try:
        yield
    finally:
        _LIMIT.reset(token)


@contextmanager
def work(total: int, what: str, unit: str = "pieces") -> Iterator[None]:
    """A request of ``total`` pieces (named ``unit`` in its refusal), described by ``what``;
    inside a request already open it is part of that one (which counts its pieces)."""
    limit = _LIMIT.get()
    if limit is None or _WORK.get() is not None:
        yield
        return
    token = _WORK.set(_Work(max(int(total), 1), what, limit, clock(), unit))
    try:
        yield
    finally:
        _WORK.reset(token)


@contextmanager
def aside() -> Iterator[None]:
    """Run the block outside the open request: its pieces (an evaluation between two epochs
    of a training) are not that request's, and a request it opens is measured on its own."""
    token = _WORK.set(None)
    try:
        yield
    finally:
        _WORK.reset(token)


def piece_done() -> None:
    """Mark a piece of the open request done (see the module docstring)."""
    current = _WORK.get()
    if current is not None:
        current.piece()


def num_batches(source: Any, batch_size: int, *args: Any) -> int:
    """The batches of ``batch_size`` a :mod:`~pyro_vae.data.batches` source gives (its ``steps``;
    1 for a loader without a length)."""
    try:
        return source.steps(batch_size, *args)
    except TypeError:
        return 1
