"""Peak memory of a piece of work, for the benchmarks' memory probes.

CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) above what was
allocated at the start. CPU: the resident-set high-water mark of a fresh child process
(``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``) above the
resident set at the start, glibc's mmap threshold fixed so that freed tensors leave the
resident set. A script probes by running itself with ``--memory-probe SPEC`` (JSON) and
printing :func:`answer`'s line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

KIB = 1024
MIB = 1024 * KIB
PROBE_PREFIX = "PROBE "
MMAP_THRESHOLD = 128 * KIB


class ProbeError(RuntimeError):
    """A memory probe's child process failed; the message is the last line it wrote."""


def _status_kib() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """Peak memory of ``fn()`` above what was in use when it started, and how it was read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, "torch.cuda.max_memory_allocated"
    start = _status_kib()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    fn()
    return (_status_kib()["VmHWM"] - start) * KIB, "VmHWM - VmRSS (/proc/self/status)"


def answer(result: dict[str, Any]) -> None:
    """Print a child's result where :func:`probe` reads it."""
    print(PROBE_PREFIX + json.dumps(result), flush=True)


def probe(
    script: Path,
    spec: dict[str, Any],
    device: torch.device,
    here: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """``here(spec)`` on CUDA (the allocator's peak is the process's own); on the CPU, ``script
    --memory-probe SPEC`` in a fresh child process. A failed child raises :class:`ProbeError`
    with the last line it wrote."""
    if device.type == "cuda":
        return here(spec)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(
        [sys.executable, str(script), "--memory-probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(PROBE_PREFIX)]
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProbeError(f"the memory probe {script.name} failed: {last}")
    return json.loads(lines[-1][len(PROBE_PREFIX) :])
