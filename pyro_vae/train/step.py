"""One SVI step (the optimizers: :func:`pyro_vae.util.optimizers.make_optimizer`; the
estimators: :func:`pyro_vae.infer.make_estimator`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyro_vae.util.distributed import SINGLE, DistributedContext, average_gradients

#: the plate nesting of the package's own models (one data plate)
BUILTIN_PLATE_NESTING = 1


def svi_step(
    loss_fn: Callable[[], torch.Tensor],
    num_data: int,
    optimizer: torch.optim.Optimizer,
    dist: DistributedContext = SINGLE,
    clip_norm: float | None = None,
) -> torch.Tensor:
    """One optimizer step on ``loss_fn() / num_data``, the per-datapoint mean of a loss summed
    over a batch of ``num_data``; returns the summed loss, detached.

    Under ``dist`` the gradients are averaged over the ranks before the step (the reduction of
    DistributedDataParallel, :func:`~pyro_vae.util.distributed.average_gradients`): with batches of
    equal size on every rank, that is the gradient of the mean loss over the combined batch of
    ``world_size * num_data`` datapoints, and every rank takes the same step. With
    ``clip_norm`` the (averaged) gradients are scaled down to that total norm when they exceed
    it (:func:`torch.nn.utils.clip_grad_norm_`).
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    (loss / num_data).backward()
    # a generator: a single process (nothing to average) never walks the parameter list
    average_gradients((p for group in optimizer.param_groups for p in group["params"]), dist)
    if clip_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    return loss.detach()
