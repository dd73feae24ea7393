"""The timing harness shared by the benchmarks.

Several contenders (callables doing the same work in different ways) are measured side by side
in one process: after ``warmup`` untimed calls each, ``rounds`` rounds in which every contender
is timed once, the order rotating from round to round, so that a load that drifts over seconds
falls on all of them alike. Each measurement records CPU time (``time.process_time``; one
thread, see :func:`set_threads`) and wall time (``time.perf_counter``), divided by the calls it
made. Ratios are paired: the ratio of two contenders' times within each round, summarized by
the median with the minimum and maximum over the rounds.

The machine's load average is recorded when the measurements start and when they end; a load
above :data:`BUSY_LOAD` is reported as a warning, since the numbers then share the machine with
other work. Results are written as JSON atomically (a temporary file renamed over the target),
so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUSY_LOAD = 1.5  # one-minute load average above which a warning is printed


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number ≥ ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number ≥ {minimum}, got {value}")
        return value

    return parse


positive_int = at_least(1)
whole_int = at_least(0)


def parent_parser(
    rounds: int = 5, warmup: int = 1, threads: int | None = 1
) -> argparse.ArgumentParser:
    """The options every timing script shares: ``--rounds``, ``--warmup``, ``--seed``,
    ``--out`` and ``--threads`` (``threads=None``: torch's default); pass it in
    ``parents=[...]``."""
    p = argparse.ArgumentParser(add_help=False)
    group = p.add_argument_group("timing")
    group.add_argument(
        "--rounds", type=positive_int, default=rounds, help=f"interleaved rounds ({rounds})"
    )
    group.add_argument(
        "--warmup",
        type=whole_int,
        default=warmup,
        help=f"untimed calls of each contender before the rounds ({warmup})",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (0)")
    group.add_argument("--out", type=Path, help="write the result here as JSON")
    group.add_argument(
        "--threads",
        type=positive_int,
        default=threads,
        help=f"intra-op threads of torch ({threads or 'torch default'})",
    )
    return p


def check_out(parser: argparse.ArgumentParser, out: Path | None) -> None:
    """A usage error (exit 2) unless ``--out``'s folder exists."""
    if out is not None and not out.parent.is_dir():
        parser.error(f"--out: folder {str(out.parent)!r} does not exist")


def set_threads(threads: int | None) -> None:
    """``threads`` intra-op threads for torch (one: CPU time measures the work); None leaves
    torch's default."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)


@dataclass
class Clocks:
    """The two clocks read around each measurement; tests inject fakes."""

    cpu: Callable[[], float] = time.process_time
    wall: Callable[[], float] = time.perf_counter


def synced_clocks(sync: Callable[[], None]) -> Clocks:
    """Clocks that call ``sync()`` (e.g. ``torch.cuda.synchronize``) before each reading, so a
    measurement covers the device's queued work."""
    return Clocks(
        cpu=lambda: (sync(), time.process_time())[1], wall=lambda: (sync(), time.perf_counter())[1]
    )


@dataclass
class Timings:
    """Per contender, the CPU and wall seconds per call of each round, each round's order, the
    per-round change of every counter (per call) and the value of each contender's last call."""

    cpu: dict[str, list[float]] = field(default_factory=dict)
    wall: dict[str, list[float]] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)
    counts: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)

    def median(self, name: str, clock: str = "cpu") -> float:
        return statistics.median(getattr(self, clock)[name])


def rotated(names: Sequence[str], round_: int) -> list[str]:
    """``names`` starting at position ``round_ % len(names)``: the order of one round."""
    start = round_ % len(names)
    return list(names[start:]) + list(names[:start])


def calibrate(
    fn: Callable[[], Any],
    seconds: float,
    minimum: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> int:
    """How many calls of ``fn`` take about ``seconds`` (at least ``minimum``): the calls made in
    a quarter of ``seconds``, times four."""
    start, n = clock(), 0
    while clock() - start < seconds / 4:
        fn()
        n += 1
    return max(minimum, 4 * n)


def interleave(
    contenders: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 0,
    calls: int | Mapping[str, int] = 1,
    clocks: Clocks | None = None,
    before: Callable[[str, int], None] | None = None,
    counters: Mapping[str, Callable[[], float]] | None = None,
) -> Timings:
    """Time each contender once per round, ``rounds`` rounds in rotating order, after ``warmup``
    untimed calls each. A contender is called ``calls`` times per measurement (an int, or one
    per contender) and its times are divided by that; ``before(name, round_)``, when given,
    runs untimed before each measurement (to seed, or to swap what the contender calls);
    ``counters`` (name: reading, such as page faults) are read around each measurement like
    the clocks."""
    if not contenders:
        raise ValueError("contenders is empty")
    names = list(contenders)
    per = dict(calls) if isinstance(calls, Mapping) else dict.fromkeys(names, calls)
    if rounds < 1 or warmup < 0 or any(per.get(name, 0) < 1 for name in names):
        raise ValueError(
            f"rounds and calls must be ≥ 1 and warmup ≥ 0, got rounds={rounds}, "
            f"calls={calls}, warmup={warmup}"
        )
    clocks = clocks or Clocks()
    for name in names:
        for _ in range(warmup):
            if before is not None:
                before(name, -1)
            contenders[name]()
    counters = counters or {}
    timings = Timings(
        cpu={name: [] for name in names},
        wall={name: [] for name in names},
        counts={c: {name: [] for name in names} for c in counters},
    )
    for round_ in range(rounds):
        order = rotated(names, round_)
        timings.orders.append(order)
        for name in order:
            if before is not None:
                before(name, round_)
            counted = {c: read() for c, read in counters.items()}
            wall, cpu = clocks.wall(), clocks.cpu()
            for _ in range(per[name]):
                timings.last[name] = contenders[name]()
            cpu, wall = clocks.cpu() - cpu, clocks.wall() - wall
            for c, read in counters.items():
                timings.counts[c][name].append((read() - counted[c]) / per[name])
            timings.cpu[name].append(cpu / per[name])
            timings.wall[name].append(wall / per[name])
    return timings


def paired_ratio(top: Sequence[float], bottom: Sequence[float]) -> dict[str, Any]:
    """Per round ``top[r] / bottom[r]`` (times measured next to each other), with the median,
    minimum and maximum over the rounds."""
    if len(top) != len(bottom) or not top:
        raise ValueError(
            f"top and bottom must be of the same, non-zero length, got {len(top)} and {len(bottom)}"
        )
    per_round = [a / b if b > 0 else float("inf") for a, b in zip(top, bottom)]
    return {
        "median": statistics.median(per_round),
        "min": min(per_round),
        "max": max(per_round),
        "per_round": per_round,
    }


def ratios(timings: Timings, baseline: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Each contender's paired ratio to ``baseline``, on both clocks."""
    if baseline not in timings.cpu:
        raise ValueError(f"baseline {baseline!r} is not one of {sorted(timings.cpu)}")
    return {
        name: {
            clock: paired_ratio(getattr(timings, clock)[name], getattr(timings, clock)[baseline])
            for clock in ("cpu", "wall")
        }
        for name in timings.cpu
        if name != baseline
    }


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the system has none."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def warn_if_busy(load: list[float] | None, when: str, stream=None) -> bool:
    """Print one warning line if the one-minute load is above :data:`BUSY_LOAD`; True if so."""
    if load is None or load[0] <= BUSY_LOAD:
        return False
    print(
        f"warning: load average {load[0]:.2f} at {when} (above {BUSY_LOAD}): the timings "
        f"share the machine with other work",
        file=stream or sys.stderr,
    )
    return True


class Session:
    """One benchmark's measurements: the load at start and end, and the JSON report."""

    def __init__(self, load: Callable[[], list[float] | None] = load_average, stream=None):
        self._load, self._stream = load, stream
        self.load_start = load()
        warn_if_busy(self.load_start, "start", stream)
        self.load_end: list[float] | None = None

    def finish(self) -> None:
        self.load_end = self._load()
        warn_if_busy(self.load_end, "end", self._stream)

    def report(
        self, timings: Timings | None = None, baseline: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """``fields`` with the load averages and, given ``timings``, every contender's
        per-round and median seconds per call and (given ``baseline``) the paired ratios."""
        if self.load_end is None:
            self.finish()
        result = dict(fields)
        result["load_average"] = {"start": self.load_start, "end": self.load_end}
        if timings is not None:
            result["rounds"] = len(timings.orders)
            result["orders"] = timings.orders
            result["seconds_per_call"] = {
                clock: {
                    name: {"median": statistics.median(values), "per_round": values}
                    for name, values in getattr(timings, clock).items()
                }
                for clock in ("cpu", "wall")
            }
            if baseline is not None:
                result["baseline"] = baseline
                result["ratios"] = ratios(timings, baseline)
        return result


def write_json(path: Path | str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically, by the package's own writer (a temporary
    file in the same folder, renamed over ``path`` once complete)."""
    from pyro_vae.util.io import write_json as package_write_json

    package_write_json(path, data)


def format_ratio(ratio: dict[str, Any]) -> str:
    """``1.23× (1.10–1.40)``: the median and the range over rounds."""
    return f"{ratio['median']:.2f}× ({ratio['min']:.2f}–{ratio['max']:.2f})"
