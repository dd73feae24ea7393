"""Memory a request needs, estimated before it is allocated, against what the device has.

A size the machine cannot hold (a latent dimension of a billion, a billion particles or samples)
is refused with one line before anything is allocated, instead of failing inside the allocator
with a traceback or driving the machine into swap. The estimates are deliberately rough (within a
small factor): their job is to tell an impossible request from a possible one. The cap is the
memory the device has free now (``MemAvailable`` and the cgroup limit on Linux, free memory of a
CUDA device), or the one given with :func:`limit` (the command line's ``--max-memory``).
"""

from __future__ import annotations

import contextvars
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pyro_vae.util.errors import ConfigError, PyroVAEError

FLOAT_BYTES = 4
#: Bytes per parameter while training: the parameter, its gradient and Adam's two moments.
TRAIN_BYTES_PER_PARAM = 4 * FLOAT_BYTES
#: Copies of each activation a training step keeps (forward values, saved inputs, gradients).
TRAIN_ACTIVATION_COPIES = 4
EVAL_ACTIVATION_COPIES = 2
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
#: the cap :func:`limit` set and what set it, named in a refusal
_LIMIT: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar(
    "pyro_vae_memory_limit", default=None
)


class MemoryLimitError(PyroVAEError):
    """A request whose estimated memory exceeds what the device has (or the given limit)."""


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``"512M"``, ``"4G"``, ``"1.5GiB"`` or ``"1000000"`` (binary
    units: K = 1024)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtb]?)(?:i?b)?\s*", str(text).lower())
        if match is None:
            raise ConfigError(f"memory size must look like 512M, 4G or 1.5GiB, got {text!r}")
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ConfigError(f"memory size must be positive, got {text!r}")
    return size


def format_bytes(size: float) -> str:
    """``size`` bytes in binary units (``"1.5 GiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(size) < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _cgroup_free() -> int | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:  # not Linux: physical memory as a bound
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory free on ``device`` now, or ``None`` where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    readings = [value for value in (_meminfo_available(), _cgroup_free()) if value is not None]
    return min(readings) if readings else None


@contextmanager
def limit(size: str | int | None, how: str = "memory.limit") -> Iterator[None]:
    """Cap the memory :func:`require` allows (``None``: what the device has free); a refusal
    names the cap's source as ``how`` (the command line names its option)."""
    token = _LIMIT.set(None if size is None else (parse_size(size), how))
    try:
        yield
    finally:
        _LIMIT.reset(token)


def require(nbytes: float, what: str, device: torch.device | str = "cpu") -> None:
    """Refuse ``what`` with one line when its estimated ``nbytes`` exceed the cap.

    :raises MemoryLimitError: naming the request, the estimate and the cap.
    """
    limited = _LIMIT.get()
    cap, how = limited if limited is not None else (available_bytes(device), "")
    if cap is not None and (not math.isfinite(nbytes) or nbytes > cap):
        bound = (
            f"the memory limit of {format_bytes(cap)} ({how})"
            if limited
            else f"the {format_bytes(cap)} free on {torch.device(device)}"
        )
        raise MemoryLimitError(
            f"{what} needs about {format_bytes(nbytes)} of memory, more than "
            f"{bound}; ask for a smaller size"
        )


def network_footprint(build: Callable[[], torch.nn.Module]) -> tuple[int, int] | None:
    """``(parameters, width)`` of the network ``build()`` makes, built on the meta device so
    nothing is allocated: the number of parameters, and the activations one datapoint (one
    particle) produces, the sum of the output sizes of its linear and convolutional layers
    plus the network's own ``activations_per_row`` if it declares one (``None`` if the network
    cannot be built there)."""
    try:
        with torch.device("meta"):
            network = build()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    params = sum(p.numel() for p in network.parameters())
    width = 0
    for module in network.modules():
        if isinstance(module, torch.nn.Linear):
            width += module.out_features
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            width += module.out_channels
    width += getattr(network, "activations_per_row", 0)  # what a model declares beside them
    return params, max(width, 1)


def saved_bytes(run: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors ``run()`` saves for its backward pass (its activations), measured
    by running it once; tensors sharing storage with ``exclude`` (the parameters) are not
    counted, nor is one storage twice."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in skip and key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def training_bytes(params: int, width: int, rows: int) -> int:
    """A training step's memory: parameters with gradients and Adam state, and the activations
    of ``rows`` = batch × particles × importance samples."""
    return params * TRAIN_BYTES_PER_PARAM + rows * width * FLOAT_BYTES * TRAIN_ACTIVATION_COPIES


def inference_bytes(params: int, width: int, rows: int) -> int:
    """A forward pass without gradients over ``rows`` = datapoints × particles (or samples)."""
    return params * FLOAT_BYTES + rows * width * FLOAT_BYTES * EVAL_ACTIVATION_COPIES


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's refusal (CPU or CUDA out of memory), or a shared
    library that could not be mapped into the memory left (a module imported late)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    if isinstance(exc, ImportError) and "failed to map segment" in text:
        return True
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def allocation_message(exc: BaseException) -> str:
    """One line for an allocator's refusal, with the size it was asked for when it says."""
    match = re.search(r"tried to allocate (\d+) bytes", str(exc))
    asked = f" ({format_bytes(int(match.group(1)))} in one piece)" if match else ""
    return (
        f"out of memory{asked}: the sizes asked for do not fit on this machine; ask for "
        "smaller sizes (layers, latent dimension, batch, particles, particle chunk)"
    )
