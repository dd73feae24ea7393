"""The estimators by name: :data:`ESTIMATORS` and :func:`make_estimator`."""

from __future__ import annotations

from pyro_vae.infer.dreg import DoublyReparameterizedELBO
from pyro_vae.infer.elbo import ELBOEstimator
from pyro_vae.infer.iwae import ImportanceWeightedELBO
from pyro_vae.infer.meanfield_elbo import MeanFieldELBO
from pyro_vae.infer.stl import StickingTheLandingELBO
from pyro_vae.infer.trace_elbo import TraceELBO
from pyro_vae.infer.vimco import VIMCO
from pyro_vae.util.errors import ConfigError

#: the estimators for reparameterizable (and enumerated) latents
ESTIMATORS = ("trace", "meanfield", "iwae", "stl", "dreg")
#: every estimator by name: the above and ``vimco`` for sampled discrete latents
ALL_ESTIMATORS = (*ESTIMATORS, "vimco")


_CLASSES: dict[str, type[ELBOEstimator]] = {
    cls.name: cls for cls in (TraceELBO, MeanFieldELBO, ImportanceWeightedELBO,
                              StickingTheLandingELBO, DoublyReparameterizedELBO, VIMCO)}
assert tuple(_CLASSES) == ALL_ESTIMATORS


def make_estimator(name: str, num_particles: int = 1, importance_samples: int = 1,
                   beta: float = 1.0, max_plate_nesting: int | None = None,
                   data_plate: str | None = None) -> ELBOEstimator:
    """The estimator called ``name`` (one of :data:`ALL_ESTIMATORS`).

    :raises ConfigError: (a ``ValueError``) for an unknown name or a bad combination, with what
        to use instead.
    """
    if name not in _CLASSES:
        raise ConfigError(f"unknown estimator {name!r}: choose one of "
                          f"{', '.join(ALL_ESTIMATORS)}")
    return _CLASSES[name](num_particles=num_particles, importance_samples=importance_samples,
                          beta=beta, max_plate_nesting=max_plate_nesting, data_plate=data_plate)
