"""Reference computations the tests compare the package against."""

import pyro
import torch
from pyro import poutine

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


def plain_pyro_log_weight(model, guide, x: torch.Tensor, latent: str = "z") -> torch.Tensor:
    """One ordinary Pyro run: the guide traced, the model replayed on it, and
    log p(x, z) − log q(z|x) per datapoint (a one-latent guide named ``latent``)."""
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    log_p = sum(
        site["fn"].log_prob(site["value"])
        for site in model_trace.nodes.values()
        if site["type"] == "sample"
    )
    site = guide_trace.nodes[latent]
    return log_p - site["fn"].log_prob(site["value"])
