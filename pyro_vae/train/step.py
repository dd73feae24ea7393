"""One SVI step and what it needs: the optimizer (the estimators:
:func:`pyro_vae.infer.make_estimator`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_vae.util.distributed import SINGLE, DistributedContext, average_gradients

#: the plate nesting of the package's own models (one data plate)
BUILTIN_PLATE_NESTING = 1


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the device has one, plain Adam otherwise (the same
    update up to float rounding)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


def svi_step(
    loss_fn: Callable[[], torch.Tensor],
    num_data: int,
    optimizer: torch.optim.Optimizer,
    dist: DistributedContext = SINGLE,
) -> torch.Tensor:
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
