r"""``rws``: reweighted wake-sleep (Bornschein and Bengio 2015; Le, Kosiorek, Siddharth, Teh
and Wood 2019), see :class:`ReweightedWakeSleep`."""

from __future__ import annotations

import torch

from pyro_vae.core.particles import Particles
from pyro_vae.infer.bounds import (
    Objective,
    fixed_draw_log_weights,
    grouped,
    importance_weighted_bound,
    score_free_log_q,
)
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.infer.iwae import importance_weighted_elbo
from pyro_vae.infer.pair_checks import check_guided_and_local


class DetachedDraws:
    """Hands the model each guide draw detached (the same value, no gradient through it): the
    model's densities are then those at fixed draws, in the draw's one run of the model."""

    def __call__(self, site: dict) -> torch.Tensor:
        return site["value"].detach()


class ReweightedWakeSleep(ELBOEstimator):
    r"""Reweighted wake-sleep (RWS; Bornschein and Bengio 2015; Le, Kosiorek, Siddharth, Teh
    and Wood 2019, "Revisiting reweighted wake-sleep for models with stochastic control
    flow"), its wake phases for the model and the guide from the same K draws
    z_1, …, z_K ~ q_φ(z | x) of a datapoint, with normalized weights
    :math:`\tilde w_k = w_k / \sum_j w_j` taken as constants:

    .. math::

        \text{wake-}\theta:\ \sum_k \tilde w_k \nabla_\theta \log p_\theta(x, z_k),
        \qquad
        \text{wake-}\phi:\ \sum_k \tilde w_k \nabla_\phi \log q_\phi(z_k \mid x).

    Wake-θ is the gradient of the IWAE bound for the model's parameters. Wake-φ is a
    self-normalized importance-sampling estimate of :math:`-\nabla_\phi \mathrm{KL}(p_\theta(z
    \mid x) \,\|\, q_\phi(z \mid x))`: the guide moves towards the posterior, by the
    inclusive KL, whatever K, where IWAE's guide gradient loses its signal as K grows. Neither
    phase differentiates through the draws, so guide sites need no reparameterization:
    discrete guide sites are sampled, and RWS is the alternative to ``vimco`` for them (a
    continuous site without rsample is still refused). β weights the rate inside the
    log-weights that give w̃.

    The surrogate, with sg the stop-gradient, is

    .. math::

        \log \frac1K \sum_k \exp \bigl[\log p_\theta(x, \mathrm{sg}\,z_k)
        - \mathrm{sg} \log q(z_k \mid x)\bigr]
        + \sum_k \mathrm{sg}(\tilde w_k)\,\bigl[\log q_\phi(\mathrm{sg}\,z_k \mid x)
        - \mathrm{sg}(\cdot)\bigr]:

    the model is run on detached draws (the class attribute ``draw_view``), so the first term
    has the IWAE bound's value and the model's gradient only; the second has value 0 and the
    wake-φ gradient (log q_φ(sg z) read from the traced site, or, for a guide of several
    sites, from a replay of the guide on its detached draws). The loss reports the IWAE bound
    of the K draws, averaged over M = ``num_particles``. A step costs about what an ``iwae``
    step of the same M·K draws costs. K ≥ 2 (with one draw w̃ = 1 and wake-φ has expectation
    zero); the guide must sample every model latent, all in the data plate. The optional
    sleep phase (training q on the model's own samples) is not part of it.
    """

    name = "rws"
    min_importance_samples = 2
    scores_discrete = True
    needs_deterministic_guide = True
    draw_view = DetachedDraws

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        check_guided_and_local(self.name, particles)
        beta, k = self.beta, self.importance_samples
        if not gradient:
            return Objective(importance_weighted_elbo(particles, beta, k))
        detached = isinstance(particles.view, DetachedDraws)
        model_trace = particles.model_trace if detached else particles.replay(model=True)
        fixed = grouped(fixed_draw_log_weights(particles, beta, model_trace), k)  # [M, K, N]
        score = grouped(score_free_log_q(particles), k)
        normalized = torch.softmax(fixed.detach(), dim=1)
        wake_phi = (normalized * (score - score.detach())).sum(1)
        return Objective(importance_weighted_bound(fixed, 1) + wake_phi)
