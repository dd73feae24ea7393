"""A training step (the estimator's loss, its gradients and Adam's update) as one flat function
of tensors, captured as an FX graph on fake tensors.

The step's inputs are one flat list, always in this order: the parameters (P), the buffers,
Adam's first moments (P), second moments (P) and step counts (P), the learning rate (a 0-d
tensor), the batch's tensors, and last the tensor constants the capture met (lifted out of the
graph into inputs, so that the graph holds no tensor of its own and a compiled graph stored on
disk takes the same inputs as one just compiled). It returns ``(loss,)`` and updates the
parameters, buffers and Adam's state in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from pyro_vae.util.rng import forked_rng


class Loss(torch.nn.Module):
    """The pair's summed loss as a module, so :func:`torch.func.functional_call` can swap its
    parameters and buffers for the graph's inputs."""

    def __init__(self, pair: torch.nn.Module, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.pair = pair
        self.loss = loss

    def forward(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.loss(*args, **kwargs)


def rebuild(layout: Any, tensors: list[torch.Tensor]) -> tuple[list, dict]:
    """The batch's ``args`` and ``kwargs`` from its tensors and its layout (see
    :meth:`~pyro_vae.train.compiled.CompiledStep.split`)."""
    it = iter(tensors)
    args, kwargs = [], {}
    for entry in layout:
        value = next(it) if entry[1] == "tensor" else entry[2]
        if isinstance(entry[0], int):
            args.append(value)
        else:
            kwargs[entry[0]] = value
    return args, kwargs


def step_function(
    wrapper: Loss,
    param_names: list[str],
    buffer_names: list[str],
    betas: tuple[float, float],
    eps: float,
    layout: Any,
    num_data: int,
) -> Callable[..., tuple[torch.Tensor]]:
    """The flat step of the module docstring (without constants: the capture adds them)."""
    beta1, beta2 = betas
    n_params, n_buffers = len(param_names), len(buffer_names)

    def step(*flat: torch.Tensor) -> tuple[torch.Tensor]:
        p, b = n_params, n_params + n_buffers
        params, buffers = list(flat[:p]), flat[p:b]
        exp_avgs, exp_avg_sqs = flat[b : b + p], flat[b + p : b + 2 * p]
        steps, lr, tensors = flat[b + 2 * p : b + 3 * p], flat[b + 3 * p], flat[b + 3 * p + 1 :]
        args, kwargs = rebuild(layout, list(tensors))
        swapped = {f"pair.{n}": t for n, t in zip(param_names, params)}
        swapped.update({f"pair.{n}": t for n, t in zip(buffer_names, buffers)})
        loss = torch.func.functional_call(wrapper, swapped, (tuple(args), kwargs))
        grads = torch.autograd.grad(loss / num_data, params, allow_unused=True)
        with torch.no_grad():  # torch.optim.Adam's update (single-tensor form)
            for p_, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                if g is None:
                    g = torch.zeros_like(p_)
                t.add_(1)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step_size = lr / (1 - beta1**t)
                denom = (v.sqrt() / (1 - beta2**t).sqrt()).add_(eps)
                p_.sub_(step_size * m / denom)
        return (loss.detach(),)

    return step


def capture(
    function: Callable[..., Any], inputs: list[torch.Tensor], n_params: int
) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """``function`` traced on fake tensors of ``inputs`` (the first ``n_params`` as leaves
    that require gradients), with its tensor constants lifted into extra trailing inputs;
    returns the graph and those constants."""
    leaves = [t.detach().requires_grad_() if i < n_params else t for i, t in enumerate(inputs)]
    # validation checks values, which a graph cannot: training runs without it anyway
    with pyro.get_param_store().scope(), pyro.validation_enabled(False):
        graph = make_fx(function, tracing_mode="fake")(*leaves)
    return graph, lift_constants(graph)


def lift_constants(graph: torch.fx.GraphModule) -> list[torch.Tensor]:
    """Turn each tensor constant of ``graph`` (a ``get_attr`` node) into a trailing input, in
    place; returns their values, the inputs to pass for them."""
    # FX calls a graph's input nodes "placeholder" nodes (its op name and Graph.placeholder)
    inputs = [node for node in graph.graph.nodes if node.op == "placeholder"]
    constants, last = [], inputs[-1] if inputs else None
    for node in list(graph.graph.nodes):
        if node.op != "get_attr" or not isinstance(getattr(graph, node.target), torch.Tensor):
            continue
        value = getattr(graph, node.target)
        context = (
            graph.graph.inserting_after(last)
            if last is not None
            else graph.graph.inserting_before(next(iter(graph.graph.nodes)))
        )
        with context:
            lifted = graph.graph.placeholder(f"constant_{len(constants)}")
        lifted.meta.update(node.meta)
        node.replace_all_uses_with(lifted)
        graph.graph.erase_node(node)
        delattr(graph, node.target)
        constants.append(value)
        last = lifted
    graph.recompile()
    return constants


def warm_up(module: torch.nn.Module, wrapper: Loss, args: tuple, kwargs: dict) -> None:
    """One eager loss, without gradients, on a fork of the random state and with the buffers
    restored afterwards: what the estimator learns about a pair on its first call (whether its
    networks take a particle dimension, its plate nesting) is learnt by running the pair on
    real values, which a trace on fake tensors cannot do."""
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        with (
            forked_rng(),
            torch.no_grad(),
            pyro.get_param_store().scope(),
            pyro.validation_enabled(False),
        ):
            wrapper(args, kwargs)
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved):
                buffer.copy_(value)
