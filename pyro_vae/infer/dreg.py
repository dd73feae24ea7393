"""``dreg``: the importance-weighted bound with the doubly reparameterized gradient (Tucker,
Lawson, Gu and Maddison 2018), see :class:`DoublyReparameterizedELBO`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch

from pyro_vae.core.particles import Particles
from pyro_vae.core.traces import latent_sites
from pyro_vae.infer.elbo import ELBOEstimator, beta_log_weight, weighted


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
    bracket only the path derivative through the draws.

    One run of the model is enough when the guide samples every model latent and every latent
    is local: since c_k = w̃_k [(1 − β) + β w̃_k], the surrogate is the plain bound
    LSE_k lw^stl_k − log K, whose path derivative (w̃_k ∂lw^stl_k/∂z_k) is multiplied by
    (1 − β) + β w̃_k per draw and datapoint on its way back from z_k to the guide. The model
    (and, for a guide of several sites, a replay of the guide) gets each draw as an alias of
    the same value that does this rescaling, so gradients reaching an earlier draw through the
    guide's own dependence on it are rescaled once. Otherwise (``single_pass = False``, an
    unguided or global latent) the model runs a second time on the detached draws, guided and
    unguided. An unguided latent z_u is part of the proposal
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
    parallel_enumeration = False
    needs_deterministic_guide = True
    sums_enumerated = True
    #: One run of the model, its path gradients rescaled on the way back (see above); ``False``
    #: forces the second run on detached draws (the same gradients up to rounding).
    single_pass: ClassVar[bool] = True

    def _draw_view(self) -> Callable[[dict], torch.Tensor] | None:
        return _GradientGate() if self.single_pass and torch.is_grad_enabled() else None

    def _surrogate(self, particles: Particles, model: Callable, guide: Callable, args: tuple,
                   kwargs: dict) -> torch.Tensor:
        gate = particles.view
        if isinstance(gate, _GradientGate) and gate.fits(particles):
            return self._single_pass(particles, gate, guide, args, kwargs)
        return doubly_reparameterized(self.beta, [_parts(self, particles, model, guide, args,
                                                         kwargs)], self.importance_samples)

    def _single_pass(self, particles: Particles, gate: _GradientGate, guide: Callable,
                     args: tuple, kwargs: dict) -> torch.Tensor:
        """LSE_k lw^stl_k − log K on the model's one run, ``[P, N]``, with ``gate`` set to
        multiply the path derivative of draw k by (1 − β) + β w̃_k."""
        latent = particles.guide_latents
        if len(latent) == 1 and self.single_site_shortcut:
            site = latent[0]
            log_q = particles.reduce(particles.log_prob(
                site, value=particles.views.nodes[site["name"]]["value"]), site["name"])
        else:
            log_q = particles.site_total(latent_sites(
                particles.replay(guide, args, kwargs, on_views=True)))
        score = self._score_free_log_q(particles, guide, args, kwargs)
        log_weights = self._grouped(beta_log_weight(
            particles.log_lik, particles.log_prior, log_q + (score.detach() - score), self.beta))
        normalized = torch.softmax(log_weights.detach(), dim=1)
        gate.open((1 - self.beta) + self.beta * normalized, particles)
        return torch.logsumexp(log_weights, 1) - math.log(self.importance_samples)

    def _summed_bound(self, model: Callable, guide: Callable, args: tuple, kwargs: dict,
                      sites: dict[str, torch.Tensor], first: Particles
                      ) -> tuple[torch.Tensor, float]:
        r"""With guide sites c marked for enumeration, the bound of ``iwae``,
        log (1/K) Σ_k Σ_c w_kc, whose K·C draws z_kc ~ q(z | x, c) each come from a
        reparameterized proposal: the identity that rewrites the score terms holds draw by
        draw, so the gradient is the one above with w̃ normalized over all K·C draws."""
        return summed_doubly_reparameterized(self, model, guide, args, kwargs, sites)


class _GradientGate:
    """Hands the model each guide draw as an alias of the same value whose gradient, on the way
    back, is multiplied by a factor per draw and datapoint (:meth:`open`, before ``backward``);
    until then the aliases pass gradients unchanged."""

    def __init__(self) -> None:
        self.factor: torch.Tensor | None = None
        # the particle dim (None for a single draw without the particle plate) and the data
        # dim, both counted from the right of the batch shape
        self.dims: tuple[int | None, int] = (None, -1)

    def __call__(self, site: dict) -> torch.Tensor:
        value = site["value"]
        if not value.requires_grad:
            return value
        alias = value.view_as(value)
        event_dim = site["fn"].event_dim
        alias.register_hook(lambda grad: self._scaled(grad, event_dim))
        return alias

    def fits(self, particles: Particles) -> bool:
        """Whether every draw that reaches the model is a local guide latent with one value per
        draw and datapoint (no unguided or global latent; a single draw may lack the particle
        dimension; a data plate)."""
        if particles.unguided_latents or particles.global_latents or particles.data_dim is None:
            return False
        for site in particles.guide_latents:
            value = particles.views.nodes[site["name"]]["value"]
            batch = value.dim() - site["fn"].event_dim
            if (batch < -particles.data_dim
                    or value.shape[batch + particles.data_dim] != particles.num_data
                    or particles.plated and (
                        batch < -particles.particle_dim
                        or value.shape[batch + particles.particle_dim]
                        != particles.num_particles)):
                return False
        return True

    def open(self, factor: torch.Tensor, particles: Particles) -> None:
        """Rescale by ``factor`` (``[P, K, N]``, detached) from now on."""
        self.factor = factor.detach().reshape(particles.shape)
        self.dims = (particles.particle_dim if particles.plated else None, particles.data_dim)

    def _scaled(self, grad: torch.Tensor, event_dim: int) -> torch.Tensor:
        if self.factor is None:
            return grad
        batch = grad.dim() - event_dim
        shape = [1] * grad.dim()
        shape[batch + self.dims[1]] = self.factor.shape[1]
        if self.dims[0] is not None:  # a single draw without the particle plate has no such dim
            shape[batch + self.dims[0]] = self.factor.shape[0]
        return grad * self.factor.reshape(shape)


_Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _parts(estimator: ELBOEstimator, particles: Particles, model: Callable, guide: Callable,
           args: tuple, kwargs: dict) -> _Parts:
    """The log-weights the surrogate combines, each ``[P, K, N]``: lw^stl(z), lw^stl(sg z),
    lw^stl(sg z) with the unguided latents' score put back, and the plain β-weighted ones."""
    beta = estimator.beta
    stl = estimator._stl_log_weights(particles, guide, args, kwargs)
    replayed = particles.replay(model, args, kwargs, model=True)
    log_lik = particles.log_lik_of(replayed)
    log_prior = particles.site_total([replayed.nodes[site["name"]]
                                      for site in particles.guided_latents])
    stl_fixed = beta_log_weight(log_lik, log_prior, particles.log_q.detach(), beta)
    fixed_weights = stl_fixed
    if particles.unguided_latents and beta != 0:
        score = particles.site_total([replayed.nodes[site["name"]]
                                      for site in particles.unguided_latents])
        fixed_weights = stl_fixed + weighted(beta, score - score.detach())
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
