"""The estimators by name: :data:`ESTIMATORS` and the one factory, :func:`make_estimator`."""

from __future__ import annotations

import inspect

from pyro_vae.infer.ciwae import CombinedImportanceWeightedELBO
from pyro_vae.infer.dreg import DoublyReparameterizedELBO
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.infer.iwae import ImportanceWeightedELBO
from pyro_vae.infer.meanfield_elbo import MeanFieldELBO
from pyro_vae.infer.miwae import MultipleImportanceWeightedELBO
from pyro_vae.infer.piwae import PartiallyImportanceWeightedELBO
from pyro_vae.infer.renyi import VariationalRenyiBound
from pyro_vae.infer.rws import ReweightedWakeSleep
from pyro_vae.infer.stl import StickingTheLandingELBO
from pyro_vae.infer.trace_elbo import TraceELBO
from pyro_vae.infer.tvo import ThermodynamicVariationalObjective
from pyro_vae.infer.vimco import VIMCO
from pyro_vae.util.errors import ConfigError

#: every estimator class by its :attr:`~pyro_vae.infer.ELBOEstimator.name`; registering a new
#: one is one line, ``CLASSES[MyELBO.name] = MyELBO``
CLASSES: dict[str, type[ELBOEstimator]] = {
    cls.name: cls
    for cls in (
        TraceELBO,
        MeanFieldELBO,
        ImportanceWeightedELBO,
        StickingTheLandingELBO,
        DoublyReparameterizedELBO,
        VIMCO,
        VariationalRenyiBound,
        CombinedImportanceWeightedELBO,
        MultipleImportanceWeightedELBO,
        PartiallyImportanceWeightedELBO,
        ReweightedWakeSleep,
        ThermodynamicVariationalObjective,
    )
}
#: the names of the package's estimators, in the order the documentation gives them (``vimco``,
#: for sampled discrete latents, and ``miwae``, ``piwae``, ``rws`` need
#: ``importance_samples >= 2``: see each class's
#: :attr:`~pyro_vae.infer.ELBOEstimator.min_importance_samples`)
ESTIMATORS = tuple(CLASSES)


def make_estimator(
    name: str,
    num_particles: int = 1,
    importance_samples: int = 1,
    beta: float = 1.0,
    max_plate_nesting: int | None = None,
    data_plate: str | None = None,
    options: dict | None = None,
) -> ELBOEstimator:
    """The estimator called ``name`` (one of :data:`ESTIMATORS`, or a name registered in
    :data:`CLASSES`), with its arguments (:class:`~pyro_vae.infer.ELBOEstimator`);
    ``max_plate_nesting=None`` guesses the plate nesting from the first call (one run of
    the pair), the package's own models have 1. ``options``: the estimator's own keyword
    arguments (:func:`estimator_options`), e.g. ``{"alpha": 0.5}`` for ``renyi``.

    :raises ConfigError: (a ``ValueError``) for an unknown name, an option the estimator does
        not take, or a bad combination, with what to use instead.
    """
    if name not in CLASSES:
        raise ConfigError(f"unknown estimator {name!r}: choose one of {', '.join(CLASSES)}")
    cls = CLASSES[name]
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ConfigError(f"options must be a dict of {name}'s keyword options, got {options!r}")
    accepted = estimator_options(cls)
    unknown = sorted(set(options) - set(accepted), key=str)
    if unknown:
        takes = f"its options are {', '.join(accepted)}" if accepted else "it takes no options"
        own = [key for key in unknown if key in inspect.signature(ELBOEstimator).parameters]
        raise ConfigError(
            f"{name} has no option {', '.join(map(repr, unknown))}: {takes}"
            + (f" ({', '.join(own)}: an argument of its own)" if own else "")
        )
    return cls(
        num_particles=num_particles,
        importance_samples=importance_samples,
        beta=beta,
        max_plate_nesting=max_plate_nesting,
        data_plate=data_plate,
        **options,
    )


def estimator_options(cls: type[ELBOEstimator]) -> tuple[str, ...]:
    """The keyword options of an estimator class: the parameters of its ``__init__`` that
    :class:`~pyro_vae.infer.ELBOEstimator`'s lacks (``("alpha", "gradient")`` for
    ``renyi``, ``()`` for ``iwae``)."""
    base = inspect.signature(ELBOEstimator.__init__).parameters
    return tuple(
        name
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name not in base
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    )
