"""The evaluation of a pair on a data set, batch by batch, with each batch's own random stream
when a seed is given, and sharded over the ranks of a process group.

See :mod:`pyro_vae.evaluate` for the estimates and how random numbers, memory and validation are
handled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from itertools import chain
from typing import Any

import torch

from pyro_vae.data.agreement import describe, fingerprint
from pyro_vae.data.batches import TensorSource, as_source
from pyro_vae.evaluate.chunks import check_finite_inputs, num_chunks
from pyro_vae.evaluate.results import EvaluationResult
from pyro_vae.evaluate.sizing import AUTO, check_particle_chunk
from pyro_vae.evaluate.weights import (
    batch_result,
    data_device,
    eval_mode,
    require_weights_memory,
    resolve_draws,
)
from pyro_vae.util import budget
from pyro_vae.util.distributed import (
    EVAL_BATCH_STREAM,
    SINGLE,
    DistributedContext,
    all_gather_objects,
    check_same_on_every_rank,
    derive_seed,
)
from pyro_vae.util.errors import ConfigError, PyroVAEError, check_count
from pyro_vae.util.rng import forked_rng

DEFAULT_BATCH_SIZE = 100


@contextmanager
def _batch_rng(batch_seed: int | None, index: int) -> Iterator[None]:
    """Batch ``index``'s own random stream when ``batch_seed`` is given (on a fork of torch's
    state); otherwise the global stream, left as it is."""
    if batch_seed is None:
        yield
        return
    with forked_rng():
        torch.manual_seed(derive_seed(batch_seed, EVAL_BATCH_STREAM, index))
        yield


@torch.no_grad()
def evaluate_dataset(
    model: Callable,
    guide: Callable,
    data: Any,
    *,
    num_particles: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    particle_chunk: int | str | None = AUTO,
    khat: bool | None = None,
    keep_log_weights: bool = False,
    max_plate_nesting: int | None = None,
    data_plate: str | None = None,
    progress: bool = False,
    batch_seed: int | None = None,
    dist: DistributedContext = SINGLE,
    collate_fn: Callable | None = None,
    **kwargs: Any,
) -> EvaluationResult:
    """Evaluate a pair batch by batch: ``model(*batch_args, **batch_kwargs, **kwargs)``.

    ``data`` takes every form the training engine takes (:func:`pyro_vae.data.batches.as_source`):
    a tensor or array, a tuple/list of them (positional arguments) or a dict (keyword
    arguments), sliced along their first dimension into batches of ``batch_size`` rows; a
    map-style Dataset collated by ``collate_fn``; or a DataLoader, whose own batches are used.
    Each batch is evaluated with :func:`evaluate` semantics and the per-datapoint results are
    concatenated in order. Peak memory is that of one ``particle_chunk × batch_size``
    model/guide call plus the ``[M + 1, batch_size]`` largest log-weights for k-hat
    (M = ceil(min(K/5, 3√K))); ``keep_log_weights=True`` also
    keeps all ``[K, N]`` log-weights (on the CPU). Datapoints are independent given the
    parameters, so batching changes which particles are drawn but not their distribution.

    ``particle_chunk="auto"`` (the default) sizes the chunk from the pair on the first batch
    (:func:`~pyro_vae.evaluate.weights.resolve_draws`): as many particles per call as keep the
    largest sample-site tensor of a call (a Bernoulli decoder's ``[k, batch, D]`` logits) near
    :data:`~pyro_vae.evaluate.sizing.CHUNK_BYTES` (12 MiB), so the elementwise work runs in
    cache; it depends only on the pair's shapes and ``batch_size``, the same on every machine.
    An integer is used as given, and ``None`` draws all particles in one call. The plate
    nesting's guess (when ``max_plate_nesting`` is not given) and the chunk's size come from
    one plain run of the pair on the first batch; whether particles can be drawn in one
    vectorized call is probed on the first chunk of the first batch a process evaluates
    (:func:`~pyro_vae.evaluate.chunks.log_weight_chunks`), once per call.

    With ``batch_seed`` batch i draws from torch's generator seeded with
    ``derive_seed(batch_seed, EVAL_BATCH_STREAM, i)``
    (:func:`pyro_vae.util.distributed.derive_seed`; on a fork: the caller's random state is left
    alone), so each batch's numbers depend only on the seed, ``batch_size``, ``particle_chunk``
    and the batch's own data; with ``batch_size=1``
    datapoint i gets exactly the numbers of :func:`evaluate` on it alone after
    ``torch.manual_seed`` of that seed (with the same ``particle_chunk``). Data that fit in one
    batch may come from a pair with
    no data plate, scored as :func:`evaluate` scores it (one datapoint, the data set). Under a
    ``dist`` of several ranks
    (:func:`~pyro_vae.util.distributed.init_distributed`), which needs ``batch_seed``, rank r
    evaluates batches r, r + W, r + 2W, ... and every rank returns the gathered result, equal
    per datapoint to a single process's with the same ``batch_seed``.
    """
    if dist.enabled and batch_seed is None:
        raise ConfigError(
            "sharded evaluation needs batch_seed, so that each batch draws the "
            "same particles whichever rank evaluates it"
        )
    check_count("num_particles", num_particles)
    check_count("batch_size", batch_size)
    check_particle_chunk(particle_chunk)
    source = as_source(data, collate_fn)
    require_weights_memory(
        num_particles,
        particle_chunk,
        min(batch_size, source.num_data),
        source.num_data,
        khat,
        keep_log_weights,
        data_device((source.tensors,), {})
        if isinstance(source, TensorSource)
        else getattr(source, "device", None) or torch.device("cpu"),
    )
    if dist.enabled:  # ranks sharing out different data would gather a wrong result
        check_same_on_every_rank(describe(source), dist, "data", fingerprint(source))
    # data that fit one batch may come from a pair with no data plate: one datapoint, the set
    whole = source.num_data <= batch_size
    from tqdm.auto import tqdm

    parts, failure, num_batches, first_index = [], None, 0, 0
    batches = iter(
        tqdm(
            source.ordered(batch_size),
            desc="evaluate",
            unit="batch",
            leave=False,
            disable=not progress or not dist.is_main,
        )
    )
    try:
        with eval_mode(model, guide):
            first = next(batches)
            first_kwargs = {**first.kwargs, **kwargs}
            check_finite_inputs(first.args, first_kwargs)
            with nullcontext() if batch_seed is None else forked_rng():
                draws = resolve_draws(
                    model,
                    guide,
                    first.args,
                    first_kwargs,
                    num_particles,
                    particle_chunk,
                    max_plate_nesting,
                    data_plate,
                )
            draws = replace(draws, whole=whole)
            pieces = budget.num_batches(source, batch_size, dist) * num_chunks(
                num_particles, draws.particle_chunk
            )
            what = f"evaluating {num_particles:,} particles on {source.num_data:,} datapoints"
            with budget.work(pieces, what):
                for index, batch in enumerate(chain([first], batches)):
                    num_batches, size = index + 1, batch.size
                    start, first_index = first_index, first_index + size
                    if index % dist.world_size != dist.rank:
                        continue
                    call_kwargs = {**batch.kwargs, **kwargs}
                    if index > 0:
                        check_finite_inputs(batch.args, call_kwargs)
                    with _batch_rng(batch_seed, index):
                        part = batch_result(
                            model,
                            guide,
                            batch.args,
                            call_kwargs,
                            draws,
                            khat=khat,
                            keep_log_weights=keep_log_weights,
                            first_index=start,
                        )
                    draws = replace(draws, vectorize=part.vectorized)  # probed once
                    if part.whole_data_set and index > 0:
                        raise ConfigError(
                            "no pyro.plate holds every observed site, so the data set is one "
                            "datapoint: evaluate it in one batch (batch_size >= its length)"
                        )
                    if part.num_datapoints != size and not part.whole_data_set:
                        raise ConfigError(
                            f"the data plate has {part.num_datapoints} entries for a "
                            f"batch of {size} rows: its size must be the batch's "
                            "length"
                        )
                    parts.append(part)
    except PyroVAEError as exc:
        if not dist.enabled:
            raise
        failure = exc
    if dist.enabled:
        gathered = all_gather_objects((parts, failure), dist, "gathering the evaluation")
        failures = [error for _, error in gathered if error is not None]
        if failures:
            raise failures[0]
        world = dist.world_size
        parts = [gathered[index % world][0][index // world] for index in range(num_batches)]
    return EvaluationResult.concatenate(parts)
