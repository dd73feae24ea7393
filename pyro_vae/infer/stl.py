r"""``stl``: the ELBO with the "sticking the landing" gradient (Roeder, Wu and Duvenaud 2017),
see :class:`StickingTheLandingELBO`, and the score-free log q that it and ``dreg`` use.

Dropping the guide's score term ("sg" = stop-gradient): the guide is replayed on the detached
draws, so log q_φ(sg z) depends on φ only through the guide's parameters at fixed z; then
log q_φ(sg z) − sg(log q_φ(sg z)) has value 0 and gradient exactly the score
∂_φ log q_φ(z). This stays exact for hierarchical guides whose later sites depend on earlier
draws (a plain detach of each site's distribution parameters would also cut the path through
those draws). A guide with a single latent site cannot have such dependences, so there the
score-free term is read from the traced distribution itself without a second guide run; both
give the same numbers. The guide (and, for ``dreg``, the model) must be deterministic given its
sample sites (no dropout in train mode).
"""

from __future__ import annotations

from pyro_vae.core.particles import Particles
from pyro_vae.infer.bounds import Objective, beta_log_weight, global_term, stl_log_weights
from pyro_vae.infer.dreg import summed_doubly_reparameterized
from pyro_vae.infer.elbo import ELBOEstimator


class StickingTheLandingELBO(ELBOEstimator):
    r"""The ELBO with the "sticking the landing" gradient (STL; Roeder, Wu and Duvenaud 2017).

    The reparameterization gradient of the ELBO with respect to the guide's parameters φ is a
    path term plus the score term −β ∂_φ log q_φ(z) at fixed z, whose expectation is zero. STL
    drops the score term:

    .. math::

        \widehat\nabla = \nabla_\theta \log w_\beta(z)\big|_{z}
        + \frac{\partial \log w_\beta(z)}{\partial z} \frac{\partial z}{\partial \phi},

    through the surrogate log w_β(z) + β [log q_φ(sg z) − sg(log q_φ(sg z))] (sg: stop
    gradient). It is unbiased for the (β-)ELBO gradient and, at β = 1, has zero variance when
    q equals the posterior. Values are those of :class:`TraceELBO`. Global latents θ keep
    their term β [log p(θ) − log q(θ)] with its score term dropped the same way.

    Guide sites c marked for enumeration are summed out as in ``iwae`` at K = 1: the value is
    log Σ_c w_c, each configuration with its own draw z_c ~ q(z | x, c). That is an
    importance-weighted bound over C draws, for which dropping the score terms would be
    biased; the doubly reparameterized gradient of :class:`DoublyReparameterizedELBO` at K = 1
    (coefficients w̃_c², normalized over the configurations) is unbiased and keeps STL's
    property: zero variance in the guide's gradient when every q(z | x, c) is p(z | x, c).
    """

    name = "stl"
    parallel_enumeration = False
    needs_deterministic_guide = True
    sums_enumerated = True
    importance_hint = (
        "use dreg (the doubly reparameterized IWAE gradient) for importance samples inside it"
    )

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        if particles.configurations:  # log Σ_c w_c, DReG's gradient at K = 1
            return Objective(summed_doubly_reparameterized(particles.configurations, self.beta, 1))
        if not gradient:
            return Objective(
                beta_log_weight(particles.log_lik, particles.log_prior, particles.log_q, self.beta),
                global_term(particles, self.beta, 1),
            )
        return Objective(
            stl_log_weights(particles, self.beta),
            global_term(particles, self.beta, 1, score_free=True),
        )
