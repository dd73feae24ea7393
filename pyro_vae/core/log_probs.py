"""The evaluator's view of the draws of :mod:`pyro_vae.core.particles`: per-datapoint log p(x, z_k)
and log q(z_k | x) of K particles, with every enumerated site summed out, and the global
latents' terms per particle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pyro_vae.core.drawing import draw_particles
from pyro_vae.core.traces import guess_max_plate_nesting
from pyro_vae.util.errors import ConfigError


@dataclass
class ParticleLogProbs:
    """Per-particle, per-datapoint log-densities, each of shape ``[K, N]``.

    ``log_p`` is log p(x, z | θ) (the observed sites and the local latent sites the guide
    samples, with the sites enumerated in the model summed out; a model latent that the guide
    leaves to the prior cancels from the weight), ``log_q`` is log q(z | x, θ);
    ``log_weights`` = ``log_p − log_q``. With sites enumerated in the guide the two cannot be
    told apart inside the sum over their values: ``log_p`` is then the summed log-weight and
    ``log_q`` zeros. Global latents θ (sites outside the data plate) are drawn once per
    particle and shared by its datapoints; their log p(θ) and log q(θ) are ``log_p_global``
    and ``log_q_global``, shape ``[K]`` (zeros without global latents), named in
    ``global_sites``. The traces are kept for callers that need more.
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    model_trace: Any
    guide_trace: Any
    data_plate: str
    log_p_global: torch.Tensor | None = None
    log_q_global: torch.Tensor | None = None
    global_sites: tuple[str, ...] = ()
    #: the guide's sites enumerated and summed inside each weight
    guide_enumerated: tuple[str, ...] = ()
    #: with ``guide_enumerated``: the ELBO that ``TraceEnum_ELBO`` computes, per particle and
    #: datapoint (``[K, N]``; ``None`` where it is not defined, e.g. reused enumeration dims)
    trace_enum_elbo: torch.Tensor | None = None

    @property
    def log_weights(self) -> torch.Tensor:
        return self.log_p - self.log_q

    @property
    def global_log_weight(self) -> torch.Tensor:
        """log p(θ) − log q(θ) per particle, ``[K]``."""
        return self.log_p_global - self.log_q_global


def vectorized_log_probs(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_particles: int = 1,
    max_plate_nesting: int | None = None,
    data_plate: str | None = None,
    compact: bool = False,
    vectorize: bool = True,
    require_data_plate: bool = True,
    **kwargs: Any,
) -> ParticleLogProbs:
    """Per-datapoint log p(x, z_k) and log q(z_k|x) for ``num_particles`` draws z_k ~ q(z|x),
    read from the same draws the estimators use (:func:`draw_particles`, every enumerated site
    summed out).

    The particles are an outer vectorized plate at dim ``-(max_plate_nesting + 1)``; there is no
    Python loop over particles or datapoints. Gradients flow as usual (wrap in ``torch.no_grad()``
    for evaluation). ``compact=True``
    computes each site's log-density on :func:`~pyro_vae.core.traces.compact_distribution` (the same
    values with fewer operations; the evaluator uses it, under ``torch.no_grad()``).
    ``vectorize=False`` (one particle only) runs the pair without the particle plate, as it
    would run on its own: the leading dimension of the result is then added after the fact.
    Nothing is required of the guide's sites beyond a density (discrete sites may be sampled):
    this is importance sampling, not a gradient estimator. ``require_data_plate=False`` scores
    a pair whose observed sites share no plate as one datapoint, the data set.

    :returns: :class:`ParticleLogProbs` with ``log_p`` and ``log_q`` of shape ``[K, N]``.
    """
    if num_particles < 1:
        raise ConfigError(f"num_particles must be >= 1, got {num_particles}")
    if not vectorize and num_particles != 1:
        raise ConfigError("vectorize=False draws one particle per call")
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    drawn = draw_particles(
        model,
        guide,
        args,
        kwargs,
        num_particles,
        max_plate_nesting,
        plated=vectorize,
        data_plate=data_plate,
        compact=compact,
        require_data_plate=require_data_plate,
    )
    trace_enum_elbo = None
    if drawn.guide_enumerated:
        log_p = drawn.summed_log_weights(1.0)
        log_q = torch.zeros_like(log_p)
        try:
            trace_enum_elbo = drawn.expected_log_weights(1.0)
        except ConfigError:  # a guide that reuses enumeration dimensions
            trace_enum_elbo = None
    else:
        log_p = drawn.log_lik + drawn.log_prior
        log_q = drawn.log_q
    globals_ = drawn.global_latents
    return ParticleLogProbs(
        log_p,
        log_q,
        drawn.model_trace,
        drawn.guide_trace,
        drawn.data_plate,
        drawn.global_log_prior,
        drawn.global_log_q,
        tuple(site["name"] for site in globals_),
        drawn.guide_enumerated,
        trace_enum_elbo,
    )
