r"""ELBO estimators: five named Monte Carlo objectives for one Pyro model/guide pair.

Every estimator works from per-particle, per-datapoint log-densities (the data plate is kept, see
:func:`pyro_vae.traces.vectorized_log_probs`): the log-likelihood (observed model sites), the
log-prior (latent model sites) and log q (latent guide sites). With a rate weight β they combine
into the β-weighted log-weight of one draw z ~ q(z|x),

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

Dropping the guide's score term ("sg" = stop-gradient): the guide is replayed on the detached
draws, so log q_φ(sg z) depends on φ only through the guide's parameters at fixed z; then
log q_φ(sg z) − sg(log q_φ(sg z)) has value 0 and gradient exactly the score ∂_φ log q_φ(z).
This stays exact for hierarchical guides whose later sites depend on earlier draws (a plain
detach of each site's distribution parameters would also cut the path through those draws).
A guide with a single latent site cannot have such dependences, so there the score-free term is
read from the traced distribution itself without a second guide run; both give the same
numbers. The guide must be deterministic given its sample sites (no dropout in train mode).

Scale factors (``poutine.scale``, subsampling) are not applied: the densities are the true
ones, and β is applied here, so β = 0 is allowed. All guide latent sites must be
reparameterizable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.runtime import am_i_wrapped
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, warn_if_nan
from torch.distributions import kl_divergence

from .errors import ConfigError
from .traces import (PARTICLE_PLATE, find_data_plate, guess_max_plate_nesting,
                     reduce_to_particles_and_data, site_log_prob, trace_pair)

ESTIMATORS = ("trace", "meanfield", "iwae", "stl", "dreg")


def beta_log_weight(log_lik: torch.Tensor, log_prior: torch.Tensor, log_q: torch.Tensor,
                    beta: float) -> torch.Tensor:
    r"""The β-weighted log-weight of single draws,
    :math:`\log p(x|z) + \beta\,(\log p(z) - \log q(z|x))` (elementwise)."""
    return log_lik + _weighted(beta, log_prior - log_q)


def importance_weighted_bound(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r""":math:`\log \frac1K \sum_k w_k` over the K entries of ``log_weights`` along ``dim``
    (the IWAE bound of one set of K draws; the ELBO's single-draw estimate when K = 1)."""
    if log_weights.shape[dim] == 1:
        return log_weights.squeeze(dim)
    return torch.logsumexp(log_weights, dim) - math.log(log_weights.shape[dim])


def _weighted(beta: float, term: torch.Tensor) -> torch.Tensor:
    """``beta * term``, without the multiplication at β = 1 (the same numbers)."""
    return term if beta == 1 else beta * term


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_beta(beta: float, what: str = "beta") -> float:
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {beta}")
    return beta


def _detached(trace: poutine.Trace) -> poutine.Trace:
    """The sample sites of ``trace`` with detached values (for ``poutine.replay``)."""
    out = poutine.Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample":
            out.add_node(name, **dict(site, value=site["value"].detach()))
    return out


def _latent_sites(trace: poutine.Trace) -> list[dict]:
    return [site for site in trace.nodes.values()
            if site["type"] == "sample" and not site["is_observed"]]


def _masked(value: torch.Tensor, site: dict) -> torch.Tensor:
    if site["mask"] is None:
        return value
    return torch.where(site["mask"], value, value.new_zeros(()))


def _sum(terms: list[torch.Tensor]) -> torch.Tensor:
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


@dataclass
class _Particles:
    """The model and guide traces of M = P·K vectorized draws, and what it takes to read
    per-draw, per-datapoint (``[M, N]``) log-densities from them or to replay further runs the
    same way. log p(x|z), log p(z) and log q(z|x) are computed on first use only (the
    ``meanfield`` estimator needs neither log q nor log p(z)).

    ``plated`` is ``False`` for a single draw run without the particle plate: its sites have
    no particle dimension, which :meth:`reduce` adds as a leading dimension of size 1.
    """

    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    num_particles: int
    max_plate_nesting: int
    data_dim: int
    num_data: int
    plated: bool
    hide_params: bool

    @property
    def particle_dim(self) -> int:
        return -(self.max_plate_nesting + 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_particles, self.num_data

    def reduce(self, log_prob: torch.Tensor, name: str = "") -> torch.Tensor:
        """A site's log-density (or KL), summed to ``[M, N]``."""
        if self.max_plate_nesting == 1 and self.data_dim == -1:
            if self.plated and log_prob.shape == self.shape:
                return log_prob
            if not self.plated and log_prob.shape == self.shape[1:]:
                return log_prob.unsqueeze(0)
        if not self.plated and log_prob.dim() > self.max_plate_nesting:
            raise ConfigError(
                f"site {name!r} has batch shape {list(log_prob.shape)}, more dimensions than the "
                f"{self.max_plate_nesting} declared plate(s): put every batch dimension in a "
                "pyro.plate or move it into the event with .to_event()")
        return reduce_to_particles_and_data(log_prob, self.max_plate_nesting + 1, self.data_dim,
                                            self.shape, name)

    def site_total(self, sites: list[dict]) -> torch.Tensor:
        """Σ of the sites' log-densities, ``[M, N]`` (zeros for no sites)."""
        terms = [self.reduce(site_log_prob(site), site["name"]) for site in sites]
        if not terms:
            return self.guide_latents[0]["value"].new_zeros(self.shape)
        return _sum(terms)

    @cached_property
    def guide_latents(self) -> list[dict]:
        return _latent_sites(self.guide_trace)

    @cached_property
    def unguided_latents(self) -> list[dict]:
        """Model latents the guide does not sample (drawn from their prior on replay)."""
        names = {site["name"] for site in self.guide_latents}
        return [site for site in _latent_sites(self.model_trace) if site["name"] not in names]

    @cached_property
    def log_lik(self) -> torch.Tensor:
        """log p(x|z) of the observed sites, less the log-prior of the unguided latents (which
        cancels from the weight against their prior proposal)."""
        observed = [site for site in self.model_trace.nodes.values()
                    if site["type"] == "sample" and site["is_observed"]]
        log_lik = self.site_total(observed)
        if self.unguided_latents:
            log_lik = log_lik - self.site_total(self.unguided_latents)
        return log_lik

    @cached_property
    def log_prior(self) -> torch.Tensor:
        """log p(z) of every latent model site."""
        return self.site_total(_latent_sites(self.model_trace))

    @cached_property
    def log_q(self) -> torch.Tensor:
        return self.site_total(self.guide_latents)

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` run the way the draws were: in the particle plate (if any), with its param
        messages hidden (if they were)."""
        return _as_drawn(fn, self.num_particles, self.particle_dim, self.plated,
                         self.hide_params)

    def replay(self, fn: Callable, args: tuple, kwargs: dict) -> poutine.Trace:
        """Trace ``fn`` the same way, replayed on the guide's detached draws."""
        replayed = poutine.replay(self.wrap(fn), trace=_detached(self.guide_trace))
        return prune_subsample_sites(poutine.trace(replayed).get_trace(*args, **kwargs))


def _as_drawn(fn: Callable, num_particles: int, particle_dim: int, plated: bool,
              hide_params: bool) -> Callable:
    if hide_params:
        fn = poutine.block(fn, hide_types=["param"])
    if not plated:
        return fn

    def in_particle_plate(*a: Any, **k: Any) -> Any:
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
            return fn(*a, **k)

    return in_particle_plate


def _draw_particles(model: Callable, guide: Callable, args: tuple, kwargs: dict,
                    num_particles: int, max_plate_nesting: int, plated: bool = True
                    ) -> _Particles:
    """Trace the guide and replay the model on it, for ``num_particles`` vectorized draws.

    A single draw may skip the particle plate (``plated=False``): the same random numbers, the
    same values. Param messages are hidden when no effect handler is active outside (they
    reach no one: the traces' param sites are never read here), which lets
    :func:`pyro_vae.models.register_module` skip its param-store round trip.
    """
    plated = plated or num_particles > 1
    hide_params = not am_i_wrapped()
    particle_dim = -(max_plate_nesting + 1)
    model_trace, guide_trace = trace_pair(
        _as_drawn(model, num_particles, particle_dim, plated, hide_params),
        _as_drawn(guide, num_particles, particle_dim, plated, hide_params), args, kwargs)
    data_plate = find_data_plate(model_trace, guide_trace)
    guide_latents = _latent_sites(guide_trace)
    if not guide_latents:
        raise ConfigError("the guide has no latent sample sites")
    for site in guide_latents:
        if not site["fn"].has_rsample:
            raise ConfigError(
                f"guide site {site['name']!r} ({type(site['fn']).__name__}) is not "
                "reparameterizable; these estimators need rsample. Use pyro.infer.TraceGraph_ELBO "
                "or TraceEnum_ELBO for discrete latent variables")
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting + plated)
    frame = next(frame for site in guide_latents for frame in site["cond_indep_stack"]
                 if frame.name == data_plate)
    return _Particles(model_trace=model_trace, guide_trace=guide_trace,
                      num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                      data_dim=frame.dim, num_data=frame.size, plated=plated,
                      hide_params=hide_params)


class ELBOEstimator(ELBO):
    r"""Base class of the named estimators: a :class:`pyro.infer.ELBO` with P particles outside
    the log, K importance samples inside it, and a rate weight β.

    ``loss`` returns a float, ``differentiable_loss`` a tensor whose gradient is the estimator's,
    ``loss_and_grads`` also calls ``backward`` (the interface :class:`pyro.infer.SVI` uses), and
    ``estimator(model, guide)`` is a :class:`torch.nn.Module` loss. Each loss is −(bound summed
    over the data plate), averaged over the P particles.

    :param num_particles: P, draws averaged outside the log (variance knob).
    :param importance_samples: K, draws inside the log (bound knob); only ``iwae`` and ``dreg``
        accept K > 1.
    :param beta: weight of the rate (log p(z) − log q(z|x), or the KL); settable as
        ``estimator.beta`` between steps (see :class:`LinearWarmup`).
    :param max_plate_nesting: the number of nested plates of the model and guide; guessed by
        running them once (and then kept) when ``None``. Particles are one plate further left.
    """

    name: ClassVar[str] = ""
    importance_hint: ClassVar[str | None] = None
    #: Read log q_φ(sg z) of a guide with one latent site from its traced distribution instead
    #: of replaying the guide (identical numbers; ``False`` forces the replay).
    single_site_shortcut: ClassVar[bool] = True
    #: Run a single draw (P·K = 1) without the particle plate: the same random numbers and the
    #: same values, fewer messages and broadcasts (``False`` forces the plate).
    single_draw_shortcut: ClassVar[bool] = True

    def __init__(self, num_particles: int = 1, importance_samples: int = 1, beta: float = 1.0,
                 max_plate_nesting: int | None = None):
        num_particles = _check_count("num_particles", num_particles)
        importance_samples = _check_count("importance_samples", importance_samples)
        if importance_samples > 1 and self.importance_hint is not None:
            raise ConfigError(
                f"{self.name} averages particles outside the log, so importance_samples must be "
                f"1 (got {importance_samples}); {self.importance_hint}, or --particles "
                f"{importance_samples} to average {importance_samples} particles outside it")
        if max_plate_nesting is not None and (isinstance(max_plate_nesting, bool)
                                              or not isinstance(max_plate_nesting, int)
                                              or max_plate_nesting < 0):
            raise ConfigError(f"max_plate_nesting must be an integer >= 0 or None, got "
                              f"{max_plate_nesting!r}")
        super().__init__(num_particles=num_particles, vectorize_particles=False)
        self.vectorize_particles = True
        self.max_plate_nesting = max_plate_nesting
        self.importance_samples = importance_samples
        self.beta = beta

    @property
    def beta(self) -> float:
        """The rate weight β ≥ 0 (1 is the plain bound)."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _check_beta(value)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_particles={self.num_particles}, "
                f"importance_samples={self.importance_samples}, beta={self.beta})")

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict
                   ) -> tuple[poutine.Trace, poutine.Trace]:
        """One (model_trace, guide_trace) pair without particles (Pyro's ELBO interface)."""
        return trace_pair(model, guide, args, kwargs)

    def _particles(self, model: Callable, guide: Callable, args: tuple, kwargs: dict
                   ) -> _Particles:
        if self.max_plate_nesting is None:
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        return _draw_particles(model, guide, args, kwargs,
                               self.num_particles * self.importance_samples,
                               self.max_plate_nesting, plated=not self.single_draw_shortcut)

    def _grouped(self, per_draw: torch.Tensor) -> torch.Tensor:
        """``[P·K, N]`` → ``[P, K, N]``."""
        return per_draw.reshape(self.num_particles, self.importance_samples, -1)

    def _log_weights(self, particles: _Particles) -> torch.Tensor:
        """β-weighted log-weights, ``[P, K, N]``."""
        return self._grouped(beta_log_weight(particles.log_lik, particles.log_prior,
                                             particles.log_q, self.beta))

    def _bound(self, particles: _Particles, model: Callable, guide: Callable, args: tuple,
               kwargs: dict) -> torch.Tensor:
        """The bound's estimate per particle and datapoint, ``[P, N]`` (at K = 1 the log-weights
        themselves, which the logsumexp over one draw returns unchanged)."""
        if self.importance_samples == 1:
            return beta_log_weight(particles.log_lik, particles.log_prior, particles.log_q,
                                   self.beta)
        return importance_weighted_bound(self._log_weights(particles), dim=1)

    def _surrogate(self, particles: _Particles, model: Callable, guide: Callable, args: tuple,
                   kwargs: dict) -> torch.Tensor:
        """Same value as :meth:`_bound`, the estimator's gradient; ``[P, N]``."""
        return self._bound(particles, model, guide, args, kwargs)

    def _score_free_log_q(self, particles: _Particles, guide: Callable, args: tuple,
                          kwargs: dict) -> torch.Tensor:
        """log q_φ(sg z), ``[P·K, N]``: its gradient is the score ∂_φ log q_φ(z) at fixed z."""
        latent = _latent_sites(particles.guide_trace)
        if len(latent) == 1 and self.single_site_shortcut:
            site = latent[0]
            return particles.reduce(site_log_prob(dict(site, value=site["value"].detach()),
                                                   detach=False))
        replayed = particles.replay(guide, args, kwargs)
        if [s["name"] for s in _latent_sites(replayed)] != [s["name"] for s in latent]:
            raise ConfigError("the guide's latent sites changed when replayed on its own draws; "
                              "stl and dreg need a guide with a static structure")
        return particles.site_total(_latent_sites(replayed))

    def _stl_log_weights(self, particles: _Particles, guide: Callable, args: tuple,
                         kwargs: dict) -> torch.Tensor:
        """log w_β with the score term of log q removed (value unchanged), ``[P·K, N]``."""
        score = self._score_free_log_q(particles, guide, args, kwargs)
        log_q = particles.log_q + (score.detach() - score)
        return beta_log_weight(particles.log_lik, particles.log_prior, log_q, self.beta)

    def _loss(self, surrogate: torch.Tensor) -> torch.Tensor:
        assert surrogate.shape[0] == self.num_particles and surrogate.dim() == 2, surrogate.shape
        return -surrogate.sum(-1).mean(0)

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any,
                            **kwargs: Any) -> torch.Tensor:
        """−(bound summed over the datapoints), averaged over particles; differentiable."""
        particles = self._particles(model, guide, args, kwargs)
        return self._loss(self._surrogate(particles, model, guide, args, kwargs))

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The same estimate of −bound as a float (no gradients, no extra replays)."""
        with torch.no_grad():
            particles = self._particles(model, guide, args, kwargs)
            loss = torch_item(self._loss(self._bound(particles, model, guide, args, kwargs)))
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any,
                       **kwargs: Any) -> float:
        """:meth:`loss` and, in the same pass, ``backward`` of :meth:`differentiable_loss`."""
        surrogate = self.differentiable_loss(model, guide, *args, **kwargs)
        if surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        loss = torch_item(surrogate)
        warn_if_nan(loss, "loss")
        return loss


class TraceELBO(ELBOEstimator):
    r"""The reparameterized Monte Carlo ELBO (Pyro's ``Trace_ELBO`` for reparameterized guides):

    .. math::

        \mathcal L_\beta = \mathbb E_{q}\bigl[\log p(x|z) + \beta(\log p(z) - \log q(z|x))\bigr],
        \qquad \widehat{\mathcal L} = \tfrac1P \textstyle\sum_p \log w_\beta(z_p).

    Its gradient is the full reparameterization gradient (path and score terms).
    """

    name = "trace"
    importance_hint = "use --elbo iwae (or dreg) for importance samples inside it"


class MeanFieldELBO(ELBOEstimator):
    r"""The ELBO with the KL of each latent site in closed form where one is registered
    (Pyro's ``TraceMeanField_ELBO``), the Monte Carlo term log q − log p for the others:

    .. math::

        \widehat{\mathcal L} = \tfrac1P \textstyle\sum_p \bigl[\log p(x|z_p)
        - \beta\, \mathrm{KL}(q(z|x) \,\|\, p(z))\bigr].

    For a diagonal Gaussian guide and a N(0, I) prior the KL is
    ½ Σ_j (μ_j² + σ_j² − log σ_j² − 1). As in Pyro, each site's KL is computed between the
    guide's and the model's distribution of that site at the draws of earlier sites, which
    estimates the ELBO when every guide site's model parents come before it in the guide
    (e.g. identical dependency structures).
    """

    name = "meanfield"
    importance_hint = "use --elbo iwae for importance samples inside it"

    def _rate(self, particles: _Particles) -> torch.Tensor:
        """KL(q ‖ p(z)) (analytic where available) per draw and datapoint, ``[P·K, N]``."""
        model_sites = particles.model_trace.nodes
        terms = []
        for site in particles.guide_latents:
            prior = model_sites.get(site["name"])
            if prior is None or prior["type"] != "sample" or prior["is_observed"]:
                terms.append(particles.reduce(site_log_prob(site), site["name"]))
                continue
            try:
                kl = kl_divergence(site["fn"], prior["fn"])
            except NotImplementedError:
                kl = site_log_prob(site) - site_log_prob(prior)
            else:
                kl = _masked(kl, site)
            terms.append(particles.reduce(kl, site["name"]))
        rate = _sum(terms)
        if particles.unguided_latents:
            rate = rate - particles.site_total(particles.unguided_latents)
        return rate

    def _bound(self, particles: _Particles, model: Callable, guide: Callable, args: tuple,
               kwargs: dict) -> torch.Tensor:
        return particles.log_lik - _weighted(self.beta, self._rate(particles))


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
    """

    name = "iwae"


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
    """

    name = "stl"
    importance_hint = ("use --elbo dreg (the doubly reparameterized IWAE gradient) for "
                       "importance samples inside it")

    def _surrogate(self, particles: _Particles, model: Callable, guide: Callable, args: tuple,
                   kwargs: dict) -> torch.Tensor:
        return self._stl_log_weights(particles, guide, args, kwargs)


class DoublyReparameterizedELBO(ELBOEstimator):
    r"""The IWAE bound with the doubly reparameterized gradient (DReG; Tucker, Lawson, Gu and
    Maddison 2018).

    Values and decoder gradients are those of :class:`ImportanceWeightedELBO`. For the guide,
    the score terms of the IWAE gradient are rewritten by a second reparameterization; with
    normalized weights w̃_k and β = 1:

    .. math::

        \widehat\nabla_\phi = \sum_k \tilde w_k^2\,
        \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi},

    whose variance does not grow with K the way IWAE's does. For a rate weight β the same
    identity gives the coefficient (1 − β) w̃_k + β w̃_k² (β = 0 has no score term at all).
    The surrogate, with lw^stl the log-weights of :class:`StickingTheLandingELBO`, is

    .. math::

        \operatorname{LSE}_k \mathrm{lw}^{stl}_k(\mathrm{sg}\,z) - \log K
        + \sum_k \mathrm{sg}(c_k)\,[\mathrm{lw}^{stl}_k(z) - \mathrm{lw}^{stl}_k(\mathrm{sg}\,z)],
        \qquad c_k = (1-\beta)\tilde w_k + \beta \tilde w_k^2 .

    Its value is the IWAE bound; the first term gives Σ_k w̃_k ∇_θ log w_k at fixed draws, the
    bracket only the path derivative through the draws. The model runs a second time on the
    detached draws. K = 1 is :class:`StickingTheLandingELBO`.
    """

    name = "dreg"

    def _surrogate(self, particles: _Particles, model: Callable, guide: Callable, args: tuple,
                   kwargs: dict) -> torch.Tensor:
        stl = self._stl_log_weights(particles, guide, args, kwargs)
        fixed = particles.replay(model, args, kwargs)
        log_lik = particles.site_total([site for site in fixed.nodes.values()
                                        if site["type"] == "sample" and site["is_observed"]])
        log_prior = particles.site_total(_latent_sites(fixed))
        stl_fixed = beta_log_weight(log_lik, log_prior, particles.log_q.detach(), self.beta)
        stl, stl_fixed = self._grouped(stl), self._grouped(stl_fixed)
        normalized = torch.softmax(self._log_weights(particles).detach(), dim=1)
        coefficient = (1 - self.beta) * normalized + self.beta * normalized.square()
        path = (coefficient * (stl - stl_fixed)).sum(1)
        return importance_weighted_bound(stl_fixed, dim=1) + path


_CLASSES: dict[str, type[ELBOEstimator]] = {
    cls.name: cls for cls in (TraceELBO, MeanFieldELBO, ImportanceWeightedELBO,
                              StickingTheLandingELBO, DoublyReparameterizedELBO)}
assert tuple(_CLASSES) == ESTIMATORS


def make_estimator(name: str, num_particles: int = 1, importance_samples: int = 1,
                   beta: float = 1.0, max_plate_nesting: int | None = None) -> ELBOEstimator:
    """The estimator called ``name`` (one of :data:`ESTIMATORS`).

    :raises ConfigError: (a ``ValueError``) for an unknown name or a bad combination, with what
        to use instead.
    """
    if name not in _CLASSES:
        raise ConfigError(f"unknown estimator {name!r}: choose one of {', '.join(ESTIMATORS)}")
    return _CLASSES[name](num_particles=num_particles, importance_samples=importance_samples,
                          beta=beta, max_plate_nesting=max_plate_nesting)


@dataclass(frozen=True)
class LinearWarmup:
    r"""KL warm-up: β rises linearly from ``start`` to ``end`` over ``steps`` steps, then stays.

    ``schedule(step)`` = start + (end − start) · min(step, steps) / steps for step = 0, 1, …;
    ``steps`` of ``None`` or 0 is the constant ``end``. Set ``estimator.beta = schedule(step)``
    before each step; any estimator accepts it (β = 0 is allowed).
    """

    steps: int | None = None
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if self.steps is not None and (isinstance(self.steps, bool)
                                       or not isinstance(self.steps, int) or self.steps < 0):
            raise ConfigError(f"warm-up steps must be an integer >= 0 or None, got "
                              f"{self.steps!r}")
        _check_beta(self.start, "warm-up start")
        _check_beta(self.end, "warm-up end (beta)")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        if not self.steps:
            return float(self.end)
        fraction = min(step, self.steps) / self.steps
        return float(self.start + (self.end - self.start) * fraction)
