r"""The base class of the named estimators, :class:`ELBOEstimator`, and the bound helpers they
share.

Each loss is −(bound summed over the data plate), averaged over the P particles, times the
sites' common scale factor (:mod:`pyro_vae.infer.particles`). Gradients come from a
*surrogate* whose value equals the loss and whose gradient is the estimator's.

Dropping the guide's score term ("sg" = stop-gradient), as ``stl`` and ``dreg`` do: the guide is
replayed on the detached draws, so log q_φ(sg z) depends on φ only through the guide's parameters
at fixed z; then log q_φ(sg z) − sg(log q_φ(sg z)) has value 0 and gradient exactly the score
∂_φ log q_φ(z). This stays exact for hierarchical guides whose later sites depend on earlier
draws (a plain detach of each site's distribution parameters would also cut the path through
those draws). A guide with a single latent site cannot have such dependences, so there the
score-free term is read from the traced distribution itself without a second guide run; both
give the same numbers. The guide (and, for ``dreg``, the model) must be deterministic given its
sample sites (no dropout in train mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan

from pyro_vae.core.enumeration import ENUMERATE_MODES, configurations, enumerated_sites_of, fixed
from pyro_vae.core.particles import Particles, draw_particles
from pyro_vae.core.traces import PARTICLE_PLATE, guess_max_plate_nesting, latent_sites, trace_pair
from pyro_vae.core.vectorization import particle_mismatch
from pyro_vae.infer.pair_checks import (
    check_estimable,
    check_no_active_dropout,
    cuda_devices,
    pair_key,
    same_subsample,
)
from pyro_vae.util.errors import ConfigError, PyroVAEError
from pyro_vae.util.module_state import running_statistics_kept


def weighted(beta: float, term: torch.Tensor) -> torch.Tensor:
    """``beta * term``, without the multiplication at β = 1 (the same numbers)."""
    return term if beta == 1 else beta * term


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_beta(beta: float, what: str = "beta") -> float:
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {beta}")
    return beta


def beta_log_weight(log_lik: torch.Tensor, log_prior: torch.Tensor, log_q: torch.Tensor,
                    beta: float) -> torch.Tensor:
    r"""The β-weighted log-weight of single draws,
    :math:`\log p(x|z) + \beta\,(\log p(z) - \log q(z|x))` (elementwise)."""
    return log_lik + weighted(beta, log_prior - log_q)


def importance_weighted_bound(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r""":math:`\log \frac1K \sum_k w_k` over the K entries of ``log_weights`` along ``dim``
    (the IWAE bound of one set of K draws; the ELBO's single-draw estimate when K = 1)."""
    if log_weights.shape[dim] == 1:
        return log_weights.squeeze(dim)
    return torch.logsumexp(log_weights, dim) - math.log(log_weights.shape[dim])


class ELBOEstimator(ELBO):
    r"""Base class of the named estimators: a :class:`pyro.infer.ELBO` with P particles outside
    the log, K importance samples inside it, and a rate weight β.

    ``loss`` returns a float, ``differentiable_loss`` a tensor whose gradient is the estimator's,
    ``loss_and_grads`` also calls ``backward`` (the interface :class:`pyro.infer.SVI` uses), and
    ``estimator(model, guide)`` is a :class:`torch.nn.Module` loss. Each loss is −(bound summed
    over the data plate), averaged over the P particles, times the scale factor that all sample
    sites share (1 unless ``poutine.scale`` or a subsampled plate sets one; see
    :mod:`pyro_vae.infer.particles`).

    :param num_particles: P, draws averaged outside the log (variance knob).
    :param importance_samples: K, draws inside the log (bound knob); only ``iwae`` and ``dreg``
        accept K > 1.
    :param beta: weight of the rate (log p(z) − log q(z|x), or the KL); settable as
        ``estimator.beta`` between steps (see :class:`LinearWarmup`).
    :param max_plate_nesting: the number of nested plates of the model and guide; guessed by
        running them once (and then kept) when ``None``. Particles are one plate further left.
    :param data_plate: the name of the plate that indexes datapoints, where several plates
        hold every site; ``None`` finds it (:func:`pyro_vae.core.traces.find_data_plate`).
    """

    name: ClassVar[str] = ""
    importance_hint: ClassVar[str | None] = None
    #: Read log q_φ(sg z) of a guide with one latent site from its traced distribution instead
    #: of replaying the guide (identical numbers; ``False`` forces the replay).
    single_site_shortcut: ClassVar[bool] = True
    #: Run a single draw (P·K = 1) without the particle plate: the same random numbers and the
    #: same values, fewer messages and broadcasts (``False`` forces the plate).
    single_draw_shortcut: ClassVar[bool] = True
    #: The guide is replayed on its own draws (``stl``, ``dreg``): its networks must give the
    #: same output twice, so a module in train mode with active dropout is refused.
    needs_deterministic_guide: ClassVar[bool] = False
    #: whether guide sites marked for enumeration are summed out inside the log-weight
    #: (:mod:`pyro_vae.core.enumeration`); the others refuse such a guide
    sums_enumerated: ClassVar[bool] = False
    #: whether guide sites marked for enumeration are enumerated in parallel, as Pyro's
    #: ``TraceEnum_ELBO`` does (one run, every value along a dimension of its own, summed
    #: plate by plate); the others run the pair once per configuration
    parallel_enumeration: ClassVar[bool] = True
    #: whether guide sites without rsample (discrete, not enumerated) get a score-function
    #: gradient (:class:`~pyro_vae.infer.vimco.VIMCO`); the others refuse them
    scores_discrete: ClassVar[bool] = False

    def __init__(self, num_particles: int = 1, importance_samples: int = 1, beta: float = 1.0,
                 max_plate_nesting: int | None = None, data_plate: str | None = None):
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
        if data_plate is not None and not isinstance(data_plate, str):
            raise ConfigError(f"data_plate must be a plate's name or None, got {data_plate!r}")
        super().__init__(num_particles=num_particles, vectorize_particles=False)
        #: the plate that indexes datapoints (``None``: found in the traces)
        self.data_plate = data_plate
        self.vectorize_particles = True
        self.max_plate_nesting = max_plate_nesting
        self.importance_samples = importance_samples
        self.beta = beta
        self._vectorizable: set[tuple[int, int]] = set()
        #: the pairs that have shown sites marked for enumeration, and those whose first draw
        #: enumerated none
        self._enumerating: set[tuple[int, int]] = set()
        self._unmarked: set[tuple[int, int]] = set()
        #: weight of the global latents' term β [log p(θ) − log q(θ)] in this call's loss: the
        #: batch's share B / N of the data set (set by the training engine each step); 1 when
        #: the batch is the whole data set
        self.global_weight = 1.0

    @property
    def beta(self) -> float:
        """The rate weight β ≥ 0 (1 is the plain bound)."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = check_beta(value)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_particles={self.num_particles}, "
                f"importance_samples={self.importance_samples}, beta={self.beta})")

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict
                   ) -> tuple[poutine.Trace, poutine.Trace]:
        """One (model_trace, guide_trace) pair without particles (Pyro's ELBO interface)."""
        return trace_pair(model, guide, args, kwargs)

    def _particles(self, model: Callable, guide: Callable, args: tuple, kwargs: dict
                   ) -> Particles:
        if self.max_plate_nesting is None:
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        draws = self.num_particles * self.importance_samples
        plated = draws > 1 or not self.single_draw_shortcut
        if self.needs_deterministic_guide:
            check_no_active_dropout(self.name, model, guide)
        key = pair_key(model, guide)
        try:
            # after a first draw that enumerated nothing, a pair is drawn without Pyro's
            # enumeration messengers (their bookkeeping costs a few per cent of a small step);
            # a later draw that shows a site marked for enumeration but drawn is drawn again
            # with them, and so is every draw of that pair from then on
            optimistic = key in self._unmarked and key not in self._enumerating
            for enumerate_sites in ((False, True) if optimistic else (True,)):
                particles = draw_particles(
                    model, guide, args, kwargs, draws, self.max_plate_nesting, plated=plated,
                    view=self._draw_view(), data_plate=self.data_plate,
                    enumerate_guide=enumerate_sites and self.parallel_enumeration,
                    enumerate_model=enumerate_sites, require_data_plate=False,
                    outermost_plate=self.importance_samples == 1)
                if not enumerate_sites and not particles.marked_but_drawn(
                        self.parallel_enumeration):
                    break
            if enumerate_sites:
                enumerated = particles.model_enumerated or particles.guide_enumerated
                (self._enumerating if enumerated else self._unmarked).add(key)
            check_estimable(particles, allow_discrete=self.scores_discrete,
                            site_scales=self.importance_samples == 1)
        except PyroVAEError:
            raise
        except Exception:  # say so if the particle dimension is what the networks tripped on
            if plated:
                self._check_vectorizable(model, guide, args, kwargs)
            raise
        if plated:
            self._check_vectorizable(model, guide, args, kwargs)
        return particles

    def _draw_view(self) -> Callable[[dict], torch.Tensor] | None:
        """What the model is replayed on, per guide site (see :func:`draw_particles`); ``None``:
        the guide's draws themselves."""
        return None

    def _check_vectorizable(self, model: Callable, guide: Callable, args: tuple,
                            kwargs: dict) -> None:
        """Refuse, once per pair, networks that see the particle dimension
        (:func:`pyro_vae.core.vectorization.particle_mismatch`, on a fork of the random state)."""
        key = pair_key(model, guide)
        if key in self._vectorizable:
            return
        with torch.random.fork_rng(devices=cuda_devices()), pyro.validation_enabled(False), \
                running_statistics_kept(model, guide):
            reason = particle_mismatch(model, guide, args, kwargs,
                                       max_plate_nesting=self.max_plate_nesting,
                                       data_plate=self.data_plate, require_data_plate=False)
        if reason is not None:
            draws = self.num_particles * self.importance_samples
            raise ConfigError(
                f"{self.name} draws {draws} particles per step in one vectorized call, but "
                f"{reason}. Write the networks to broadcast over leading dimensions (e.g. "
                "x.expand(*z.shape[:-1], -1), softmax(dim=-1)), or draw one particle per step "
                "(trace, meanfield or stl with particles=1)")
        self._vectorizable.add(key)

    def _grouped(self, per_draw: torch.Tensor) -> torch.Tensor:
        """``[P·K, N]`` → ``[P, K, N]``."""
        return per_draw.reshape(self.num_particles, self.importance_samples, -1)

    def _log_weights(self, particles: Particles) -> torch.Tensor:
        """β-weighted log-weights, ``[P, K, N]`` (enumerated sites summed out)."""
        if particles.guide_enumerated:
            return self._grouped(particles.summed_log_weights(self.beta))
        return self._grouped(beta_log_weight(particles.log_lik, particles.log_prior,
                                             particles.log_q, self.beta))

    def _bound(self, particles: Particles, model: Callable, guide: Callable, args: tuple,
               kwargs: dict) -> torch.Tensor:
        """The bound's estimate per particle and datapoint, ``[P, N]`` (at K = 1 the log-weights
        themselves, which the logsumexp over one draw returns unchanged)."""
        if self.importance_samples == 1 and not particles.guide_enumerated:
            return beta_log_weight(particles.log_lik, particles.log_prior, particles.log_q,
                                   self.beta)
        return importance_weighted_bound(self._log_weights(particles), dim=1)

    def _surrogate(self, particles: Particles, model: Callable, guide: Callable, args: tuple,
                   kwargs: dict) -> torch.Tensor:
        """Same value as :meth:`_bound`, the estimator's gradient; ``[P, N]``."""
        return self._bound(particles, model, guide, args, kwargs)

    def _global_term(self, particles: Particles, guide: Callable, args: tuple, kwargs: dict,
                     score_free: bool) -> torch.Tensor | None:
        """β [log p(θ) − log q(θ)] of the global latents per particle, averaged over its K
        draws, ``[P]`` (``None`` without global latents); ``score_free`` drops the score term of
        log q(θ) from the gradient (stl, dreg), leaving the value."""
        if not particles.global_latents:
            return None
        log_q = particles.global_log_q
        if score_free:
            replayed = particles.replay(guide, args, kwargs)
            score = particles.global_total(latent_sites(replayed))
            log_q = log_q + (score.detach() - score)
        term = weighted(self.beta, particles.global_log_prior - log_q)
        return term.reshape(self.num_particles, self.importance_samples).mean(1)

    def _score_free_log_q(self, particles: Particles, guide: Callable, args: tuple,
                          kwargs: dict) -> torch.Tensor:
        """log q_φ(sg z), ``[P·K, N]``: its gradient is the score ∂_φ log q_φ(z) at fixed z."""
        latent = latent_sites(particles.guide_trace)
        if len(latent) == 1 and self.single_site_shortcut and particles.is_local(latent[0]):
            site = latent[0]
            return particles.reduce(particles.log_prob(site, value=site["value"].detach()))
        replayed = particles.replay(guide, args, kwargs)
        if [s["name"] for s in latent_sites(replayed)] != [s["name"] for s in latent]:
            raise ConfigError("the guide's latent sites changed when replayed on its own draws; "
                              "stl and dreg need a guide with a static structure")
        return particles.site_total(latent_sites(replayed))

    def _stl_log_weights(self, particles: Particles, guide: Callable, args: tuple,
                         kwargs: dict) -> torch.Tensor:
        """log w_β with the score term of log q removed (value unchanged), ``[P·K, N]``."""
        score = self._score_free_log_q(particles, guide, args, kwargs)
        log_q = particles.log_q + (score.detach() - score)
        return beta_log_weight(particles.log_lik, particles.log_prior, log_q, self.beta)

    def _loss(self, surrogate: torch.Tensor, scale: float,
              global_term: torch.Tensor | None = None) -> torch.Tensor:
        """−(``surrogate`` summed over the datapoints, plus ``global_weight`` times the global
        latents' term), averaged over particles, times the sites' common scale factor."""
        assert surrogate.shape[0] == self.num_particles and surrogate.dim() == 2, surrogate.shape
        total = surrogate.sum(-1)
        if global_term is not None:
            total = total + self.global_weight * global_term
        return weighted(scale, -total.mean(0))

    def _enumeration(self, particles: Particles) -> dict[str, torch.Tensor]:
        """The sites of this call's guide trace marked for enumeration that must be summed by
        one run per configuration (read on every call: a labelled batch may observe what an
        unlabelled one sums out); none when this draw enumerated them in parallel. Refused by
        the estimators that cannot sum them out."""
        guide_trace, data_plate = particles.guide_trace, particles.data_plate
        marked = [name for name, site in guide_trace.nodes.items()
                  if site["type"] == "sample" and not site["is_observed"]
                  and site["infer"].get("enumerate") in ENUMERATE_MODES]
        if marked and not self.sums_enumerated:
            sample = (f", or remove the enumerate mark to sample them with {self.name}"
                      if self.scores_discrete else "")
            raise ConfigError(
                f"{self.name} cannot sum out the guide sites marked for enumeration "
                f"{marked}: use trace or meanfield (the exact expectation over their "
                f"values), or iwae, dreg or stl (the log of the sum over them){sample}")
        if particles.guide_enumerated or not marked:
            return {}
        sites = enumerated_sites_of(guide_trace)
        for name in sites:
            nested = [frame.name for frame in guide_trace.nodes[name]["cond_indep_stack"]
                      if frame.vectorized and frame.name not in (PARTICLE_PLATE, data_plate)]
            if nested:
                raise ConfigError(
                    f"guide site {name!r} is marked for enumeration inside the plate "
                    f"{nested[0]!r}, nested in the data plate {data_plate!r}: {self.name} sums "
                    "a guide's enumerated sites one value per datapoint. Enumerate it in the "
                    "model instead (the model's enumerated sites are summed plate by plate), "
                    "use iwae or trace (which enumerate in parallel), or move it to the data "
                    "plate")
        return sites

    def _summed_bound(self, model: Callable, guide: Callable, args: tuple, kwargs: dict,
                      sites: dict[str, torch.Tensor], first: Particles
                      ) -> tuple[torch.Tensor, float]:
        """The bound's surrogate with the enumerated ``sites`` summed out by one run per
        configuration (:meth:`_per_configuration`), ``[P, N]``, and the scale factor; for the
        estimators whose sum needs each configuration on its own (``parallel_enumeration``
        false). ``first`` is the draw that showed the sites (its guide trace holds q(c | x))."""
        raise NotImplementedError(f"{type(self).__name__} enumerates in parallel")

    def _per_configuration(self, model: Callable, guide: Callable, args: tuple, kwargs: dict,
                           sites: dict[str, torch.Tensor]
                           ) -> Iterator[tuple[dict, Callable, Callable, Particles]]:
        """For every configuration c of the enumerated ``sites``: c, the model and guide with
        c fixed, and their particles (global latents refused: each c would draw its own)."""
        for values in configurations(sites):
            fixed_model, fixed_guide = fixed(model, values), fixed(guide, values)
            particles = self._particles(fixed_model, fixed_guide, args, kwargs)
            if particles.global_latents:
                raise ConfigError(f"the enumerated sites {list(sites)} and global latents "
                                  "cannot be combined: each configuration would draw its own")
            yield values, fixed_model, fixed_guide, particles

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any,
                            **kwargs: Any) -> torch.Tensor:
        """−(bound summed over the datapoints), averaged over particles; differentiable."""
        particles = self._particles(model, guide, args, kwargs)
        sites = self._enumeration(particles)
        if sites:  # this draw only showed which sites to sum: one run per configuration
            model, guide = same_subsample(model, guide, particles)
            return self._loss(*self._summed_bound(model, guide, args, kwargs, sites, particles))
        return self._loss(self._surrogate(particles, model, guide, args, kwargs),
                          particles.scale,
                          self._global_term(particles, guide, args, kwargs,
                                            score_free=self.needs_deterministic_guide))

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The same estimate of −bound as a float (no gradients, no extra replays)."""
        with torch.no_grad():
            particles = self._particles(model, guide, args, kwargs)
            sites = self._enumeration(particles)
            if sites:
                model, guide = same_subsample(model, guide, particles)
                loss = torch_item(self._loss(*self._summed_bound(model, guide, args, kwargs,
                                                                 sites, particles)))
                warn_if_nan(loss, "loss")
                return loss
            loss = torch_item(self._loss(self._bound(particles, model, guide, args, kwargs),
                                         particles.scale,
                                         self._global_term(particles, guide, args, kwargs,
                                                           score_free=False)))
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
