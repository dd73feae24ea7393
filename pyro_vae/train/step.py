"""One SVI step and what it needs: the named estimator and the optimizer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_vae.infer import ELBOEstimator, make_estimator
from pyro_vae.util.distributed import SINGLE, DistributedContext, average_gradients

BUILTIN_PLATE_NESTING = 1


def make_elbo(name: str, num_particles: int = 1, importance_samples: int = 1,
              beta: float = 1.0, max_plate_nesting: int | None = BUILTIN_PLATE_NESTING,
              data_plate: str | None = None) -> ELBOEstimator:
    """The named estimator (see :mod:`pyro_vae.infer`); the default plate nesting is the
    package's models' (one data plate), ``None`` guesses it from the first call."""
    return make_estimator(name, num_particles, importance_samples, beta,
                          max_plate_nesting=max_plate_nesting, data_plate=data_plate)


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the device has one, plain Adam otherwise (the same
    update up to float rounding)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


def svi_step(loss_fn: Callable[[], torch.Tensor], num_data: int,
             optimizer: torch.optim.Optimizer, dist: DistributedContext = SINGLE) -> torch.Tensor:
    """One optimizer step on ``loss_fn() / num_data``, the per-datapoint mean of a loss summed
    over a batch of ``num_data``; returns the summed loss, detached.

    Under ``dist`` the gradients are averaged over the ranks before the step (the reduction of
    DistributedDataParallel, :func:`~pyro_vae.util.distributed.average_gradients`): with batches of
    equal size on every rank, that is the gradient of the mean loss over the combined batch of
    ``world_size * num_data`` datapoints, and every rank takes the same step.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    (loss / num_data).backward()
    # a generator: a single process (nothing to average) never walks the parameter list
    average_gradients((p for group in optimizer.param_groups for p in group["params"]), dist)
    optimizer.step()
    return loss.detach()
