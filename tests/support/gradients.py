"""A loss and its gradients on one seed, for comparing two ways of computing one estimator."""

from collections.abc import Callable

import pyro
import torch
from torch import nn


def loss_and_grads(
    module: nn.Module, args: tuple, estimator, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``estimator.differentiable_loss(module.model, module.guide, *args)`` after seeding with
    ``seed``, and its gradient in every parameter (zeros where it does not depend on one)."""
    params = [p for p in module.parameters() if p.requires_grad]
    pyro.set_rng_seed(seed)
    with pyro.validation_enabled(False):
        loss = estimator.differentiable_loss(module.model, module.guide, *args)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class Calling:
    """An object with ``differentiable_loss(model, guide, *args)`` that calls ``loss_fn(*args)``
    (so :func:`loss_and_grads` can run any loss function)."""

    def __init__(self, loss_fn: Callable):
        self.loss_fn = loss_fn

    def differentiable_loss(self, model, guide, *args):
        return self.loss_fn(*args)
