"""The estimators by name: :data:`ESTIMATORS` and the one factory, :func:`make_estimator`."""

from __future__ import annotations

from pyro_vae.infer.dreg import DoublyReparameterizedELBO
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.infer.iwae import ImportanceWeightedELBO
from pyro_vae.infer.meanfield_elbo import MeanFieldELBO
from pyro_vae.infer.miwae import MultipleImportanceWeightedELBO
from pyro_vae.infer.piwae import PartiallyImportanceWeightedELBO
from pyro_vae.infer.rws import ReweightedWakeSleep
from pyro_vae.infer.stl import StickingTheLandingELBO
from pyro_vae.infer.trace_elbo import TraceELBO
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
        MultipleImportanceWeightedELBO,
        PartiallyImportanceWeightedELBO,
        ReweightedWakeSleep,
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
) -> ELBOEstimator:
    """The estimator called ``name`` (one of :data:`ESTIMATORS`, or a name registered in
    :data:`CLASSES`), with its arguments (:class:`~pyro_vae.infer.ELBOEstimator`);
    ``max_plate_nesting=None`` guesses the plate nesting from the first call (one run of
    the pair), the package's own models have 1.

    :raises ConfigError: (a ``ValueError``) for an unknown name or a bad combination, with what
        to use instead.
    """
    if name not in CLASSES:
        raise ConfigError(f"unknown estimator {name!r}: choose one of {', '.join(CLASSES)}")
    return CLASSES[name](
        num_particles=num_particles,
        importance_samples=importance_samples,
        beta=beta,
        max_plate_nesting=max_plate_nesting,
        data_plate=data_plate,
    )
