r"""``piwae``: the IWAE bound of all M·K draws for the model, MIWAE(M, K) for the guide
(Rainforth, Kosiorek, Le, Maddison, Igl, Wood and Teh 2018), see
:class:`PartiallyImportanceWeightedELBO`."""

from __future__ import annotations

import torch

from pyro_vae.core.particles import Particles
from pyro_vae.infer.bounds import (
    Objective,
    fixed_draw_log_weights,
    grouped,
    importance_weighted_bound,
    log_weights,
)
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.infer.pair_checks import check_guided_and_local


def all_draws_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """The IWAE bound of all M·K draws of each datapoint, ``[N]``, from log-weights
    ``[M, K, N]``."""
    return importance_weighted_bound(log_weights.flatten(0, 1), dim=0)


class PartiallyImportanceWeightedELBO(ELBOEstimator):
    r"""PIWAE(M, K) (Rainforth, Kosiorek, Le, Maddison, Igl, Wood and Teh 2018, "Tighter
    variational bounds are not necessarily better"): the model's parameters θ follow the
    gradient of the IWAE bound of all M·K draws of a datapoint, the guide's parameters φ the
    gradient of MIWAE(M, K), the average of M IWAE bounds of K draws each:

    .. math::

        \widehat\nabla_\theta = \nabla_\theta \log \frac{1}{MK} \sum_{m,k} w_{mk}
        = \sum_{m,k} \tilde w^{(MK)}_{mk} \nabla_\theta \log p_\theta(x, z_{mk}),
        \qquad
        \widehat\nabla_\phi = \nabla_\phi \frac1M \sum_m \log \frac1K \sum_k w_{mk},

    with M = ``num_particles`` and K = ``importance_samples`` (K ≥ 2). A tighter bound helps
    the model, but the signal-to-noise ratio of the guide's gradient falls as 1/√K with K
    draws inside the log and rises as √M with M outside it; PIWAE gives the model the tight
    IWAE_{MK} and the guide the better-behaved MIWAE(M, K) from the same M·K draws.

    The surrogate, with sg the stop-gradient and :math:`\mathrm{lw}(\mathrm{sg}\,z)` the
    log-weights with the model's densities read on a second run of the model on the detached
    draws (:func:`~pyro_vae.infer.bounds.fixed_draw_log_weights`), is

    .. math::

        \mathrm{IWAE}_{MK}[\mathrm{lw}(\mathrm{sg}\,z)]
        + \mathrm{MIWAE}[\mathrm{lw}(z)] - \mathrm{MIWAE}[\mathrm{lw}(\mathrm{sg}\,z)]:

    the first term carries the model's gradient at fixed draws and nothing for the guide; the
    difference cancels the model's part of MIWAE's gradient and keeps the guide's (through
    the draws and log q). A parameter used by both networks gets the sum of its two parts.

    The loss reports the model's bound, IWAE_{MK} per datapoint (the same value in each of
    the M rows), the bound ``iwae`` reports with ``importance_samples=M·K``. A step costs what
    an ``iwae`` step of M·K draws costs plus one more run of the model. The guide must sample
    every model latent, all in the data plate; guide sites marked for enumeration are refused.
    """

    name = "piwae"
    min_importance_samples = 2
    single_particle_is = "iwae"
    needs_deterministic_guide = True

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        check_guided_and_local(self.name, particles)
        k = self.importance_samples
        log_w = log_weights(particles, self.beta, k)  # [M, K, N]
        value = all_draws_bound(log_w).expand(self.num_particles, -1)  # [M, N]
        if not gradient:
            return Objective(value)
        fixed = grouped(
            fixed_draw_log_weights(particles, self.beta, particles.replay(model=True)), k
        )
        model_part = all_draws_bound(fixed)  # [N]: θ's gradient, IWAE_MK
        guide_part = importance_weighted_bound(log_w, 1) - importance_weighted_bound(fixed, 1)
        surrogate = model_part + guide_part  # [M, N]
        return Objective(surrogate + (value - surrogate).detach())
