"""What the runs of a model/guide pair leave in its modules' state.

A network with BatchNorm in train mode gives the same output for the same batch, but every run
moves its running statistics. The runs that only look at a pair (guessing its plate nesting,
checking its sites, probing the particle dimension) or repeat a step's run (an estimator's
replay of the guide or model on its own draws) use :func:`running_statistics_kept`, so that a
training step moves the statistics once, as its one run of the pair does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def running_statistics_kept(*functions: Callable) -> Iterator[None]:
    """Run the block on copies of the running statistics of the functions' modules (a bound
    method's module, or a module called directly), and put the originals back afterwards: the
    buffers of every submodule in train mode that tracks running statistics (BatchNorm's
    running mean and variance and its batch count). A replay of the guide or model on its own
    draws, or a probe run, then leaves them as the step's one run left them. The originals are
    swapped out, not overwritten, since the first run's backward pass holds them."""
    modules = {}
    for fn in functions:
        module = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if isinstance(module, torch.nn.Module):
            modules.update(
                (id(sub), sub)
                for sub in module.modules()
                if sub.training and getattr(sub, "track_running_stats", False)
            )
    kept = [
        (sub, name, buffer)
        for sub in modules.values()
        for name, buffer in sub.named_buffers(recurse=False)
    ]
    for sub, name, buffer in kept:
        setattr(sub, name, buffer.clone())
    try:
        yield
    finally:
        for sub, name, buffer in kept:
            setattr(sub, name, buffer)
