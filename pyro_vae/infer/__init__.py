r"""ELBO estimators: twelve named Monte Carlo objectives for one Pyro model/guide pair.

One estimator per module, as Pyro keeps them (``pyro/infer/trace_elbo.py``, ...):

=============  =========================================  =======================================
name           class (module)                             bound; gradient
=============  =========================================  =======================================
``trace``      :class:`TraceELBO` (``trace_elbo``)        ELBO, Monte Carlo rate; path + score
``meanfield``  :class:`MeanFieldELBO`                     ELBO, closed-form KL where registered;
               (``meanfield_elbo``)                       reparameterization
``iwae``       :class:`ImportanceWeightedELBO`            K-sample importance-weighted bound;
               (``iwae``)                                 reparameterization of the bound
``stl``        :class:`StickingTheLandingELBO`            ELBO; sticking the landing (no score
               (``stl``)                                  term)
``dreg``       :class:`DoublyReparameterizedELBO`         K-sample bound; doubly reparameterized
               (``dreg``)
``vimco``      :class:`VIMCO` (``vimco``)                 K-sample bound (K ≥ 2); leave-one-out
                                                          score terms for sampled discrete sites
``renyi``      :class:`VariationalRenyiBound`             K-sample Rényi bound of order α;
               (``renyi``)                                reparameterization or doubly
                                                          reparameterized
``ciwae``      :class:`CombinedImportanceWeightedELBO`    λ ELBO + (1 − λ) IWAE of the same K
               (``ciwae``)                                draws; reparameterization
``miwae``      :class:`MultipleImportanceWeightedELBO`    M IWAE-K bounds averaged (``iwae`` with
               (``miwae``)                                M particles); same for both networks
``piwae``      :class:`PartiallyImportanceWeightedELBO`   IWAE bound of all M·K draws; the model
               (``piwae``)                                its gradient, the guide MIWAE(M, K)'s
``rws``        :class:`ReweightedWakeSleep` (``rws``)     K-sample bound; wake-θ and wake-φ at
                                                          fixed draws (sampled discrete sites)
``tvo``        :class:`ThermodynamicVariationalObjective` left Riemann sum of the thermodynamic
               (``tvo``)                                  integral, S points; reparameterization
=============  =========================================  =======================================

The shared machinery: :mod:`pyro_vae.core.particles` draws the particles and reads their
log-densities (which latents count, scale factors, enumeration; the evaluator reads the same
draws), :mod:`pyro_vae.infer.elbo` holds the base class :class:`ELBOEstimator` (drawing,
checks, enumeration, the loss interface), each estimator's module its math behind the one
hook :meth:`ELBOEstimator.objective`, :mod:`pyro_vae.infer.bounds` the math several share
(:func:`beta_log_weight`, :func:`importance_weighted_bound`, :class:`Objective`),
:mod:`pyro_vae.infer.registry` the names (:data:`ESTIMATORS`, :data:`CLASSES`,
:func:`make_estimator`) and :mod:`pyro_vae.infer.schedule` the KL warm-up
(:class:`LinearWarmup`).

Every estimator works from per-particle, per-datapoint log-densities (the data plate is kept, see
:func:`pyro_vae.core.drawing.draw_particles`): the log-likelihood (observed model sites), the
log-prior (the model's latent sites that the guide samples) and log q (latent guide sites).
With a rate weight β they combine into the β-weighted log-weight of one draw z ~ q(z|x),

.. math::

    \log w_\beta = \log p_\theta(x \mid z) + \beta\,[\log p_\theta(z) - \log q_\phi(z \mid x)],

which is the ordinary log-weight log p(x, z) − log q(z|x) at β = 1.

Two knobs, never mixed up: ``num_particles`` (P) draws are averaged *outside* the log (lower
variance, same bound); ``importance_samples`` (K) draws sit *inside* the log (a tighter bound,
Burda et al. 2016). All P·K draws are one vectorized particle plate, reshaped ``[P, K, N]``;
a single draw (P·K = 1, the common training case) runs without the plate, which gives the same
random numbers and values with less Pyro bookkeeping, and each estimator computes only the
log-densities it uses (``meanfield`` never needs log q or log p(z)).
A loss is −(bound summed over the datapoints of the batch), averaged over the P particles, as
in Pyro. Gradients come from a *surrogate* whose value equals the loss and whose gradient is
the estimator's.
"""

from pyro_vae.infer.bounds import Objective, beta_log_weight, importance_weighted_bound
from pyro_vae.infer.ciwae import CombinedImportanceWeightedELBO
from pyro_vae.infer.dreg import DoublyReparameterizedELBO
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.infer.iwae import ImportanceWeightedELBO
from pyro_vae.infer.meanfield_elbo import MeanFieldELBO
from pyro_vae.infer.miwae import MultipleImportanceWeightedELBO
from pyro_vae.infer.piwae import PartiallyImportanceWeightedELBO
from pyro_vae.infer.registry import CLASSES, ESTIMATORS, estimator_options, make_estimator
from pyro_vae.infer.renyi import VariationalRenyiBound
from pyro_vae.infer.rws import ReweightedWakeSleep
from pyro_vae.infer.schedule import LinearWarmup
from pyro_vae.infer.stl import StickingTheLandingELBO
from pyro_vae.infer.trace_elbo import TraceELBO
from pyro_vae.infer.tvo import ThermodynamicVariationalObjective
from pyro_vae.infer.vimco import VIMCO

__all__ = [
    "CLASSES",
    "ESTIMATORS",
    "CombinedImportanceWeightedELBO",
    "DoublyReparameterizedELBO",
    "ELBOEstimator",
    "ImportanceWeightedELBO",
    "LinearWarmup",
    "MeanFieldELBO",
    "MultipleImportanceWeightedELBO",
    "PartiallyImportanceWeightedELBO",
    "ReweightedWakeSleep",
    "Objective",
    "StickingTheLandingELBO",
    "ThermodynamicVariationalObjective",
    "TraceELBO",
    "VIMCO",
    "VariationalRenyiBound",
    "beta_log_weight",
    "importance_weighted_bound",
    "estimator_options",
    "make_estimator",
]
