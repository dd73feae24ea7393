"""``iwae``: the K-sample importance-weighted bound (Burda, Grosse and Salakhutdinov 2016), see
:class:`ImportanceWeightedELBO`."""

from __future__ import annotations

import torch

from pyro_vae.core.particles import Particles
from pyro_vae.infer.bounds import (
    Objective,
    beta_log_weight,
    global_term,
    importance_weighted_bound,
    log_weights,
)
from pyro_vae.infer.elbo import ELBOEstimator


def importance_weighted_elbo(
    particles: Particles, beta: float, importance_samples: int
) -> torch.Tensor:
    r"""The IWAE bound of each particle's K draws per datapoint, ``[P, N]``:
    log (1/K) Σ_k w_k of the β-weighted log-weights, the enumerated sites summed inside each
    w_k (at K = 1 without them, the log-weights themselves, which the log-mean-exp of one draw
    returns unchanged)."""
    if importance_samples == 1 and not particles.guide_enumerated:
        return beta_log_weight(particles.log_lik, particles.log_prior, particles.log_q, beta)
    return importance_weighted_bound(log_weights(particles, beta, importance_samples), dim=1)


class ImportanceWeightedELBO(ELBOEstimator):
    r"""The importance-weighted bound (IWAE; Burda, Grosse and Salakhutdinov 2016) per datapoint:

    .. math::

        \mathcal L_K = \mathbb E\Bigl[\log \tfrac1K \textstyle\sum_{k=1}^K w_k\Bigr],
        \qquad \log w_k = \log p(x|z_k) + \beta(\log p(z_k) - \log q(z_k|x)),
        \quad z_{1:K} \sim q(z|x),

    with the logsumexp over the K draws of each datapoint (inside the data plate), then summed
    over datapoints and averaged over P independent sets of K draws. β weights the rate part
    inside each log-weight; at β = 1 the bound lies below log p(x), rises with K and tends to
    it. K = 1 is :class:`TraceELBO`. The gradient is the reparameterization gradient of the
    bound, Σ_k w̃_k ∇ log w_k with normalized weights w̃_k = w_k / Σ_j w_j.

    Guide sites c marked for enumeration are summed inside each weight, w_k = Σ_c w_kc
    (enumerated in parallel, one run), so the bound is the log of the sum over c; the global
    latents' term β [log p(θ) − log q(θ)] is averaged over the K draws of each particle.
    """

    name = "iwae"
    sums_enumerated = True

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        # the gradient is the bound's own: surrogate and value are one tensor
        return Objective(
            importance_weighted_elbo(particles, self.beta, self.importance_samples),
            global_term(particles, self.beta, self.importance_samples),
        )
