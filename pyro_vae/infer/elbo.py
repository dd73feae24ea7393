r"""The base class of the named estimators, :class:`ELBOEstimator`: the plumbing they share.

It draws the particles (:func:`~pyro_vae.core.drawing.draw_particles`, with the checks of
:mod:`~pyro_vae.infer.pair_checks` and the handling of sites marked for enumeration), and turns
an estimator's :meth:`~ELBOEstimator.objective` into Pyro's ELBO interface: ``loss``,
``differentiable_loss`` and ``loss_and_grads``. Each loss is −(bound summed over the data
plate, plus the global latents' term weighted by :attr:`~ELBOEstimator.global_weight`),
averaged over the P particles, times the sites' common scale factor
(:mod:`pyro_vae.core.particles`). Gradients come from a *surrogate* whose value equals the loss and
whose gradient is the estimator's.

The math of each estimator is its own module's, behind the one hook
:meth:`~ELBOEstimator.objective` (the IWAE bound in :mod:`~pyro_vae.infer.iwae`, the score-free
log q in :mod:`~pyro_vae.infer.stl`, ...); what several share is in
:mod:`~pyro_vae.infer.bounds`.
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

from pyro_vae.core.drawing import draw_particles
from pyro_vae.core.enumeration import ENUMERATE_MODES, configurations, enumerated_sites_of, fixed
from pyro_vae.core.particles import Particles
from pyro_vae.core.traces import PARTICLE_PLATE, guess_max_plate_nesting, trace_pair
from pyro_vae.core.vectorization import particle_mismatch
from pyro_vae.infer.bounds import Objective, weighted
from pyro_vae.infer.pair_checks import (
    check_estimable,
    check_no_active_dropout,
    marked_but_drawn,
    pair_key,
    same_subsample,
)
from pyro_vae.util.errors import ConfigError, PyroVAEError, check_count
from pyro_vae.util.module_state import running_statistics_kept
from pyro_vae.util.rng import forked_rng


def check_beta(beta: float, what: str = "beta") -> float:
    """``beta`` as a float, refused unless finite and >= 0."""
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {beta}")
    return beta


class ELBOEstimator(ELBO):
    r"""Base class of the named estimators: a :class:`pyro.infer.ELBO` with P particles outside
    the log, K importance samples inside it, and a rate weight β.

    ``loss`` returns a float, ``differentiable_loss`` a tensor whose gradient is the estimator's,
    ``loss_and_grads`` also calls ``backward`` (the interface :class:`pyro.infer.SVI` uses), and
    ``estimator(model, guide)`` is a :class:`torch.nn.Module` loss. Each loss is −(bound summed
    over the data plate), averaged over the P particles, times the scale factor that all sample
    sites share (1 unless ``poutine.scale`` or a subsampled plate sets one; see
    :mod:`pyro_vae.core.particles`).

    :param num_particles: P, draws averaged outside the log (variance knob).
    :param importance_samples: K, draws inside the log (bound knob); estimators without an
        :attr:`importance_hint` accept K > 1, and some need K ≥ :attr:`min_importance_samples`
        (``vimco``, ``miwae``, ``piwae``, ``rws``: 2).
    :param beta: weight of the rate (log p(z) − log q(z|x), or the KL); settable as
        ``estimator.beta`` between steps (see :class:`LinearWarmup`).
    :param max_plate_nesting: the number of nested plates of the model and guide; guessed by
        running them once (and then kept) when ``None``. Particles are one plate further left.
    :param data_plate: the name of the plate that indexes datapoints, where several plates
        hold every site; ``None`` finds it (:func:`pyro_vae.core.traces.find_data_plate`).

    A subclass sets :attr:`name` and the class attributes below that describe it, and
    implements the one hook :meth:`objective`, which maps the particles of one call to the
    bound (and its surrogate); see "Writing a new estimator" in ``docs/estimators.rst``.
    """

    #: the name the factory knows it by (:func:`~pyro_vae.infer.make_estimator`)
    name: ClassVar[str] = ""
    #: for an estimator whose particles all lie outside the log (K must be 1): what to use for
    #: importance samples inside it, said when K > 1 is asked for; ``None`` accepts K > 1
    importance_hint: ClassVar[str | None] = None
    #: the least K it accepts (``vimco``'s leave-one-out baselines need two)
    min_importance_samples: ClassVar[int] = 1
    #: for an estimator that is another one at P = 1 (``miwae`` and ``piwae`` are ``iwae``
    #: there): that one's name, said when P = 1 is asked for; ``None`` accepts P = 1
    single_particle_is: ClassVar[str | None] = None
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
    #: what the model is replayed on, per guide site: a class whose instances map a guide site
    #: to its value (e.g. an alias whose gradient is rescaled on the way back, ``dreg``), one
    #: instance per draw while gradients are recorded (see :func:`draw_particles`); ``None``:
    #: the guide's draws themselves
    draw_view: ClassVar[Callable[[], Callable[[dict], torch.Tensor]] | None] = None

    def __init__(
        self,
        num_particles: int = 1,
        importance_samples: int = 1,
        beta: float = 1.0,
        max_plate_nesting: int | None = None,
        data_plate: str | None = None,
    ):
        num_particles = check_count("num_particles", num_particles)
        importance_samples = check_count("importance_samples", importance_samples)
        if importance_samples > 1 and self.importance_hint is not None:
            raise ConfigError(
                f"{self.name} averages particles outside the log, so importance_samples must be "
                f"1 (got {importance_samples}); {self.importance_hint}, or num_particles="
                f"{importance_samples} to average {importance_samples} particles outside it"
            )
        if importance_samples < self.min_importance_samples:
            raise ConfigError(
                f"{self.name} needs importance_samples >= {self.min_importance_samples} (got "
                f"{importance_samples}): give importance_samples=K, K >= "
                f"{self.min_importance_samples}"
            )
        if num_particles == 1 and self.single_particle_is is not None:
            raise ConfigError(
                f"{self.name} with num_particles=1 is {self.single_particle_is}, draw for draw: "
                f"give num_particles=M >= 2 (M sets of K importance samples), or use "
                f"{self.single_particle_is}"
            )
        check_count("max_plate_nesting", max_plate_nesting, minimum=0, optional=True)
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
        return (
            f"{type(self).__name__}(num_particles={self.num_particles}, "
            f"importance_samples={self.importance_samples}, beta={self.beta})"
        )

    def _get_trace(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[poutine.Trace, poutine.Trace]:
        """One (model_trace, guide_trace) pair without particles (Pyro's ELBO interface)."""
        return trace_pair(model, guide, args, kwargs)

    def objective(self, particles: Particles, gradient: bool = True) -> Objective:
        """The estimator's bound on the draws of one call: the one hook of a subclass.

        :param particles: the call's P·K draws (``particles.num_draws``, in the order
            ``[P, K]``; :func:`~pyro_vae.infer.bounds.grouped` reshapes per-draw values so) and
            their log-densities; the pair can be replayed on them
            (:meth:`~pyro_vae.core.particles.Particles.replay`). Where the guide's enumerated sites
            are summed one configuration at a time (:attr:`parallel_enumeration` false),
            ``particles.configurations`` holds each configuration's own draws.
        :param gradient: ``True`` for :meth:`differentiable_loss`: a surrogate of the bound's
            value whose gradient is the estimator's; ``False`` for :meth:`loss` (no gradients
            recorded): the value only, and nothing that only the gradient needs (replays,
            baselines' updates).
        :returns: :class:`~pyro_vae.infer.bounds.Objective`: the bound per particle and
            datapoint, ``[P, N]``, and the global latents' term per particle, ``[P]``.
        """
        raise NotImplementedError(f"{type(self).__name__} defines no objective")

    def draw(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Particles:
        """The particles of one call of :meth:`loss` or :meth:`differentiable_loss`, checked
        (:func:`~pyro_vae.infer.pair_checks.check_estimable`), with the configurations of the
        guide's enumerated sites drawn one by one where this estimator sums them so."""
        particles = self._draw(model, guide, args, kwargs)
        sites = self._enumeration(particles)
        if sites:  # this draw only showed which sites to sum: one run per configuration
            model, guide = same_subsample(model, guide, particles)
            particles.configurations = tuple(
                self._per_configuration(model, guide, args, kwargs, sites)
            )
        return particles

    def loss_of(self, particles: Particles, gradient: bool = True) -> torch.Tensor:
        """The loss of :meth:`draw`'s ``particles``: −(:meth:`objective` summed over the
        datapoints, plus :attr:`global_weight` times the global latents' term), averaged over
        the particles, times the sites' common scale factor."""
        objective = self.objective(particles, gradient)
        per_datapoint, global_term = objective
        scale = (particles.configurations[-1][1] if particles.configurations else particles).scale
        assert per_datapoint.shape[0] == self.num_particles and per_datapoint.dim() == 2, (
            per_datapoint.shape
        )
        total = per_datapoint.sum(-1)
        if global_term is not None:
            total = total + self.global_weight * global_term
        return weighted(scale, -total.mean(0))

    def _draw(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Particles:
        """The P·K draws of one run of the pair (the plate nesting guessed on the first call),
        checked; a vectorized draw the networks cannot take is refused with the reason."""
        if self.max_plate_nesting is None:
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        draws = self.num_particles * self.importance_samples
        plated = draws > 1
        if self.needs_deterministic_guide:
            check_no_active_dropout(self.name, model, guide)
        key = pair_key(model, guide)
        try:
            # after a first draw that enumerated nothing, a pair is drawn without Pyro's
            # enumeration messengers (their bookkeeping costs a few per cent of a small step);
            # a later draw that shows a site marked for enumeration but drawn is drawn again
            # with them, and so is every draw of that pair from then on
            optimistic = key in self._unmarked and key not in self._enumerating
            for enumerate_sites in (False, True) if optimistic else (True,):
                view = (
                    self.draw_view()
                    if self.draw_view is not None and torch.is_grad_enabled()
                    else None
                )
                particles = draw_particles(
                    model,
                    guide,
                    args,
                    kwargs,
                    draws,
                    self.max_plate_nesting,
                    plated=plated,
                    view=view,
                    data_plate=self.data_plate,
                    enumerate_guide=enumerate_sites and self.parallel_enumeration,
                    enumerate_model=enumerate_sites,
                    require_data_plate=False,
                    outermost_plate=self.importance_samples == 1,
                )
                if not enumerate_sites and not marked_but_drawn(
                    particles, self.parallel_enumeration
                ):
                    break
            if enumerate_sites:
                enumerated = particles.model_enumerated or particles.guide_enumerated
                (self._enumerating if enumerated else self._unmarked).add(key)
            check_estimable(
                particles,
                allow_discrete=self.scores_discrete,
                site_scales=self.importance_samples == 1,
            )
        except PyroVAEError:
            raise
        except Exception:  # say so if the particle dimension is what the networks tripped on
            if plated:
                self._check_vectorizable(model, guide, args, kwargs)
            raise
        if plated:
            self._check_vectorizable(model, guide, args, kwargs)
        return particles

    def _check_vectorizable(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> None:
        """Refuse, once per pair, networks that see the particle dimension
        (:func:`pyro_vae.core.vectorization.particle_mismatch`, on a fork of the random state)."""
        key = pair_key(model, guide)
        if key in self._vectorizable:
            return
        with forked_rng(), pyro.validation_enabled(False), running_statistics_kept(model, guide):
            reason = particle_mismatch(
                model,
                guide,
                args,
                kwargs,
                max_plate_nesting=self.max_plate_nesting,
                data_plate=self.data_plate,
                require_data_plate=False,
            )
        if reason is not None:
            draws = self.num_particles * self.importance_samples
            raise ConfigError(
                f"{self.name} draws {draws} particles per step in one vectorized call, but "
                f"{reason}. Write the networks to broadcast over leading dimensions (e.g. "
                "x.expand(*z.shape[:-1], -1), softmax(dim=-1)), or draw one particle per step "
                "(trace, meanfield or stl with num_particles=1)"
            )
        self._vectorizable.add(key)

    def _enumeration(self, particles: Particles) -> dict[str, torch.Tensor]:
        """The sites of this call's guide trace marked for enumeration that must be summed by
        one run per configuration (read on every call: a labelled batch may observe what an
        unlabelled one sums out); none when this draw enumerated them in parallel. Refused by
        the estimators that cannot sum them out."""
        guide_trace, data_plate = particles.guide_trace, particles.data_plate
        marked = [
            name
            for name, site in guide_trace.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and site["infer"].get("enumerate") in ENUMERATE_MODES
        ]
        if marked and not self.sums_enumerated:
            sample = (
                f", or remove the enumerate mark to sample them with {self.name}"
                if self.scores_discrete
                else ""
            )
            raise ConfigError(
                f"{self.name} cannot sum out the guide sites marked for enumeration "
                f"{marked}: use trace or meanfield (the exact expectation over their "
                f"values), or iwae, dreg or stl (the log of the sum over them){sample}"
            )
        if particles.guide_enumerated or not marked:
            return {}
        sites = enumerated_sites_of(guide_trace)
        for name in sites:
            nested = [
                frame.name
                for frame in guide_trace.nodes[name]["cond_indep_stack"]
                if frame.vectorized and frame.name not in (PARTICLE_PLATE, data_plate)
            ]
            if nested:
                raise ConfigError(
                    f"guide site {name!r} is marked for enumeration inside the plate "
                    f"{nested[0]!r}, nested in the data plate {data_plate!r}: {self.name} sums "
                    "a guide's enumerated sites one value per datapoint. Enumerate it in the "
                    "model instead (the model's enumerated sites are summed plate by plate), "
                    "use iwae or trace (which enumerate in parallel), or move it to the data "
                    "plate"
                )
        return sites

    def _per_configuration(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        sites: dict[str, torch.Tensor],
    ) -> Iterator[tuple[dict, Particles]]:
        """For every configuration c of the enumerated ``sites``: c and the particles of the
        pair with c fixed (global latents refused: each c would draw its own)."""
        for values in configurations(sites):
            particles = self._draw(fixed(model, values), fixed(guide, values), args, kwargs)
            if particles.global_latents:
                raise ConfigError(
                    f"the enumerated sites {list(sites)} and global latents "
                    "cannot be combined: each configuration would draw its own"
                )
            yield values, particles

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """−(bound summed over the datapoints), averaged over particles; differentiable."""
        return self.loss_of(self.draw(model, guide, args, kwargs))

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The same estimate of −bound as a float (no gradients, no extra replays)."""
        with torch.no_grad():
            loss = torch_item(self.loss_of(self.draw(model, guide, args, kwargs), gradient=False))
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """:meth:`loss` and, in the same pass, ``backward`` of :meth:`differentiable_loss`."""
        surrogate = self.differentiable_loss(model, guide, *args, **kwargs)
        if surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        loss = torch_item(surrogate)
        warn_if_nan(loss, "loss")
        return loss
