"""The particle chunk sized from the pair: as many particles per call as keep the largest
tensor of a sample site near :data:`CHUNK_BYTES`, so that a chunk's elementwise passes (the
likelihood's log-density over the decoder's output, the activations) work on tensors that stay
near the cache, and that the allocator reuses rather than maps afresh: glibc hands tensors over
32 MiB (its largest mmap threshold) to the system when freed, and the next chunk's tensors are
then new zeroed pages, faulted in one by one. On the IWAE paper's 784-200-200-50 MNIST network
with batches of 100, one CPU thread, chunks of 500 particles took about twice the time of
chunks of 25–50 (``benchmarks/bench_evaluate.py``, ``docs/performance.rst``).

The size comes from one plain run of the pair (no particle plate, on a fork of the random state,
Pyro's effects hidden, running statistics kept): the bytes of its largest sample-site tensor
(a site's value, or its distribution's batch × event shape where that is larger: a Bernoulli's
``[N, D]`` logits) are the memory one particle adds to a vectorized call. The same run gives the
pair's plate nesting (:func:`pyro_vae.core.traces.plate_nesting`). The chunk depends only on the
pair's shapes and dtypes, so it is the same on every machine and rank for a given pair and batch
shape: results stay reproducible for a given seed and batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from pyro import poutine

from pyro_vae.core.traces import plate_nesting, trace_pair
from pyro_vae.util.errors import ConfigError, check_count
from pyro_vae.util.module_state import running_statistics_kept
from pyro_vae.util.rng import forked_rng

#: ``particle_chunk="auto"``: sized by :func:`auto_chunk`
AUTO = "auto"
#: the bytes of a chunk's largest site tensor the automatic chunk aims at
CHUNK_BYTES = 12 * 2**20


class PlainRun(NamedTuple):
    """What one plain run of a pair tells: its plate nesting and the bytes of its largest
    sample-site tensor."""

    max_plate_nesting: int
    bytes_per_particle: int


def site_bytes(site: dict) -> int:
    """Bytes of a sample site's largest tensor: its value, or its distribution's
    batch × event shape in the value's element size where that is larger."""
    value = site["value"]
    if not isinstance(value, torch.Tensor):
        return 0
    fn = site["fn"]  # a plate's subsample site has no shapes
    shape = tuple(getattr(fn, "batch_shape", ())) + tuple(getattr(fn, "event_shape", ()))
    return max(value.numel(), math.prod(shape)) * value.element_size()


def largest_site_bytes(*traces: Any) -> int:
    """The largest :func:`site_bytes` over the sample sites of ``traces`` (at least 1)."""
    sizes = (
        site_bytes(site)
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
    )
    return max(1, max(sizes, default=1))


def plain_run(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> PlainRun:
    """Run the pair once without a particle plate (the guide traced, the model replayed on it)
    on a fork of the random state, its effects hidden and the modules' running statistics
    kept: the caller's draws and modules are as they were."""
    with poutine.block(), forked_rng(), running_statistics_kept(model, guide):
        traces = trace_pair(model, guide, args, kwargs)
    return PlainRun(plate_nesting(*traces), largest_site_bytes(*traces))


def auto_chunk(num_particles: int, bytes_per_particle: int) -> int:
    """``CHUNK_BYTES // bytes_per_particle`` particles, at least one and at most all."""
    return max(1, min(num_particles, CHUNK_BYTES // max(bytes_per_particle, 1)))


def chunk_bound(num_particles: int, rows: int) -> int:
    """The largest chunk :func:`auto_chunk` can give on ``rows`` datapoints: a site in the data
    plate holds at least ``rows`` elements of at least one byte per particle."""
    return auto_chunk(num_particles, rows)


def check_particle_chunk(particle_chunk: object) -> None:
    """A :class:`ConfigError` unless ``particle_chunk`` is a whole number >= 1, None or
    ``"auto"``."""
    if isinstance(particle_chunk, str):
        if particle_chunk != AUTO:
            raise ConfigError(
                f"particle_chunk must be an integer >= 1, None or {AUTO!r}, got {particle_chunk!r}"
            )
        return
    check_count("particle_chunk", particle_chunk, optional=True)
