"""``dreg``: the importance-weighted bound with the doubly reparameterized gradient (Tucker,
Lawson, Gu and Maddison 2018), see :class:`DoublyReparameterizedELBO`."""

from __future__ import annotations

from typing import Callable

import torch

from .elbo import ELBOEstimator, _weighted, beta_log_weight, importance_weighted_bound
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
    """

    name = "dreg"
    needs_deterministic_guide = True

    def _surrogate(self, particles: _Particles, model: Callable, guide: Callable, args: tuple,
                   kwargs: dict) -> torch.Tensor:
        stl = self._stl_log_weights(particles, guide, args, kwargs)
        fixed = particles.replay(model, args, kwargs, model=True)
        log_lik = particles.site_total(_observed_sites(fixed))
        log_prior = particles.site_total([fixed.nodes[site["name"]]
                                          for site in particles.guided_latents])
        stl_fixed = beta_log_weight(log_lik, log_prior, particles.log_q.detach(), self.beta)
        fixed_weights = stl_fixed
        if particles.unguided_latents and self.beta != 0:
            score = particles.site_total([fixed.nodes[site["name"]]
                                          for site in particles.unguided_latents])
            fixed_weights = stl_fixed + _weighted(self.beta, score - score.detach())
        stl, stl_fixed = self._grouped(stl), self._grouped(stl_fixed)
        normalized = torch.softmax(self._log_weights(particles).detach(), dim=1)
        coefficient = (1 - self.beta) * normalized + self.beta * normalized.square()
        path = (coefficient * (stl - stl_fixed)).sum(1)
        return importance_weighted_bound(self._grouped(fixed_weights), dim=1) + path
