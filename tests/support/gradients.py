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


def value_and_grad(loss: torch.Tensor, params) -> torch.Tensor:
    """``loss`` and its gradient in ``params`` (zeros where it does not depend on one), as one
    flat vector: two ways of computing a surrogate compare in one assertion."""
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    flat = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return torch.cat([loss.detach().reshape(1), *(g.flatten() for g in flat)])


def draws_and_eps(estimator, lg, x):
    """One call's particles of ``estimator`` on the linear-Gaussian pair ``lg`` (its diagonal
    guide) and the standard normals behind its draws of ``"z"``, ``[P, K, N, d]``."""
    particles = estimator.draw(lg.model, lg.guide, (x,), {})
    q = lg.guide_distribution(x)
    z = particles.guide_trace.nodes["z"]["value"].detach()
    eps = (z - q.base_dist.loc) / q.base_dist.scale
    shape = (estimator.num_particles, estimator.importance_samples, *eps.shape[-2:])
    return particles, eps.detach().reshape(shape)
