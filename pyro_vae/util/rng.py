"""One fork of the random state for the package's side computations (probes of a pair,
held-out scores, evaluation draws): the block draws from a copy, the caller's stream goes on
as if it had not run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def cuda_devices() -> list[int]:
    """The CUDA devices whose random state a fork saves: every device once CUDA has started
    (a tensor or module on CUDA has started it), none before, so that a fork never starts
    CUDA itself."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@contextmanager
def forked_rng() -> Iterator[None]:
    """Run a block on a copy of torch's random state, CPU and every CUDA device in use
    (:func:`cuda_devices`), restored when the block ends, also by an exception. Pyro draws
    from torch's generators, so its draws are forked too. Before CUDA has started, a
    ``torch.manual_seed`` inside the block seeds CUDA for when it starts (torch defers it)."""
    with torch.random.fork_rng(devices=cuda_devices()):
        yield


def saved_rng() -> Callable[[], None]:
    """A function that puts torch's random state (CPU and every CUDA device in use,
    :func:`cuda_devices`) back to what it is now: to draw again from the same point, e.g. one
    particle of a vectorized draw replayed on its own."""
    devices = cuda_devices()
    cpu = torch.get_rng_state()
    cuda = [torch.cuda.get_rng_state(device) for device in devices]

    def restore() -> None:
        torch.set_rng_state(cpu)
        for device, state in zip(devices, cuda):
            torch.cuda.set_rng_state(state, device)

    return restore
