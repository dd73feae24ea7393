"""torch's optimizers by name: :data:`OPTIMIZERS` and :func:`make_optimizer`, which builds one
with a learning rate and the optimizer's own keyword options."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

#: optimizers whose step is not a gradient step on dense gradients: L-BFGS needs a closure
#: that evaluates the loss again, SparseAdam sparse gradients, Muon 2-D parameters only
NOT_STEPPED = ("LBFGS", "SparseAdam", "Muon")
#: every other optimizer class of :mod:`torch.optim` by its lower-case name (``"adam"``,
#: ``"sgd"``, ...)
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    name.lower(): cls
    for name, cls in sorted(vars(torch.optim).items())
    if isinstance(cls, type)
    and issubclass(cls, torch.optim.Optimizer)
    and cls is not torch.optim.Optimizer
    and name not in NOT_STEPPED
}


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    name: str = "adam",
    options: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (:data:`OPTIMIZERS`) over ``params`` with learning rate ``lr`` and
    its keyword ``options`` (``momentum``, ``betas``, ``weight_decay``, ...). Adam uses torch's
    fused kernel where the device has one, plain Adam otherwise (the same update up to float
    rounding).

    :raises ValueError: for an unknown name; torch's own ``TypeError`` / ``ValueError`` for an
        option the optimizer does not take or a bad value.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    params, options = list(params), dict(options or {})
    cls = OPTIMIZERS[name]
    if cls is torch.optim.Adam and "fused" not in options:
        try:
            return cls(params, lr=lr, fused=True, **options)
        except RuntimeError:
            pass
    return cls(params, lr=lr, **options)


#: schedulers that take functions or other schedulers, which a run's config cannot hold
NOT_NAMED = ("ChainedScheduler", "LambdaLR", "MultiplicativeLR", "SequentialLR")
#: the other learning-rate schedulers of :mod:`torch.optim.lr_scheduler` by lower-case name
#: (``"steplr"``, ``"cosineannealinglr"``, ``"reducelronplateau"``, ...)
SCHEDULERS: dict[str, type] = {
    name.lower(): cls
    for name, cls in sorted(vars(torch.optim.lr_scheduler).items())
    if isinstance(cls, type)
    and issubclass(cls, torch.optim.lr_scheduler.LRScheduler)
    and not name.startswith("_")
    and cls is not torch.optim.lr_scheduler.LRScheduler
    and name not in NOT_NAMED
}


def make_scheduler(
    optimizer: torch.optim.Optimizer, name: str, options: Mapping[str, Any] | None = None
) -> Any:
    """The learning-rate scheduler ``name`` (:data:`SCHEDULERS`) of ``optimizer`` with its
    keyword ``options`` (``step_size``, ``gamma``, ``T_max``, ...).

    :raises ValueError: for an unknown name; torch's own errors for a bad option.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](optimizer, **dict(options or {}))
