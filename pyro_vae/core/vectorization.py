"""Whether a pair's networks may be handed a particle dimension, found out rather than assumed.

The evaluator and the estimators draw K particles at once by running the model and guide inside
an outer plate, so every tensor a network sees gains a leading dimension ``[K, N, ...]``. A
network written for ``[N, ...]`` inputs may notice: ``BatchNorm1d`` on a 3-D input,
``softmax(dim=1)`` meant for the feature axis (it then normalizes over the datapoints), boolean
mask indexing, ``torch.cat`` with an input that was not broadcast. Some fail loudly, others give
other numbers without a word.

:func:`particle_mismatch` probes a pair on a batch: a vectorized call with two particles, then
each particle's draws replayed through the pair run on its own, without the particle plate (as
the pair would run in plain Pyro). When the log-weights differ beyond float rounding, or the
vectorized call fails, it returns the reason; the evaluator then draws particles one call at a
time (correct, K times slower) and the estimators refuse more than one draw per step.
:func:`replay_mismatch` and :func:`failure_mismatch` are its two halves for a vectorized draw
made anyway (the evaluator's first particle chunk): the check costs the two replays alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine

from pyro_vae.core.log_probs import ParticleLogProbs, vectorized_log_probs
from pyro_vae.util.errors import PyroVAEError
from pyro_vae.util.rng import saved_rng

PROBE_PARTICLES = 2
RELATIVE_TOLERANCE = 1e-4  # float32 rounding of sums over a few hundred terms, with margin


def _particle_trace(
    trace_in: Any, index: int, particle_dim_from_right: int, num_particles: int, skip: Any = ()
) -> Any:
    """A trace holding particle ``index``'s value of every latent site of ``trace_in`` (drawn
    with ``num_particles`` particles; except the sites named in ``skip``)."""
    trace = poutine.Trace()
    for name, site in trace_in.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or name in skip:
            continue
        value = site["value"]
        dim = value.dim() - site["fn"].event_dim - particle_dim_from_right
        if dim >= 0 and value.shape[dim] == num_particles:
            value = value.select(dim, index)
        trace.add_node(
            name, type="sample", value=value, is_observed=False, infer=site["infer"], fn=site["fn"]
        )
    return trace


def _scale(values: torch.Tensor) -> float:
    return max(1.0, float(values.abs().max()))


def _single(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    start: Callable[[], None],
    max_plate_nesting: int,
    data_plate: str | None,
    require_data_plate: bool = True,
) -> torch.Tensor | None:
    """``[1, N]`` log-weights of one call without the particle plate, from the random state
    ``start()`` sets (``None`` if the pair fails that way too: then the particle dimension is
    not what it trips on)."""
    start()
    try:
        return vectorized_log_probs(
            model,
            guide,
            *args,
            num_particles=1,
            max_plate_nesting=max_plate_nesting,
            data_plate=data_plate,
            vectorize=False,
            require_data_plate=require_data_plate,
            **kwargs,
        ).log_weights
    except PyroVAEError:
        raise
    except Exception:  # the user's code failing on its own: its error is reported elsewhere
        return None


@torch.no_grad()
def particle_mismatch(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    max_plate_nesting: int,
    data_plate: str | None = None,
    require_data_plate: bool = True,
) -> str | None:
    """``None`` when two vectorized particles give the log-weights of the same draws replayed
    one at a time (or when the pair fails without a particle dimension too); otherwise why
    not, in one line. Every run starts from the random state found on entry (a subsampled
    plate draws its subsample first, the same each time), which it leaves advanced: call it
    on a fork."""
    start = saved_rng()
    options = (max_plate_nesting, data_plate, require_data_plate)
    try:
        vectorized = vectorized_log_probs(
            model,
            guide,
            *args,
            num_particles=PROBE_PARTICLES,
            max_plate_nesting=max_plate_nesting,
            data_plate=data_plate,
            require_data_plate=require_data_plate,
            **kwargs,
        )
    except Exception as exc:  # the user's code meeting a shape it was not written for?
        return failure_mismatch(exc, model, guide, args, kwargs, start, *options)
    return replay_mismatch(vectorized, PROBE_PARTICLES, model, guide, args, kwargs, start, *options)


def failure_mismatch(
    exc: Exception,
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    start: Callable[[], None],
    max_plate_nesting: int,
    data_plate: str | None = None,
    require_data_plate: bool = True,
) -> str | None:
    """Why a vectorized call that raised ``exc`` cannot be used, or ``None`` when the pair run
    without a particle plate (from ``start()``'s random state) fails too: then the particle
    dimension is not what it trips on (a rule of the package broken either way re-raises)."""
    options = (max_plate_nesting, data_plate, require_data_plate)
    if _single(model, guide, args, kwargs, start, *options) is None:
        if isinstance(exc, PyroVAEError):
            raise exc
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"with a particle dimension the pair fails ({type(exc).__name__}: {first})"


def replay_mismatch(
    vectorized: ParticleLogProbs,
    num_particles: int,
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    start: Callable[[], None],
    max_plate_nesting: int,
    data_plate: str | None = None,
    require_data_plate: bool = True,
) -> str | None:
    """``None`` when the first and last of the ``num_particles`` particles of a vectorized draw
    (drawn from ``start()``'s random state) give the same log-weights replayed one at a time,
    each through the pair run without the particle plate; otherwise why not, in one line."""
    particle_dim = max_plate_nesting + 1
    indices = sorted({0, num_particles - 1})
    singles = []
    for index in indices:
        guide_draws = _particle_trace(vectorized.guide_trace, index, particle_dim, num_particles)
        # latents the guide leaves to the prior are drawn by the model: replay those too
        prior_draws = _particle_trace(
            vectorized.model_trace, index, particle_dim, num_particles, skip=guide_draws.nodes
        )
        single = _single(
            poutine.replay(model, trace=prior_draws),
            poutine.replay(guide, trace=guide_draws),
            args,
            kwargs,
            start,
            max_plate_nesting,
            data_plate,
            require_data_plate,
        )
        if single is None:
            return None
        singles.append(single)
    single = torch.cat(singles)
    batched = vectorized.log_weights
    if batched.dim() == 2 and batched.shape[0] == num_particles:
        batched = batched[indices]
    if single.shape != batched.shape:
        return (
            f"with a particle dimension the log-weights have shape "
            f"{list(vectorized.log_weights.shape)}, one particle at a time {list(single.shape)}"
        )
    error = float((single - batched).abs().max())
    if not error <= RELATIVE_TOLERANCE * _scale(single):
        return (
            f"the log-weights of particles drawn together differ from the same draws "
            f"scored one at a time by up to {error:.3g} nats: a network sees the particle "
            "dimension (e.g. BatchNorm, softmax over dim=1, mask indexing)"
        )
    return None
