r"""ELBO estimators: five named Monte Carlo objectives for one Pyro model/guide pair.

Every estimator works from per-particle, per-datapoint log-densities (the data plate is kept, see
:func:`pyro_vae.traces.vectorized_log_probs`): the log-likelihood (observed model sites), the
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

Dropping the guide's score term ("sg" = stop-gradient): the guide is replayed on the detached
draws, so log q_φ(sg z) depends on φ only through the guide's parameters at fixed z; then
log q_φ(sg z) − sg(log q_φ(sg z)) has value 0 and gradient exactly the score ∂_φ log q_φ(z).
This stays exact for hierarchical guides whose later sites depend on earlier draws (a plain
detach of each site's distribution parameters would also cut the path through those draws).
A guide with a single latent site cannot have such dependences, so there the score-free term is
read from the traced distribution itself without a second guide run; both give the same
numbers. The guide (and, for ``dreg``, the model) must be deterministic given its sample
sites (no dropout in train mode).

Which latents count. Every guide latent must be a latent site of the model. A model latent that
the guide does not sample ("unguided") is drawn from its prior, given the draws before it, when
the model is replayed: the proposal of one draw is q(z_g|x) p(z_u|z_g), whose second factor
cancels against the model's, so log p(z_u|·) enters no log-weight, for any β. The rate that β
weights is that of the guided latents only,

.. math::

    \log w_\beta = \log p_\theta(x \mid z_g, z_u)
    + \beta\,[\log p_\theta(z_g) - \log q_\phi(z_g \mid x)].

Unguided latents must be reparameterizable too, so that gradients follow their draws.
(Pyro's ``Trace_ELBO`` instead adds log p(z_u) to the model's log-density and warns "Found vars
in model but not guide"; the two agree whenever the guide samples every model latent.)

Scale factors (``poutine.scale``, a subsampled ``pyro.plate``) are honoured when every sample
site of the model and guide has the same scalar scale s, the case of a subsampled data plate
(s = N/B): the loss is s times the loss of the batch. Any other scales raise
:class:`~pyro_vae.errors.ConfigError` naming the site, since a per-site weight has no meaning
inside the log of an importance-weighted bound; weight the rate with β instead (β is applied
here, so β = 0 is allowed, which ``poutine.scale`` refuses). All guide latent sites must be
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
from .traces import (PARTICLE_PLATE, check_guide_latents_in_model, find_data_plate,
                     guess_max_plate_nesting, reduce_to_particles_and_data, site_log_prob,
                     trace_pair)

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
    """The unobserved sample sites of ``trace`` (subsample sites included) with detached
    values, for ``poutine.replay``."""
    out = poutine.Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            out.add_node(name, **dict(site, value=site["value"].detach()))
    return out


def _scale_value(site: dict, where: str) -> float:
    scale = site["scale"]
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ConfigError(
                f"{where} site {site['name']!r} has a scale tensor of shape "
                f"{list(scale.shape)}: these estimators take one scale factor for every sample "
                "site (as a subsampled pyro.plate gives); use pyro.poutine.mask to leave "
                "datapoints out, and beta to weight the rate")
        return scale.item()
    return float(scale)


def _common_scale(model_trace: poutine.Trace, guide_trace: poutine.Trace) -> float:
    """The scale factor that every sample site of both traces shares, or ConfigError naming
    the first site whose scale differs from the first site's."""
    first: tuple[str, str, float] | None = None
    for where, trace in (("model", model_trace), ("guide", guide_trace)):
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            scale = _scale_value(site, where)
            if first is None:
                first = (where, site["name"], scale)
            elif scale != first[2]:
                raise ConfigError(
                    f"{where} site {site['name']!r} has scale {scale:g} but {first[0]} site "
                    f"{first[1]!r} has scale {first[2]:g}: these estimators honour a scale "
                    "factor (poutine.scale, a subsampled pyro.plate) only when every sample site "
                    "of the model and guide has the same one, since a per-site weight has no "
                    "meaning inside the log of an importance-weighted bound. To weight the rate "
                    "(KL) term, use beta (--beta, LinearWarmup) instead of poutine.scale")
    return 1.0 if first is None else first[2]


def _latent_sites(trace: poutine.Trace) -> list[dict]:
    return [site for site in trace.nodes.values()
            if site["type"] == "sample" and not site["is_observed"]]


def _observed_sites(trace: poutine.Trace) -> list[dict]:
    return [site for site in trace.nodes.values()
            if site["type"] == "sample" and site["is_observed"]]


def _masked(value: torch.Tensor, site: dict) -> torch.Tensor:
    mask = site["mask"]
    if mask is None or mask is True:
        return value
    if mask is False:
        return torch.zeros_like(value)
    return torch.where(mask, value, value.new_zeros(()))


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
    ``model_trace`` and ``guide_trace`` have their subsample sites pruned; the ``raw_`` traces
    keep them, so that replays draw the same subsample. ``scale`` is the one scale factor of
    every sample site (1 without ``poutine.scale`` or subsampling).
    """

    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    raw_model_trace: poutine.Trace
    raw_guide_trace: poutine.Trace
    num_particles: int
    max_plate_nesting: int
    data_dim: int
    num_data: int
    plated: bool
    hide_params: bool
    scale: float

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
    def guided_latents(self) -> list[dict]:
        """The model's latent sites that the guide samples, in the model's order."""
        names = {site["name"] for site in self.guide_latents}
        return [site for site in _latent_sites(self.model_trace) if site["name"] in names]

    @cached_property
    def unguided_latents(self) -> list[dict]:
        """Model latents the guide does not sample (drawn from their prior on replay)."""
        names = {site["name"] for site in self.guide_latents}
        return [site for site in _latent_sites(self.model_trace) if site["name"] not in names]

    @cached_property
    def log_lik(self) -> torch.Tensor:
        """log p(x|z) of the observed sites (z: guided and unguided latents)."""
        return self.site_total(_observed_sites(self.model_trace))

    @cached_property
    def log_prior(self) -> torch.Tensor:
        """log p(z_g) of the guided latents: an unguided latent's prior is its own proposal,
        so its density cancels from the weight and is left out of it."""
        return self.site_total(self.guided_latents)

    @cached_property
    def log_q(self) -> torch.Tensor:
        return self.site_total(self.guide_latents)

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` run the way the draws were: in the particle plate (if any), with its param
        messages hidden (if they were)."""
        return _as_drawn(fn, self.num_particles, self.particle_dim, self.plated,
                         self.hide_params)

    def replay(self, fn: Callable, args: tuple, kwargs: dict, model: bool = False
               ) -> poutine.Trace:
        """Trace ``fn`` the same way, replayed on detached draws: the guide's (``model=False``)
        or every latent of the model's, the unguided ones included (``model=True``); the same
        subsample in either case."""
        source = self.raw_model_trace if model else self.raw_guide_trace
        replayed = poutine.replay(self.wrap(fn), trace=_detached(source))
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

    :raises ConfigError: for a guide without latents, a latent (guide, or model-only) that is
        not reparameterizable, a guide latent that is no latent of the model, or scale factors
        that differ between sites (see the module docstring).
    """
    plated = plated or num_particles > 1
    hide_params = not am_i_wrapped()
    particle_dim = -(max_plate_nesting + 1)
    raw_guide_trace = poutine.trace(
        _as_drawn(guide, num_particles, particle_dim, plated, hide_params)
    ).get_trace(*args, **kwargs)
    raw_model_trace = poutine.trace(poutine.replay(
        _as_drawn(model, num_particles, particle_dim, plated, hide_params),
        trace=raw_guide_trace)).get_trace(*args, **kwargs)
    model_trace = prune_subsample_sites(raw_model_trace)
    guide_trace = prune_subsample_sites(raw_guide_trace)
    data_plate = find_data_plate(model_trace, guide_trace)
    guide_latents = _latent_sites(guide_trace)
    if not guide_latents:
        raise ConfigError("the guide has no latent sample sites")
    model_latents = {site["name"]: site for site in _latent_sites(model_trace)}
    check_guide_latents_in_model(
        [site["name"] for site in guide_latents if site["name"] not in model_latents],
        "latent sample sites")
    for site in guide_latents:
        if not site["fn"].has_rsample:
            raise ConfigError(
                f"guide site {site['name']!r} ({type(site['fn']).__name__}) is not "
                "reparameterizable; these estimators need rsample. Use pyro.infer.TraceGraph_ELBO "
                "or TraceEnum_ELBO for discrete latent variables")
    guided = {site["name"] for site in guide_latents}
    for name, site in model_latents.items():
        if name not in guided and not site["fn"].has_rsample:
            raise ConfigError(
                f"model site {name!r} ({type(site['fn']).__name__}) is not sampled by the guide "
                "and not reparameterizable: it is drawn from its prior on replay, and its "
                "gradient would need a score term these estimators do not have. Sample it in the "
                "guide, or use pyro.infer.TraceGraph_ELBO or TraceEnum_ELBO")
    scale = _common_scale(model_trace, guide_trace)
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting + plated)
    frame = next(frame for site in guide_latents for frame in site["cond_indep_stack"]
                 if frame.name == data_plate)
    return _Particles(model_trace=model_trace, guide_trace=guide_trace,
                      raw_model_trace=raw_model_trace, raw_guide_trace=raw_guide_trace,
                      num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                      data_dim=frame.dim, num_data=frame.size, plated=plated,
                      hide_params=hide_params, scale=scale)


class ELBOEstimator(ELBO):
    r"""Base class of the named estimators: a :class:`pyro.infer.ELBO` with P particles outside
    the log, K importance samples inside it, and a rate weight β.

    ``loss`` returns a float, ``differentiable_loss`` a tensor whose gradient is the estimator's,
    ``loss_and_grads`` also calls ``backward`` (the interface :class:`pyro.infer.SVI` uses), and
    ``estimator(model, guide)`` is a :class:`torch.nn.Module` loss. Each loss is −(bound summed
    over the data plate), averaged over the P particles, times the scale factor that all sample
    sites share (1 unless ``poutine.scale`` or a subsampled plate sets one; see the module
    docstring).

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

    def _loss(self, surrogate: torch.Tensor, scale: float) -> torch.Tensor:
        """−(``surrogate`` summed over the datapoints), averaged over particles, times the
        sites' common scale factor."""
        assert surrogate.shape[0] == self.num_particles and surrogate.dim() == 2, surrogate.shape
        return _weighted(scale, -surrogate.sum(-1).mean(0))

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any,
                            **kwargs: Any) -> torch.Tensor:
        """−(bound summed over the datapoints), averaged over particles; differentiable."""
        particles = self._particles(model, guide, args, kwargs)
        return self._loss(self._surrogate(particles, model, guide, args, kwargs),
                          particles.scale)

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The same estimate of −bound as a float (no gradients, no extra replays)."""
        with torch.no_grad():
            particles = self._particles(model, guide, args, kwargs)
            loss = torch_item(self._loss(self._bound(particles, model, guide, args, kwargs),
                                         particles.scale))
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
    r"""The reparameterized Monte Carlo ELBO:

    .. math::

        \mathcal L_\beta = \mathbb E_{q}\bigl[\log p(x|z) + \beta(\log p(z) - \log q(z|x))\bigr],
        \qquad \widehat{\mathcal L} = \tfrac1P \textstyle\sum_p \log w_\beta(z_p).

    Its gradient is the full reparameterization gradient (path and score terms). At β = 1,
    with no model latent left out of the guide, this is the quantity of Pyro's ``Trace_ELBO``
    on a reparameterized guide (the tests compare values and gradients on the same draws).
    """

    name = "trace"
    importance_hint = "use --elbo iwae (or dreg) for importance samples inside it"


class MeanFieldELBO(ELBOEstimator):
    r"""The ELBO with the KL of each latent site in closed form where one is registered
    (Pyro's ``TraceMeanField_ELBO``), the Monte Carlo term log q − log p for the others:

    .. math::

        \widehat{\mathcal L} = \tfrac1P \textstyle\sum_p \bigl[\log p(x|z_p)
        - \beta\, \mathrm{KL}(q(z|x) \,\|\, p(z))\bigr],

    the KL over the guided latents only (an unguided latent, drawn from its prior, has none).

    For a diagonal Gaussian guide and a N(0, I) prior the KL is
    ½ Σ_j (μ_j² + σ_j² − log σ_j² − 1). As in Pyro, each site's KL is computed between the
    guide's and the model's distribution of that site at the draws of earlier sites, which
    estimates the ELBO when every guide site's model parents come before it in the guide
    (e.g. identical dependency structures). A site that the model samples after a guide latent
    which the guide samples after it (the two-layer VAE's z1: z2 → z1 in the model, z1 → z2 in
    the guide) gets the Monte Carlo term instead: its model distribution depends on a later
    guide draw, so the closed-form KL at that draw would not estimate the ELBO.
    """

    name = "meanfield"
    importance_hint = "use --elbo iwae for importance samples inside it"

    def _rate(self, particles: _Particles) -> torch.Tensor:
        """KL(q ‖ p(z_g)) of the guided latents (analytic where available) per draw and
        datapoint, ``[P·K, N]``."""
        model_sites = particles.model_trace.nodes
        guided = [site["name"] for site in particles.guide_latents]
        model_order = [name for name in model_sites if name in guided]
        terms = []
        for position, site in enumerate(particles.guide_latents):
            prior = model_sites[site["name"]]
            earlier_in_model = model_order[:model_order.index(site["name"])]
            closed = None
            if not set(guided[position + 1:]).intersection(earlier_in_model):
                closed = _closed_form_kl(site["fn"], prior["fn"])
            kl = (_masked(closed, site) if closed is not None
                  else site_log_prob(site) - site_log_prob(prior))
            terms.append(particles.reduce(kl, site["name"]))
        return _sum(terms)

    def _bound(self, particles: _Particles, model: Callable, guide: Callable, args: tuple,
               kwargs: dict) -> torch.Tensor:
        return particles.log_lik - _weighted(self.beta, self._rate(particles))


def _closed_form_kl(q: Any, p: Any) -> torch.Tensor | None:
    """KL(q ‖ p) from torch's registry, or ``None`` where it has no closed form (torch's
    ``kl_divergence`` signals that with NotImplementedError, as Pyro's TraceMeanField_ELBO
    expects)."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


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
