"""Compiled SVI steps for any model/guide pair and any estimator.

A step (the estimator's loss, its gradients and Adam's update) is captured once per input
signature as a static graph of tensor operations (:mod:`pyro_vae.train.capture`): the
estimator runs as ordinary Python, Pyro's effect handlers included, under
:func:`torch.fx.experimental.proxy_tensor.make_fx` on fake tensors, with the parameters,
buffers, Adam's state, the learning rate and the batch as the graph's inputs. Nothing of Pyro is
left in the graph, only the operations it issued; the random draws are operations of the graph
too, so every call draws afresh. The graph is compiled by inductor as it is (no dynamo in front
of it, so no guards checked at each call; :mod:`pyro_vae.train.compile_cache`, which also keeps
the compiled code for later runs) and called once per step with inputs gathered once: the
parameters, buffers and Adam's state (the optimizer's own state dict, so checkpoints and
resuming work as for an eager step), which it updates in place, and the learning rate, a 0-d
tensor refilled only when the optimizer's rate changes (a schedule).

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
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch

from pyro_vae.infer import ELBOEstimator
from pyro_vae.train.capture import Loss, capture, step_function, warm_up
from pyro_vae.train.compile_cache import STANDALONE, GraphCache, cache_folder
from pyro_vae.train.loop import Callback, Loop
from pyro_vae.util.rng import forked_rng

DEFAULT_MAX_GRAPHS = 4
#: compiled calls timed after a graph is made, and throwaway eager steps timed beside them
TIMED_STEPS = 5
_CONSTANTS = (type(None), bool, int, float, str)


class _Uncompilable(Exception):
    """Why a step cannot be compiled (one line)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip(": ")


@dataclass
class Graph:
    """One signature's compiled step: ``run(*inputs)`` and what it was made of."""

    run: Callable[..., Any]
    module: torch.fx.GraphModule
    constants: list[torch.Tensor]
    #: whether its compiled code came from :mod:`~pyro_vae.train.compile_cache`
    loaded: bool = False
    key: str | None = None
    #: the fixed inputs before the batch's tensors, and the constants after them
    fixed: list[torch.Tensor] = field(default_factory=list)
    #: seconds of the first compiled calls (min taken), filled while ``timed`` < TIMED_STEPS
    compiled_seconds: float = float("inf")
    timed: int = 0


class CompiledStep:
    """``step(args, kwargs, num_data)``: one SVI step on a batch, compiled per signature.

    :param module: the pair (``module.model``, ``module.guide``).
    :param estimator: the ELBO estimator; its ``beta`` and ``global_weight`` at capture time are
        part of the signature.
    :param optimizer: a :class:`torch.optim.Adam` over the module's parameters (one parameter
        group, no weight decay, no AMSGrad); its state is updated in place.
    :param loss: the summed loss of a batch, ``loss(*args, **kwargs)``.
    :param eager: the eager step, ``eager(args, kwargs, num_data)``, for what is not compiled.
    :param backend: ``"inductor"`` (compiled as is, and kept in ``cache``), another
        :func:`torch.compile` backend, or ``None`` to run the captured graph as is.
    :param log: where the one-line notes go (compile times, fallbacks).
    :param cache: where compiled graphs are kept across runs (default: a
        :class:`~pyro_vae.train.compile_cache.GraphCache` in
        :func:`~pyro_vae.train.compile_cache.cache_folder`).
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
        cache: GraphCache | None = None,
    ):
        self.module, self.estimator, self.optimizer = module, estimator, optimizer
        self.eager, self.backend, self.max_graphs, self.log = eager, backend, max_graphs, log
        self.cache = cache if cache is not None else GraphCache(cache_folder(), log)
        self.wrapper = Loss(module, loss)
        self.graphs: dict[Any, Graph] = {}
        self.compile_seconds = 0.0
        #: the fastest of a few throwaway eager steps, timed when the first graph is made
        self.eager_step_seconds: float | None = None
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
        self._state: Any = None  # the optimizer state dict the fixed inputs were gathered from
        self._lr_value: Any = None
        self._lr = torch.zeros(())  # the learning rate as the graphs' input, refilled in place
        self._shared: list[torch.Tensor] = []

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
    def split(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], Any]:
        """The batch's tensors (graph inputs) and a hashable description of everything else."""
        tensors: list[torch.Tensor] = []
        layout = []
        items = enumerate(args) if not kwargs else [*enumerate(args), *sorted(kwargs.items())]
        for key, value in items:
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                layout.append((key, "tensor", value.shape, value.dtype, value.device))
            elif isinstance(value, _CONSTANTS):
                layout.append((key, "constant", value))
            else:
                raise _Uncompilable(
                    f"a batch holds a {type(value).__name__}: only tensors and "
                    "plain constants can be a compiled step's inputs"
                )
        return tensors, tuple(layout)

    # --- inputs ----------------------------------------------------------------------------

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

    def _gather(self) -> None:
        """The inputs every graph shares, gathered again only when the optimizer's state dict
        was replaced (``load_state_dict``): parameters, buffers, Adam's state, the rate."""
        exp_avgs, exp_avg_sqs, steps = self._adam_state()
        params = [p.detach() for p in self.params]
        buffers = [b for _, b in self.module.named_buffers()]
        self._shared = [*params, *buffers, *exp_avgs, *exp_avg_sqs, *steps, self._lr]
        self._state = self.optimizer.state
        for graph in self.graphs.values():
            graph.fixed = self._shared

    def _set_lr(self) -> None:
        value = self.optimizer.param_groups[0]["lr"]
        if value is not self._lr_value or isinstance(value, torch.Tensor):  # a new rate
            self._lr.fill_(float(value))
            self._lr_value = value

    # --- capture and compile ---------------------------------------------------------------

    def _make(self, tensors: list[torch.Tensor], layout: Any, num_data: int, args, kwargs):
        warm_up(self.module, self.wrapper, args, kwargs)
        group = self.optimizer.param_groups[0]
        function = step_function(
            self.wrapper,
            self.param_names,
            self.buffer_names,
            group["betas"],
            group["eps"],
            layout,
            num_data,
        )
        self._gather()
        self._set_lr()
        inputs = [*self._shared, *tensors]
        start = time.perf_counter()
        try:
            graph, constants = capture(function, inputs, len(self.params))
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
        made = Graph(graph, graph, constants, fixed=self._shared)
        if self.backend is not None:
            self._compile(made, [*inputs, *constants])
        self.compile_seconds += time.perf_counter() - start
        if self.eager_step_seconds is None:
            self.eager_step_seconds = self._time_eager(args, kwargs, num_data)
        return made

    def _compile(self, made: Graph, inputs: list[torch.Tensor]) -> None:
        """``made.run``: its graph compiled, or loaded from the cache."""
        try:
            with warnings.catch_warnings():  # torch's internal notices are not the user's
                warnings.simplefilter("ignore")
                if self.backend == "inductor" and STANDALONE:
                    made.run, made.loaded, made.key = self.cache.compiled(made.module, inputs)
                else:  # a lazy backend: torch.compile compiles on the first call
                    made.run = torch.compile(
                        made.module, backend=self.backend, dynamic=False, fullgraph=True
                    )
        except Exception as exc:
            raise _Uncompilable(f"the graph could not be compiled: {_first_line(exc)}") from None

    def _time_eager(self, args: tuple, kwargs: dict, num_data: int) -> float | None:
        """The fastest of :data:`TIMED_STEPS` eager steps on copies of the parameters, buffers
        and optimizer (random state forked): what a compiled step saves is measured against
        it. ``None`` if such a step fails."""
        group = self.optimizer.param_groups[0]
        params = [p.detach().clone().requires_grad_() for p in self.params]
        swapped = {f"pair.{n}": p for n, p in zip(self.param_names, params)}
        swapped.update({f"pair.{n}": b.clone() for n, b in self.module.named_buffers()})
        adam = torch.optim.Adam(
            params, lr=group["lr"], betas=group["betas"], eps=group["eps"], foreach=False
        )
        sync = _synchronizer(params)
        best = float("inf")
        try:
            with forked_rng(), pyro.get_param_store().scope(), pyro.validation_enabled(False):
                for _ in range(TIMED_STEPS):
                    sync()
                    start = time.perf_counter()
                    adam.zero_grad(set_to_none=True)
                    loss = torch.func.functional_call(self.wrapper, swapped, (args, kwargs))
                    (loss / num_data).backward()
                    adam.step()
                    sync()
                    best = min(best, time.perf_counter() - start)
        except Exception:  # the estimate is a report; training does not depend on it
            return None
        return best

    # --- a step ------------------------------------------------------------------------------

    def __call__(self, args: tuple, kwargs: dict, num_data: int) -> torch.Tensor:
        if self.disabled:
            self.eager_steps += 1
            return self.eager(args, kwargs, num_data)
        try:
            tensors, layout = self.split(args, kwargs)
        except _Uncompilable as exc:
            return self._give_up(str(exc), args, kwargs, num_data)
        key = (
            layout,
            num_data,
            float(self.estimator.beta),
            float(getattr(self.estimator, "global_weight", 1.0)),
        )
        graph = self.graphs.get(key)
        if graph is None:
            if len(self.graphs) >= self.max_graphs:
                return self._past_cap(args, kwargs, num_data)
            try:
                graph = self.graphs[key] = self._make(tensors, layout, num_data, args, kwargs)
            except _Uncompilable as exc:
                return self._give_up(str(exc), args, kwargs, num_data)
        if self._state is not self.optimizer.state:
            self._gather()
        self._set_lr()
        if graph.timed < TIMED_STEPS:
            return self._first_calls(graph, key, tensors, args, kwargs, num_data)
        self.compiled_steps += 1
        return graph.run(*graph.fixed, *tensors, *graph.constants)[0]

    def _first_calls(self, graph: Graph, key: Any, tensors, args, kwargs, num_data):
        """A graph's first calls: timed (the report of what compiling saves), and the first
        one guarded: a graph loaded from the cache that fails is compiled afresh, one that
        was just compiled and fails turns compiled steps off."""
        sync = _synchronizer(tensors or graph.fixed)
        inputs = [*graph.fixed, *tensors, *graph.constants]
        if graph.timed == 0 and graph.loaded:  # the loaded code on copies of the state first
            try:
                with forked_rng(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    graph.run(*[t.clone() for t in inputs])
            except Exception as exc:  # an entry torch loaded but cannot run: compile afresh
                self.cache.reject(graph.key, exc)
                start = time.perf_counter()
                try:
                    self._compile(graph, inputs)
                except _Uncompilable as why:
                    return self._give_up(str(why), args, kwargs, num_data)
                self.compile_seconds += time.perf_counter() - start
        sync()
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = graph.run(*inputs)[0]
        except Exception as exc:
            if graph.timed:
                raise
            return self._give_up(
                f"the graph could not be compiled: {_first_line(exc)}", args, kwargs, num_data
            )
        sync()
        seconds = time.perf_counter() - start
        if graph.timed == 0 and not graph.loaded:  # a lazy backend compiles on its first call
            self.compile_seconds += seconds
        else:
            graph.compiled_seconds = min(graph.compiled_seconds, seconds)
        graph.timed += 1
        self.compiled_steps += 1
        return loss

    def _past_cap(self, args: tuple, kwargs: dict, num_data: int) -> torch.Tensor:
        if not self._capped:
            self._capped = True
            self.log(
                f"compiled steps: more than {self.max_graphs} input signatures "
                "(batch shapes, β values); the others run eagerly"
            )
        self.eager_steps += 1
        return self.eager(args, kwargs, num_data)

    def _give_up(self, why: str, args: tuple, kwargs: dict, num_data: int) -> torch.Tensor:
        self.disabled = why
        self.graphs.clear()
        self.log(f"compiled steps off: {why}; training eagerly")
        self.eager_steps += 1
        return self.eager(args, kwargs, num_data)

    # --- the report --------------------------------------------------------------------------

    @property
    def compiled_step_seconds(self) -> float | None:
        """The fastest timed call of the graphs made so far (``None`` before one ran)."""
        times = [g.compiled_seconds for g in self.graphs.values()]
        best = min(times, default=float("inf"))
        return best if best < float("inf") else None

    def report(self, steps_per_epoch: int) -> str:
        """One line: how long compiling took (and what came from the cache), the measured
        eager and compiled step times, and after how many epochs of ``steps_per_epoch``
        steps the compile has paid for itself."""
        made = list(self.graphs.values())
        loaded = sum(g.loaded for g in made)
        cached = f", {loaded} loaded from the compile cache" if loaded else ""
        text = (
            f"compiled steps: compiling took {self.compile_seconds:.1f} s "
            f"({len(made)} graph(s){cached})"
        )
        eager, compiled = self.eager_step_seconds, self.compiled_step_seconds
        if eager is None or compiled is None:
            return text
        text += f"; a step takes {compiled * 1e3:.3g} ms compiled, {eager * 1e3:.3g} ms eagerly"
        saved = (eager - compiled) * steps_per_epoch
        if saved <= 0:
            return f"{text}: compiling does not pay on this pair"
        return f"{text}: it pays after {self.compile_seconds / saved:.3g} epoch(s)"


class CompileReport(Callback):
    """After the first epoch this process trains: :meth:`CompiledStep.report`'s line, when
    compiled steps are on."""

    def __init__(self, step: CompiledStep, log: Callable[[str], None]):
        self.step, self.log, self.done = step, log, False

    def on_epoch_end(self, loop: Loop) -> None:
        if not self.done and self.step.disabled is None and self.step.graphs:
            steps = loop.replicas.steps_per_epoch(loop.data.source, loop.data.batch_size)
            self.log(f"epoch {loop.epoch}: {self.step.report(steps)}")
        self.done = True


def _synchronizer(tensors: list[torch.Tensor]) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA), so that a timing covers it."""
    for t in tensors:
        if t.device.type == "cuda":
            return lambda: torch.cuda.synchronize(t.device)
    return lambda: None
