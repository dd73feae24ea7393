"""Log-weights from traces, in particle chunks and batches, and their per-datapoint statistics.

See :mod:`pyro_vae.evaluate` for the estimates and how random numbers, memory and validation are
handled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled

from pyro_vae.core.arguments import floating_tensors
from pyro_vae.core.log_probs import vectorized_log_probs
from pyro_vae.core.traces import guess_max_plate_nesting
from pyro_vae.core.vectorization import particle_mismatch
from pyro_vae.data.batches import as_source, describe
from pyro_vae.evaluate.khat import MIN_KHAT_PARTICLES, ParetoTail, pareto_khat
from pyro_vae.evaluate.results import EvaluationResult, GlobalTerm
from pyro_vae.util import budget
from pyro_vae.util.distributed import (
    EVAL_BATCH_STREAM,
    SINGLE,
    DistributedContext,
    all_gather_objects,
    check_same_on_every_rank,
    derive_seed,
)
from pyro_vae.util.errors import ConfigError, DataError, PyroVAEError
from pyro_vae.util.rng import forked_rng


class Chunk(NamedTuple):
    """One call's ``[k, N]`` local log-weights and ``[k]`` global log p(θ) − log q(θ)."""

    log_weights: torch.Tensor
    global_log_weight: torch.Tensor
    global_sites: tuple[str, ...]
    summed_sites: tuple[str, ...] = ()
    whole: bool = False  # no data plate: the data set is one datapoint
    trace_enum_elbo: torch.Tensor | None = None  # [k, N], with summed_sites


DEFAULT_BATCH_SIZE = 100
DEFAULT_PARTICLE_CHUNK = 500


class EvaluationError(PyroVAEError):
    """The log-weights are not finite: the model or guide returned NaN or ±inf densities."""


def _check_finite_inputs(args: Sequence[Any], kwargs: dict | None = None) -> None:
    """Refuse floating-point tensor arguments with NaN or ±inf entries, before any trace."""
    for where, value in floating_tensors(tuple(args), kwargs or {}):
        if not bool(torch.isfinite(value).all()):
            raise DataError(f"{where} of the model/guide holds NaN or infinite values")


def _chunk_sizes(total: int, chunk: int | None) -> Iterator[int]:
    chunk = total if chunk is None else chunk
    if chunk < 1:
        raise ConfigError(f"particle_chunk must be >= 1, got {chunk}")
    return (min(chunk, total - start) for start in range(0, total, chunk))


def _num_chunks(total: int, chunk: int | None) -> int:
    return 1 if chunk is None else -(-total // max(chunk, 1))


def _log_weight_chunks(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    particle_chunk: int | None,
    max_plate_nesting: int,
    data_plate: str | None,
    vectorize: bool = True,
    whole: bool = False,
) -> Iterator[Chunk]:
    """Yield :class:`Chunk` s of ``[k, N]`` log-weights whose k add up to ``num_particles``:
    each one call with a particle plate, or with ``vectorize=False`` k calls of one particle.

    With Pyro's validation enabled, the pair is first run once with a single particle, on a copy
    of the random state (so the draws of the chunks are unchanged): that call checks the data
    against every observed site's support and the distributions' parameters. The chunks then run
    with validation off: they see the same data and parameters, and checking every chunk's
    parameters would cost a full pass over the largest tensors (the decoder's ``[k, N, D]``
    output) per chunk. NaN densities are caught by :func:`_check_finite` regardless.

    ``pyro.param`` messages are hidden from the traces (the parameters are read as usual): the
    evaluation needs only the sample sites.
    """
    model, guide = (poutine.block(fn, hide_types=["param"]) for fn in (model, guide))

    def one_call(size: int, vectorized: bool) -> Chunk:
        drawn = vectorized_log_probs(
            model,
            guide,
            *args,
            num_particles=size,
            max_plate_nesting=max_plate_nesting,
            data_plate=data_plate,
            compact=True,
            vectorize=vectorized,
            require_data_plate=not whole,
            **kwargs,
        )
        return Chunk(
            drawn.log_weights,
            drawn.global_log_weight,
            drawn.global_sites,
            drawn.guide_enumerated,
            drawn.data_plate is None,
            drawn.trace_enum_elbo,
        )

    def draw(size: int) -> Chunk:
        if vectorize:
            return one_call(size, True)
        singles = [one_call(1, False) for _ in range(size)]
        enum_elbos = [c.trace_enum_elbo for c in singles]
        return Chunk(
            torch.cat([c.log_weights for c in singles]),
            torch.cat([c.global_log_weight for c in singles]),
            singles[0].global_sites,
            singles[0].summed_sites,
            singles[0].whole,
            None if any(e is None for e in enum_elbos) else torch.cat(enum_elbos),
        )

    if is_validation_enabled():
        with forked_rng():
            draw(1)
    num_data = None
    for size in _chunk_sizes(num_particles, particle_chunk):
        with pyro.validation_enabled(False):  # not across the yield: the caller's setting holds
            chunk = draw(size)
        num_data = chunk.log_weights.shape[1] if num_data is None else num_data
        assert chunk.log_weights.shape == (size, num_data), (
            chunk.log_weights.shape,
            size,
            num_data,
        )
        yield chunk


class _WeightAccumulator:
    """Per-datapoint statistics of log-weights fed in particle chunks (float64 accumulators).

    Keeps logsumexp(log w), logsumexp(2 log w) and the running mean and sum of squared deviations
    of log w (Chan et al.'s pairwise update), so no chunk needs to be kept.
    """

    def __init__(self) -> None:
        self.count = 0
        self.lse = self.lse2 = self.mean = self.m2 = None

    def update(self, log_weights: torch.Tensor) -> None:
        lw = log_weights.to(torch.float64)
        k = lw.shape[0]
        mean = lw.mean(0)
        m2 = (lw - mean).square().sum(0)
        lse, lse2 = torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0)
        if self.count == 0:
            self.lse, self.lse2, self.mean, self.m2 = lse, lse2, mean, m2
        else:
            total = self.count + k
            delta = mean - self.mean
            self.lse = torch.logaddexp(self.lse, lse)
            self.lse2 = torch.logaddexp(self.lse2, lse2)
            self.m2 = self.m2 + m2 + delta.square() * (self.count * k / total)
            self.mean = self.mean + delta * (k / total)
        self.count += k

    def finalize(self) -> dict[str, torch.Tensor]:
        log_k = math.log(self.count)
        return {
            "log_px": self.lse - log_k,
            "elbo": self.mean,
            "var_log_w": self.m2 / self.count,
            "ess": (2 * self.lse - self.lse2 - log_k).exp(),
        }


def _check_finite(stats: dict[str, torch.Tensor], first_index: int) -> None:
    bad = torch.zeros_like(stats["log_px"], dtype=torch.bool)
    for name in ("log_px", "elbo", "var_log_w", "ess"):
        bad |= ~torch.isfinite(stats[name])
    if bad.any():
        where = (bad.nonzero().flatten()[:5] + first_index).tolist()
        raise EvaluationError(
            f"the log-weights of {int(bad.sum())} datapoint(s) are NaN or infinite (first: "
            f"{where}): log p(x, z) or log q(z|x) is not finite. Check that the data lie in the "
            "likelihood's support and that the model's parameters are finite."
        )


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
        for chunk in _log_weight_chunks(
            model,
            guide,
            args,
            kwargs,
            num_particles=num_particles,
            particle_chunk=particle_chunk,
            max_plate_nesting=max_plate_nesting,
            data_plate=data_plate,
        )
    ]
    return torch.cat(chunks)


def _batch_result(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    particle_chunk: int | None,
    max_plate_nesting: int,
    data_plate: str | None,
    khat: bool | None,
    keep_log_weights: bool,
    first_index: int = 0,
    vectorize: bool = True,
    whole: bool = False,
) -> EvaluationResult:
    with_khat = num_particles >= MIN_KHAT_PARTICLES if khat is None else khat
    accumulator = _WeightAccumulator()
    tail = ParetoTail(num_particles) if with_khat else None
    blocks: list[torch.Tensor] | None = [] if keep_log_weights else None
    global_sum, global_sites, summed_sites, whole_data_set = 0.0, (), (), False
    #: each chunk's Σ over its particles of TraceEnum's ELBO, [N]; None once one lacks it
    enum_sums: list[torch.Tensor] | None = []
    for chunk in _log_weight_chunks(
        model,
        guide,
        args,
        kwargs,
        num_particles=num_particles,
        particle_chunk=particle_chunk,
        max_plate_nesting=max_plate_nesting,
        data_plate=data_plate,
        vectorize=vectorize,
        whole=whole,
    ):
        accumulator.update(chunk.log_weights)
        budget.piece_done()
        whole_data_set = chunk.whole
        global_sum += chunk.global_log_weight.double().sum().item()
        global_sites, summed_sites = chunk.global_sites, chunk.summed_sites
        if chunk.trace_enum_elbo is None:
            enum_sums = None
        elif enum_sums is not None:
            enum_sums.append(chunk.trace_enum_elbo.to(torch.float64).sum(0))
        if tail is not None:
            tail.update(chunk.log_weights)
        if blocks is not None:
            blocks.append(chunk.log_weights)
    stats = {name: value.cpu() for name, value in accumulator.finalize().items()}
    _check_finite(stats, first_index)
    full = torch.cat(blocks) if blocks is not None else None
    global_term = None
    if global_sites:
        global_term = GlobalTerm(global_sites, global_sum / num_particles, num_particles)
        if not math.isfinite(global_term.mean):
            raise EvaluationError(
                f"log p(θ) − log q(θ) of the global latents {list(global_sites)} is NaN or infinite"
            )
    return EvaluationResult(
        num_particles=num_particles,
        **stats,
        khat=tail.khat() if tail is not None else None,
        log_weights=full.cpu() if full is not None else None,
        vectorized=vectorize,
        global_term=global_term,
        summed_sites=summed_sites,
        whole_data_set=whole_data_set,
        trace_enum_elbo=(sum(enum_sums) / num_particles).cpu()
        if enum_sums and summed_sites
        else None,
    )


def _vectorizable(
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


@contextmanager
def eval_mode(*functions: Callable) -> Iterator[None]:
    """Put the modules whose bound methods ``functions`` are (``module.model``,
    ``module.guide``) in eval mode for the block, then give every submodule its mode back."""
    modules = {
        id(m): m
        for fn in functions
        if isinstance(m := getattr(fn, "__self__", None), torch.nn.Module)
    }
    saved = [(sub, sub.training) for m in modules.values() for sub in m.modules()]
    for m in modules.values():
        m.eval()
    try:
        yield
    finally:
        for sub, training in saved:
            sub.training = training


@torch.no_grad()
def evaluate(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_particles: int,
    particle_chunk: int | None = None,
    khat: bool | None = None,
    keep_log_weights: bool = True,
    max_plate_nesting: int | None = None,
    data_plate: str | None = None,
    **kwargs: Any,
) -> EvaluationResult:
    """Evaluate a model/guide pair on all its datapoints at once (one call per particle chunk).

    ``model(*args, **kwargs)`` and ``guide(*args, **kwargs)`` must put every sample site inside
    one data plate (found automatically unless ``data_plate`` names it). ``khat=None`` computes
    k-hat when ``num_particles >= MIN_KHAT_PARTICLES``; ``True`` demands it, ``False`` skips it.
    With ``keep_log_weights`` the ``[K, N]`` log-weights are kept on the result.

    The module behind ``model`` and ``guide`` (when they are its bound methods) runs in eval
    mode (dropout off, batch norm on its running statistics) and gets its mode back at the end.
    Particles are drawn in one vectorized call unless a probe finds that the pair's networks
    see the particle dimension (:func:`pyro_vae.core.vectorization.particle_mismatch`); then one
    call per particle, K times slower, and the result says ``vectorized = False``.

    A pair with no plate that holds every observed site is scored as one datapoint, the
    whole data set (``result.whole_data_set``): its log p̂ and bound are the data set's, and
    per-datapoint statistics do not apply.

    :raises ConfigError: for an ambiguous data plate, or a bad option.
    :raises DataError: if a floating-point tensor argument holds NaN or infinite values.
    :raises EvaluationError: if any datapoint's log-weights are NaN or infinite.
    """
    _check_finite_inputs(args, kwargs)
    with (
        eval_mode(model, guide),
        budget.work(
            _num_chunks(num_particles, particle_chunk), f"evaluating {num_particles:,} particles"
        ),
    ):
        if max_plate_nesting is None:
            max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        vectorize = _vectorizable(
            model, guide, args, kwargs, max_plate_nesting, data_plate, whole=True
        )
        return _batch_result(
            model,
            guide,
            args,
            kwargs,
            num_particles=num_particles,
            particle_chunk=particle_chunk,
            max_plate_nesting=max_plate_nesting,
            data_plate=data_plate,
            khat=khat,
            keep_log_weights=keep_log_weights,
            vectorize=vectorize,
            whole=True,
        )


@torch.no_grad()
def evaluate_dataset(
    model: Callable,
    guide: Callable,
    data: Any,
    *,
    num_particles: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    particle_chunk: int | None = DEFAULT_PARTICLE_CHUNK,
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

    With ``batch_seed`` batch i draws from torch's generator seeded with
    ``derive_seed(batch_seed, EVAL_BATCH_STREAM, i)``
    (:func:`pyro_vae.util.distributed.derive_seed`; on a fork: the caller's random state is left
    alone), so each batch's numbers depend only on the seed, ``batch_size``, ``particle_chunk``
    and the batch's own data; with ``batch_size=1``
    datapoint i gets exactly the numbers of :func:`evaluate` on it alone after
    ``torch.manual_seed`` of that seed. Data that fit in one batch may come from a pair with
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
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    source = as_source(data, collate_fn)
    if dist.enabled:  # ranks sharing out different data would gather a wrong result
        check_same_on_every_rank(describe(source), dist, "data")
    # data that fit one batch may come from a pair with no data plate: one datapoint, the set
    whole = source.num_data <= batch_size
    from tqdm.auto import tqdm

    parts, failure, num_batches, first_index, vectorize = [], None, 0, 0, None
    batches = tqdm(
        source.ordered(batch_size),
        desc="evaluate",
        unit="batch",
        leave=False,
        disable=not progress or not dist.is_main,
    )
    pieces = budget.num_batches(source, batch_size, dist) * _num_chunks(
        num_particles, particle_chunk
    )
    try:
        with (
            eval_mode(model, guide),
            budget.work(
                pieces, f"evaluating {num_particles:,} particles on {source.num_data:,} datapoints"
            ),
        ):
            for index, batch in enumerate(batches):
                num_batches, size = index + 1, batch.size
                start, first_index = first_index, first_index + size
                if index % dist.world_size != dist.rank:
                    continue
                call_kwargs = {**batch.kwargs, **kwargs}
                _check_finite_inputs(batch.args, call_kwargs)
                if max_plate_nesting is None:
                    with nullcontext() if batch_seed is None else forked_rng():
                        max_plate_nesting = guess_max_plate_nesting(
                            model, guide, batch.args, call_kwargs
                        )
                if vectorize is None:
                    vectorize = _vectorizable(
                        model,
                        guide,
                        batch.args,
                        call_kwargs,
                        max_plate_nesting,
                        data_plate,
                        whole=whole,
                    )
                with _batch_rng(batch_seed, index):
                    part = _batch_result(
                        model,
                        guide,
                        batch.args,
                        call_kwargs,
                        num_particles=num_particles,
                        particle_chunk=particle_chunk,
                        max_plate_nesting=max_plate_nesting,
                        data_plate=data_plate,
                        khat=khat,
                        keep_log_weights=keep_log_weights,
                        first_index=start,
                        vectorize=vectorize,
                        whole=whole,
                    )
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


def weight_statistics(log_weights: torch.Tensor, khat: bool | None = None) -> EvaluationResult:
    """All per-datapoint statistics of given ``[K, N]`` log-weights (kept on the result)."""
    if log_weights.dim() != 2 or log_weights.shape[0] < 1:
        raise ConfigError(f"log_weights must have shape [K, N], got {list(log_weights.shape)}")
    num_particles = log_weights.shape[0]
    with_khat = num_particles >= MIN_KHAT_PARTICLES if khat is None else khat
    accumulator = _WeightAccumulator()
    accumulator.update(log_weights.detach())
    stats = {name: value.cpu() for name, value in accumulator.finalize().items()}
    _check_finite(stats, 0)
    return EvaluationResult(
        num_particles=num_particles,
        **stats,
        khat=pareto_khat(log_weights) if with_khat else None,
        log_weights=log_weights.detach().cpu(),
    )
