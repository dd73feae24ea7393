"""Reference computations the tests compare the package against."""

import pyro
import torch

from pyro_vae.infer import make_estimator


def per_datapoint_elbo(module, args: tuple, particles: int) -> torch.Tensor:
    """The ``trace`` estimator's ELBO of each datapoint (one call per row): an implementation
    of the bound independent of the evaluator's."""
    estimator = make_estimator("trace", num_particles=particles, max_plate_nesting=1)
    with pyro.validation_enabled(False), torch.no_grad():
        return torch.tensor(
            [
                -estimator.loss(module.model, module.guide, *(a[i : i + 1] for a in args))
                for i in range(args[0].shape[0])
            ],
            dtype=torch.float64,
        )
