"""``dreg``: the importance-weighted bound with the doubly reparameterized gradient (Tucker,
Lawson, Gu and Maddison 2018), see :class:`DoublyReparameterizedELBO`."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .elbo import ELBOEstimator, _weighted, beta_log_weight
from .particles import _observed_sites, _Particles


class DoublyReparameterizedELBO(ELBOEstimator):
    r"""The IWAE bound with the doubly reparameterized gradient (DReG; Tucker, Lawson, Gu and
    Maddison 2018).

    Values are those of :class:`ImportanceWeightedELBO`, and so are the gradients of parameters
    that only the model's densities use (the decoder's) when the guide samples every model
    latent. For the guide, the score terms of the IWAE gradient are rewritten by a second
    reparameterization; with normalized weights w̃_k and β = 1:

    .. math::

        \widehat\nabla_\phi = \sum_k \tilde w_k^2\,
        \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi},

    whose variance does not grow with K the way IWAE's does. For a rate weight β the same
    identity gives the coefficient (1 − β) w̃_k + β w̃_k² (β = 0 has no score term at all).
    The surrogate, with lw^stl the log-weights of :class:`StickingTheLandingELBO`, is

    .. math::

        \operatorname{LSE}_k \bigl[\mathrm{lw}^{stl}_k(\mathrm{sg}\,z)
        + \beta\,(\log p_\theta(\mathrm{sg}\,z_{u,k}) - \mathrm{sg}(\cdot))\bigr] - \log K
        + \sum_k \mathrm{sg}(c_k)\,[\mathrm{lw}^{stl}_k(z) - \mathrm{lw}^{stl}_k(\mathrm{sg}\,z)],
        \qquad c_k = (1-\beta)\tilde w_k + \beta \tilde w_k^2 .

    Its value is the IWAE bound; the first term gives Σ_k w̃_k ∇_θ log w_k at fixed draws, the
    bracket only the path derivative through the draws. The model runs a second time on the
    detached draws, guided and unguided. An unguided latent z_u is part of the proposal
    q(z_g|x) p_θ(z_u|z_g), so the identity rewrites its score in θ too: the term
    β [log p_θ(sg z_u) − sg(·)] (value 0) puts that score back at weight w̃_k, and its draws'
    paths get the coefficient c_k. K = 1 is :class:`StickingTheLandingELBO` when the guide
    samples every model latent.

    Guide sites c marked for enumeration are summed out as in ``iwae``: the bound is
    log (1/K) Σ_k Σ_c w_kc, each configuration with its own draws z_kc ~ q(z | x, c), and the
    identity above holds draw by draw, so w̃ is normalized over all K·C draws. The guide's
    q(c | x) enters no weight and gets no gradient from this bound.
    """

    name = "dreg"
    needs_deterministic_guide = True
    sums_enumerated = True

    def _surrogate(self, particles: _Particles, model: Callable, guide: Callable, args: tuple,
                   kwargs: dict) -> torch.Tensor:
        return doubly_reparameterized(self.beta, [_parts(self, particles, model, guide, args,
                                                         kwargs)], self.importance_samples)

    def _summed_bound(self, model: Callable, guide: Callable, args: tuple, kwargs: dict,
                      sites: dict[str, torch.Tensor], first: _Particles
                      ) -> tuple[torch.Tensor, float]:
        r"""With guide sites c marked for enumeration, the bound of ``iwae``,
        log (1/K) Σ_k Σ_c w_kc, whose K·C draws z_kc ~ q(z | x, c) each come from a
        reparameterized proposal: the identity that rewrites the score terms holds draw by
        draw, so the gradient is the one above with w̃ normalized over all K·C draws."""
        return summed_doubly_reparameterized(self, model, guide, args, kwargs, sites)


_Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _parts(estimator: ELBOEstimator, particles: _Particles, model: Callable, guide: Callable,
           args: tuple, kwargs: dict) -> _Parts:
    """The log-weights the surrogate combines, each ``[P, K, N]``: lw^stl(z), lw^stl(sg z),
    lw^stl(sg z) with the unguided latents' score put back, and the plain β-weighted ones."""
    beta = estimator.beta
    stl = estimator._stl_log_weights(particles, guide, args, kwargs)
    replayed = particles.replay(model, args, kwargs, model=True)
    log_lik = particles.site_total(_observed_sites(replayed))
    log_prior = particles.site_total([replayed.nodes[site["name"]]
                                      for site in particles.guided_latents])
    stl_fixed = beta_log_weight(log_lik, log_prior, particles.log_q.detach(), beta)
    fixed_weights = stl_fixed
    if particles.unguided_latents and beta != 0:
        score = particles.site_total([replayed.nodes[site["name"]]
                                      for site in particles.unguided_latents])
        fixed_weights = stl_fixed + _weighted(beta, score - score.detach())
    grouped = estimator._grouped
    return (grouped(stl), grouped(stl_fixed), grouped(fixed_weights),
            estimator._log_weights(particles))


def doubly_reparameterized(beta: float, groups: list[_Parts], count: int) -> torch.Tensor:
    """The DReG surrogate, ``[P, N]``, over the draws of every group (concatenated along the
    draw dimension: the K draws of each enumerated configuration), with the bound's
    normalizer ``log count`` (K: the configurations are summed, not averaged)."""
    stl, stl_fixed, fixed_weights, log_weights = (torch.cat(parts, 1) for parts in zip(*groups))
    normalized = torch.softmax(log_weights.detach(), dim=1)
    coefficient = (1 - beta) * normalized + beta * normalized.square()
    path = (coefficient * (stl - stl_fixed)).sum(1)
    return torch.logsumexp(fixed_weights, 1) - math.log(count) + path


def summed_doubly_reparameterized(estimator: ELBOEstimator, model: Callable, guide: Callable,
                                  args: tuple, kwargs: dict, sites: dict[str, torch.Tensor]
                                  ) -> tuple[torch.Tensor, float]:
    """The DReG surrogate of the summed bound log (1/K) Σ_k Σ_c w_kc (``[P, N]``), one run of
    the pair per configuration c of the enumerated ``sites``, and the sites' scale factor."""
    groups, scale = [], 1.0
    for _, fixed_model, fixed_guide, particles in estimator._per_configuration(
            model, guide, args, kwargs, sites):
        groups.append(_parts(estimator, particles, fixed_model, fixed_guide, args, kwargs))
        scale = particles.scale
    return doubly_reparameterized(estimator.beta, groups, estimator.importance_samples), scale
