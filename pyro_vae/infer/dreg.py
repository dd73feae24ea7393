"""``dreg``: the importance-weighted bound with the doubly reparameterized gradient (Tucker,
Lawson, Gu and Maddison 2018), see :class:`DoublyReparameterizedELBO`."""

from __future__ import annotations

import math

import torch

from pyro_vae.core.particles import Particles
from pyro_vae.core.traces import latent_sites
from pyro_vae.infer.bounds import (
    Objective,
    beta_log_weight,
    fixed_draw_log_weights,
    global_term,
    grouped,
    log_weights,
    score_free_log_q,
    stl_log_weights,
    weighted,
)
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.infer.iwae import importance_weighted_elbo


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
            if (
                batch < -particles.data_dim
                or value.shape[batch + particles.data_dim] != particles.num_data
                or particles.plated
                and (
                    batch < -particles.particle_dim
                    or value.shape[batch + particles.particle_dim] != particles.num_draws
                )
            ):
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
    guide's own dependence on it are rescaled once (the class attribute ``draw_view``, the
    gate that hands out those aliases). Otherwise (an unguided or global latent, or a subclass
    with ``draw_view = None``) the model runs a second time on the detached draws, guided and
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
    draw_view = _GradientGate
    parallel_enumeration = False
    needs_deterministic_guide = True
    sums_enumerated = True

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        beta, k = self.beta, self.importance_samples
        if particles.configurations:  # log (1/K) Σ_k Σ_c w_kc, see summed_doubly_reparameterized
            return Objective(summed_doubly_reparameterized(particles.configurations, beta, k))
        if not gradient:
            return Objective(
                importance_weighted_elbo(particles, beta, k), global_term(particles, beta, k)
            )
        gate = particles.view
        if isinstance(gate, _GradientGate) and gate.fits(particles):
            surrogate = self._single_pass(particles, gate)
        else:
            surrogate = doubly_reparameterized_surrogate(particles, beta, k)
        return Objective(surrogate, global_term(particles, beta, k, score_free=True))

    def _single_pass(self, particles: Particles, gate: _GradientGate) -> torch.Tensor:
        """LSE_k lw^stl_k − log K on the model's one run, ``[P, N]``, with ``gate`` set to
        multiply the path derivative of draw k by (1 − β) + β w̃_k."""
        latent = particles.guide_latents
        if len(latent) == 1:  # read from the traced site, at the value the model saw
            site = latent[0]
            log_q = particles.reduce(
                particles.log_prob(site, value=particles.views.nodes[site["name"]]["value"]),
                site["name"],
            )
        else:
            log_q = particles.site_total(latent_sites(particles.replay(on_views=True)))
        score = score_free_log_q(particles)
        log_weights = grouped(
            beta_log_weight(
                particles.log_lik, particles.log_prior, log_q + (score.detach() - score), self.beta
            ),
            self.importance_samples,
        )
        normalized = torch.softmax(log_weights.detach(), dim=1)
        gate.open((1 - self.beta) + self.beta * normalized, particles)
        return torch.logsumexp(log_weights, 1) - math.log(self.importance_samples)


_Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def surrogate_parts(particles: Particles, beta: float, importance_samples: int) -> _Parts:
    """The log-weights the surrogate combines, each ``[P, K, N]``: lw^stl(z), lw^stl(sg z),
    lw^stl(sg z) with the unguided latents' score put back, and the plain β-weighted ones."""
    stl = stl_log_weights(particles, beta)
    replayed = particles.replay(model=True)
    stl_fixed = fixed_draw_log_weights(particles, beta, replayed)
    fixed_weights = stl_fixed
    if particles.unguided_latents and beta != 0:
        score = particles.site_total(
            [replayed.nodes[site["name"]] for site in particles.unguided_latents]
        )
        fixed_weights = stl_fixed + weighted(beta, score - score.detach())
    k = importance_samples
    return (
        grouped(stl, k),
        grouped(stl_fixed, k),
        grouped(fixed_weights, k),
        log_weights(particles, beta, k),
    )


def doubly_reparameterized(beta: float, groups: list[_Parts], count: int) -> torch.Tensor:
    """The DReG surrogate, ``[P, N]``, over the draws of every group (concatenated along the
    draw dimension: the K draws of each enumerated configuration), with the bound's
    normalizer ``log count`` (K: the configurations are summed, not averaged)."""
    stl, stl_fixed, fixed_weights, log_weights = (torch.cat(parts, 1) for parts in zip(*groups))
    normalized = torch.softmax(log_weights.detach(), dim=1)
    coefficient = (1 - beta) * normalized + beta * normalized.square()
    path = (coefficient * (stl - stl_fixed)).sum(1)
    return torch.logsumexp(fixed_weights, 1) - math.log(count) + path


def doubly_reparameterized_surrogate(
    particles: Particles, beta: float, importance_samples: int
) -> torch.Tensor:
    """The DReG surrogate of the IWAE bound on ``particles`` (``[P, N]``), from a second run
    of the model on the detached draws (guided and unguided latents): any pair, and the same
    loss and gradients, up to rounding, as the single run through the gate."""
    return doubly_reparameterized(
        beta, [surrogate_parts(particles, beta, importance_samples)], importance_samples
    )


def summed_doubly_reparameterized(
    configurations: tuple[tuple[dict, Particles], ...], beta: float, importance_samples: int
) -> torch.Tensor:
    r"""With guide sites c marked for enumeration, the bound of ``iwae``,
    log (1/K) Σ_k Σ_c w_kc, whose K·C draws z_kc ~ q(z | x, c) each come from a
    reparameterized proposal: the identity that rewrites the score terms holds draw by draw,
    so the gradient is the one above with w̃ normalized over all K·C draws; ``[P, N]``, from
    the draws of each configuration (:attr:`~pyro_vae.core.particles.Particles.configurations`)."""
    groups = [
        surrogate_parts(particles, beta, importance_samples) for _, particles in configurations
    ]
    return doubly_reparameterized(beta, groups, importance_samples)
