"""A model and a guide in any form a Pyro user writes them, as one module the engine can train.

:func:`pyro_vae.fit` trains a :class:`torch.nn.Module` with ``model`` and ``guide`` methods.
Pyro users also write the pair as two plain functions whose parameters are ``pyro.param``
entries of Pyro's param store, as a :class:`~pyro.nn.PyroModule` model with an AutoGuide
(``AutoNormal``, ``AutoDelta``, ...), or as a mix. :class:`PyroPair` holds such a pair: the
modules among the two (an AutoGuide, a ``PyroModule``) are its submodules, and every other
``pyro.param`` entry that the pair reads is adopted the first time it is read: the store's
unconstrained tensor becomes an :class:`~torch.nn.Parameter` of the pair (the same storage, so
the same numbers) and the store is pointed at it. From then on the pair owns the entry: one
optimizer over ``pair.parameters()`` trains it, its ``state_dict`` checkpoints it by name
(``param_store.<name>``, a ``.`` in the name written ``:``), and every run of the pair puts its
own tensor back in the current param store, so ``pyro.clear_param_store()`` or a scoped store
does not lose it. Constraints are Pyro's: the entry's unconstrained value is what is trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import nn

from pyro_vae.util.errors import ConfigError
from pyro_vae.util.module_state import running_statistics_kept
from pyro_vae.util.rng import forked_rng


@contextmanager
def isolated_run(module: Any, validate: bool | None = None) -> Iterator[None]:
    """Run the block as a look at the pair ``module`` that leaves nothing behind: hidden from
    the effect handlers around it (``poutine.block``), on a fork of the random state, in an
    empty param store (so a stale entry under one of the pair's names cannot mislead, and
    none is left), with the running statistics of ``module``'s BatchNorm layers kept.
    ``validate`` turns Pyro's validation on or off inside (``None``: as it is)."""
    with ExitStack() as stack:
        stack.enter_context(poutine.block())
        stack.enter_context(forked_rng())
        if validate is not None:
            stack.enter_context(pyro.validation_enabled(validate))
        stack.enter_context(pyro.get_param_store().scope())
        stack.enter_context(running_statistics_kept(module))
        yield


def _key(name: str) -> str:
    return name.replace(".", ":")


class _AdoptParams(Messenger):
    """Hands every ``pyro.param`` read of a run to :meth:`PyroPair._param` first."""

    def __init__(self, pair: PyroPair):
        super().__init__()
        self.pair = pair

    def _pyro_param(self, msg: dict) -> None:
        self.pair._param(msg)


class PyroPair(nn.Module):
    """``model`` and ``guide`` (callables, modules or not) as one :class:`torch.nn.Module` with
    ``model`` and ``guide`` methods that owns every parameter the two read (see the module
    docstring). Call :meth:`discover` on a batch before building an optimizer: parameters
    that ``pyro.param`` creates lazily exist only after a first run. ``data_plate`` names the
    plate that indexes datapoints where several plates hold every site (the ``data_plate``
    attribute that the engine reads)."""

    def __init__(self, model: Callable, guide: Callable, data_plate: str | None = None):
        super().__init__()
        if data_plate is not None:
            if not isinstance(data_plate, str):
                raise ConfigError(f"data_plate must be a plate's name, got {data_plate!r}")
            self.data_plate = data_plate
        for role, fn in (("model", model), ("guide", guide)):
            if not callable(fn):
                raise ConfigError(f"the {role} must be callable, got {type(fn).__name__}")
        self._model_fn, self._guide_fn = model, guide
        # the modules the two are, or whose methods they are: their parameters, buffers and
        # train/eval mode are the pair's
        guide_module, model_module = (
            fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
            for fn in (guide, model)
        )
        if isinstance(guide_module, nn.Module):
            self.guide_module = guide_module
        if isinstance(model_module, nn.Module) and model_module is not guide_module:
            self.model_module = model_module
        self.param_store = nn.ParameterDict()
        self._constraints: dict[str, Any] = {}
        self._owned: set[int] | None = None
        self._pending: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"PyroPair(model={_describe(self._model_fn)}, guide={_describe(self._guide_fn)})"

    def model(self, *args: Any, **kwargs: Any) -> Any:
        with _AdoptParams(self):
            return self._model_fn(*args, **kwargs)

    def guide(self, *args: Any, **kwargs: Any) -> Any:
        with _AdoptParams(self):
            return self._guide_fn(*args, **kwargs)

    @property
    def adopted(self) -> list[str]:
        """The param-store names of the entries this pair owns, in the order first read."""
        return list(self._constraints)

    def discover(self, *args: Any, **kwargs: Any) -> None:
        """Run the guide, and the model replayed on it, once on a batch (random state forked,
        running statistics kept), so that every parameter the pair creates lazily exists and
        is adopted. It runs in an empty param store: an entry the pair has not adopted yet
        starts from its initial value, whatever the global store holds under its name (as
        after ``pyro.clear_param_store()``); the pair's own entries are kept, and are in the
        current param store afterwards."""
        with isolated_run(self):
            guide_trace = poutine.trace(self.guide).get_trace(*args, **kwargs)
            poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(*args, **kwargs)
        self._owned = None
        if self._constraints:
            pyro.get_param_store().set_state(
                {
                    "params": {name: self.param_store[_key(name)] for name in self._constraints},
                    "constraints": dict(self._constraints),
                }
            )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a ``state_dict``; a param-store entry that this pair has not read yet is kept
        and loaded into the entry when the pair first reads it."""
        state, prefix = dict(state_dict), "param_store."
        for key in [k for k in state if k.startswith(prefix)]:
            if key[len(prefix) :] not in self.param_store:
                self._pending[key[len(prefix) :]] = state.pop(key)
        return super().load_state_dict(state, strict=strict, assign=assign)

    def _param(self, msg: dict) -> None:
        """Before a ``pyro.param`` read: put an adopted entry back into the current store, or
        adopt an entry read for the first time (created as the read would create it)."""
        name = msg["name"]
        store = pyro.get_param_store()
        key = _key(name)
        if key in self.param_store:
            param = self.param_store[key]
            if name not in store or store.get_param(name).unconstrained() is not param:
                store.set_state(
                    {"params": {name: param}, "constraints": {name: self._constraints[name]}}
                )
            return
        value = msg["fn"](*msg["args"], **msg["kwargs"])
        unconstrained = value.unconstrained()
        if self._owned is None:
            self._owned = {id(p) for p in self.parameters()}
        if id(unconstrained) in self._owned or not unconstrained.requires_grad:
            return  # a module's own (PyroModule, pyro.module) or a frozen entry
        # a tensor of the user's own, such as the parameter of a module outside the pair that
        # pyro.module registers, is adopted as it is: the module computes with it
        param = (
            unconstrained
            if isinstance(unconstrained, nn.Parameter)
            else nn.Parameter(unconstrained.detach())
        )
        if key in self._pending:
            with torch.no_grad():
                param.copy_(self._pending.pop(key))
        constraint = store.get_state()["constraints"].get(name)
        self.param_store[key] = param
        self._constraints[name] = constraint
        self._owned.add(id(param))
        store.set_state({"params": {name: param}, "constraints": {name: constraint}})


def _describe(fn: Callable) -> str:
    if isinstance(fn, nn.Module):
        return type(fn).__name__
    return getattr(fn, "__qualname__", type(fn).__name__)


def is_pair_module(obj: Any) -> bool:
    """Whether ``obj`` is a module with callable ``model`` and ``guide`` (the engine's form)."""
    return (
        isinstance(obj, nn.Module)
        and callable(getattr(obj, "model", None))
        and callable(getattr(obj, "guide", None))
    )


def as_pair(model: Any, guide: Any = None) -> Any:
    """The engine's form of a pair: ``model`` itself when it is a module with ``model`` and
    ``guide`` methods and no ``guide`` is given, else :class:`PyroPair` of the two; a
    ``(model, guide)`` tuple is unpacked. ``None`` stays ``None`` (the built-in model).

    :raises ConfigError: for a model without a guide, or a guide given beside a pair module.
    """
    if isinstance(model, tuple):
        if len(model) != 2 or guide is not None:
            raise ConfigError("a pair given as a tuple must be (model, guide)")
        model, guide = model
    if model is None:
        if guide is not None:
            raise ConfigError("a guide was given without a model")
        return None
    if guide is None:
        if is_pair_module(model):
            return model
        raise ConfigError(
            f"{_describe(model)} is not a model/guide pair: give the guide too, "
            "fit(model, guide, data), or a torch.nn.Module with model and guide "
            "methods"
        )
    if is_pair_module(model) and not isinstance(model, pyro.nn.PyroModule):
        raise ConfigError(
            f"{type(model).__name__} already has model and guide methods: give it "
            "alone, or pass its model method with the other guide"
        )
    return PyroPair(model, guide)
