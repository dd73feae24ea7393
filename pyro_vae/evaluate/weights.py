"""Per-datapoint statistics of log-weights (log p̂, the ELBO, var log w, ESS, k-hat), streamed
over particle chunks, and the evaluation of a pair on all its datapoints at once.

See :mod:`pyro_vae.evaluate` for the estimates and how random numbers, memory and validation are
handled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from pyro_vae.core.arguments import batch_length, leaves
from pyro_vae.evaluate.chunks import (
    Draws,
    check_finite_inputs,
    log_weight_chunks,
    num_chunks,
)
from pyro_vae.evaluate.khat import MIN_KHAT_PARTICLES, ParetoTail, pareto_khat, tail_size
from pyro_vae.evaluate.results import EvaluationResult, GlobalTerm
from pyro_vae.evaluate.sizing import (
    AUTO,
    auto_chunk,
    check_particle_chunk,
    chunk_bound,
    plain_run,
)
from pyro_vae.util import budget, memory
from pyro_vae.util.errors import ConfigError, DataError, PyroVAEError, check_count


class EvaluationError(PyroVAEError):
    """The log-weights are not finite: the model or guide returned NaN or ±inf densities."""


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


def batch_result(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    draws: Draws,
    *,
    khat: bool | None,
    keep_log_weights: bool,
    first_index: int = 0,
) -> EvaluationResult:
    """The statistics of one call's datapoints (the first of them ``first_index`` of the data
    set, for messages), streamed over the particle chunks of ``draws`` (``result.vectorized``
    says how they were drawn, found by the probe when ``draws.vectorize`` is ``None``)."""
    num_particles = draws.num_particles
    with_khat = num_particles >= MIN_KHAT_PARTICLES if khat is None else khat
    accumulator = _WeightAccumulator()
    tail = ParetoTail(num_particles) if with_khat else None
    blocks: list[torch.Tensor] | None = [] if keep_log_weights else None
    global_sum, global_sites, summed_sites, whole_data_set = 0.0, (), (), False
    #: each chunk's Σ over its particles of TraceEnum's ELBO, [N]; None once one lacks it
    enum_sums: list[torch.Tensor] | None = []
    vectorized = draws.vectorize is not False
    for chunk in log_weight_chunks(model, guide, args, kwargs, draws):
        vectorized = chunk.vectorized
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
        vectorized=vectorized,
        global_term=global_term,
        summed_sites=summed_sites,
        whole_data_set=whole_data_set,
        trace_enum_elbo=(sum(enum_sums) / num_particles).cpu()
        if enum_sums and summed_sites
        else None,
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
    particle_chunk: int | str | None = None,
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
    With ``keep_log_weights`` the ``[K, N]`` log-weights are kept on the result. Particles are
    drawn all at once by default; ``particle_chunk`` bounds a call's particles, and ``"auto"``
    sizes the chunk from the pair (:func:`resolve_draws`).

    The module behind ``model`` and ``guide`` (when they are its bound methods) runs in eval
    mode (dropout off, batch norm on its running statistics) and gets its mode back at the end.
    Particles are drawn in one vectorized call unless a probe finds that the pair's networks
    see the particle dimension (:mod:`pyro_vae.core.vectorization`, on the first chunk: see
    :func:`~pyro_vae.evaluate.chunks.log_weight_chunks`); then one call per particle, K times
    slower, and the result says ``vectorized = False``.

    A pair with no plate that holds every observed site is scored as one datapoint, the
    whole data set (``result.whole_data_set``): its log p̂ and bound are the data set's, and
    per-datapoint statistics do not apply.

    :raises ConfigError: for an ambiguous data plate, or a bad option.
    :raises DataError: if a floating-point tensor argument holds NaN or infinite values.
    :raises EvaluationError: if any datapoint's log-weights are NaN or infinite.
    """
    check_count("num_particles", num_particles)
    check_particle_chunk(particle_chunk)
    check_finite_inputs(args, kwargs)
    try:
        rows = batch_length(args, kwargs)
    except DataError:  # no tensor with a datapoint dimension: the data set is one datapoint
        rows = 1
    require_weights_memory(
        num_particles, particle_chunk, rows, rows, khat, keep_log_weights, data_device(args, kwargs)
    )
    with eval_mode(model, guide):
        draws = resolve_draws(
            model, guide, args, kwargs, num_particles, particle_chunk, max_plate_nesting, data_plate
        )
        draws = replace(draws, whole=True)
        with budget.work(
            num_chunks(num_particles, draws.particle_chunk),
            f"evaluating {num_particles:,} particles",
        ):
            return batch_result(
                model, guide, args, kwargs, draws, khat=khat, keep_log_weights=keep_log_weights
            )


def resolve_draws(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    particle_chunk: int | str | None,
    max_plate_nesting: int | None,
    data_plate: str | None,
) -> Draws:
    """The :class:`Draws` of an evaluation, the vectorization left to the first chunk's probe.

    ``particle_chunk`` is kept as given (``None``: all particles in one call) except
    ``"auto"``: then :func:`~pyro_vae.evaluate.sizing.auto_chunk` sizes it from one plain run
    of the pair (:func:`~pyro_vae.evaluate.sizing.plain_run`, which also gives the plate
    nesting when ``max_plate_nesting`` is not given), so that a chunk's largest site tensor
    holds about :data:`~pyro_vae.evaluate.sizing.CHUNK_BYTES`; one particle needs no sizing.
    The size changes which random numbers a particle gets, not their distribution."""
    run = None
    if max_plate_nesting is None or (particle_chunk == AUTO and num_particles > 1):
        run = plain_run(model, guide, args, kwargs)
    nesting = run.max_plate_nesting if max_plate_nesting is None else max_plate_nesting
    chunk = particle_chunk
    if particle_chunk == AUTO:
        chunk = 1 if run is None else auto_chunk(num_particles, run.bytes_per_particle)
    return Draws(num_particles, chunk, nesting, data_plate, vectorize=None)


def data_device(args: tuple, kwargs: dict) -> torch.device:
    """The device of a call's first tensor (the CPU without one)."""
    tensors = (t for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor))
    return next((t.device for t in tensors), torch.device("cpu"))


def require_weights_memory(
    num_particles: int,
    particle_chunk: int | str | None,
    rows: int,
    total_rows: int,
    khat: bool | None,
    keep_log_weights: bool,
    device: torch.device,
) -> None:
    """Refuse, before drawing anything, an evaluation whose arrays that grow with the number
    of particles cannot fit (:func:`pyro_vae.util.memory.require`): a chunk's ``[k, rows]``
    log-weights, the ``[M + 1, rows]`` largest ones k-hat keeps and, when kept, all
    ``[K, total_rows]`` log-weights, in float64. The pair's own activations are not counted
    (the command line measures them first). A ``num_particles`` that is not a positive integer
    is left to the evaluation's own checks. An automatic chunk counts as the largest it can be
    on ``rows`` datapoints (:func:`~pyro_vae.evaluate.sizing.chunk_bound`)."""
    if not isinstance(num_particles, int) or num_particles < 1:
        return
    if particle_chunk == AUTO:
        chunk = chunk_bound(num_particles, rows)
    else:
        chunk = num_particles if particle_chunk is None else min(particle_chunk, num_particles)
    with_khat = num_particles >= MIN_KHAT_PARTICLES if khat is None else khat
    nbytes = 8 * (
        max(chunk, 1) * rows
        + (tail_size(num_particles) + 1) * rows * bool(with_khat)
        + num_particles * total_rows * bool(keep_log_weights)
    )
    memory.require(
        nbytes,
        f"evaluating num_particles={num_particles} in chunks of particle_chunk={chunk} on "
        f"{rows:,} datapoints at a time",
        device,
    )


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
