"""Log-weights drawn in particle chunks: each chunk one call of the pair with a particle plate
(or, for a pair whose networks see the particle dimension, one call per particle).

See :mod:`pyro_vae.evaluate` for how random numbers, memory and validation are handled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled

from pyro_vae.core.arguments import floating_tensors
from pyro_vae.core.log_probs import vectorized_log_probs
from pyro_vae.core.traces import guess_max_plate_nesting
from pyro_vae.core.vectorization import failure_mismatch, particle_mismatch, replay_mismatch
from pyro_vae.util.errors import ConfigError, DataError
from pyro_vae.util.rng import forked_rng, saved_rng

DEFAULT_PARTICLE_CHUNK = 500
#: a first chunk of at most this many particles is itself run with Pyro's validation (when it
#: is enabled) instead of after a separate one-particle call: checking it costs about as much
VALIDATED_CHUNK = 8


class Chunk(NamedTuple):
    """One call's ``[k, N]`` local log-weights and ``[k]`` global log p(θ) − log q(θ)."""

    log_weights: torch.Tensor
    global_log_weight: torch.Tensor
    global_sites: tuple[str, ...]
    summed_sites: tuple[str, ...] = ()
    whole: bool = False  # no data plate: the data set is one datapoint
    trace_enum_elbo: torch.Tensor | None = None  # [k, N], with summed_sites
    vectorized: bool = True  # drawn with a particle plate (or a single particle)
    #: a vectorized chunk's draws (:class:`~pyro_vae.core.log_probs.ParticleLogProbs`, with the
    #: traces), kept until the probe of the first chunk has replayed its particles
    drawn: Any = None


@dataclass(frozen=True)
class Draws:
    """How one call's particles are drawn: ``num_particles`` in chunks of at most
    ``particle_chunk`` (all at once for ``None``), the pair's ``max_plate_nesting`` and
    ``data_plate`` (``None``: found), each chunk one vectorized call (``vectorize``), one call
    per particle, or (``vectorize=None``) whichever the probe of :func:`log_weight_chunks`
    finds; ``whole``: a pair without a data plate is scored as one datapoint."""

    num_particles: int
    particle_chunk: int | None
    max_plate_nesting: int
    data_plate: str | None
    vectorize: bool | None = True
    whole: bool = False


def check_finite_inputs(args: Sequence[Any], kwargs: dict | None = None) -> None:
    """Refuse floating-point tensor arguments with NaN or ±inf entries, before any trace."""
    for where, value in floating_tensors(tuple(args), kwargs or {}):
        if not bool(torch.isfinite(value).all()):
            raise DataError(f"{where} of the model/guide holds NaN or infinite values")


def _chunk_sizes(total: int, chunk: int | None) -> Iterator[int]:
    chunk = total if chunk is None else chunk
    if chunk < 1:
        raise ConfigError(f"particle_chunk must be >= 1, got {chunk}")
    return (min(chunk, total - start) for start in range(0, total, chunk))


def num_chunks(total: int, chunk: int | None) -> int:
    return 1 if chunk is None else -(-total // max(chunk, 1))


def log_weight_chunks(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, draws: Draws
) -> Iterator[Chunk]:
    """Yield :class:`Chunk` s of ``[k, N]`` log-weights whose k add up to
    ``draws.num_particles``: each one call with a particle plate, or without ``draws.vectorize``
    k calls of one particle.

    With ``draws.vectorize=None`` the first chunk is the probe (:mod:`pyro_vae.core.vectorization`):
    it is drawn vectorized, and its first and last particles are replayed one at a time through
    the pair run on its own, from the random state the chunk started from (on a fork). When they
    agree the chunk is kept and the rest are drawn vectorized; when they do not (or the
    vectorized call fails where the plain one does not) the chunk is discarded, the random state
    put back, and every particle drawn in a call of its own, so the draws are those of the
    per-particle path from the start. Each chunk says which way it was drawn
    (``Chunk.vectorized``). A first chunk of one particle has nothing to replay: the probe then
    runs apart, on a fork (:func:`vectorizable`). One particle in all needs no probe.

    With Pyro's validation enabled, the pair is first run once with a single particle, on a copy
    of the random state (so the draws of the chunks are unchanged): that call checks the data
    against every observed site's support and the distributions' parameters. The chunks then run
    with validation off: they see the same data and parameters, and checking every chunk's
    parameters would cost a full pass over the largest tensors (the decoder's ``[k, N, D]``
    output) per chunk. A first chunk of at most :data:`VALIDATED_CHUNK` particles is checked
    itself instead, which costs no more than the separate call (validation draws no random
    numbers, so the draws are the same either way). NaN densities are caught by the statistics
    regardless (:mod:`pyro_vae.evaluate.weights`). A chunk of one particle is drawn without a
    particle plate, as the pair runs on its own (the same draws and values).

    ``pyro.param`` messages are hidden from the traces (the parameters are read as usual): the
    evaluation needs only the sample sites.
    """
    model, guide = (poutine.block(fn, hide_types=["param"]) for fn in (model, guide))
    options = (draws.max_plate_nesting, draws.data_plate, not draws.whole)

    def one_call(size: int, vectorized: bool) -> Chunk:
        drawn = vectorized_log_probs(
            model,
            guide,
            *args,
            num_particles=size,
            max_plate_nesting=draws.max_plate_nesting,
            data_plate=draws.data_plate,
            compact=True,
            vectorize=vectorized,
            require_data_plate=not draws.whole,
            **kwargs,
        )
        return Chunk(
            drawn.log_weights,
            drawn.global_log_weight,
            drawn.global_sites,
            drawn.guide_enumerated,
            drawn.data_plate is None,
            drawn.trace_enum_elbo,
            drawn=drawn if vectorized else None,
        )

    def draw(size: int, vectorize: bool) -> Chunk:
        if vectorize:
            return one_call(size, size > 1)
        singles = [one_call(1, False) for _ in range(size)]
        enum_elbos = [c.trace_enum_elbo for c in singles]
        return Chunk(
            torch.cat([c.log_weights for c in singles]),
            torch.cat([c.global_log_weight for c in singles]),
            singles[0].global_sites,
            singles[0].summed_sites,
            singles[0].whole,
            None if any(e is None for e in enum_elbos) else torch.cat(enum_elbos),
            vectorized=False,
        )

    def probed_first(size: int) -> Chunk:
        """The first chunk drawn vectorized if the probe on it agrees, else one per particle."""
        start = saved_rng()
        try:
            chunk = draw(size, True)
        except Exception as exc:
            with forked_rng(), pyro.validation_enabled(False):
                reason = failure_mismatch(exc, model, guide, args, kwargs, start, *options)
            if reason is None:
                raise
        else:
            with forked_rng(), pyro.validation_enabled(False):
                k, pair = chunk.log_weights.shape[0], (model, guide, args, kwargs)
                reason = replay_mismatch(chunk.drawn, k, *pair, start, *options)
            if reason is None:
                return chunk
        start()
        return draw(size, False)

    # the sizes one at a time: a list of them would grow with the number of chunks
    first = next(_chunk_sizes(draws.num_particles, draws.particle_chunk), None)
    vectorize = draws.vectorize
    if vectorize is None and (draws.num_particles == 1 or first is None):
        vectorize = True
    elif vectorize is None and first == 1:
        vectorize = vectorizable(model, guide, args, kwargs, *options[:2], draws.whole)
    validate_first = is_validation_enabled() and first is not None and first <= VALIDATED_CHUNK
    if is_validation_enabled() and not validate_first:
        with forked_rng():
            draw(1, True)
    num_data = None
    for index, size in enumerate(_chunk_sizes(draws.num_particles, draws.particle_chunk)):
        # not across the yield: the caller's setting holds there
        with pyro.validation_enabled(validate_first and index == 0):
            chunk = probed_first(size) if vectorize is None else draw(size, vectorize)
        vectorize = chunk.vectorized
        chunk = chunk._replace(drawn=None)
        num_data = chunk.log_weights.shape[1] if num_data is None else num_data
        assert chunk.log_weights.shape == (size, num_data), (
            chunk.log_weights.shape,
            size,
            num_data,
        )
        yield chunk


@torch.no_grad()
def log_weights(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_particles: int,
    particle_chunk: int | None = None,
    max_plate_nesting: int | None = None,
    data_plate: str | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Per-datapoint log-weights log p(x, z_k) − log q(z_k|x), shape ``[K, N]``.

    ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)`` are called once per chunk of at most
    ``particle_chunk`` particles (all K at once by default), each chunk vectorized by an outer
    particle plate; the chunks are concatenated along K. The data plate is found automatically
    unless ``data_plate`` names it. Gradients are not recorded.

    :raises ConfigError: if no plate contains every sample site (see
        :func:`pyro_vae.core.traces.find_data_plate`).
    """
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    chunks = [
        chunk.log_weights
        for chunk in log_weight_chunks(
            model,
            guide,
            args,
            kwargs,
            Draws(num_particles, particle_chunk, max_plate_nesting, data_plate),
        )
    ]
    return torch.cat(chunks)


def vectorizable(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    max_plate_nesting: int,
    data_plate: str | None,
    whole: bool = False,
) -> bool:
    """Whether particles may be drawn in one vectorized call (:mod:`pyro_vae.core.vectorization`),
    probed on a fork of the random state so the evaluation's draws are unchanged."""
    with forked_rng(), pyro.validation_enabled(False):
        return (
            particle_mismatch(
                model,
                guide,
                args,
                kwargs,
                max_plate_nesting=max_plate_nesting,
                require_data_plate=not whole,
                data_plate=data_plate,
            )
            is None
        )
