r"""The math that several estimators share, over the draws of
:class:`~pyro_vae.core.particles.Particles` (M = P·K draws, N datapoints): the β-weighted
log-weight of one draw, the log-mean-exp of K log-weights, the global latents' term, the
score-free log q that ``stl``, ``dreg`` and ``rws`` share, the log-weights at fixed draws whose
gradient is the model's part of an importance-weighted gradient (``dreg``, ``piwae``, ``rws``),
and :class:`Objective`, what an estimator's :meth:`~pyro_vae.infer.ELBOEstimator.objective`
returns.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pyro import poutine

from pyro_vae.core.particles import Particles
from pyro_vae.core.traces import latent_sites
from pyro_vae.util.errors import ConfigError


class Objective(NamedTuple):
    """What :meth:`~pyro_vae.infer.ELBOEstimator.objective` returns.

    ``per_datapoint``: the bound's estimate per particle and datapoint, ``[P, N]``: with
    ``gradient=True`` a surrogate of the same value whose gradient is the estimator's.
    ``global_term``: the global latents' term per particle, ``[P]`` (``None`` without global
    latents), weighted in the loss by the batch's share of the data set
    (:attr:`~pyro_vae.infer.ELBOEstimator.global_weight`).
    """

    per_datapoint: torch.Tensor
    global_term: torch.Tensor | None = None


def weighted(beta: float, term: torch.Tensor) -> torch.Tensor:
    """``beta * term``, without the multiplication at β = 1 (the same numbers)."""
    return term if beta == 1 else beta * term


def beta_log_weight(
    log_lik: torch.Tensor, log_prior: torch.Tensor, log_q: torch.Tensor, beta: float
) -> torch.Tensor:
    r"""The β-weighted log-weight of single draws,
    :math:`\log p(x|z) + \beta\,(\log p(z) - \log q(z|x))` (elementwise)."""
    return log_lik + weighted(beta, log_prior - log_q)


def importance_weighted_bound(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r""":math:`\log \frac1K \sum_k w_k` over the K entries of ``log_weights`` along ``dim``
    (the IWAE bound of one set of K draws; the ELBO's single-draw estimate when K = 1)."""
    if log_weights.shape[dim] == 1:
        return log_weights.squeeze(dim)
    return torch.logsumexp(log_weights, dim) - math.log(log_weights.shape[dim])


def grouped(per_draw: torch.Tensor, importance_samples: int) -> torch.Tensor:
    """Per-draw values ``[P·K, N]`` as ``[P, K, N]``."""
    return per_draw.reshape(-1, importance_samples, per_draw.shape[-1])


def log_weights(particles: Particles, beta: float, importance_samples: int) -> torch.Tensor:
    """The β-weighted log-weights of the draws, ``[P, K, N]``, with the sites enumerated in
    parallel summed out inside each
    (:meth:`~pyro_vae.core.particles.Particles.summed_log_weights`)."""
    if particles.guide_enumerated:
        return grouped(particles.summed_log_weights(beta), importance_samples)
    return grouped(
        beta_log_weight(particles.log_lik, particles.log_prior, particles.log_q, beta),
        importance_samples,
    )


def global_term(
    particles: Particles, beta: float, importance_samples: int, score_free: bool = False
) -> torch.Tensor | None:
    """β [log p(θ) − log q(θ)] of the global latents θ per particle, averaged over its K
    draws, ``[P]`` (``None`` without global latents). ``score_free`` drops the score term of
    log q(θ) from the gradient, leaving the value (the guide is replayed on the detached
    draws, as in :func:`score_free_log_q`)."""
    if not particles.global_latents:
        return None
    log_q = particles.global_log_q
    if score_free:
        score = particles.global_total(latent_sites(particles.replay()))
        log_q = log_q + (score.detach() - score)
    term = weighted(beta, particles.global_log_prior - log_q)
    return term.reshape(-1, importance_samples).mean(1)


def score_free_log_q(particles: Particles) -> torch.Tensor:
    """log q_φ(sg z), ``[P·K, N]``: its gradient is the score ∂_φ log q_φ(z) at fixed z."""
    latent = particles.guide_latents
    if len(latent) == 1 and particles.is_local(latent[0]):  # read from the traced site
        site = latent[0]
        return particles.reduce(particles.log_prob(site, value=site["value"].detach()))
    replayed = particles.replay()
    if [s["name"] for s in latent_sites(replayed)] != [s["name"] for s in latent]:
        raise ConfigError(
            "the guide's latent sites changed when replayed on its own draws; "
            "stl and dreg need a guide with a static structure"
        )
    return particles.site_total(latent_sites(replayed))


def stl_log_weights(particles: Particles, beta: float) -> torch.Tensor:
    """log w_β with the score term of log q removed (value unchanged), ``[P·K, N]``."""
    score = score_free_log_q(particles)
    log_q = particles.log_q + (score.detach() - score)
    return beta_log_weight(particles.log_lik, particles.log_prior, log_q, beta)


def fixed_draw_log_weights(
    particles: Particles, beta: float, model_trace: poutine.Trace
) -> torch.Tensor:
    r"""The β-weighted log-weights with the model's densities read at the detached draws and
    log q by value only, :math:`\log p_\theta(x \mid \mathrm{sg}\,z) + \beta\,[\log
    p_\theta(\mathrm{sg}\,z) - \mathrm{sg}\log q(z \mid x)]`, ``[P·K, N]``, from
    ``model_trace``: a run of the model on the detached draws
    (:meth:`~pyro_vae.core.particles.Particles.replay` with ``model=True``, or the draw's own
    model trace when the model was handed detached draws). The value is log w_β; the gradient
    of an importance-weighted bound of these is :math:`\sum_k \tilde w_k \nabla_\theta \log
    p_\theta(x, z_k)` at fixed draws: no path through the draws, no score of q."""
    log_lik = particles.log_lik_of(model_trace)
    log_prior = particles.site_total(
        [model_trace.nodes[site["name"]] for site in particles.guided_latents]
    )
    return beta_log_weight(log_lik, log_prior, particles.log_q.detach(), beta)
