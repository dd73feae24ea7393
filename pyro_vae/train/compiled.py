"""Compiled SVI steps for any model/guide pair and any estimator.

A step (the estimator's loss, its gradients and Adam's update) is captured once per input
signature as a static graph of tensor operations: the estimator runs as ordinary Python, Pyro's
effect handlers included, under :func:`torch.fx.experimental.proxy_tensor.make_fx` on fake
tensors, with the parameters, buffers, Adam's state, the learning rate and the batch as the
graph's inputs. Nothing of Pyro is left in the graph, only the operations it issued; the random
draws are operations of the graph too, so every call draws afresh. The graph is then compiled
(:func:`torch.compile`, inductor: fused CPU/GPU kernels) and called once per step; it updates the
parameters, buffers (BatchNorm statistics) and Adam's state in place, in the optimizer's own
state dict, so checkpoints and resuming work as for an eager step.

What is captured is what the Python did for that input: a pair whose control flow depends on
the data's values (``if x.sum() > 0``, ``.item()``) cannot be captured, which tracing on fake
tensors detects; such a pair trains eagerly, with one line saying why. A new batch shape, or a
new β (KL warm-up changes it every step), is a new signature: each gets its own graph, up to
``max_graphs``; the others run eagerly.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from pyro_vae.infer import ELBOEstimator
from pyro_vae.util.rng import forked_rng

DEFAULT_MAX_GRAPHS = 4
_CONSTANTS = (type(None), bool, int, float, str)


class _Uncompilable(Exception):
    """Why a step cannot be compiled (one line)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip(": ")


class _Loss(torch.nn.Module):
    """The pair's summed loss as a module, so :func:`torch.func.functional_call` can swap its
    parameters and buffers for the graph's inputs."""

    def __init__(self, pair: torch.nn.Module, loss: Callable[..., torch.Tensor]):
        super().__init__()
        self.pair = pair
        self.loss = loss

    def forward(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.loss(*args, **kwargs)


class CompiledStep:
    """``step(args, kwargs, num_data)``: one SVI step on a batch, compiled per signature.

    :param module: the pair (``module.model``, ``module.guide``).
    :param estimator: the ELBO estimator; its ``beta`` and ``global_weight`` at capture time are
        part of the signature.
    :param optimizer: a :class:`torch.optim.Adam` over the module's parameters (one parameter
        group, no weight decay, no AMSGrad); its state is updated in place.
    :param loss: the summed loss of a batch, ``loss(*args, **kwargs)``.
    :param eager: the eager step, ``eager(args, kwargs, num_data)``, for what is not compiled.
    :param backend: :func:`torch.compile`'s backend, or ``None`` to run the captured graph as is.
    :param log: where the one-line notes go (compile times, fallbacks).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        estimator: ELBOEstimator,
        optimizer: torch.optim.Optimizer,
        loss: Callable[..., torch.Tensor],
        eager: Callable[[tuple, dict, int], torch.Tensor],
        *,
        backend: str | None = "inductor",
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        log: Callable[[str], None] = print,
    ):
        self.module, self.estimator, self.optimizer = module, estimator, optimizer
        self.eager, self.backend, self.max_graphs, self.log = eager, backend, max_graphs, log
        self.wrapper = _Loss(module, loss)
        self.graphs: dict[Any, Callable | None] = {}
        self.compile_seconds = 0.0
        self.compiled_steps = self.eager_steps = 0
        self.disabled = self._refusal()
        if self.disabled:
            self.log(f"compiled steps off: {self.disabled}; training eagerly")
        names = {id(p): name for name, p in module.named_parameters()}
        group = optimizer.param_groups[0] if optimizer.param_groups else {"params": []}
        self.params = list(group["params"])
        self.param_names = [names.get(id(p)) for p in self.params]
        self.buffer_names = [name for name, _ in module.named_buffers()]
        self._capped = False

    # --- what can be compiled ------------------------------------------------------------

    def _refusal(self) -> str | None:
        opt = self.optimizer
        if type(opt) is not torch.optim.Adam:
            return f"the optimizer is {type(opt).__name__}, and only Adam's update is compiled"
        if len(opt.param_groups) != 1:
            return "the optimizer has several parameter groups"
        group = opt.param_groups[0]
        if group.get("weight_decay") or group.get("amsgrad") or group.get("maximize"):
            return "Adam with weight decay, AMSGrad or maximize is not compiled"
        names = {id(p) for p in self.module.parameters()}
        if any(id(p) not in names for p in group["params"]):
            return "the optimizer holds parameters that are not the module's"
        if any(not p.requires_grad for p in group["params"]):
            return "a parameter does not require gradients"
        return None

    @staticmethod
    def _split(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], Any]:
        """The batch's tensors (graph inputs) and a hashable description of everything else."""
        tensors: list[torch.Tensor] = []
        layout = []
        for key, value in [*enumerate(args), *sorted(kwargs.items())]:
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                layout.append((key, "tensor", tuple(value.shape), value.dtype, value.device))
            elif isinstance(value, _CONSTANTS):
                layout.append((key, "constant", value))
            else:
                raise _Uncompilable(
                    f"a batch holds a {type(value).__name__}: only tensors and "
                    "plain constants can be a compiled step's inputs"
                )
        return tensors, tuple(layout)

    # --- capture ---------------------------------------------------------------------------

    def _adam_state(self) -> tuple[list, list, list]:
        state = self.optimizer.state
        for p in self.params:
            if "exp_avg" not in state[p]:  # as Adam initializes it on its first step
                state[p]["step"] = torch.tensor(0.0)
                state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return (
            [state[p]["exp_avg"] for p in self.params],
            [state[p]["exp_avg_sq"] for p in self.params],
            [state[p]["step"] for p in self.params],
        )

    def _step_function(self, layout: Any, num_data: int) -> Callable:
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        param_names, buffer_names, wrapper = self.param_names, self.buffer_names, self.wrapper

        def step(params, buffers, exp_avgs, exp_avg_sqs, steps, lr, tensors):
            it = iter(tensors)
            args, kwargs = [], {}
            for entry in layout:
                value = next(it) if entry[1] == "tensor" else entry[2]
                if isinstance(entry[0], int):
                    args.append(value)
                else:
                    kwargs[entry[0]] = value
            swapped = {f"pair.{n}": p for n, p in zip(param_names, params)}
            swapped.update({f"pair.{n}": b for n, b in zip(buffer_names, buffers)})
            loss = torch.func.functional_call(wrapper, swapped, (tuple(args), kwargs))
            grads = torch.autograd.grad(loss / num_data, params, allow_unused=True)
            with torch.no_grad():  # torch.optim.Adam's update (single-tensor form)
                for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                    if g is None:
                        g = torch.zeros_like(p)
                    t.add_(1)
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    step_size = lr / (1 - beta1**t)
                    denom = (v.sqrt() / (1 - beta2**t).sqrt()).add_(eps)
                    p.sub_(step_size * m / denom)
            return loss.detach()

        return step

    def _inputs(self, tensors: list[torch.Tensor]) -> tuple:
        exp_avgs, exp_avg_sqs, steps = self._adam_state()
        lr = torch.tensor(float(self.optimizer.param_groups[0]["lr"]))
        params = [p.detach() for p in self.params]
        buffers = [b for _, b in self.module.named_buffers()]
        return params, buffers, exp_avgs, exp_avg_sqs, steps, lr, tensors

    def _warm_up(self, args: tuple, kwargs: dict) -> None:
        """One eager loss, without gradients, on a fork of the random state and with the
        buffers restored afterwards: what the estimator learns about a pair on its first call
        (whether its networks take a particle dimension, its plate nesting) is learnt by
        running the pair on real values, which a trace on fake tensors cannot do."""
        saved = [b.detach().clone() for b in self.module.buffers()]
        try:
            with (
                forked_rng(),
                torch.no_grad(),
                pyro.get_param_store().scope(),
                pyro.validation_enabled(False),
            ):
                self.wrapper(args, kwargs)
        finally:
            with torch.no_grad():
                for buffer, value in zip(self.module.buffers(), saved):
                    buffer.copy_(value)

    def _capture(
        self, tensors: list[torch.Tensor], layout: Any, num_data: int, args: tuple, kwargs: dict
    ) -> Callable:
        self._warm_up(args, kwargs)
        function = self._step_function(layout, num_data)
        params, buffers, exp_avgs, exp_avg_sqs, steps, lr, _ = self._inputs(tensors)
        leaves = [p.detach().requires_grad_() for p in params]
        start = time.perf_counter()
        try:
            # validation checks values, which a graph cannot: training runs without it anyway
            with pyro.get_param_store().scope(), pyro.validation_enabled(False):
                graph = make_fx(function, tracing_mode="fake")(
                    leaves, buffers, exp_avgs, exp_avg_sqs, steps, lr, tensors
                )
        except Exception as exc:
            if "FakeTensor" in str(exc) and "allow_non_fake_inputs" in str(exc):
                raise _Uncompilable(  # a graph would bake the tensor's current value in
                    "the pair uses a tensor that is neither a parameter, a buffer nor an "
                    "argument (a plain tensor attribute? register it with register_buffer)"
                ) from None
            raise _Uncompilable(
                "the step could not be captured as a graph (does the pair's "
                f"control flow depend on the data's values?): "
                f"{_first_line(exc)}"
            ) from None
        if self.backend is not None:
            graph = torch.compile(graph, backend=self.backend, dynamic=False, fullgraph=True)
        self.compile_seconds += time.perf_counter() - start
        return graph

    # --- a step ------------------------------------------------------------------------------

    def __call__(self, args: tuple, kwargs: dict, num_data: int) -> torch.Tensor:
        if self.disabled:
            self.eager_steps += 1
            return self.eager(args, kwargs, num_data)
        try:
            tensors, layout = self._split(args, kwargs)
        except _Uncompilable as exc:
            return self._give_up(str(exc), args, kwargs, num_data)
        key = (
            layout,
            num_data,
            float(self.estimator.beta),
            float(getattr(self.estimator, "global_weight", 1.0)),
        )
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                if not self._capped:
                    self._capped = True
                    self.log(
                        f"compiled steps: more than {self.max_graphs} input signatures "
                        "(batch shapes, β values); the others run eagerly"
                    )
                self.eager_steps += 1
                return self.eager(args, kwargs, num_data)
            try:
                self.graphs[key] = self._capture(tensors, layout, num_data, args, kwargs)
            except _Uncompilable as exc:
                return self._give_up(str(exc), args, kwargs, num_data)
            first = True
        else:
            first = False
        start = time.perf_counter()
        try:
            if first:  # torch.compile compiles now; its internal notices are not the user's
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loss = self.graphs[key](*self._inputs(tensors))
            else:
                loss = self.graphs[key](*self._inputs(tensors))
        except Exception as exc:
            if not first:
                raise
            return self._give_up(
                f"the graph could not be compiled: {_first_line(exc)}", args, kwargs, num_data
            )
        if first:  # torch.compile compiles on the first call
            self.compile_seconds += time.perf_counter() - start
        self.compiled_steps += 1
        return loss

    def _give_up(self, why: str, args: tuple, kwargs: dict, num_data: int) -> torch.Tensor:
        self.disabled = why
        self.graphs.clear()
        self.log(f"compiled steps off: {why}; training eagerly")
        self.eager_steps += 1
        return self.eager(args, kwargs, num_data)
