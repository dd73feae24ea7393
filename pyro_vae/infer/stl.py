"""``stl``: the ELBO with the "sticking the landing" gradient (Roeder, Wu and Duvenaud 2017),
see :class:`StickingTheLandingELBO`; the score-free log q it uses is the base class's
(:mod:`pyro_vae.infer.elbo`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_vae.core.particles import Particles
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
    q equals the posterior. Values are those of :class:`TraceELBO`.

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
    importance_hint = ("use --elbo dreg (the doubly reparameterized IWAE gradient) for "
                       "importance samples inside it")

    def _surrogate(self, particles: Particles, model: Callable, guide: Callable, args: tuple,
                   kwargs: dict) -> torch.Tensor:
        return self._stl_log_weights(particles, guide, args, kwargs)

    def _summed_bound(self, model: Callable, guide: Callable, args: tuple, kwargs: dict,
                      sites: dict[str, torch.Tensor], first: Particles
                      ) -> tuple[torch.Tensor, float]:
        """log Σ_c w_c with the doubly reparameterized gradient (see the class docstring)."""
        return summed_doubly_reparameterized(self, model, guide, args, kwargs, sites)
